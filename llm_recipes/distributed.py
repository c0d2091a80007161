"""Process group, sharding, and the collectives and state dicts the training loop needs.

Under torchrun (WORLD_SIZE > 1) every process joins one group (NCCL on GPUs, gloo on CPU) and the
student is always synchronized: FSDP2 with `--enable_fsdp`, DDP otherwise. One process runs without
a group, unless FSDP is asked for (then a one-process group, so the same sharded code path, mixed
precision policy and CPU offload apply); the helpers below reduce to no-ops without a group, so the
loop reads the same in every case.

FSDP2 and our loss code: `models.forward_hidden` stops the model's forward before its output
projection, and the loss code calls the projection afterwards, chunk by chunk, and again inside
backward (torch.utils.checkpoint recomputes each chunk). The projection and the embeddings belong to
the root FSDP unit, whose parameters FSDP2 keeps gathered from the root's forward until its
post-backward (the root is never resharded after forward: `reshard_after_forward=False`), and the
root's gradients are reduce-scattered by FSDP2's end-of-backward callback, after every chunk's
backward has accumulated into them. So the head and tied embeddings get complete, reduced gradients
(tests/test_distributed.py compares 1 and 2 processes). A frozen teacher has no backward to release
its root, so `release` frees it after each micro-batch's backward (and both models after evaluation).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from llm_recipes.errors import UserError

# What each llama-recipes (FSDP1) sharding strategy becomes with FSDP2 (docs/distributed.md).
SHARDING_STRATEGIES = {
    "FULL_SHARD": "1-D mesh over all processes; each decoder layer is gathered for its forward and again "
                  "for its backward (ZeRO-3)",
    "SHARD_GRAD_OP": "1-D mesh; decoder layers stay gathered from forward to backward (ZeRO-2: less "
                     "communication, more memory)",
    "NO_SHARD": "2-D mesh (processes x 1): every process keeps all parameters, gradients are all-reduced "
                "(DDP with FSDP's mixed precision and CPU offload)",
    "HYBRID_SHARD": "2-D mesh (replicas x sharding_group_size): sharded within a group (by default one node), "
                    "replicated across groups",
}


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


RESHARD_AFTER_FORWARD = "_llm_distill_reshard_after_forward"  # an FSDP unit's setting, kept on the unit


def setup(fsdp: bool = False, timeout_minutes: Optional[float] = None) -> DistInfo:
    """Join torchrun's process group if there is one (or a one-process group for FSDP); pick the device.
    `timeout_minutes`: how long a collective may wait for the slowest process (NCCL's watchdog otherwise kills
    a job whose rank 0 builds a projection map or a cache index for longer than torch's default 10 minutes)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
    if not dist.is_initialized():
        if world_size > 1:
            dist.init_process_group(backend=backend, timeout=timeout)
        elif fsdp:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def finish() -> None:
    """Wait, on a run's normal end (every process gets here), until every process's collectives are done.

    gloo's barrier first waits for all of this process's work in flight, then for every process; destroying
    the group with an asynchronous collective still held by gloo's worker threads can abort a process at exit
    after a finished run (SIGABRT, "terminate called without an active exception"). Not for error paths: a
    barrier there would wait for processes that may never come."""
    barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (float64, so token counts stay exact)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """Whether `flag` is true on any process (all processes get the same answer: they act on it together)."""
    if not dist.is_initialized():
        return bool(flag)
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast_flag(flag: bool, device: Optional[torch.device] = None) -> bool:
    """Rank 0's `flag`, on every process."""
    if not dist.is_initialized():
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


# ------------------------------------------------------------------------------------------ wrapping
def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_student(model: nn.Module, cfg, info: DistInfo) -> nn.Module:
    """Put the student on the device, synchronised across processes: FSDP2 with --enable_fsdp, DDP otherwise.

    FSDP2 shards in place (the returned module is `model`) and moves one unit at a time to the device,
    so a model larger than one device can be sharded from CPU memory; DDP returns a wrapper around it.
    """
    t, f = cfg.train, cfg.fsdp
    if t.enable_fsdp:
        if f.fsdp_activation_checkpointing:
            # transformers' per-layer checkpointing keeps the parameter names of a plain model, so a
            # checkpoint stays an ordinary Hugging Face folder; FSDP2 re-gathers a layer for its recompute.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        shard(model, f.sharding_strategy, info, precision=precision_policy(t.pure_bf16, t.mixed_precision),
              cpu_offload=f.fsdp_cpu_offload, group_size=f.sharding_group_size)
        return model
    model.to(info.device)
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_teacher(model: nn.Module, distillation_config, info: DistInfo) -> nn.Module:
    """Put the frozen teacher on the device; with --distillation_config.enable_fsdp shard it on the way
    (forward only, never in the optimizer)."""
    d = distillation_config
    if not d.enable_fsdp or d.sharding_strategy == "NO_SHARD":  # a frozen replica needs no FSDP at all
        return model.to(info.device)
    shard(model, d.sharding_strategy, info, precision=precision_policy(False, d.mixed_precision),
          cpu_offload=d.fsdp_cpu_offload, group_size=0)
    return model


