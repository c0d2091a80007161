"""The distillation recipe: `setup` -> `train_step` -> the loop, in one readable place.

    python finetuning.py --model_name STUDENT --dataset.file LOADER.py --output_dir OUT \
        --distillation --distillation_config.model_name TEACHER --distillation_config.distil_factor 1.5

`setup` turns the frozen configuration into a `TrainState`: the two models (the student wrapped for
DDP or sharded by FSDP2, the frozen teacher), the paired teacher/student data, the resolved loss
(`objective.Objective`), the optimizer and schedule, and the run's progress (restored on resume).
`train_step` is one optimizer step: it counts every term's units over all the step's micro-batches
on all processes first, so that each micro-batch's loss is divided by the step's totals (a per-token
mean over the whole step, not a mean of per-micro-batch means); then forward (teacher without grad,
student to its last hidden states, logits only at answer rows), backward, clip, step. `train` runs the
epochs: log every --log_every steps, validate and save every --save_step steps and at each epoch end.
"""
from __future__ import annotations

import math
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from llm_recipes import checkpoint, data, distributed, flags, freezing, intermediate, metrics_log, models, objective
from llm_recipes import interrupt, on_policy, preflight
from llm_recipes.config import TRAINER, RunConfig, RunPlan, run_config
from llm_recipes.errors import RunInterrupted, UserError
from llm_recipes.losses.family import PairArtifacts
from llm_recipes.metrics_log import MetricsLog, peak_memory_gb
from llm_recipes.objective import Answers, Counts, Models, Objective
from llm_recipes.optim import build_optimizer, build_scheduler

# ------------------------------------------------------------------------------------------- state
@dataclass
class Progress:
    """Where the run is: saved in every checkpoint's trainer_state.json, restored by --resume_from."""

    global_step: int = 0
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps done in it
    best_eval_loss: Optional[float] = None
    best_checkpoint: Optional[str] = None
    last_checkpoint: Optional[str] = None
    grad_scaler: Optional[dict] = None  # fp16 only


@dataclass
class TrainState:
    """Everything the step and the loop read; built by `setup`."""

    run: RunConfig
    plan: RunPlan
    info: distributed.DistInfo
    models: Models
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    student_tokenizer: object = None
    train_split: Optional[data.PairedSplit] = None
    val_split: Optional[data.PairedSplit] = None
    pad_ids: tuple = (None, None)
    steps_per_epoch: int = 0
    total_steps: int = 0
    identity: dict = field(default_factory=dict)  # what a checkpoint must share with the run that resumes it
    progress: Progress = field(default_factory=Progress)
    log: Optional[MetricsLog] = None
    last_eval: Optional[dict] = None
    on_policy: Optional[on_policy.OnPolicy] = None  # --distillation_config.lmbda > 0: the student's own answers


# ------------------------------------------------------------------------------------------- set-up
def dtype_of(pure_bf16: bool) -> torch.dtype:
    return torch.bfloat16 if pure_bf16 else torch.float32


def load_models(run: RunConfig, plan: RunPlan, resume: Optional[Path], info: distributed.DistInfo):
    """The student (from the checkpoint when resuming) and, when a term needs it, the frozen teacher."""
    t, d = run.train, run.distillation
    if (t.use_fp16 or d.use_fp16) and info.device.type != "cuda":
        raise UserError("--use_fp16 needs a CUDA GPU (fp16 autocast with a gradient scaler): use "
                        "--mixed_precision (bf16) on this machine")
    student_source = str(resume) if (resume is not None and not t.use_peft) else t.model_name
    student = models.load_model(student_source, encoder_decoder=t.encoder_decoder, dtype=dtype_of(t.pure_bf16),
                                trust_remote_code=t.trust_remote_code, attn_implementation=plan.student_attention,
                                what="student model")
    if t.freeze_layers:
        models.freeze_first_layers(student, t.num_freeze_layers)
    freezing.apply_freezing(student, t.freeze_regex, t.unfreeze_regex, t.spectrum_yaml)
    if t.use_peft:
        from llm_recipes import lora

        student = (lora.load_lora_checkpoint(student, str(resume)) if resume is not None
                   else lora.add_lora(student, run.lora, t.encoder_decoder))
    teacher = None
    if plan.uses_teacher and d.teacher_cache is None:  # a cached teacher is never loaded
        teacher = models.load_model(d.model_name, encoder_decoder=d.encoder_decoder, dtype=dtype_of(d.pure_bf16),
                                    trust_remote_code=d.trust_remote_code,
                                    attn_implementation="sdpa" if d.use_fast_kernels else None, what="teacher model")
        models.freeze_teacher(teacher)
    return student, teacher


