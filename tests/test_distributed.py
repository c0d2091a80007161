"""Multi-process training on CPU (2 gloo processes under torchrun).

The claim under test: 2 processes with batch b train exactly what 1 process with batch 2b trains
(same per-step losses, same final weights), with DDP, FSDP2 (every sharding strategy, the teacher
sharded too, tied embeddings, activation checkpointing, CPU offload), LoRA, and LoRA + FSDP; the
student is synchronized across ranks; FSDP checkpoints are ordinary Hugging Face folders and resume
exactly. All 2-process runs share one torchrun launch (tests/multi_run.py) to pay start-up once.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from llm_recipes import distributed
from llm_recipes.config import parse_flags
from llm_recipes.errors import UserError
from llm_recipes.finetuning import train

LOSS_RTOL, WEIGHT_ATOL = 1e-6, 1e-5  # fp32: only the summation order differs between 1 and 2 processes
BF16_LOSS_RTOL, BF16_WEIGHT_ATOL = 5e-3, 5e-2  # bf16 compute: a few ulps of bf16 after 6 steps
LORA = {"use_peft": True, "lora_config.r": 4, "lora_config.lora_dropout": 0.0}
FSDP_TEACHER = {"enable_fsdp": True, "distillation_config.enable_fsdp": True}
# hidden-state term (projections 16 -> 32, replicated, all-reduced) and token selection on the KL term
METHODS = {"distillation_config.hidden_weight": 1.0, "distillation_config.token_selection": "teacher_entropy"}

# name -> (flags of the 2-process run, name of its 1-process reference)
TWO_PROCESS = {
    "ddp": ({}, "plain"),
    "fsdp": ({"enable_fsdp": True}, "plain"),
    "fsdp_teacher_tied": ({**FSDP_TEACHER, "model_name": "TIED"}, "tied"),
    "ddp_teacher_fsdp": ({"distillation_config.enable_fsdp": True}, "plain"),
    # ULD's gradient is discontinuous in the logits (a sort, then |p - q|, whose sign flips where a sorted
    # student probability crosses the teacher's): the 1e-8 weight differences that summation order leaves
    # after a few steps eventually flip one sign (measured: at step 3, one lm_head row's gradient moves by
    # 1.6e-4, while FSDP's gradient at FSDP's own weights equals the 1-process gradient to 2e-8). So
    # ULD is compared over the first 2 steps, which checks its cross-rank normalisation exactly.
    "fsdp_teacher_uld": ({**FSDP_TEACHER, "distillation_config.loss": "uld", "max_train_step": 2}, "uld"),
    "no_shard": ({"enable_fsdp": True, "fsdp_config.sharding_strategy": "NO_SHARD"}, "plain"),
    "shard_grad_op": ({**FSDP_TEACHER, "fsdp_config.sharding_strategy": "SHARD_GRAD_OP",
                       "distillation_config.sharding_strategy": "SHARD_GRAD_OP"}, "plain"),
    "hybrid_shard": ({**FSDP_TEACHER, "fsdp_config.sharding_strategy": "HYBRID_SHARD",
                      "distillation_config.sharding_strategy": "HYBRID_SHARD"}, "plain"),
    "checkpointing_offload": ({**FSDP_TEACHER, "fsdp_config.fsdp_activation_checkpointing": True,
                               "fsdp_config.fsdp_cpu_offload": True, "distillation_config.fsdp_cpu_offload": True},
                              "plain"),
    "adamw_fsdp": ({"enable_fsdp": True, "optimizer": "AdamW", "lr": 1e-3, "save_step": 3, "save_all": True}, "adamw"),
    "lora": (LORA, "lora"),
    "lora_fsdp": ({**LORA, "enable_fsdp": True, "save_step": 3, "save_all": True}, "lora"),
    "mixed_precision_fsdp": ({**FSDP_TEACHER, "mixed_precision": True, "distillation_config.mixed_precision": True},
                             "mixed_precision_fsdp"),
    "pure_bf16_fsdp": ({**FSDP_TEACHER, "pure_bf16": True, "distillation_config.pure_bf16": True}, "pure_bf16_fsdp"),
    "ddp_methods": (METHODS, "methods"),
    "fsdp_methods": ({**METHODS, "enable_fsdp": True, "save_step": 3, "save_all": True}, "methods"),
    # a student with its own tokenizer, answer tokens paired by text (alignment groups in the batches)
    "fsdp_projected_text": ({**FSDP_TEACHER, "model_name": "OTHER", "distillation_config.loss": "projected",
                             "save_step": 3, "save_all": True}, "projected_text"),
    "ddp_hybrid_text": ({"model_name": "OTHER", "distillation_config.loss": "hybrid", "max_train_step": 2},
                        "hybrid_text"),  # ULD on the unshared tokens: compared over 2 steps, as ULD above
    # the teacher's whole distribution from a cache (float32): each rank reads its own examples' rows
    "ddp_teacher_cache": ({"distillation_config.teacher_cache": "CACHE"}, "plain"),
}
ONE_PROCESS = {
    "plain": {},
    "tied": {"model_name": "TIED"},
    "uld": {"distillation_config.loss": "uld", "max_train_step": 2},
    "adamw": {"optimizer": "AdamW", "lr": 1e-3},
    "lora": LORA,
    "methods": METHODS,
    "projected_text": {"model_name": "OTHER", "distillation_config.loss": "projected"},
    "hybrid_text": {"model_name": "OTHER", "distillation_config.loss": "hybrid", "max_train_step": 2},
    # bf16 runs are compared with the same FSDP precision policy in one process (a one-process group)
    "mixed_precision_fsdp": TWO_PROCESS["mixed_precision_fsdp"][0],
    "pure_bf16_fsdp": TWO_PROCESS["pure_bf16_fsdp"][0],
}
BF16 = {"mixed_precision_fsdp", "pure_bf16_fsdp"}
# On-policy runs: each process samples its own answers, so 2 processes do not train what 1 does; they must run,
# agree on which steps are on-policy, and keep the student synchronized
ON_POLICY_FLAGS = {"distillation_config.lmbda": 0.5, "distillation_config.on_policy_max_new_tokens": 6}
ON_POLICY = {
    "ddp_on_policy": {**ON_POLICY_FLAGS, "distillation_config.lmbda": 1.0},
    "ddp_on_policy_ce": {**ON_POLICY_FLAGS, "distillation_config.lmbda": 1.0, "distillation_config.on_policy_ce": True},
    "fsdp_on_policy_projected": {**FSDP_TEACHER, **ON_POLICY_FLAGS, "model_name": "OTHER",
                                 "distillation_config.loss": "projected", "max_train_step": 4},
    "fsdp_on_policy_ce": {**FSDP_TEACHER, **ON_POLICY_FLAGS, "model_name": "OTHER", "distillation_config.lmbda": 1.0,
                          "distillation_config.loss": "projected", "distillation_config.on_policy_ce": True,
                          "max_train_step": 3},
}
RESUMED = ("adamw_fsdp", "lora_fsdp", "fsdp_methods", "fsdp_projected_text")  # resumed from their step-3 checkpoints, in the same launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(tiny, tied: str, out: Path, batch: int, extra: dict) -> dict:
    """6 optimizer steps of 2 micro-batches; SGD, constant rate, no dropout (the Llama student; same
    tokenizer as the teacher, so the loss is CE + KL unless a case asks for ULD; "OTHER": the GPT-NeoX
    student with its own tokenizer, without dropout)."""
    f = {"model_name": tiny["student_same"], "dataset.file": tiny["loader"], "output_dir": str(out),
         "distillation": True, "distillation_config.model_name": tiny["teacher"], "optimizer": "SGD", "lr": 0.5,
         "scheduler": "constant", "batch_size_training": batch, "gradient_accumulation_steps": 2,
         "val_batch_size": 4, "num_epochs": 1, "save_step": 0}
    f.update(extra)
    if f["model_name"] == "TIED":
        f["model_name"] = tied
    if f["model_name"] == "OTHER":
        f["model_name"] = other_student(tiny)
    if f.get("distillation_config.teacher_cache") == "CACHE":
        f["distillation_config.teacher_cache"] = full_teacher_cache(tiny)
    return f


def full_teacher_cache(tiny) -> str:
    """The tiny teacher's whole distribution at every answer row of the fixtures' data (float32)."""
    from configs.datasets import dataset
    from llm_distillation import cache_teacher

    path = Path(tiny["root"]) / "teacher_cache_full"
    if not (path / "cache.json").exists():
        cache_teacher.write_cache(cache_teacher.CacheArgs(model_name=tiny["teacher"], output_dir=str(path),
                                                          topk=10**6, storage="float32", progress=False),
                                  dataset(file=tiny["loader"]))
    return str(path)


def other_student(tiny) -> str:
    """The cross-tokenizer student without dropout (2 processes draw other dropout masks than 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(tiny["root"]) / "student_no_dropout"
    if not path.exists():
        config = AutoConfig.from_pretrained(tiny["student"])
        config.hidden_dropout = config.attention_dropout = 0.0
        model = AutoModelForCausalLM.from_pretrained(tiny["student"], config=config)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(tiny["student"]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tied_student(tiny):
    """The same-tokenizer Llama student with tied input and output embeddings."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    path = Path(tiny["root"]) / "student_tied"
    if not path.exists():
        config = AutoConfig.from_pretrained(tiny["student_same"])
        config.tie_word_embeddings = True
        torch.manual_seed(3)
        model = LlamaForCausalLM(config)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(tiny["student_same"]).save_pretrained(path)
    return str(path)


def launch(specs: list, folder: Path, name: str, processes: int) -> subprocess.Popen:
    """Start tests/multi_run.py over `specs` (under torchrun when processes > 1); one thread per process."""
    runs_file = folder / f"{name}.json"
    runs_file.write_text(json.dumps(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}  # the repository without an install too
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    command = [sys.executable, str(REPO / "tests" / "multi_run.py"), str(runs_file)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port())]
    log = open(folder / f"{name}.log", "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait(process: subprocess.Popen, folder: Path, name: str) -> None:
    try:
        code = process.wait(timeout=400)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert code == 0, (folder / f"{name}.log").read_text()[-6000:]


@pytest.fixture(scope="module")
def runs(tiny, tied_student, tmp_path_factory):
    """Output folders of every 2-process run and every 1-process reference (both launches run at once)."""
    root = tmp_path_factory.mktemp("distributed")
    two = [{"flags": flags(tiny, tied_student, root / name, 2, extra), "dump": name == "ddp"}
           for name, (extra, _) in TWO_PROCESS.items()]
    for name in RESUMED:
        resume_from = root / name / "checkpoints" / "step-0000003"
        two.append({"flags": flags(tiny, tied_student, root / f"{name}_resumed", 2,
                                   {**TWO_PROCESS[name][0], "resume_from": str(resume_from)})})
    ddp_extra = {k: v for k, v in TWO_PROCESS["adamw_fsdp"][0].items() if k != "enable_fsdp"}
    two.append({"flags": flags(tiny, tied_student, root / "adamw_fsdp_resumed_under_ddp", 2,
                               {**ddp_extra, "resume_from": str(root / "adamw_fsdp" / "checkpoints" / "step-0000003")})})
    two.append({"flags": flags(tiny, tied_student, root / "unsynchronized", 2, {"run_validation": False}),
                "dump": True, "unsynchronized": True})
    for name, extra in ON_POLICY.items():
        two.append({"flags": flags(tiny, tied_student, root / name, 2, extra), "dump": name.startswith("ddp_")})
    two.append({"sample": {"model": other_student(tiny), "seed": 7, "max_new_tokens": 9,
                           "out": str(root / "fsdp_sampling")}})
    one = [{"flags": flags(tiny, tied_student, root / f"one_{name}", 4, extra)} for name, extra in ONE_PROCESS.items()]
    started = [(launch(two, root, "two", 2), "two"), (launch(one, root, "one", 1), "one")]
    for process, name in started:
        wait(process, root, name)
    return root


def train_losses(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def eval_loss(folder: Path) -> float:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "eval"][-1]["eval_loss"]


def saved_weights(folder: Path) -> dict:
    last = folder / "last"
    name = "model.safetensors" if (last / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(str(last / name))


def differences(a: Path, b: Path) -> tuple[float, float]:
    """(largest relative per-step loss difference, largest absolute final-weight difference)."""
    la, lb = train_losses(a), train_losses(b)
    assert la.keys() == lb.keys() and len(la) >= 2
    loss = max(abs(la[s] - lb[s]) / abs(la[s]) for s in la)
    wa, wb = saved_weights(a), saved_weights(b)
    assert wa.keys() == wb.keys()
    weight = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    return loss, weight


@pytest.mark.parametrize("name", list(TWO_PROCESS))
@pytest.mark.slow  # 2-process launches (the `runs` fixture: about a minute on 2 cores)
def test_two_processes_with_batch_b_match_one_process_with_batch_2b(runs, name):
    reference = runs / f"one_{TWO_PROCESS[name][1]}"
    loss, weight = differences(reference, runs / name)
    print(f"{name}: per-step loss relative difference {loss:.1e}, final weights {weight:.1e}")
    loss_rtol, weight_atol = (BF16_LOSS_RTOL, BF16_WEIGHT_ATOL) if name in BF16 else (LOSS_RTOL, WEIGHT_ATOL)
    assert loss <= loss_rtol and weight <= weight_atol
    assert abs(eval_loss(reference) - eval_loss(runs / name)) <= loss_rtol * abs(eval_loss(reference))
    if name == "pure_bf16_fsdp":
        assert {t.dtype for t in saved_weights(runs / name).values()} == {torch.bfloat16}
    if name == "mixed_precision_fsdp":  # bf16 compute over fp32 master weights
        assert {t.dtype for t in saved_weights(runs / name).values()} == {torch.float32}


@pytest.mark.slow  # 2-process launches (the `runs` fixture: about a minute on 2 cores)
def test_training_moves_the_weights(runs, tiny):
    """The equality above is not vacuous: 6 steps change every run's weights well beyond its tolerance."""
    start = load_file(str(Path(tiny["student_same"]) / "model.safetensors"))
    end = saved_weights(runs / "fsdp")
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 100 * WEIGHT_ATOL
    lora_b = [v for k, v in saved_weights(runs / "lora_fsdp").items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 100 * WEIGHT_ATOL  # B starts at zero


@pytest.mark.slow  # 2-process launches (the `runs` fixture: about a minute on 2 cores)
def test_student_is_synchronized_across_ranks(runs):
    """After DDP training both ranks hold bit-identical students; without a wrapper (the published ULD
    code's defect) the same run leaves two different students, so the check can fail."""
    rank0, rank1 = (torch.load(runs / "ddp" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    rank0, rank1 = (torch.load(runs / "unsynchronized" / f"rank{r}.pt") for r in (0, 1))
    assert max((rank0[k] - rank1[k]).abs().max().item() for k in rank0) > 1e-3


@pytest.mark.parametrize("name, resumed_name", [(n, f"{n}_resumed") for n in RESUMED]
                         + [("adamw_fsdp", "adamw_fsdp_resumed_under_ddp")])
@pytest.mark.slow  # 2-process launches (the `runs` fixture: about a minute on 2 cores)
def test_resume_under_fsdp_equals_the_straight_run(runs, name, resumed_name):
    """Also across wrappers: an FSDP checkpoint resumed under DDP (same process count)."""
    straight, resumed = runs / name, runs / resumed_name
    assert (straight / "last").resolve().name == (resumed / "last").resolve().name == "step-0000006"
    a, b = saved_weights(straight), saved_weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    la, lb = train_losses(straight), train_losses(resumed)
    assert sorted(lb) == [4, 5, 6] and all(abs(la[s] - lb[s]) <= 1e-6 * abs(la[s]) for s in lb)
    optimizer = torch.load(straight / "checkpoints" / "step-0000003" / "optimizer.pt", weights_only=True)
    names = list(optimizer["state"])  # full and keyed by name: 1 process, DDP and FSDP read the same file
    assert names and all(isinstance(n, str) for n in names)
    if name == "adamw_fsdp":
        assert optimizer["state"]["model.embed_tokens.weight"]["exp_avg"].shape == (len_vocab(straight), 16)


@pytest.mark.slow  # 2-process launches (the `runs` fixture: about a minute on 2 cores)
def test_hidden_state_projections_are_synchronised_and_resumed(runs):
    """The projections live outside the DDP/FSDP wrapper: 2 processes must still train what 1 trains,
    and an FSDP run resumed from its step-3 checkpoint must end with the same projections."""
    def projections(folder):
        return load_file(str(folder / "last" / "hidden_projections.safetensors"))

    reference = projections(runs / "one_methods")
    for name in ("ddp_methods", "fsdp_methods", "fsdp_methods_resumed"):
        other = projections(runs / name)
        assert other.keys() == reference.keys() == {f"s{i}_t{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
        assert max((reference[k] - other[k]).abs().max().item() for k in reference) <= WEIGHT_ATOL, name


def len_vocab(folder: Path) -> int:
    return json.loads((folder / "last" / "config.json").read_text())["vocab_size"]


@pytest.mark.slow  # 2-process launches (the `runs` fixture: about a minute on 2 cores)
def test_fsdp_checkpoint_is_an_ordinary_hugging_face_folder(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    last = (runs / "fsdp_teacher_tied" / "last").resolve()
    files = {p.name for p in last.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "run_config.json",
            "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_rank0.pt", "rng_rank1.pt"} <= files
    assert json.loads((last / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "lm_head.weight" not in load_file(str(last / "model.safetensors"))  # tied: stored once
    model = AutoModelForCausalLM.from_pretrained(last)
    AutoTokenizer.from_pretrained(last)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    saved = load_file(str(last / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)


@pytest.mark.slow  # 2-process launches (the `runs` fixture: about a minute on 2 cores)
def test_lora_under_fsdp_saves_the_adapter_and_merges_into_a_full_model(runs, tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_recipes.lora import main as merge_main

    last = (runs / "lora_fsdp" / "last").resolve()
    files = {p.name for p in last.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run_config.json"} <= files
    assert "model.safetensors" not in files
    merged_dir = tmp_path / "merged"
    merge_main(str(last), str(merged_dir))
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["student_same"]), last)
    base = AutoModelForCausalLM.from_pretrained(tiny["student_same"])
    ids = AutoTokenizer.from_pretrained(merged_dir)("context: ada lives in oslo. answer: oslo",
                                                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want, before = (m.eval()(input_ids=ids).logits for m in (merged, adapter, base))
    assert (got - want).abs().max().item() <= 1e-5
    assert (want - before).abs().max().item() > 1e-4  # the adapter does change the model


def test_merge_lora_refuses_a_folder_without_adapter(tmp_path, capsys):
    from llm_recipes.lora import main as merge_main

    with pytest.raises(SystemExit) as exit_info:
        merge_main(str(tmp_path), str(tmp_path / "out"))
    assert exit_info.value.code == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    ({"enable_fsdp": True, "fsdp_config.sharding_strategy": "_HYBRID_SHARD_ZERO2"}, "is not supported with FSDP2"),
    ({"enable_fsdp": True, "fsdp_config.sharding_group_size": 2}, "only applies to HYBRID_SHARD"),
    ({"distillation_config.sharding_strategy": "NO_SHARD"}, "has no effect without --distillation_config.enable_fsdp"),
    ({"enable_fsdp": True, "use_fp16": True}, "--use_fp16 is not supported with --enable_fsdp"),
    ({"low_cpu_fsdp": True}, "--low_cpu_fsdp is not supported"),
])
def test_unsupported_sharding_is_a_one_line_error(tiny, tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_flags(flags(tiny, "", tmp_path, 4, extra))


def test_hybrid_shard_group_must_divide_the_processes(tiny, tmp_path):
    extra = {"enable_fsdp": True, "fsdp_config.sharding_strategy": "HYBRID_SHARD", "fsdp_config.sharding_group_size": 2,
             "max_train_step": 1}
    try:
        with pytest.raises(UserError, match="HYBRID_SHARD needs the 1 processes to split into groups of"):
            train(parse_flags(flags(tiny, "", tmp_path, 4, extra)))
    finally:
        distributed.teardown()


def test_activation_checkpointing_recomputes_each_layer_and_keeps_the_gradients(tiny):
    """--fsdp_config.fsdp_activation_checkpointing: every decoder layer runs twice per step (forward,
    then its recompute in backward) and the gradients, lm_head's included, are unchanged."""
    from transformers import AutoModelForCausalLM

    from llm_recipes import models

    def one_step(checkpointing: bool):
        cfg = parse_flags({"model_name": tiny["student_same"], "enable_fsdp": True,
                           "fsdp_config.fsdp_activation_checkpointing": checkpointing})
        info = distributed.setup(fsdp=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(tiny["student_same"]).train()
            calls = []
            mlp = models.decoder_layers(model)[0].mlp  # its forward runs again in the recompute (hooks do not)
            mlp_forward = mlp.forward
            mlp.forward = lambda *args, **kwargs: calls.append(1) or mlp_forward(*args, **kwargs)
            distributed.wrap_student(model, cfg, info)
            ids = torch.arange(3, 19).reshape(2, 8)
            hidden = models.forward_hidden(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, False)
            logits = models.output_head(model)(hidden[:, :-1].reshape(-1, hidden.shape[-1]))
            torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)).backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        finally:
            distributed.teardown()
        return len(calls), grads

    plain_calls, plain = one_step(False)
    checkpointed_calls, checkpointed = one_step(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) <= 1e-6
    assert plain["lm_head.weight"].abs().max() > 0


@pytest.mark.slow  # 2-process launches (the `runs` fixture: about a minute on 2 cores)
def test_torchrun_command_line_with_fsdp_for_student_and_teacher(tiny, tmp_path):
    """The users' launch line, end to end: torchrun + finetuning.py + both enable_fsdp flags."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "finetuning.py", "--model_name", tiny["student_same"],
               "--dataset.file", tiny["loader"], "--output_dir", str(out), "--distillation",
               "--distillation_config.model_name", tiny["teacher"], "--enable_fsdp", "--distillation_config.enable_fsdp",
               "--batch_size_training", "2", "--max_train_step", "2", "--run_validation", "false", "--lr", "1e-3"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "done: 2 optimizer steps" in result.stdout
    AutoModelForCausalLM.from_pretrained(out / "last")


def worker_with_rank(launcher: int, rank: int):
    """The pid of torchrun's worker process of the given rank (its children, read from /proc), or None."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return None
    for child in map(int, children):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return child
    return None


@pytest.mark.slow  # 2 launches of 2 processes
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny, tmp_path):
    """SIGTERM to rank 1 only (a node preempted first): both ranks save the same step, exit 143; resumed
    under torchrun, the run ends bit-identical to a straight one."""
    out = tmp_path / "stopped"
    common = {"enable_fsdp": True, "optimizer": "AdamW", "lr": 1e-3, "num_epochs": 30, "max_train_step": 80,
              "run_validation": False}
    stopped = flags(tiny, None, out, 2, common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "finetuning.py"]
    for key, value in stopped.items():
        command += [f"--{key}", str(value)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline, sent = time.time() + 200, False
    while time.time() < deadline and process.poll() is None and not sent:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"train"') >= 3:
            worker = worker_with_rank(process.pid, 1)
            if worker is not None:
                os.kill(worker, signal.SIGTERM)
                sent = True
        time.sleep(0.02)
    output, _ = process.communicate(timeout=200)
    assert sent and process.returncode != 0, output[-4000:]
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    step = state["global_step"]
    assert 3 <= step < 80, output[-4000:]
    assert f"interrupted: stopped by SIGTERM at step {step}" in output
    saved = {p.name for p in (out / "last").resolve().iterdir()}
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors", "optimizer.pt"} <= saved

    resumed = {"flags": {**stopped, "resume_from": str(out)}}
    straight = {"flags": flags(tiny, None, tmp_path / "straight", 2, common)}
    wait(launch([resumed, straight], tmp_path, "after", 2), tmp_path, "after")
    a, b = saved_weights(out), saved_weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, 81))


@pytest.mark.slow  # 2-process launches (the `runs` fixture)
def test_on_policy_under_ddp_and_fsdp(runs):
    """Sampled answers under DDP (every step, with and without the data set's CE kept: two passes per micro-batch
    with it) and FSDP2 (the student and the teacher sharded; lmbda 0.5, and 1 with the CE kept): the runs
    finish, log their answers, and the DDP students stay identical on both ranks."""
    for name in ON_POLICY:
        lines = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        train_lines = [line for line in lines if line["type"] == "train"]
        assert train_lines and all(torch.isfinite(torch.tensor(line["loss"])) for line in train_lines)
        sampled = [line for line in train_lines if line["on_policy"]]
        keeps_ce = ON_POLICY[name].get("distillation_config.on_policy_ce", False)
        assert sampled and all(1 <= line["sampled_tokens"] <= 6 and ("ce" in line) == keeps_ce for line in sampled)
    for name in ("ddp_on_policy", "ddp_on_policy_ce"):
        rank0, rank1 = (torch.load(runs / name / f"rank{r}.pt") for r in (0, 1))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), name


@pytest.mark.slow  # 2-process launches (the `runs` fixture)
def test_fsdp_sampling_equals_the_unsharded_models(runs):
    """The student sharded by FSDP2 samples, with the same seed, exactly what the whole model samples, while
    the two ranks decode prompts of different lengths for different numbers of steps."""
    found = [json.loads((runs / "fsdp_sampling" / f"sampled_rank{r}.json").read_text()) for r in (0, 1)]
    for rank in found:
        assert rank["sharded"] == rank["plain"] and all(rank["plain"])
    assert max(map(len, found[0]["plain"])) < max(map(len, found[1]["plain"]))  # 9 and 13 tokens at most


FINISH_SCRIPT = """
import time, torch, torch.distributed as dist
from llm_recipes import distributed
info = distributed.setup()
tensor = torch.ones(1000)
if info.rank == 1:
    time.sleep(1.0)  # rank 0's collective cannot complete before rank 1 joins it
work = dist.all_reduce(tensor, async_op=True)
distributed.finish()
print(f"rank {info.rank} completed {work.is_completed()} sum {tensor[0].item()}", flush=True)
distributed.teardown()
"""


def test_finish_waits_for_collectives_in_flight_before_the_group_is_destroyed(tmp_path):
    """A run's end: no asynchronous collective still held by gloo when the group goes (a process exiting with one
    can abort after a finished run). Without the barrier, rank 0 reads its all-reduce as not completed."""
    script = tmp_path / "finish.py"
    script.write_text(FINISH_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "rank 0 completed True sum 2.0" in result.stdout
    assert "rank 1 completed True sum 2.0" in result.stdout
