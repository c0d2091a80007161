"""The distillation recipe: set-up, then the training loop, in one readable place.

    python finetuning.py --model_name STUDENT --dataset.file LOADER.py --output_dir OUT \
        --distillation --distillation_config.model_name TEACHER --distillation_config.distil_factor 1.5

Per optimizer step: count the answer tokens (and distillation units) of all its micro-batches on all
processes first, so that every micro-batch's loss is divided by the step's totals (a per-token mean
over the whole step, not a mean of per-micro-batch means); then forward the teacher (no grad) and the
student to their last hidden states, compute CE and the distillation term from logits at answer
positions only (`llm_recipes.losses`), backward, clip, step. With a hidden-state or feature term
(docs/methods.md) both models also return their intermediate hidden states, the learned projections
train in the same optimizer, and their gradients are all-reduced before the clip.
"""
from __future__ import annotations

import math
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from llm_recipes import checkpoint, data, distributed, freezing, intermediate, models
from llm_recipes.config import RunConfig, flag_reference, parse_flags
from llm_recipes.errors import UserError
from llm_recipes.losses import SFT_ONLY, LossSpec, count_units, distillation_terms
from llm_recipes.losses.hidden import RowPairs, hidden_row_pairs, hidden_states_sum
from llm_recipes.losses.selection import feature_selection_sum, top_units
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
    freezing.apply_freezing(student, t.freeze_regex, t.unfreeze_regex, t.spectrum_yaml)
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
class Counts(NamedTuple):
    """Units of each term in a micro-batch (summed over an optimizer step's micro-batches and processes,
    the divisors of the step's terms): CE tokens, logit-term units (tokens or sequences), hidden-state
    rows, feature-term rows."""

    ce: float = 0
    distill: float = 0
    hidden: float = 0
    feature: float = 0


@dataclass
class Terms:
    sums: dict  # term name -> 0-d fp32 tensor, the term summed over its units in this micro-batch
    counts: Counts
    candidate_positions: int = 0  # paired answer positions before token selection
    kept_positions: int = 0  # ... and after