def precision_policy(pure_bf16: bool, mixed_precision: bool):
    """FSDP2 mixed precision: bf16 gathers and compute over fp32 shards (--mixed_precision), or bf16
    weights throughout (--pure_bf16); gradients are reduced in fp32 in both cases."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if pure_bf16:
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def device_mesh(strategy: str, info: DistInfo, group_size: int):
    """The FSDP2 mesh of a sharding strategy (see SHARDING_STRATEGIES)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if strategy == "NO_SHARD":
        shape = (world, 1)
    elif strategy == "HYBRID_SHARD":
        size = group_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if size < 1 or world % size:
            raise UserError(f"HYBRID_SHARD needs the {world} processes to split into groups of "
                            f"--fsdp_config.sharding_group_size {size}: choose a divisor of {world}")
        shape = (world // size, size)
    else:
        return init_device_mesh(info.device.type, (world,))
    return init_device_mesh(info.device.type, shape, mesh_dim_names=("replicate", "shard"))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block (decoder layers; encoder and decoder layers of a seq2seq model)."""
    from llm_recipes.models import decoder_layers

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst
              if type(m).__name__ in names]
    return blocks or list(decoder_layers(model))


def shard(model: nn.Module, strategy: str, info: DistInfo, *, precision, cpu_offload: bool, group_size: int) -> None:
    """FSDP2 in place: one unit per transformer block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if strategy not in SHARDING_STRATEGIES:  # config.validate refuses these first
        raise UserError(f"sharding strategy {strategy} is not supported: use one of {', '.join(SHARDING_STRATEGIES)}")
    offload = CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if cpu_offload else OffloadPolicy()
    common = dict(mesh=device_mesh(strategy, info, group_size), mp_policy=precision, offload_policy=offload)
    reshard_layers = strategy in ("FULL_SHARD", "HYBRID_SHARD")
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_layers, **common)
        setattr(block, RESHARD_AFTER_FORWARD, reshard_layers)  # what `gathered` restores after a generation
    # The root stays gathered after forward: the head runs after it (see the module docstring).
    fully_shard(model, reshard_after_forward=False, **common)
    setattr(model, RESHARD_AFTER_FORWARD, False)