def pair_artifacts(plan: RunPlan, student_tokenizer, teacher_tokenizer, info) -> PairArtifacts:
    """What the loss's family builds of the tokenizer pair (the projection map, the shared tokens), cached on
    disk per pair: rank 0 builds or reads it first, the other processes then read what it wrote."""
    family = plan.spec.family
    if family is None:
        return PairArtifacts()
    artifacts = family.artifacts(student_tokenizer, teacher_tokenizer) if info.is_main else None
    distributed.barrier()
    if not info.is_main:
        artifacts = family.artifacts(student_tokenizer, teacher_tokenizer)
    elif artifacts.summary:
        print(artifacts.summary)
    return artifacts


def load_data(run: RunConfig, plan: RunPlan, tokenizers: tuple, student, teacher, projection_map, info,
              cache=None):
    """(train split, validation split or None): the loader file called once per tokenizer, paired, aligned
    by text when the plan says so, and found in the teacher cache when there is one (`cache`: its metadata)."""
    student_tokenizer, teacher_tokenizer = tokenizers
    t, d = run.train, run.distillation
    teacher_name, teacher_encoder_decoder, teacher_max = d.model_name, d.encoder_decoder, None
    if cache is not None:  # the examples the cache was written for: its teacher's prompts, kind and length limit
        teacher_name, teacher_encoder_decoder, teacher_max = cache.teacher, cache.encoder_decoder, cache.max_positions
    elif t.distillation:
        teacher_config = teacher.config if teacher is not None else models.load_config(
            d.model_name, trust_remote_code=d.trust_remote_code, what="teacher model")
        teacher_max = models.max_positions(teacher_config)
    loader = data.import_loader(run.dataset.file)
    split_args = dict(student_tokenizer=student_tokenizer, student_name=t.model_name,
                      student_encoder_decoder=t.encoder_decoder,
                      student_max=models.max_positions(student.config, t.context_length),
                      teacher_tokenizer=teacher_tokenizer, teacher_name=teacher_name,
                      teacher_encoder_decoder=teacher_encoder_decoder, teacher_max=teacher_max,
                      teacher_eos=plan.distill_eos)
    names = ("train", "validation") if t.run_validation else ("train",)
    splits = [data.build_paired_split(loader, run.dataset, name, **split_args) for name in names]
    if plan.text_groups:
        end = end_tokens(plan, student_tokenizer, teacher_tokenizer, student)
        splits = [data.attach_alignment(split, student_tokenizer, teacher_tokenizer, projection_map, end,
                                        plan.continuation) for split in splits]
    if cache is not None and plan.spec.distills:
        splits = [data.attach_teacher_cache(split, d.teacher_cache, name, teacher_tokenizer)
                  for split, name in zip(splits, names)]
    if info.is_main:
        for name, split in zip(("train", "validation"), splits):
            print(f"{name}: {len(split)} examples ({split.dropped_too_long} dropped as too long, "
                  f"{split.without_answer} without answer tokens)" + describe_alignment(split.alignment))
    return splits[0], splits[1] if len(splits) > 1 else None


def end_tokens(plan: RunPlan, student_tokenizer, teacher_tokenizer, student) -> Optional[tuple]:
    """(student EOS ids, teacher EOS ids) when the end of the answer is distilled (--distillation_config.distill_eos):
    the ids that end a student's answer (its tokenizer's and its generation config's) and the teacher's EOS."""
    if not plan.distill_eos:
        return None
    return tuple(on_policy.eos_ids(student, student_tokenizer)), (teacher_tokenizer.eos_token_id,)


def describe_alignment(figures: dict) -> str:
    if not figures:
        return ""
    text = (f"; text alignment: {figures['groups']:,} groups, {figures['one_to_one_share']:.1%} one-to-one, "
            f"largest {figures['largest_group']['teacher_tokens']}:{figures['largest_group']['student_tokens']}, "
            f"{figures['unaligned_examples']} examples unaligned")
    if "projection_served_share" in figures:
        text += f"; the projection serves {figures['projection_served_share']:.1%} of the student's answer tokens"
    if "continued_share" in figures:
        text += (f"; {figures['continued_share']:.1%} of the groups start where the teacher could have continued "
                 "the token before (projected_continuation)")
    return text


