"""A run's inputs, checked before any model or data set is loaded: every problem found, one line each.

`check_run` looks at what a run will need, in seconds: the output folder (a folder holding an earlier
run is refused unless the run is continued or --overwrite_output_dir), --resume_from, the loader file
and its data (a local JSONL source parses line by line, its first example has the task's columns), the logging
backends' packages, the tokenizers (loaded: they are small) against their models' configs (a
tokenizer longer than its model's embedding, or a pad id outside it, would fail at the first step),
and the loss against the tokenizer pair (`config.resolve_plan`). Problems are collected, not raised
one at a time, so one attempt shows them all (`UserErrors`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from llm_recipes import checkpoint, data, metrics_log, models
from llm_recipes.config import RunConfig, RunPlan, resolve_plan
from llm_recipes.errors import UserError, UserErrors


@dataclass(frozen=True)
class CheckedRun:
    """What the checks found and the set-up reuses."""

    resume: Optional[Path]  # the checkpoint --resume_from names (a run folder: its last checkpoint)
    student_tokenizer: object
    teacher_tokenizer: object  # None without --distillation
    plan: RunPlan
    cache: Optional[object] = None  # teacher_cache.CacheMeta with --distillation_config.teacher_cache


def check_embedding(tokenizer, model_name: str, trust_remote_code: bool, what: str) -> None:
    """The tokenizer's ids fit the model's embedding (a pad token added to the tokenizer does not)."""
    config = models.load_config(model_name, trust_remote_code=trust_remote_code, what=what)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    if not rows:
        return
    pad = tokenizer.pad_token_id
    if len(tokenizer) > rows or (pad is not None and pad >= rows):
        raise UserError(f"the {what} {model_name} has {rows} embedding rows but its tokenizer has {len(tokenizer)} "
                        f"tokens (pad id {pad}): resize the model's embeddings to the tokenizer "
                        "(model.resize_token_embeddings(len(tokenizer)), then save it) or use the model's own "
                        "tokenizer without added tokens")


def check_data(run: RunConfig) -> None:
    """The loader file exists and imports; for the shipped task loaders, a local source's lines and first example."""
    loader = data.import_loader(run.dataset.file)
    task = getattr(loader.get_split, "task", None)
    if task is None:  # a user's own loader: its data is its own business
        return
    from llm_distillation.datasets.tasks import check_source, task_data

    answer_column = run.dataset.answer_column
    if answer_column is None and run.dataset.generated_by:
        answer_column = task_data(task).generated_column
    check_source(task, run.dataset.source, answer_column)


def check_cache(run: RunConfig):
    """--distillation_config.teacher_cache: a complete cache, for the teacher the run names (if it names one),
    whose stored tokenizer is the one it was written with; returns (its metadata, that tokenizer)."""
    from llm_recipes import teacher_cache

    d = run.distillation
    meta = teacher_cache.read_meta(d.teacher_cache)
    if not meta.complete:
        raise UserError(f"the teacher cache {d.teacher_cache} is incomplete (its writer stopped): run the same "
                        "python -m llm_distillation.cache_teacher command again to finish it")
    if "distillation_config.model_name" in run.given and d.model_name != meta.teacher:
        raise UserError(f"the teacher cache {d.teacher_cache} was written for the teacher {meta.teacher}, not "
                        f"{d.model_name}: drop --distillation_config.model_name or write a cache for that teacher")
    tokenizer = models.load_tokenizer(d.teacher_cache, what="teacher tokenizer (from the cache)")
    fingerprint = teacher_cache.tokenizer_fingerprint(tokenizer)
    if fingerprint != meta.tokenizer_fingerprint or len(tokenizer) != meta.vocab_size:
        raise UserError(f"the tokenizer in the teacher cache {d.teacher_cache} is not the one its rows were written "
                        "with: write the cache again")
    return meta, tokenizer


def check_cache_temperature(run: RunConfig, plan: RunPlan, meta) -> None:
    """The loss's teacher temperature is the one the cached log-probabilities were taken at."""
    d = run.distillation
    if plan.spec.family is None:
        return
    name = plan.spec.family.teacher_temperature_field
    if getattr(d, name) != meta.temperature:
        raise UserError(f"--distillation_config.{name} is {getattr(d, name)} but the teacher cache "
                        f"{d.teacher_cache} holds log-probabilities at temperature {meta.temperature}: use that "
                        "temperature or write a cache at this one (cache_teacher --temperature)")


def _collect(problems: list[str]) -> Callable:
    def attempt(check: Callable, *args):
        try:
            return check(*args)
        except UserErrors as errors:
            problems.extend(errors.messages)
        except UserError as error:
            problems.append(str(error))
        return None
    return attempt


def check_run(run: RunConfig) -> CheckedRun:
    """Every check above; raises UserErrors listing all the problems found."""
    t, d = run.train, run.distillation
    problems: list[str] = []
    attempt = _collect(problems)
    resume = attempt(checkpoint.latest_checkpoint, t.resume_from) if t.resume_from else None
    if not (t.resume_from and resume is None):
        attempt(checkpoint.claim_output_dir, t.output_dir, resume, t.overwrite_output_dir)
    attempt(check_data, run)
    problems += metrics_log.missing_backends(t.use_wandb, t.use_tensorboard)
    student = attempt(lambda: models.load_tokenizer(
        t.tokenizer_name or t.model_name, trust_remote_code=t.trust_remote_code,
        what="student tokenizer" if t.tokenizer_name else "student model"))
    if student is not None:
        attempt(check_embedding, student, t.model_name, t.trust_remote_code, "student model")
    teacher = cache = None
    if t.distillation and d.teacher_cache:
        cache, teacher = attempt(check_cache, run) or (None, None)
    elif t.distillation:
        teacher = attempt(lambda: models.load_tokenizer(
            d.tokenizer_name or d.model_name, trust_remote_code=d.trust_remote_code,
            what="teacher tokenizer" if d.tokenizer_name else "teacher model"))
        if teacher is not None:
            attempt(check_embedding, teacher, d.model_name, d.trust_remote_code, "teacher model")
    plan = attempt(resolve_plan, run, student, teacher, cache) \
        if student is not None and (teacher or not t.distillation) else None
    if plan is not None and cache is not None:
        attempt(check_cache_temperature, run, plan, cache)
    if problems:
        raise UserErrors(list(dict.fromkeys(problems)))
    return CheckedRun(resume, student, teacher, plan, cache)