class Objective:
    """The terms of one micro-batch, from hidden states (no [B, S, V] logits), each a sum over its units:

        loss = cross_entropy_factor * CE + distil_factor * logit term + hidden_weight * hidden-state term
               + feature_weight * feature term,   each term divided by the step's `Counts`.
    """

    def __init__(self, cfg: RunConfig, spec: LossSpec, student, teacher, info: distributed.DistInfo,
                 plan: Optional[intermediate.LayerPlan] = None, projections=None):
        t, d = cfg.train, cfg.distillation
        self.cfg, self.spec, self.info, self.plan = cfg, spec, info, plan
        self.student, self.teacher = student, teacher
        self.student_inner = distributed.unwrap(student)
        self.use_teacher = teacher is not None
        self.weights = {"ce": d.cross_entropy_factor if t.distillation else 1.0,
                        "distill": d.distil_factor if spec.name != SFT_ONLY else 0.0,
                        "hidden": d.hidden_weight if plan is not None and plan.hidden_pairs else 0.0,
                        "feature": d.feature_weight if plan is not None and plan.feature_pairs else 0.0}
        self.active = [name for name in Counts._fields if name == "ce" or self.weights[name] > 0]
        self.project = intermediate.projector(projections)

    def row_pairs(self, batch: dict) -> RowPairs:
        """Rows where the hidden-state and feature terms compare the two models."""
        d = self.cfg.distillation
        return hidden_row_pairs(batch["student"], batch["teacher"], positions=d.hidden_positions,
                                alignment=d.hidden_alignment, student_encoder_decoder=self.cfg.train.encoder_decoder,
                                teacher_encoder_decoder=d.encoder_decoder, skip_student_eos=d.skip_student_eos)

    def _row_counts(self, rows: int) -> tuple[int, int]:
        return (rows if "hidden" in self.active else 0,
                rows if "feature" in self.active and rows >= 2 else 0)  # correlations need 2 rows

    def counts(self, batch: dict) -> Counts:
        """Units of every term, from labels and masks only (before any forward)."""
        teacher_labels = batch["teacher"]["labels"] if self.use_teacher else None
        ce, units = count_units(self.spec, batch["student"]["labels"], teacher_labels)
        rows = self.row_pairs(batch).count if self.plan is not None else 0
        return Counts(int(ce), int(units), *self._row_counts(rows))

    def terms(self, batch: dict) -> Terms:
        t, d, plan = self.cfg.train, self.cfg.distillation, self.plan
        teacher = None
        if self.use_teacher:
            with autocast(self.info.device, d.mixed_precision, d.use_fp16):
                teacher = intermediate.teacher_pass(
                    self.teacher, batch["teacher"], d.encoder_decoder, states=plan is not None,
                    attribute=plan.teacher_feature_layers if "feature" in self.active else [],
                    last_layer=len(plan.teacher_sizes) - 1 if plan is not None else 0,
                    attribution=d.feature_attribution, vocab_size=self.spec.teacher_vocab_size,
                    chunk_size=t.logits_chunk_size)
        with autocast(self.info.device, t.mixed_precision, t.use_fp16):
            states = None
            if plan is None:
                student_hidden = models.forward_hidden(self.student, batch["student"], t.encoder_decoder,
                                                       inner=self.student_inner)
            else:
                student_hidden, states = intermediate.forward_hidden_states(
                    self.student, batch["student"], t.encoder_decoder, inner=self.student_inner, what="student")
            logit = distillation_terms(
                self.spec, student_hidden, batch["student"]["labels"], models.output_head(self.student_inner),
                teacher.head_input if teacher is not None else None,
                batch["teacher"]["labels"] if teacher is not None else None,
                models.output_head(self.teacher) if teacher is not None else None)
            sums = {"ce": logit.ce_sum, "distill": logit.distill_sum}
            rows = 0
            if plan is not None:
                pairs = self.row_pairs(batch)
                rows = pairs.count
                if "hidden" in self.active:
                    sums["hidden"] = hidden_states_sum(states, teacher.states, pairs, plan.hidden_pairs,
                                                       d.hidden_distance, self.project)
                if "feature" in self.active:
                    units = {(s, layer): top_units(teacher.scores[layer], plan.student_sizes[s])
                             for s, layer in plan.feature_pairs}
                    sums["feature"] = feature_selection_sum(states, teacher.states, pairs.student_rows,
                                                            pairs.teacher_rows, plan.feature_pairs, units,
                                                            d.feature_offdiag_weight)
        counts = Counts(logit.ce_count, logit.distill_count, *self._row_counts(rows))
        return Terms(sums, counts, logit.candidate_positions, logit.kept_positions)

    def combine(self, terms: Terms, totals: Counts) -> torch.Tensor:
        """The micro-batch's share of the step's loss: each term's sum over the step's units of that term."""
        loss = None
        for name in self.active:
            value = self.weights[name] * terms.sums[name] / max(getattr(totals, name), 1.0)
            loss = value if loss is None else loss + value
        return loss


def check_finite(value: torch.Tensor, what: str, where: str) -> None:
    if not torch.isfinite(value).all():
        raise UserError(f"{what} is {value.item() if value.numel() == 1 else 'not finite'} at {where}: lower --lr, "
                        "check the data for empty or broken examples, or try without --pure_bf16")


