"""The distillation recipe: set-up, then the training loop, in one readable place.

    python finetuning.py --model_name STUDENT --dataset.file LOADER.py --output_dir OUT \
        --distillation --distillation_config.model_name TEACHER --distillation_config.distil_factor 1.5

Per optimizer step: count the answer tokens (and distillation units) of all its micro-batches on all
processes first, so that every micro-batch's loss is divided by the step's totals (a per-token mean
over the whole step, not a mean of per-micro-batch means); then forward the teacher (no grad) and the
student to their last hidden states, compute CE and the distillation term from logits at answer
positions only (`llm_recipes.losses`), backward, clip, step.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llm_recipes import checkpoint, data, distributed, models
from llm_recipes.config import RunConfig, flag_reference, parse_flags
from llm_recipes.errors import UserError
from llm_recipes.losses import LossSpec, count_units, distillation_terms
from llm_recipes.metrics_log import MetricsLog, peak_memory_gb
from llm_recipes.optim import build_optimizer, build_scheduler

SAME_TOKENIZER_LOSSES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def main(**kwargs) -> None:
    """fire entry point: flags in, a trained student out; user errors become one line and exit code 2."""
    if kwargs.pop("help", False) or kwargs.pop("h", False):
        print(flag_reference())
        return
    try:
        train(parse_flags(kwargs))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    finally:
        distributed.teardown()


# ------------------------------------------------------------------------------------------ set-up
def prepare_output_dir(path: str) -> Path:
    output = Path(path)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to --output_dir {path}: {error.strerror or error}; choose a writable folder") from None
    return output


def dtype_of(pure_bf16: bool) -> torch.dtype:
    return torch.bfloat16 if pure_bf16 else torch.float32


def autocast(device: torch.device, mixed_precision: bool, use_fp16: bool):
    if use_fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    if mixed_precision:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolve_loss(cfg: RunConfig, student_tokenizer, teacher_tokenizer) -> tuple[str, bool]:
    """The distillation term to use and whether the two tokenizers are the same."""
    if not cfg.train.distillation:
        return "none", True
    same = student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    name = cfg.distillation.loss
    if name == "auto":
        name = "kl" if same else "uld"
    if name in SAME_TOKENIZER_LOSSES and not same:
        raise UserError(f"--distillation_config.loss {name} needs the same tokenizer for teacher and student, but "
                        f"their vocabularies differ ({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens): "
                        "use uld or multilevel_ot")
    if cfg.distillation.distil_factor is None:
        cfg.distillation.distil_factor = 0.15 if name == "multilevel_ot" else 1.5
    return name, same


def max_positions(config, limit=None):
    """Longest sequence a model accepts (None: no fixed limit), capped by `limit`."""
    found = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "relative_attention_num_buckets", None):
        found = None  # relative positions (T5 family)
    candidates = [v for v in (found, limit) if v]
    return min(candidates) if candidates else None


def load_tokenizers(cfg: RunConfig):
    t, d = cfg.train, cfg.distillation
    student = models.load_tokenizer(t.tokenizer_name or t.model_name, trust_remote_code=t.trust_remote_code,
                                    what="student tokenizer" if t.tokenizer_name else "student model")
    teacher = None
    if t.distillation:
        teacher = models.load_tokenizer(d.tokenizer_name or d.model_name, trust_remote_code=d.trust_remote_code,
                                        what="teacher tokenizer" if d.tokenizer_name else "teacher model")
    return student, teacher


def load_models(cfg: RunConfig, info: distributed.DistInfo, with_teacher: bool):
    """The student (from the checkpoint when resuming) and, when its term is used, the frozen teacher."""
    t, d = cfg.train, cfg.distillation
    if (t.use_fp16 or d.use_fp16) and info.device.type != "cuda":
        raise UserError("--use_fp16 needs a CUDA GPU (fp16 autocast with a gradient scaler): use "
                        "--mixed_precision (bf16) on this machine")
    student_source = t.resume_from if (t.resume_from and not t.use_peft) else t.model_name
    student = models.load_model(student_source, encoder_decoder=t.encoder_decoder, dtype=dtype_of(t.pure_bf16),
                                trust_remote_code=t.trust_remote_code, attn_implementation=t.attn_implementation,
                                what="student model")
    if t.freeze_layers:
        models.freeze_first_layers(student, t.num_freeze_layers)
    if t.use_peft:
        from llm_recipes import lora

        student = (lora.load_lora_checkpoint(student, t.resume_from) if t.resume_from
                   else lora.add_lora(student, cfg.lora, t.encoder_decoder))
    teacher = None
    if with_teacher:
        teacher = models.load_model(d.model_name, encoder_decoder=d.encoder_decoder, dtype=dtype_of(d.pure_bf16),
                                    trust_remote_code=d.trust_remote_code,
                                    attn_implementation="sdpa" if d.use_fast_kernels else None, what="teacher model")
        models.freeze_teacher(teacher)
    return student, teacher


# ---------------------------------------------------------------------------------------- the step
class Objective:
    """CE + distil_factor * term for one micro-batch, from hidden states (no [B, S, V] logits)."""

    def __init__(self, cfg: RunConfig, spec: LossSpec, student, teacher, info: distributed.DistInfo):
        self.cfg, self.spec, self.info = cfg, spec, info
        self.student, self.teacher = student, teacher
        self.student_inner = distributed.unwrap(student)
        self.use_teacher = teacher is not None
        self.ce_factor = cfg.distillation.cross_entropy_factor if cfg.train.distillation else 1.0
        self.distil_factor = cfg.distillation.distil_factor if cfg.train.distillation else 0.0

    def counts(self, batch: dict) -> tuple[int, int]:
        teacher_labels = batch["teacher"]["labels"] if self.use_teacher else None
        ce, units = count_units(self.spec, batch["student"]["labels"], teacher_labels)
        return int(ce), int(units)

    def terms(self, batch: dict):
        t, d = self.cfg.train, self.cfg.distillation
        teacher_hidden = teacher_head = None
        if self.use_teacher:
            with torch.no_grad(), autocast(self.info.device, d.mixed_precision, d.use_fp16):
                teacher_hidden = models.forward_hidden(self.teacher, batch["teacher"], d.encoder_decoder)
            teacher_head = models.output_head(self.teacher)
        with autocast(self.info.device, t.mixed_precision, t.use_fp16):
            student_hidden = models.forward_hidden(self.student, batch["student"], t.encoder_decoder,
                                                   inner=self.student_inner)
            return distillation_terms(
                self.spec, student_hidden, batch["student"]["labels"],
                models.output_head(self.student_inner), teacher_hidden,
                batch["teacher"]["labels"] if self.use_teacher else None, teacher_head)

    def combine(self, ce_sum, distill_sum, ce_total: float, units_total: float):
        loss = self.ce_factor * ce_sum / max(ce_total, 1.0)
        if self.use_teacher:
            loss = loss + self.distil_factor * distill_sum / max(units_total, 1.0)
        return loss


def check_finite(value: torch.Tensor, what: str, where: str) -> None:
    if not torch.isfinite(value).all():
        raise UserError(f"{what} is {value.item() if value.numel() == 1 else 'not finite'} at {where}: lower --lr, "
                        "check the data for empty or broken examples, or try without --pure_bf16")


@torch.no_grad()
def evaluate(objective: Objective, split: data.PairedSplit, cfg: RunConfig, info: distributed.DistInfo,
             pad_ids: tuple[int, int | None]) -> dict:
    """Token-level CE, the distillation term and perplexity over the whole validation split."""
    objective.student.eval()
    batches = data.eval_batches(len(split), cfg.train.val_batch_size, info.world_size, info.rank)
    if cfg.train.max_eval_step:
        batches = batches[: cfg.train.max_eval_step]
    loader = data.loader_over(batches, split, pad_ids[0], pad_ids[1], cfg.train.num_workers_dataloader)
    sums = [0.0, 0.0, 0.0, 0.0]
    for batch in tqdm(loader, desc="eval", leave=False, disable=not info.is_main):
        terms = objective.terms(data.move(batch, info.device))
        sums = [s + float(v) for s, v in zip(sums, (terms.ce_sum, terms.ce_count, terms.distill_sum, terms.distill_count))]
    ce_sum, ce_count, distill_sum, distill_count = distributed.all_reduce_sum(sums, info.device)
    distributed.release(objective.student)
    distributed.release(objective.teacher)
    objective.student.train()
    ce = ce_sum / max(ce_count, 1.0)
    result = {"eval_ce": ce, "eval_ppl": math.exp(min(ce, 50.0)), "eval_tokens": int(ce_count)}
    loss = objective.ce_factor * ce
    if objective.use_teacher:
        result["eval_distill"] = distill_sum / max(distill_count, 1.0)
        loss += objective.distil_factor * result["eval_distill"]
    result["eval_loss"] = loss
    return result


# --------------------------------------------------------------------------------------- the run
def quiet_libraries() -> None:
    """Keep the console to our own progress bars: no per-file loading bars from transformers/datasets."""
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def train(cfg: RunConfig) -> dict:
    t = cfg.train
    quiet_libraries()
    info = distributed.setup(fsdp=t.enable_fsdp or cfg.distillation.enable_fsdp)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    output = prepare_output_dir(t.output_dir)
    if info.is_main:
        print("resolved configuration:\n" + cfg.to_json())
        (output / checkpoint.RUN_CONFIG).write_text(cfg.to_json())

    resume = checkpoint.load_resume_state(t.resume_from, info.rank) if t.resume_from else None
    student_tokenizer, teacher_tokenizer = load_tokenizers(cfg)
    loss_name, same_tokenizer = resolve_loss(cfg, student_tokenizer, teacher_tokenizer)
    use_teacher = loss_name != "none" and cfg.distillation.distil_factor > 0
    if t.distillation and not use_teacher and info.is_main:
        print("distil_factor 0: plain fine-tuning on the loader's labels; the teacher model is not loaded")
    student, teacher = load_models(cfg, info, with_teacher=use_teacher)
    spec = LossSpec.from_config(
        cfg.distillation, name=loss_name if use_teacher else "none", student_vocab_size=len(student_tokenizer),
        teacher_vocab_size=len(teacher_tokenizer) if teacher_tokenizer is not None else len(student_tokenizer),
        same_tokenizer=same_tokenizer, student_encoder_decoder=t.encoder_decoder,
        teacher_encoder_decoder=cfg.distillation.encoder_decoder, chunk_size=t.logits_chunk_size)

    loader_module = data.import_loader(cfg.dataset.file)
    split_args = dict(student_tokenizer=student_tokenizer, student_name=t.model_name,
                      student_encoder_decoder=t.encoder_decoder, student_max=max_positions(student.config, t.context_length),
                      teacher_tokenizer=teacher_tokenizer, teacher_name=cfg.distillation.model_name,
                      teacher_encoder_decoder=cfg.distillation.encoder_decoder,
                      teacher_max=max_positions(teacher.config if teacher is not None else models.load_config(
                          cfg.distillation.model_name, trust_remote_code=cfg.distillation.trust_remote_code,
                          what="teacher model")) if t.distillation else None)
    train_split = data.build_paired_split(loader_module, cfg.dataset, "train", **split_args)
    val_split = data.build_paired_split(loader_module, cfg.dataset, "validation", **split_args) if t.run_validation else None
    if info.is_main:
        for name, split in (("train", train_split), ("validation", val_split)):
            if split is not None:
                print(f"{name}: {len(split)} examples ({split.dropped_too_long} dropped as too long, "
                      f"{split.without_answer} without answer tokens)")
    per_epoch = data.steps_per_epoch(len(train_split), t.batch_size_training, t.gradient_accumulation_steps,
                                     info.world_size)
    if per_epoch == 0:
        raise UserError(f"the training split has {len(train_split)} examples, fewer than one optimizer step needs "
                        f"(batch {t.batch_size_training} x accumulation {t.gradient_accumulation_steps} x "
                        f"{info.world_size} processes): lower --batch_size_training")
    total_steps = per_epoch * t.num_epochs
    if t.max_train_step:
        total_steps = min(total_steps, t.max_train_step)

    pad_ids = (student_tokenizer.pad_token_id, teacher_tokenizer.pad_token_id if teacher_tokenizer is not None else None)
    probe = data.move(data.PairedBatches(train_split, *pad_ids)[[0]], info.device)
    student.train()
    wrapped = distributed.wrap_student(student, cfg, info)  # moves it to the device (FSDP: shard by shard)
    models.check_output_head(student, probe["student"], t.encoder_decoder, "student")
    distributed.release(student)
    if use_teacher:
        teacher = distributed.shard_teacher(teacher, cfg.distillation, info)
        models.check_output_head(teacher, probe["teacher"], cfg.distillation.encoder_decoder, "teacher")
        distributed.release(teacher)
    trainable, total = models.count_parameters(student)
    if info.is_main:
        print(f"student: {trainable:,} trainable of {total:,} parameters; loss: CE"
              + (f" + {cfg.distillation.distil_factor} x {loss_name}" if use_teacher else ""))
    optimizer = build_optimizer(student, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=t.use_fp16)  # fp16 needs loss scaling; bf16 does not
    objective = Objective(cfg, spec, wrapped, teacher, info)

    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_eval_loss": None, "best_checkpoint": None,
             "last_checkpoint": None, "train_examples": len(train_split), "world_size": info.world_size,
             "batch_size_training": t.batch_size_training, "gradient_accumulation_steps": t.gradient_accumulation_steps,
             "seed": t.seed, "student": t.model_name, "teacher": cfg.distillation.model_name if t.distillation else None,
             "loss": loss_name}
    if resume is not None:
        state = restore(resume, state, student, optimizer, scheduler, info)
        if "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
    log = MetricsLog(output / "metrics.jsonl", enabled=info.is_main)
    log_sums = {"loss": 0.0, "ce": 0.0, "distill": 0.0, "tokens": 0, "steps": 0, "time": 0.0, "lr": 0.0}
    eval_result = None

    def save(result: dict | None) -> None:
        nonlocal eval_result
        eval_result = result if result is not None else eval_result
        if not t.save_model:
            return
        name = checkpoint.checkpoint_name(state["global_step"])
        if result is not None and (state["best_eval_loss"] is None or result["eval_loss"] < state["best_eval_loss"]):
            state["best_eval_loss"], state["best_checkpoint"] = result["eval_loss"], name
        state["last_checkpoint"] = name
        if scaler.is_enabled():
            state["grad_scaler"] = scaler.state_dict()
        checkpoint.save_checkpoint(
            t.output_dir, name, rank=info.rank, model_saver=lambda path: save_model(student, path, info),
            tokenizer=student_tokenizer, run_config_json=cfg.to_json(), trainer_state=state,
            optimizer_state=distributed.optimizer_state_dict(student, optimizer) if t.save_optimizer else None,
            scheduler_state=scheduler.state_dict(), barrier=distributed.barrier)
        if info.is_main:
            if not t.save_all:
                checkpoint.prune(t.output_dir, {state["best_checkpoint"], state["last_checkpoint"]} - {None})
            checkpoint.point(t.output_dir, "last", state["last_checkpoint"])
            checkpoint.point(t.output_dir, "best", state["best_checkpoint"] or state["last_checkpoint"])

    def validate_and_save() -> None:
        result = evaluate(objective, val_split, cfg, info, pad_ids) if val_split is not None else None
        if result is not None:
            log.write({"type": "eval", "step": state["global_step"], "epoch": state["epoch"], **result})
            if info.is_main:
                tqdm.write(f"step {state['global_step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        save(result)

    stop = False
    for epoch in range(state["epoch"], t.num_epochs):
        state["epoch"] = epoch
        first_step = state["step_in_epoch"]
        micro_batches = list(data.train_micro_batches(
            len(train_split), epoch, t.seed, t.batch_size_training, t.gradient_accumulation_steps,
            info.world_size, info.rank, start_step=first_step))
        batches = iter(data.loader_over(micro_batches, train_split, *pad_ids, t.num_workers_dataloader))
        bar = tqdm(total=per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{t.num_epochs}",
                   disable=not info.is_main, dynamic_ncols=True)
        for _ in range(first_step, per_epoch):
            started = time.perf_counter()
            group = [next(batches) for _ in range(t.gradient_accumulation_steps)]
            counts = [objective.counts(b) for b in group]
            ce_total, units_total = distributed.all_reduce_sum(
                [sum(c[0] for c in counts), sum(c[1] for c in counts)], info.device)
            where = f"step {state['global_step'] + 1} (epoch {epoch + 1})"
            if ce_total == 0 and units_total == 0:
                warnings.warn(f"skipping {where}: its batches have no answer tokens (all labels are -100)")
            else:
                step_sums = [0.0, 0.0, 0.0]
                for i, batch in enumerate(group):
                    if info.world_size == 1 and counts[i] == (0, 0):
                        warnings.warn(f"skipping a micro-batch of {where}: all its labels are -100")
                        continue
                    batch = data.move(batch, info.device)
                    with distributed.no_sync(wrapped, i < len(group) - 1):
                        terms = objective.terms(batch)
                        loss = objective.combine(terms.ce_sum, terms.distill_sum, ce_total, units_total)
                        check_finite(loss, "the loss", where)
                        scaler.scale(loss * info.world_size).backward()
                    distributed.release(teacher)
                    step_sums = [s + float(v.detach()) for s, v in zip(step_sums, (loss, terms.ce_sum, terms.distill_sum))]
                    log_sums["tokens"] += int(batch["student"]["attention_mask"].sum())
                scaler.unscale_(optimizer)
                grad_norm = clip_gradients(student, t)
                if not scaler.is_enabled():  # with fp16 an overflow only skips the step and lowers the scale
                    check_finite(grad_norm, "the gradient norm", where)
                scaler.step(optimizer)
                scaler.update()
                step_loss, ce_sum, distill_sum = distributed.all_reduce_sum(step_sums, info.device)
                log_sums["loss"] += step_loss
                log_sums["ce"] += ce_sum / max(ce_total, 1.0)
                log_sums["distill"] += distill_sum / max(units_total, 1.0)
            optimizer.zero_grad(set_to_none=True)
            log_sums["lr"] = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            log_sums["steps"] += 1
            log_sums["time"] += time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{log_sums['loss'] / log_sums['steps']:.4f}")
            if state["global_step"] % t.log_every == 0:
                log.write(step_record(state, log_sums, objective, info))
                log_sums = {k: 0 if k == "tokens" else 0.0 for k in log_sums}
            last_step = state["global_step"] >= total_steps
            epoch_end = state["step_in_epoch"] >= per_epoch
            if t.save_step and state["global_step"] % t.save_step == 0 and not (last_step or epoch_end):
                validate_and_save()
            if last_step:
                stop = True
                break
        bar.close()
        if state["step_in_epoch"] >= per_epoch:  # the epoch is complete: a resume starts the next one
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        validate_and_save()
        if stop:
            break

    if info.is_main:
        report(t, state, eval_result, output)
    return {"state": state, "eval": eval_result}


def clip_gradients(model, train_config) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    max_norm = train_config.gradient_clipping_threshold if train_config.gradient_clipping else float("inf")
    return distributed.clip_grad_norm(params, max_norm)


def step_record(state: dict, sums: dict, objective: Objective, info: distributed.DistInfo) -> dict:
    steps = max(sums["steps"], 1)
    tokens = distributed.all_reduce_sum([sums["tokens"]], info.device)[0]
    record = {"type": "train", "step": state["global_step"], "epoch": state["epoch"] + 1,
              "loss": sums["loss"] / steps, "ce": sums["ce"] / steps,
              "lr": sums["lr"], "tokens_per_s": tokens / max(sums["time"], 1e-9),
              "peak_memory_gb": peak_memory_gb(info.device)}
    if objective.use_teacher:
        record["distill"] = sums["distill"] / steps
    return record


def restore(resume: dict, state: dict, model, optimizer, scheduler, info: distributed.DistInfo) -> dict:
    saved = resume["trainer_state"]
    for key in ("world_size", "batch_size_training", "gradient_accumulation_steps", "seed", "train_examples"):
        if saved.get(key) != state[key]:
            raise UserError(f"--resume_from was written with {key}={saved.get(key)}, this run has {state[key]}: "
                            "resume with the same data, seed, batch size, accumulation and process count")
    for key in ("teacher", "loss"):
        if saved.get(key) != state[key] and info.is_main:
            warnings.warn(f"resuming with {key} {state[key]!r}; the checkpoint was trained with {saved.get(key)!r}")
    if resume["optimizer"] is None:
        raise UserError("--resume_from holds no optimizer state (it was saved with --save_optimizer false): "
                        "start a new run with --model_name pointing at it instead")
    distributed.load_optimizer_state_dict(model, optimizer, resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    checkpoint.set_rng_state(resume["rng"])
    progress = ("global_step", "epoch", "step_in_epoch", "best_eval_loss", "best_checkpoint", "last_checkpoint",
                "grad_scaler")
    return {**state, **{k: saved[k] for k in progress if k in saved}}


def save_model(model, path: Path, info: distributed.DistInfo) -> None:
    """save_pretrained with safetensors (the adapter only with LoRA); rank 0 writes, FSDP gathers to it."""
    distributed.save_pretrained(model, path, info)


def report(t, state: dict, eval_result: dict | None, output: Path) -> None:
    where = output / "last" if state["last_checkpoint"] else None
    print(f"done: {state['global_step']} optimizer steps")
    if where is not None:
        print(f"model saved to {output / 'checkpoints' / state['last_checkpoint']} (last) and "
              f"{output / 'checkpoints' / (state['best_checkpoint'] or state['last_checkpoint'])} (best)")
    if eval_result is not None:
        print(f"eval loss {eval_result['eval_loss']:.4f} (CE {eval_result['eval_ce']:.4f}, "
              f"perplexity {eval_result['eval_ppl']:.2f})")
    print(f"metrics: {output / 'metrics.jsonl'}")