def schedule(run: RunConfig, train_examples: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the whole run)."""
    t = run.train
    per_epoch = data.steps_per_epoch(train_examples, t.batch_size_training, t.gradient_accumulation_steps, world_size)
    if per_epoch == 0:
        raise UserError(f"the training split has {train_examples} examples, fewer than one optimizer step needs "
                        f"(batch {t.batch_size_training} x accumulation {t.gradient_accumulation_steps} x "
                        f"{world_size} processes): lower --batch_size_training")
    total = per_epoch * t.num_epochs
    return per_epoch, min(total, t.max_train_step) if t.max_train_step else total


def place_models(run: RunConfig, plan: RunPlan, student, teacher, probe: dict, info) -> Models:
    """Student and teacher on the device (wrapped or sharded), checked against their own logits, and the
    hidden-state projections when a hidden-state term needs them."""
    t = run.train
    student.train()
    wrapped = distributed.wrap_student(student, run, info)  # moves it to the device (FSDP: shard by shard)
    models.check_output_head(student, probe["student"], t.encoder_decoder, "student")
    distributed.release(student)
    if teacher is not None:
        teacher = distributed.shard_teacher(teacher, run.distillation, info)
        models.check_output_head(teacher, probe["teacher"], run.distillation.encoder_decoder, "teacher")
        distributed.release(teacher)
    return Models(wrapped, distributed.unwrap(wrapped), teacher)


def add_projections(run: RunConfig, found: Models, layers, resume: Optional[Path], info) -> Models:
    """The learned hidden-state projections (replicated on every process), restored when resuming."""
    projections = intermediate.build_projections(layers, dtype_of(run.train.pure_bf16), info.device) if layers else None
    if projections is not None:
        distributed.broadcast_parameters(projections)
        if resume is not None:
            intermediate.load_projections(projections, str(resume))
    return Models(found.student, found.student_inner, found.teacher, projections)


def run_identity(run: RunConfig, plan: RunPlan, state_models: Models, train_examples: int, world_size: int) -> dict:
    t = run.train
    projections = state_models.projections
    return {"train_examples": train_examples, "world_size": world_size, "batch_size_training": t.batch_size_training,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "seed": t.seed, "student": t.model_name,
            "teacher": run.distillation.model_name if t.distillation else None, "loss": plan.spec.name,
            "projected_continuation": plan.continuation,
            "hidden_projections": sorted(projections.keys()) if projections is not None else None}


def prepare_run_folder(run: RunConfig, checked: preflight.CheckedRun, info) -> Path:
    """The output folder, writable; an earlier run's files removed with --overwrite_output_dir, a killed
    save's leftovers removed; the run's configuration written."""
    t = run.train
    if info.is_main and t.overwrite_output_dir and checkpoint.holds_a_run(t.output_dir) and checked.resume is None:
        checkpoint.clear_run(t.output_dir)
        print(f"--overwrite_output_dir: removed the earlier run in {t.output_dir}")
    distributed.barrier()
    output = checkpoint.prepare_output_dir(t.output_dir)
    if info.is_main:
        stale = checkpoint.remove_stale(t.output_dir)
        if stale:
            print(f"removed {len(stale)} unfinished checkpoint folder(s) a killed save left: {', '.join(stale)}")
        print("resolved configuration:\n" + run.to_json())
        (output / checkpoint.RUN_CONFIG).write_text(run.to_json())
    return output


def open_log(run: RunConfig, output: Path, resumed_step: Optional[int], info) -> MetricsLog:
    """metrics.jsonl (a resumed run first drops the lines past its checkpoint, so each step is there once),
    and TensorBoard / W&B when asked."""
    t, path = run.train, output / "metrics.jsonl"
    if info.is_main and resumed_step is not None:
        metrics_log.truncate(path, resumed_step)
    wandb = None
    if t.use_wandb:
        w = run.wandb
        wandb = {"project": w.project, "entity": w.entity, "name": w.name, "group": w.group, "tags": w.tags,
                 "notes": w.notes, "mode": w.mode, "config": run.to_dict(), "dir": str(output)}
    return MetricsLog(path, enabled=info.is_main, wandb_settings=wandb,
                      tensorboard_dir=output / metrics_log.TENSORBOARD_DIR if t.use_tensorboard else None)


def setup(run: RunConfig) -> TrainState:
    """Models, data, loss, optimizer and progress of a run (restored from --resume_from when given)."""
    t = run.train
    quiet_libraries()
    info = distributed.setup(fsdp=t.enable_fsdp or run.distillation.enable_fsdp,
                             timeout_minutes=t.dist_timeout_minutes)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    checked = preflight.check_run(run)  # every input, before any model or data set is loaded
    output = prepare_run_folder(run, checked, info)
    resume = checkpoint.load_resume_state(str(checked.resume), info.rank) if checked.resume else None
    student_tokenizer, teacher_tokenizer, plan = checked.student_tokenizer, checked.teacher_tokenizer, checked.plan
    if t.distillation and not plan.uses_teacher and info.is_main:
        print("distil_factor 0: plain fine-tuning on the loader's labels; the teacher model is not loaded")
    elif checked.cache is not None and info.is_main:
        c = checked.cache
        print(f"teacher: the cache {run.distillation.teacher_cache} of {c.teacher} (top {c.topk} of {c.vocab_size:,} "
              f"ids, {c.storage}, temperature {c.temperature:g}); the teacher model is not loaded")
    student, teacher = load_models(run, plan, checked.resume, info)
    artifacts = pair_artifacts(plan, student_tokenizer, teacher_tokenizer, info)
    spec = plan.spec.with_artifacts(artifacts)
    train_split, val_split = load_data(run, plan, (student_tokenizer, teacher_tokenizer), student, teacher,
                                       artifacts.projection_map, info, checked.cache)
    per_epoch, total_steps = schedule(run, len(train_split), info.world_size)
    pad_ids = (student_tokenizer.pad_token_id,
               teacher_tokenizer.pad_token_id if teacher_tokenizer is not None else None)
    probe = data.move(data.PairedBatches(train_split, *pad_ids)[[0]], info.device)
    placed = place_models(run, plan, student, teacher, probe, info)
    layers = intermediate.plan_layers(run, student, placed.teacher, probe, distributed.is_fsdp(placed.teacher)) \
        if plan.uses_teacher else None
    distributed.release(student)
    distributed.release(placed.teacher)
    placed = add_projections(run, placed, layers, checked.resume, info)
    objective_ = objective.build_objective(run, plan.distil_factor, spec, layers, checked.cache)
    sampled = on_policy.OnPolicy(
        on_policy.Sampling.from_config(run.distillation, total_steps), (student_tokenizer, teacher_tokenizer),
        on_policy.eos_ids(placed.student_inner, student_tokenizer), plan.same_tokenizer, plan.text_groups,
        artifacts.projection_map, end_tokens(plan, student_tokenizer, teacher_tokenizer, placed.student_inner),
        plan.continuation) \
        if run.distillation.lmbda > 0 else None
    first = next(data.train_micro_batches(len(train_split), 0, t.seed, t.batch_size_training, 1, info.world_size,
                                          info.rank))
    report_setup(run, plan, placed, objective_, data.PairedBatches(train_split, *pad_ids)[first], info,
                 sampled.sampling if sampled is not None else None)
    optimizer = build_optimizer(distributed.trainables(placed.student, placed.projections), t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=t.use_fp16)  # fp16 needs loss scaling, bf16 does not
    state = TrainState(run, plan, info, placed, objective_, optimizer, scheduler, scaler,
                       student_tokenizer, train_split, val_split, pad_ids, per_epoch, total_steps,
                       run_identity(run, plan, placed, len(train_split), info.world_size), on_policy=sampled)
    objective.count_units(state.objective, probe)  # refuse unpairable rows (hidden-state / feature terms) up front
    if resume is not None:
        restore(state, resume)
    state.log = open_log(run, output, state.progress.global_step if resume is not None else None, info)
    return state


def report_setup(run: RunConfig, plan: RunPlan, placed: Models, objective_: Objective, first_batch: dict,
                 info, sampling: Optional[on_policy.Sampling] = None) -> None:
    if not info.is_main:
        return
    trainable, total = models.count_parameters(placed.student_inner)
    pairing = ""
    if plan.spec.distills and not plan.same_tokenizer:
        pairing = f"; answer tokens paired by {plan.spec.alignment}"
        if plan.text_groups:
            pairing += f" ({data.one_to_one_share(first_batch):.0%} of the first batch's groups are one-to-one)"
    print(f"student: {trainable:,} trainable of {total:,} parameters; loss: "
          f"{objective.describe(objective_, run.train.distillation)}{pairing}")
    if sampling is not None:
        print(sampling.describe())
    layers = objective_.layers
    if layers is not None:
        print(layers.describe() + (f"; projections: {models.count_parameters(placed.projections)[0]:,} parameters"
                                   if placed.projections is not None else ""))


def restore(state: TrainState, resume: dict) -> None:
    """Continue a checkpoint: same data, seed, batch and processes required; optimizer, schedule, RNG and
    progress restored."""
    saved = resume["trainer_state"]
    for key in ("world_size", "batch_size_training", "gradient_accumulation_steps", "seed", "train_examples"):
        if saved.get(key) != state.identity[key]:
            raise UserError(f"--resume_from was written with {key}={saved.get(key)}, this run has "
                            f"{state.identity[key]}: resume with the same data, seed, batch size, accumulation and "
                            "process count")
    if saved.get("hidden_projections") != state.identity["hidden_projections"]:
        raise UserError(f"--resume_from was trained with hidden-state projections {saved.get('hidden_projections')}, "
                        f"this run has {state.identity['hidden_projections']}: resume with the same hidden-state flags")
    for key in ("teacher", "loss", "projected_continuation"):  # a checkpoint from before it holds no such key
        if saved.get(key) != state.identity[key] and state.info.is_main:
            warnings.warn(f"resuming with {key} {state.identity[key]!r}; the checkpoint was trained with "
                          f"{saved.get(key)!r}")
    if resume["optimizer"] is None:
        raise UserError("--resume_from holds no optimizer state (it was saved with --save_optimizer false): "
                        "start a new run with --model_name pointing at it instead")
    distributed.load_optimizer_state_dict(state.models.student, state.optimizer, resume["optimizer"],
                                          state.models.projections)
    state.scheduler.load_state_dict(resume["scheduler"])
    checkpoint.set_rng_state(resume["rng"])
    state.progress = Progress(**{k: saved[k] for k in Progress.__dataclass_fields__ if k in saved})
    best = state.progress.best_checkpoint
    if best is not None and not best_candidate(state, checkpoint.checkpoint_step(best)):
        # saved before best_candidate's rule, or under another on_policy_start: not a best this run may keep
        state.progress.best_eval_loss = state.progress.best_checkpoint = None
    if state.progress.grad_scaler is not None:
        state.scaler.load_state_dict(state.progress.grad_scaler)


def quiet_libraries() -> None:
    """Keep the console to our own progress bars: no per-file loading bars from transformers/datasets."""
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


# --------------------------------------------------------------------------------------- the step
NAN_ADVICE = "lower --lr, check the data for empty or broken examples, or try without --pure_bf16"
TERM_NAMES = {"ce": "cross-entropy (CE)", "distill": "distillation", "hidden": "hidden-state", "feature": "feature"}


def check_finite(value: torch.Tensor, what: str, where: str) -> None:
    if not torch.isfinite(value).all():
        raise UserError(f"{what} is {value.item() if value.numel() == 1 else 'not finite'} at {where}: {NAN_ADVICE}")


def check_terms_finite(loss: torch.Tensor, terms, where: str, device) -> None:
    """All processes stop together when any has a non-finite loss; the message names the term(s)."""
    finite = bool(torch.isfinite(loss.detach()).all())
    bad = {} if finite else \
        {name: float(value.detach()) for name, value in terms.sums.items() if not torch.isfinite(value.detach()).all()}
    if distributed.any_rank(not finite, device):
        found = ", ".join(f"{TERM_NAMES.get(name, name)} term {value}" for name, value in bad.items())
        raise UserError(f"the loss is not finite at {where}: " + (found or "on another process") + f"; {NAN_ADVICE}")


def train_step(state: TrainState, micro_batches: list[dict]) -> dict:
    """One optimizer step over this process's micro-batches (one per accumulation step; on CPU or the
    device). Returns the step's metrics: `loss` and each active term (means over the step's units, all
    processes), `candidates` / `kept` positions, this process's `tokens`, and the `lr` it used; only
    `tokens` and `lr` when no process had an answer token; with on-policy steps possible, `on_policy` and
    `without_ce` (an on-policy step without --on_policy_ce)."""
    objective_, info, progress = state.objective, state.info, state.progress
    sampled = state.on_policy is not None and on_policy.is_on_policy_step(
        state.on_policy.sampling, state.run.train.seed, progress.global_step, info.device)
    if not sampled:
        passes = [Pass(batch) for batch in micro_batches]
    else:
        passes = [Pass(batch, Answers.SAMPLED) for batch in sample_answers(state, micro_batches)]
        if state.on_policy.sampling.keep_ce:  # --on_policy_ce: the data set's answers, CE only
            passes += [Pass(batch, Answers.CE_ONLY) for batch in micro_batches]
    with_ce = any(p.answers is not Answers.SAMPLED for p in passes)
    counts = [objective.count_units(objective_, p.batch, p.answers) for p in passes]
    totals = Counts(*distributed.all_reduce_sum([sum(column) for column in zip(*counts)], info.device))
    where = f"step {progress.global_step + 1} (epoch {progress.epoch + 1})"
    metrics = {"tokens": 0}
    if not any(totals):
        warnings.warn(f"skipping {where}: its batches have no answer tokens (all labels are -100)")
    else:
        sums = accumulate_gradients(state, passes, counts, totals, where)
        metrics["tokens"] = sums.pop("tokens")
        optimizer_step(state, where)
        reduced = dict(zip(sums, distributed.all_reduce_sum(list(sums.values()), info.device)))
        metrics.update({"loss": reduced["loss"], "candidates": reduced["candidates"], "kept": reduced["kept"]})
        metrics.update({name: reduced[name] / max(getattr(totals, name), 1.0) for name in objective_.active
                        if with_ce or name != "ce"})
    if state.on_policy is not None:
        metrics["on_policy"], metrics["without_ce"] = sampled, not with_ce
        state.on_policy.stats.steps += 1
        state.on_policy.stats.on_policy_steps += sampled
    state.optimizer.zero_grad(set_to_none=True)
    metrics["lr"] = state.scheduler.get_last_lr()[0]  # the rate this step used
    state.scheduler.step()
    return metrics


def sample_answers(state: TrainState, micro_batches: list[dict]) -> list[dict]:
    """The micro-batches rebuilt on the student's own sampled answers (llm_recipes.on_policy)."""
    t, info = state.run.train, state.info
    student = state.models.student_inner
    synced = distributed.is_fsdp(student) and info.world_size > 1  # FSDP: every process decodes as long
    return state.on_policy.batches(student, micro_batches, state.pad_ids, info.device, synced,
                                   lambda: objective.autocast(info.device, t.mixed_precision, t.use_fp16))