def release(model: nn.Module | None) -> None:
    """Reshard every FSDP unit of `model` after a forward that no backward followed.

    FSDP2 reshards in post-backward; without a backward (the frozen teacher, evaluation) the root
    (embeddings, head) and, under SHARD_GRAD_OP, the layers would stay gathered, and the module would
    keep exposing gathered tensors instead of the optimizer's sharded parameters. For the teacher call
    it after the micro-batch's backward, not before: the loss code recomputes teacher logits there.
    """
    from torch.distributed.fsdp import FSDPModule

    if model is None or not is_fsdp(model):
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def gathered(model: nn.Module):
    """FSDP2: every unit of `model` stays gathered through the many forwards of a generation (one all-gather
    per unit, not one per generated token), and is resharded after it; other models: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if is_fsdp(model) else []
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, RESHARD_AFTER_FORWARD, True), recurse=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip_sync: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of an optimizer step.

    FSDP reduce-scatters every micro-batch instead: skipping it would keep a full unsharded gradient
    per process between micro-batches, the memory FSDP is there to save.
    """
    if skip_sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, extra: list[torch.Tensor] = ()) -> torch.Tensor:
    """The global gradient norm (clipped to max_norm) as a plain tensor, also for FSDP's sharded grads.

    `extra`: replicated parameters outside the student (hidden-state projections), clipped together
    with it; their norm is combined with the student's (torch cannot mix DTensors and tensors)."""
    from torch.distributed.tensor import DTensor

    if not extra:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    norms = []
    for group in (params, extra):
        grads = [p.grad for p in group if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float())
    total = torch.stack(norms).norm() if norms else torch.zeros(())
    coefficient = max_norm / (float(total) + 1e-6)
    if coefficient < 1.0:  # as torch.nn.utils.clip_grad_norm_
        for p in list(params) + list(extra):
            if p.grad is not None:
                p.grad.mul_(coefficient)
    return total


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's values of a replicated module (hidden-state projections) to every process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for tensor in module.parameters():
                dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(module: nn.Module) -> None:
    """Average the gradients of a replicated module over processes, as DDP does for the student.

    Each process's loss is scaled by the world size before backward (see the training loop), so the
    average is the gradient of the whole step's loss."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(dist.get_world_size())


# ------------------------------------------------------------------------------------- state dicts
def _full(options: dict | None = None):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **(options or {}))


def save_pretrained(model: nn.Module, path, info: DistInfo) -> None:
    """An ordinary Hugging Face folder (safetensors; the adapter alone with LoRA), written by rank 0.

    Under FSDP every process takes part in gathering the full state dict onto rank 0 (on CPU); with
    LoRA only the trainable (adapter) parameters are gathered.
    """
    if not is_fsdp(model):
        if info.is_main:
            model.save_pretrained(path)
        return
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    release(model)
    adapter_only = hasattr(model, "peft_config")
    state = get_model_state_dict(model, options=_full({"ignore_frozen_params": adapter_only}))
    if info.is_main:
        model.save_pretrained(path, state_dict=drop_tied_copies(model, state))


def drop_tied_copies(model: nn.Module, state: dict) -> dict:
    """The gathered state dict holds a separate copy per name of a tied parameter (lm_head.weight and
    embed_tokens.weight), which save_pretrained cannot recognise as tied: keep the first name only,
    as an unsharded save does."""
    first = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


STUDENT_PREFIX = "student."


def trainables(model: nn.Module, extra: nn.Module | None = None) -> nn.Module:
    """The module whose parameters the optimizer holds: the student, or (with `extra`, the hidden-state
    projections) a holder of both, `student.<name>` and `hidden_projections.<name>`."""
    if extra is None:
        return unwrap(model)
    holder = nn.Module()
    holder.student = unwrap(model)
    holder.hidden_projections = extra
    return holder


def _rename(state: dict, rename) -> dict:
    if not state:
        return state
    groups = [{**g, "params": [rename(k) for k in g["params"]]} for g in state["param_groups"]]
    return {"state": {rename(k): v for k, v in state["state"].items()}, "param_groups": groups}


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, extra: nn.Module | None = None) -> dict:
    """The optimizer's full state keyed by parameter name (on rank 0; {} elsewhere under a group).

    Keyed by name and unsharded, it is the same file for 1 process, DDP and FSDP. Student parameters
    keep their own names; `extra` (hidden-state projections) adds `hidden_projections.*` entries.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    release(model)
    state = get_optimizer_state_dict(trainables(model, extra), optimizer, options=_full())
    if extra is None:
        return state
    return _rename(state, lambda k: k[len(STUDENT_PREFIX):] if k.startswith(STUDENT_PREFIX) else k)


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                              extra: nn.Module | None = None) -> None:
    """Inverse of `optimizer_state_dict`: rank 0 holds the file's content and broadcasts it (re-sharded
    to this run's FSDP layout); the other ranks pass {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if extra is not None:
        state = _rename(state, lambda k: k if k.startswith("hidden_projections.") else STUDENT_PREFIX + k)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_optimizer_state_dict(trainables(model, extra), optimizer, optim_state_dict=state, options=options)