@torch.no_grad()
def evaluate(objective: Objective, split: data.PairedSplit, cfg: RunConfig, info: distributed.DistInfo,
             pad_ids: tuple[int, int | None]) -> dict:
    """Token-level CE, every other active term and perplexity over the whole validation split."""
    objective.student.eval()
    batches = data.eval_batches(len(split), cfg.train.val_batch_size, info.world_size, info.rank)
    if cfg.train.max_eval_step:
        batches = batches[: cfg.train.max_eval_step]
    loader = data.loader_over(batches, split, pad_ids[0], pad_ids[1], cfg.train.num_workers_dataloader)
    names = objective.active
    sums = [0.0] * (2 * len(names))
    for batch in tqdm(loader, desc="eval", leave=False, disable=not info.is_main):
        terms = objective.terms(data.move(batch, info.device))
        values = [float(terms.sums[n]) for n in names] + [float(getattr(terms.counts, n)) for n in names]
        sums = [s + v for s, v in zip(sums, values)]
    sums = distributed.all_reduce_sum(sums, info.device)
    distributed.release(objective.student)
    distributed.release(objective.teacher)
    objective.student.train()
    means = {n: sums[i] / max(sums[len(names) + i], 1.0) for i, n in enumerate(names)}
    ce = means["ce"]
    result = {"eval_ce": ce, "eval_ppl": math.exp(min(ce, 50.0)), "eval_tokens": int(sums[len(names)])}
    result.update({f"eval_{n}": means[n] for n in names if n != "ce"})
    result["eval_loss"] = sum(objective.weights[n] * means[n] for n in names)
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
    output = checkpoint.prepare_output_dir(t.output_dir)
    if info.is_main:
        print("resolved configuration:\n" + cfg.to_json())
        (output / checkpoint.RUN_CONFIG).write_text(cfg.to_json())

    resume = checkpoint.load_resume_state(t.resume_from, info.rank) if t.resume_from else None
    student_tokenizer, teacher_tokenizer = load_tokenizers(cfg)
    loss_name, same_tokenizer = resolve_loss(cfg, student_tokenizer, teacher_tokenizer)
    logit_term = loss_name != "none" and cfg.distillation.distil_factor > 0
    intermediate_terms = uses_intermediate_layers(cfg, same_tokenizer)
    use_teacher = logit_term or intermediate_terms
    if t.distillation and not use_teacher and info.is_main:
        print("distil_factor 0: plain fine-tuning on the loader's labels; the teacher model is not loaded")
    student, teacher = load_models(cfg, info, with_teacher=use_teacher)
    spec = LossSpec.from_config(
        cfg.distillation, name=loss_name if logit_term else "none", student_vocab_size=len(student_tokenizer),
        teacher_vocab_size=len(teacher_tokenizer) if teacher_tokenizer is not None else len(student_tokenizer),
        same_tokenizer=same_tokenizer, student_encoder_decoder=t.encoder_decoder,
        teacher_encoder_decoder=cfg.distillation.encoder_decoder, chunk_size=t.logits_chunk_size)

    loader_module = data.import_loader(cfg.dataset.file)
    split_args = dict(student_tokenizer=student_tokenizer, student_name=t.model_name,
                      student_encoder_decoder=t.encoder_decoder, student_max=models.max_positions(student.config, t.context_length),
                      teacher_tokenizer=teacher_tokenizer, teacher_name=cfg.distillation.model_name,
                      teacher_encoder_decoder=cfg.distillation.encoder_decoder,
                      teacher_max=models.max_positions(teacher.config if teacher is not None else models.load_config(
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
    plan = intermediate.plan_layers(cfg, student, teacher, probe, distributed.is_fsdp(teacher)) if use_teacher else None
    distributed.release(student)
    distributed.release(teacher)
    projections = intermediate.build_projections(plan, dtype_of(t.pure_bf16), info.device) if plan else None
    if projections is not None:
        distributed.broadcast_parameters(projections)
        if t.resume_from:
            intermediate.load_projections(projections, t.resume_from)
    trainable, total = models.count_parameters(student)
    if info.is_main:
        print(f"student: {trainable:,} trainable of {total:,} parameters; loss: {describe_loss(cfg, spec, plan)}")
        if plan is not None:
            print(plan.describe() + (f"; projections: {models.count_parameters(projections)[0]:,} parameters"
                                     if projections is not None else ""))
    optimizer = build_optimizer(distributed.trainables(student, projections), t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=t.use_fp16)  # fp16 needs loss scaling; bf16 does not
    objective = Objective(cfg, spec, wrapped, teacher, info, plan, projections)
    objective.counts(probe)  # refuse unpairable rows (hidden-state / feature terms) before the first step

    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_eval_loss": None, "best_checkpoint": None,
             "last_checkpoint": None, "train_examples": len(train_split), "world_size": info.world_size,
             "batch_size_training": t.batch_size_training, "gradient_accumulation_steps": t.gradient_accumulation_steps,
             "seed": t.seed, "student": t.model_name, "teacher": cfg.distillation.model_name if t.distillation else None,
             "loss": loss_name, "hidden_projections": sorted(projections.keys()) if projections is not None else None}
    if resume is not None:
        state = restore(resume, state, student, optimizer, scheduler, info, projections)
        if "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
    log = MetricsLog(output / "metrics.jsonl", enabled=info.is_main)
    log_sums = new_log_sums(objective)
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
            t.output_dir, name, rank=info.rank, model_saver=lambda path: save_model(student, path, info, projections),
            tokenizer=student_tokenizer, run_config_json=cfg.to_json(), trainer_state=state,
            optimizer_state=distributed.optimizer_state_dict(student, optimizer, projections) if t.save_optimizer else None,
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
            totals = Counts(*distributed.all_reduce_sum([sum(column) for column in zip(*counts)], info.device))
            where = f"step {state['global_step'] + 1} (epoch {epoch + 1})"
            if not any(totals):
                warnings.warn(f"skipping {where}: its batches have no answer tokens (all labels are -100)")
            else:
                step_sums = dict.fromkeys(["loss", *objective.active, "candidates", "kept"], 0.0)
                for i, batch in enumerate(group):
                    if info.world_size == 1 and not any(counts[i]):
                        warnings.warn(f"skipping a micro-batch of {where}: all its labels are -100")
                        continue
                    batch = data.move(batch, info.device)
                    with distributed.no_sync(wrapped, i < len(group) - 1):
                        terms = objective.terms(batch)
                        loss = objective.combine(terms, totals)
                        check_finite(loss, "the loss", where)
                        scaler.scale(loss * info.world_size).backward()
                    distributed.release(teacher)
                    step_sums["loss"] += float(loss.detach())
                    for name in objective.active:
                        step_sums[name] += float(terms.sums[name].detach())
                    step_sums["candidates"] += terms.candidate_positions
                    step_sums["kept"] += terms.kept_positions
                    log_sums["tokens"] += int(batch["student"]["attention_mask"].sum())
                if projections is not None:
                    distributed.all_reduce_gradients(projections)
                scaler.unscale_(optimizer)
                grad_norm = clip_gradients(student, t, projections)
                if not scaler.is_enabled():  # with fp16 an overflow only skips the step and lowers the scale
                    check_finite(grad_norm, "the gradient norm", where)
                scaler.step(optimizer)
                scaler.update()
                reduced = dict(zip(step_sums, distributed.all_reduce_sum(list(step_sums.values()), info.device)))
                log_sums["loss"] += reduced["loss"]
                for name in objective.active:
                    log_sums[name] += reduced[name] / max(getattr(totals, name), 1.0)
                log_sums["candidates"] += reduced["candidates"]
                log_sums["kept"] += reduced["kept"]
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
                log_sums = new_log_sums(objective)
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


def uses_intermediate_layers(cfg: RunConfig, same_tokenizer: bool) -> bool:
    """Whether a hidden-state or feature term is on; refuses them across tokenizers without an alignment."""
    d = cfg.distillation
    if not (cfg.train.distillation and (d.hidden_weight > 0 or d.feature_weight > 0)):
        return False
    if not same_tokenizer and d.hidden_alignment == "none":
        raise UserError("hidden-state and feature distillation compare the two models position by position, but "
                        "the student and teacher tokenizers differ: set --distillation_config.hidden_alignment "
                        "answer_index (pairs the i-th answer tokens, as ULD does)")
    return True


def describe_loss(cfg: RunConfig, spec: LossSpec, plan) -> str:
    d = cfg.distillation
    text = "CE" if not cfg.train.distillation else f"{d.cross_entropy_factor} x CE"
    if spec.name != SFT_ONLY:
        text += f" + {d.distil_factor} x {spec.name}"
        if spec.selects_tokens:
            text += f" (on the top {spec.token_selection_ratio:g} of answer positions by {spec.token_selection})"
    if plan is not None and plan.hidden_pairs:
        text += f" + {d.hidden_weight} x hidden-state {d.hidden_distance}"
    if plan is not None and plan.feature_pairs:
        text += f" + {d.feature_weight} x feature correlation"
    return text if cfg.train.distillation else "CE"


def new_log_sums(objective: Objective) -> dict:
    sums = dict.fromkeys(["loss", *objective.active, "candidates", "kept", "time", "lr"], 0.0)
    return {**sums, "tokens": 0, "steps": 0}


def clip_gradients(model, train_config, projections=None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    extra = [p for p in projections.parameters() if p.grad is not None] if projections is not None else []
    if not params and not extra:
        return torch.zeros(())
    max_norm = train_config.gradient_clipping_threshold if train_config.gradient_clipping else float("inf")
    return distributed.clip_grad_norm(params, max_norm, extra)


def step_record(state: dict, sums: dict, objective: Objective, info: distributed.DistInfo) -> dict:
    """One train line of metrics.jsonl: means over the logged steps of the loss and of every active term."""
    steps = max(sums["steps"], 1)
    tokens = distributed.all_reduce_sum([sums["tokens"]], info.device)[0]
    record = {"type": "train", "step": state["global_step"], "epoch": state["epoch"] + 1, "loss": sums["loss"] / steps}
    record.update({name: sums[name] / steps for name in objective.active})
    if objective.spec.selects_tokens:  # fraction of paired answer positions the logit term used
        record["token_kept"] = sums["kept"] / max(sums["candidates"], 1.0)
    if "feature" in objective.active:  # fraction of the teacher's units the student matches
        record["feature_kept"] = objective.plan.feature_kept_fraction
    record.update({"lr": sums["lr"], "tokens_per_s": tokens / max(sums["time"], 1e-9),
                   "peak_memory_gb": peak_memory_gb(info.device)})
    return record


def restore(resume: dict, state: dict, model, optimizer, scheduler, info: distributed.DistInfo,
            projections=None) -> dict:
    saved = resume["trainer_state"]
    for key in ("world_size", "batch_size_training", "gradient_accumulation_steps", "seed", "train_examples"):
        if saved.get(key) != state[key]:
            raise UserError(f"--resume_from was written with {key}={saved.get(key)}, this run has {state[key]}: "
                            "resume with the same data, seed, batch size, accumulation and process count")
    if saved.get("hidden_projections") != state["hidden_projections"]:
        raise UserError(f"--resume_from was trained with hidden-state projections {saved.get('hidden_projections')}, "
                        f"this run has {state['hidden_projections']}: resume with the same hidden-state flags")
    for key in ("teacher", "loss"):
        if saved.get(key) != state[key] and info.is_main:
            warnings.warn(f"resuming with {key} {state[key]!r}; the checkpoint was trained with {saved.get(key)!r}")
    if resume["optimizer"] is None:
        raise UserError("--resume_from holds no optimizer state (it was saved with --save_optimizer false): "
                        "start a new run with --model_name pointing at it instead")
    distributed.load_optimizer_state_dict(model, optimizer, resume["optimizer"], projections)
    scheduler.load_state_dict(resume["scheduler"])
    checkpoint.set_rng_state(resume["rng"])
    progress = ("global_step", "epoch", "step_in_epoch", "best_eval_loss", "best_checkpoint", "last_checkpoint",
                "grad_scaler")
    return {**state, **{k: saved[k] for k in progress if k in saved}}


def save_model(model, path: Path, info: distributed.DistInfo, projections=None) -> None:
    """save_pretrained with safetensors (the adapter only with LoRA); rank 0 writes, FSDP gathers to it.
    The hidden-state projections, when trained, go beside it (hidden_projections.safetensors)."""
    distributed.save_pretrained(model, path, info)
    if projections is not None and info.is_main:
        intermediate.save_projections(projections, path)


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