class Pass(NamedTuple):
    """One forward and backward of a step: a micro-batch and the terms it trains."""

    batch: dict
    answers: Answers = Answers.DATA  # the data set's, the student's sampled ones, or the data set's for the CE alone


def accumulate_gradients(state: TrainState, passes: list[Pass], counts: list[Counts], totals: Counts,
                         where: str) -> dict:
    """Forward and backward of each pass with its share of the step's loss; the summed terms (and this
    process's `tokens`: every pass's, so an on_policy_ce step counts its prompts twice, as it runs them twice)."""
    objective_, info = state.objective, state.info
    sums = dict.fromkeys(["loss", *objective_.active, "candidates", "kept"], 0.0)
    sums["tokens"] = 0
    for i, (batch, answers) in enumerate(passes):
        if info.world_size == 1 and not any(counts[i]):
            warnings.warn(f"skipping a micro-batch of {where}: all its labels are -100")
            continue
        batch = data.move(batch, info.device)
        with distributed.no_sync(state.models.student, i < len(passes) - 1):
            terms = objective.compute_terms(objective_, state.models, batch, info.device, answers)
            loss = objective.combine(objective_, terms, totals)
            check_terms_finite(loss, terms, where, info.device)
            state.scaler.scale(loss * info.world_size).backward()
        distributed.release(state.models.teacher)
        sums["loss"] += float(loss.detach())
        for name in objective_.active:
            sums[name] += float(terms.sums[name].detach())
        sums["candidates"] += terms.candidate_positions
        sums["kept"] += terms.kept_positions
        sums["tokens"] += int(batch["student"]["attention_mask"].sum())
    return sums


def optimizer_step(state: TrainState, where: str) -> None:
    """Gradients of the replicated projections averaged, unscaled (fp16), clipped, checked, applied."""
    projections = state.models.projections
    if projections is not None:
        distributed.all_reduce_gradients(projections)
    state.scaler.unscale_(state.optimizer)
    grad_norm = clip_gradients(state.models.student_inner, state.run.train, projections)
    if not state.scaler.is_enabled():  # with fp16 an overflow only skips the step and lowers the scale
        check_finite(grad_norm, "the gradient norm", where)
    state.scaler.step(state.optimizer)
    state.scaler.update()


def clip_gradients(model, train_config, projections=None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    extra = [p for p in projections.parameters() if p.grad is not None] if projections is not None else []
    if not params and not extra:
        return torch.zeros(())
    max_norm = train_config.gradient_clipping_threshold if train_config.gradient_clipping else float("inf")
    return distributed.clip_grad_norm(params, max_norm, extra)


# ------------------------------------------------------------------------------- evaluation, saving
@torch.no_grad()
def evaluate(state: TrainState) -> dict:
    """Token-level CE, every other active term and perplexity over the whole validation split."""
    t, info, objective_ = state.run.train, state.info, state.objective
    state.models.student.eval()
    batches = data.eval_batches(len(state.val_split), t.val_batch_size, info.world_size, info.rank)
    if t.max_eval_step:
        batches = batches[: t.max_eval_step]
    loader = data.loader_over(batches, state.val_split, *state.pad_ids, t.num_workers_dataloader, info.device)
    names = objective_.active
    sums = [0.0] * (2 * len(names))
    for batch in tqdm(loader, desc="eval", leave=False, disable=not info.is_main):
        terms = objective.compute_terms(objective_, state.models, data.move(batch, info.device), info.device)
        values = [float(terms.sums[n]) for n in names] + [float(getattr(terms.counts, n)) for n in names]
        sums = [s + v for s, v in zip(sums, values)]
    sums = distributed.all_reduce_sum(sums, info.device)
    distributed.release(state.models.student)
    distributed.release(state.models.teacher)
    state.models.student.train()
    means = {n: sums[i] / max(sums[len(names) + i], 1.0) for i, n in enumerate(names)}
    ce = means["ce"]
    result = {"eval_ce": ce, "eval_ppl": math.exp(min(ce, 50.0)), "eval_tokens": int(sums[len(names)])}
    result.update({f"eval_{n}": means[n] for n in names if n != "ce"})
    result["eval_loss"] = sum(objective_.weights[n] * means[n] for n in names)
    return result


def save_checkpoint(state: TrainState, result: Optional[dict]) -> None:
    """Checkpoint the step (every rank takes part); keep the best by eval loss and the last."""
    t, progress, info = state.run.train, state.progress, state.info
    if not t.save_model:
        return
    name = checkpoint.checkpoint_name(progress.global_step)
    if result is not None and best_candidate(state) and (
            progress.best_eval_loss is None or result["eval_loss"] < progress.best_eval_loss):
        progress.best_eval_loss, progress.best_checkpoint = result["eval_loss"], name
    progress.last_checkpoint = name
    if state.scaler.is_enabled():
        progress.grad_scaler = state.scaler.state_dict()
    models_ = state.models
    checkpoint.save_checkpoint(
        t.output_dir, name, rank=info.rank, model_saver=lambda path: save_model(models_, path, info),
        tokenizer=state.student_tokenizer, run_config_json=state.run.to_json(),
        trainer_state={**state.identity, **vars(progress)},
        optimizer_state=distributed.optimizer_state_dict(models_.student, state.optimizer, models_.projections)
        if t.save_optimizer else None,
        scheduler_state=state.scheduler.state_dict(), agree=distributed.any_rank)
    if info.is_main:
        if not t.save_all:
            checkpoint.prune(t.output_dir, {progress.best_checkpoint, progress.last_checkpoint} - {None})
        checkpoint.point(t.output_dir, "last", progress.last_checkpoint)
        checkpoint.point(t.output_dir, "best", progress.best_checkpoint or progress.last_checkpoint)


def best_candidate(state: TrainState, step: Optional[int] = None) -> bool:
    """Whether the evaluation after `step` (default: this one) may become best/. With
    --distillation_config.on_policy_start, only those after the step where on-policy steps may begin
    (`Sampling.first_step`): a run asked to end on-policy must not hand back, as its best, weights that never
    trained on-policy (the eval loss, on the data set's answers, was lowest there in every tiny run we made).
    `restore` drops a resumed best from before that step."""
    step = state.progress.global_step if step is None else step
    return state.on_policy is None or step > state.on_policy.sampling.first_step


def save_model(models_: Models, path: Path, info: distributed.DistInfo) -> None:
    """save_pretrained with safetensors (the adapter only with LoRA); rank 0 writes, FSDP gathers to it.
    The hidden-state projections, when trained, go beside it (hidden_projections.safetensors)."""
    distributed.save_pretrained(models_.student_inner, path, info)
    if models_.projections is not None and info.is_main:
        intermediate.save_projections(models_.projections, path)


def validate_and_save(state: TrainState) -> None:
    result = evaluate(state) if state.val_split is not None else None
    if result is not None:
        progress = state.progress
        state.log.write({"type": "eval", "step": progress.global_step, "epoch": progress.epoch, **result})
        if state.info.is_main:
            tqdm.write(f"step {progress.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        state.last_eval = result
    save_checkpoint(state, result)


# ------------------------------------------------------------------------------------------- the run
class LogWindow:
    """Sums of the steps since the last metrics line; `record` writes their means as one train line."""

    def __init__(self, active: tuple):
        self.active, self.steps, self.time, self.tokens, self.lr = active, 0, 0.0, 0, 0.0
        self.sums = dict.fromkeys(["loss", *active, "candidates", "kept"], 0.0)
        self.without_ce = 0  # on-policy steps that train no CE (all of them, unless --on_policy_ce)

    def add(self, metrics: dict, seconds: float) -> None:
        self.steps, self.time, self.tokens, self.lr = self.steps + 1, self.time + seconds, \
            self.tokens + metrics["tokens"], metrics["lr"]
        self.without_ce += bool(metrics.get("without_ce"))
        for key in self.sums:
            self.sums[key] += metrics.get(key, 0.0)

    def record(self, state: TrainState) -> dict:
        """One train line of metrics.jsonl: means over the logged steps of the loss and of every active term."""
        steps, progress = max(self.steps, 1), state.progress
        tokens = distributed.all_reduce_sum([self.tokens], state.info.device)[0]
        line = {"type": "train", "step": progress.global_step, "epoch": progress.epoch + 1,
                "loss": self.sums["loss"] / steps}
        labelled = steps - self.without_ce  # the CE's mean is over the steps that train it
        line.update({name: self.sums[name] / (labelled if name == "ce" else steps) for name in self.active
                     if name != "ce" or labelled > 0})
        if state.on_policy is not None:
            line.update(state.on_policy.metrics(state.info.device))
        if state.objective.spec.selects_tokens:  # fraction of paired answer positions the logit term used
            line["token_kept"] = self.sums["kept"] / max(self.sums["candidates"], 1.0)
        if "feature" in self.active:  # fraction of the teacher's units the student matches
            line["feature_kept"] = state.objective.layers.feature_kept_fraction
        line.update({"lr": self.lr, "tokens_per_s": tokens / max(self.time, 1e-9), "step_s": self.time / steps,
                     "peak_memory_gb": peak_memory_gb(state.info.device)})
        return line


def epoch_micro_batches(state: TrainState, epoch: int):
    """This process's micro-batches of the epoch from the step it is at, collated in order."""
    t = state.run.train
    micro_batches = list(data.train_micro_batches(
        len(state.train_split), epoch, t.seed, t.batch_size_training, t.gradient_accumulation_steps,
        state.info.world_size, state.info.rank, start_step=state.progress.step_in_epoch))
    return iter(data.loader_over(micro_batches, state.train_split, *state.pad_ids, t.num_workers_dataloader,
                                 state.info.device))


def train(run: RunConfig) -> dict:
    """Set up, train for --num_epochs (or --max_train_step), validate and save; returns the progress and the
    last evaluation. SIGTERM / SIGINT: a checkpoint at the current step, then exit (llm_recipes.interrupt)."""
    state = setup(run)
    t, progress = run.train, state.progress
    window = LogWindow(state.objective.active)
    with interrupt.StopSignals() as signals:
        while progress.epoch < t.num_epochs and progress.global_step < state.total_steps:
            batches = epoch_micro_batches(state, progress.epoch)
            with tqdm(total=state.steps_per_epoch, initial=progress.step_in_epoch, dynamic_ncols=True,
                      desc=f"epoch {progress.epoch + 1}/{t.num_epochs}", disable=not state.info.is_main) as bar:
                while progress.step_in_epoch < state.steps_per_epoch and progress.global_step < state.total_steps:
                    started = time.perf_counter()
                    metrics = train_step(state, [next(batches) for _ in range(t.gradient_accumulation_steps)])
                    progress.global_step += 1
                    progress.step_in_epoch += 1
                    window.add(metrics, time.perf_counter() - started)
                    bar.update(1)
                    bar.set_postfix(loss=f"{window.sums['loss'] / window.steps:.4f}")
                    if progress.global_step % t.log_every == 0:
                        state.log.write(window.record(state))
                        window = LogWindow(state.objective.active)
                    between = progress.step_in_epoch < state.steps_per_epoch and \
                        progress.global_step < state.total_steps
                    if t.save_step and progress.global_step % t.save_step == 0 and between:
                        validate_and_save(state)
                    if distributed.any_rank(signals.received is not None, state.info.device):
                        bar.close()  # the message below goes on its own line
                        stop(state, window, signals.name)
            if progress.step_in_epoch >= state.steps_per_epoch:  # the epoch is complete: a resume starts the next
                progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            validate_and_save(state)
    state.log.close()
    if state.info.is_main:
        report(state)
    distributed.finish()
    return {"state": {**state.identity, **vars(progress)}, "eval": state.last_eval}


def stop(state: TrainState, window: LogWindow, signal_name: str) -> None:
    """After a stop signal: the steps not yet logged written, a checkpoint of this step, RunInterrupted."""
    t, progress = state.run.train, state.progress
    if window.steps:
        state.log.write(window.record(state))
    where = f"step {progress.global_step}"
    if not t.save_model:
        saved = "nothing saved (--save_model false)"
    else:
        if progress.last_checkpoint != checkpoint.checkpoint_name(progress.global_step):  # not saved just now
            save_checkpoint(state, None)
        saved = (f"checkpoint {Path(t.output_dir) / checkpoint.CHECKPOINTS_DIR / progress.last_checkpoint}; "
                 f"continue with --resume_from {t.output_dir}")
    state.log.close()
    distributed.finish()  # every process stops at this step (any_rank above)
    raise RunInterrupted(f"stopped by {signal_name} at {where}: {saved}", getattr(signal, signal_name))


def report(state: TrainState) -> None:
    output, progress = Path(state.run.train.output_dir), state.progress
    print(f"done: {progress.global_step} optimizer steps")
    if progress.last_checkpoint:
        print(f"model saved to {output / 'checkpoints' / progress.last_checkpoint} (last) and "
              f"{output / 'checkpoints' / (progress.best_checkpoint or progress.last_checkpoint)} (best)")
    if state.last_eval is not None:
        print(f"eval loss {state.last_eval['eval_loss']:.4f} (CE {state.last_eval['eval_ce']:.4f}, "
              f"perplexity {state.last_eval['eval_ppl']:.2f})")
    print(f"metrics: {output / 'metrics.jsonl'}")



# fire's target (`main(**flags)`; user errors: one line, exit code 2) and the console script
main, cli = flags.entry_points(TRAINER, lambda parsed: train(run_config(parsed)), cleanup=distributed.teardown)
