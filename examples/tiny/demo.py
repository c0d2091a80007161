"""The paired benchmark at toy scale: does distillation across tokenizers beat plain fine-tuning?

    python -m examples.tiny.demo                  # the full table (hours on 2 cores; --jobs 2)
    python -m examples.tiny.demo --quick          # the mechanics on a few examples, in minutes
    (scripts/demo.sh)

The published pipeline, through the project's real command lines (subprocesses, so the benchmark
exercises exactly what a user runs): the tiny teacher (assets/tiny/teacher, or --train_teacher)
answers the training questions (`llm_distillation.generate`); students learn from those answers
(`finetuning.py`); every student is scored on held-out gold answers (`llm_distillation.benchmark`).

Designed so that a gain of a few F1 points can be told from noise:
- rows (ROWS): with the student's own tokenizer (cross-tokenizer) SFT, ULD paired by index at the
  seeds' factor 1.5, ULD by text, the projected teacher (live, and from a top-32 teacher cache), the
  hybrid, MultiLevelOT fast by text; with the teacher's tokenizer SFT and forward KL (the
  same-tokenizer gain to recover);
- two student regimes: "random" (untrained students) and "pretrained" (language modelling on fresh
  contexts first: assets/tiny/*_pretrained for seed 0, the same recipe for the other seeds);
- every row's learning rate is picked from LR_GRID by its validation F1 (seed 0, the 200-example
  validation split, gold answers), never on test; factors are the losses' defaults;
- seeds 0..N-1: within a seed every row starts from the same student weights and sees the same data
  order; test F1 on the 1,000-example test split (data/test_large.jsonl);
- the table gives per row the mean, the difference to its SFT paired by seed with a 95% interval
  (Student's t over the per-seed differences), and the share of the same-tokenizer KL gain it
  recovers; the PNG shows the paired differences.

Output in --output_dir (with --quick: its quick/ folder, which a full run never reuses): results.md
(the tables), results.png, results.json (the per-seed F1 of every row, in the format of
docs/demo/results.json), details.json (learning rates, validation scores, times), and every run
(finished runs are reused when the command is run again).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from configs.paths import TINY_ASSETS, TINY_QA_DATA, TINY_QA_LOADER, TINY_TEACHER
from examples.harness import (STARTED, Row, finetune, finished, in_parallel, machine_info, on_policy_answers,
                              read_metrics, run, score, step, write_report)
from llm_recipes import flags
from llm_recipes.errors import UserError
from llm_recipes.flags import option

REGIMES = ("random", "pretrained")
LR_GRID = (1e-3, 2e-3, 5e-3)
# Student training on the teacher's answers: 3 epochs of the 3,000 training answers, batch 16, cosine.
STUDENT_TRAINING = {"num_epochs": 3, "batch_size_training": 16, "val_batch_size": 32, "scheduler": "cosine",
                    "warmup_steps": 50, "weight_decay": 0.0, "save_step": 0, "save_optimizer": False}
QUICK = {"train": 64, "validation": 16, "test_large": 32, "epochs": 1, "lr_grid": (2e-3,), "pretrain": 64}


ROWS = (
    Row("SFT", "student", "none", None, {"distillation_config.distil_factor": 0}),
    Row("ULD index 1.5", "student", "uld", "index",
        {"distillation_config.loss": "uld", "distillation_config.alignment": "index"}),
    Row("ULD text", "student", "uld", "text",
        {"distillation_config.loss": "uld", "distillation_config.alignment": "text"}),
    Row("projected", "student", "projected", "text", {"distillation_config.loss": "projected"}),
    Row("projected, cached teacher (K 32)", "student", "projected", "text",
        {"distillation_config.loss": "projected", "distillation_config.teacher_cache": "CACHE"}),
    Row("hybrid", "student", "hybrid", "text", {"distillation_config.loss": "hybrid"}),
    Row("MultiLevelOT fast text", "student", "multilevel_ot", "text",
        {"distillation_config.loss": "multilevel_ot", "distillation_config.multilevel_ot_mode": "fast",
         "distillation_config.alignment": "text"}),
    Row("SFT (same tokenizer)", "student_same", "none", None, {"distillation_config.distil_factor": 0}),
    Row("KL (same tokenizer)", "student_same", "kl", None, {"distillation_config.loss": "kl"}),
)
# On-policy rows (docs/on_policy.md): the student answers the training prompts itself, the teacher scores them.
ON_POLICY = {"distillation_config.on_policy_max_new_tokens": 16}  # tiny_qa_worked: WORKED_TOKENS (train_row)
WORKED_TOKENS = 64
ON_POLICY_ROWS = tuple(
    Row(f"{name} on-policy {lmbda:.1f}{suffix}", student, loss, alignment,
        {"distillation_config.loss": loss, "distillation_config.lmbda": lmbda, **ON_POLICY})
    for name, student, loss, alignment, suffix in (("projected", "student", "projected", "text", ""),
                                                   ("KL", "student_same", "kl", None, " (same tokenizer)"))
    for lmbda in (0.5, 1.0)) + (
    # GKD's recipe: on-policy from a student that already answers in the task's form (the first half of the steps
    # train on the teacher's answers, off-policy; on-policy from a cold student samples what the teacher cannot score)
    Row("projected then on-policy 1.0", "student", "projected", "text",
        {"distillation_config.loss": "projected", "distillation_config.lmbda": 1.0,
         "distillation_config.on_policy_start": 0.5, **ON_POLICY}),
    # every step: the CE of the teacher's answers plus the projected term on the student's own answers
    # (--distillation_config.on_policy_ce, MiniLLM's recipe; added after the rows above had test results)
    Row("projected on-policy 1.0 + CE", "student", "projected", "text",
        {"distillation_config.loss": "projected", "distillation_config.lmbda": 1.0,
         "distillation_config.on_policy_ce": True, **ON_POLICY}),)
ALL_ROWS = ROWS + ON_POLICY_ROWS
# The short-answer control table of on-policy distillation: the rows it compares, with and without the teacher's
# tokenizer (python -m examples.tiny.demo --rows on_policy --regimes pretrained --seeds 10)
ROW_SETS = {"default": ROWS, "all": ALL_ROWS, "on_policy": tuple(
    row for row in ALL_ROWS if row.name in ("SFT", "projected", "SFT (same tokenizer)", "KL (same tokenizer)")
    or "on-policy" in row.name)}


# --------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Setup:
    out: Path
    data: Path  # tiny_qa data folder (a truncated copy with --quick)
    teacher: Path
    answers: Path  # the teacher's answers to the training split (datasets folder)
    cache: Path  # the teacher's top-32 distributions over those answers (llm_distillation.cache_teacher)
    pretrain: Path  # the pretraining contexts
    quick: bool
    seeds: int
    jobs: int
    rate_seed: int = 100
    task: str = "tiny_qa"  # or tiny_qa_worked (worked answers: docs/on_policy.md)

    @property
    def lr_grid(self) -> tuple:
        return QUICK["lr_grid"] if self.quick else LR_GRID

    @property
    def loader(self) -> str:
        return str(Path(TINY_QA_LOADER).with_name(f"{self.task}.py"))

    @property
    def new_tokens(self) -> int:
        """The longest answer generated, sampled or scored (a worked answer is 45 student tokens on average)."""
        return WORKED_TOKENS if self.task == "tiny_qa_worked" else 16


def quick_data(out: Path, source: Path) -> Path:
    """A few examples of each split (the mechanics only)."""
    folder = out / "quick-data"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test", "test_large"):
        lines = (source / f"{split}.jsonl").read_text().splitlines()
        (folder / f"{split}.jsonl").write_text("\n".join(lines[:QUICK.get(split, 16)]) + "\n")
    return folder


def student_init(setup: Setup, student: str, regime: str, seed: int) -> Path:
    """The student a seed starts from: untrained (seeded), or that student after language-model pretraining."""
    from transformers import AutoTokenizer

    from examples.tiny import assets

    if regime == "pretrained" and seed == 0 and not setup.quick:
        return TINY_ASSETS / assets.PRETRAINED[student]
    untrained = TINY_ASSETS / student
    if seed:
        untrained = setup.out / "inits" / f"{student}-seed{seed}"
        if not (untrained / "config.json").exists():
            assets.save_untrained(student, AutoTokenizer.from_pretrained(TINY_ASSETS / student), untrained, seed)
    if regime == "random":
        return untrained
    run_dir = setup.out / "inits" / f"{student}-pretrained-seed{seed}"
    if not finished(run_dir):
        values = assets.pretraining_flags(str(untrained), str(setup.pretrain), str(run_dir), seed=seed)
        if setup.quick:
            values["num_epochs"] = 1
        finetune(values, run_dir, run_dir / "log.txt")
    return run_dir / "best"


def prepare(args) -> Setup:
    """Data, the teacher, its answers to the training split, the pretraining contexts."""
    from examples.tiny import assets

    out = Path(args.output_dir).resolve() / ("quick" if args.quick else "")  # never reused by a full run
    worked = args.task == "tiny_qa_worked"
    source = Path(TINY_QA_DATA) if not worked else __import__("examples.tiny.worked", fromlist=["write"]).write(
        out / "worked-data")
    data = quick_data(out, source) if args.quick else source
    settings = Setup(out, data, Path(), Path(), Path(), Path(), args.quick, args.seeds, args.jobs, args.rate_seed,
                     args.task)
    teacher = Path(args.teacher or TINY_TEACHER).resolve()
    if args.train_teacher or worked and not args.teacher:  # the shipped teacher writes short answers only
        step("training the teacher (assets/tiny's recipe)")
        run_dir = out / "teacher"
        if not finished(run_dir):
            from transformers import AutoTokenizer

            init = out / "inits" / "teacher"
            assets.save_untrained("teacher", AutoTokenizer.from_pretrained(TINY_TEACHER), init)
            teacher_data = source / "teacher" if worked else assets.write_teacher_data(out / "teacher-data")
            values = assets.teacher_training_flags(init, teacher_data, run_dir, settings.loader)
            finetune(values, run_dir, run_dir / "log.txt")
        teacher = run_dir / "best"
    answers = out / "answers"
    if not (answers / "summary.json").exists():
        step("the teacher answers the training questions")
        run([sys.executable, "-m", "llm_distillation.generate", "--model_name", str(teacher), "--task", args.task,
             "--source", str(data), "--split", "train", "--output_dir", str(answers), "--batch_size", "64",
             "--max_new_tokens", str(settings.new_tokens), "--progress", "False"], out / "logs" / "generate.txt")
    cache = out / "teacher-cache"
    if not worked and not (cache / "summary.json").exists():  # the worked table's rows run the live teacher
        step("the teacher's top-32 distributions over its answers (teacher cache)")
        run([sys.executable, "-m", "llm_distillation.cache_teacher", "--model_name", str(teacher), "--output_dir",
             str(cache), "--topk", "32", "--dataset.file", TINY_QA_LOADER, "--dataset.source", str(answers),
             "--dataset.answer_column", "answers_generated", "--batch_size", "64", "--progress", "False"],
            out / "logs" / "cache_teacher.txt")
    pretrain = assets.write_pretrain_data(out / "pretrain-data", size=QUICK["pretrain"] if args.quick else
                                          assets.PRETRAIN_SIZE)
    return Setup(out, data, teacher, answers, cache, pretrain, args.quick, args.seeds, args.jobs, args.rate_seed,
                 args.task)


# --------------------------------------------------------------------------------------------- training
def train_row(setup: Setup, row: Row, regime: str, seed: int, lr: float) -> Path:
    """One student run (reused when finished); returns its folder."""
    run_dir = setup.out / "runs" / regime / f"{row.slug}-lr{lr:g}-seed{seed}"
    if finished(run_dir):
        return run_dir
    values = {**STUDENT_TRAINING, "lr": lr, "model_name": student_init(setup, row.student, regime, seed),
              "dataset.file": setup.loader, "dataset.source": setup.answers,
              "dataset.answer_column": "answers_generated", "seed": seed,
              "distillation": True, "distillation_config.model_name": setup.teacher, **row.flags}
    if "distillation_config.on_policy_max_new_tokens" in values:
        values["distillation_config.on_policy_max_new_tokens"] = setup.new_tokens
    if values.get("distillation_config.teacher_cache") == "CACHE":
        values["distillation_config.teacher_cache"] = setup.cache
    if setup.quick:
        values["num_epochs"] = QUICK["epochs"]
    finetune(values, run_dir, run_dir / "log.txt")
    return run_dir


def select_rate(setup: Setup, row: Row, regime: str) -> dict:
    """Validation F1 of every rate of the grid at the rate seed (no test seed); the best one."""
    scores = {}
    for lr in setup.lr_grid:
        weights, scores_dir = row.scored(train_row(setup, row, regime, setup.rate_seed, lr), "validation")
        scores[lr] = score(weights, setup.data, "validation", scores_dir, setup.task,
                           {"max_new_tokens": setup.new_tokens})
    return {"validation_f1": scores, "lr": max(scores, key=lambda lr: (scores[lr], -lr)), "seed": setup.rate_seed}


def final_run(setup: Setup, row: Row, regime: str, seed: int, lr: float) -> dict:
    run_dir = train_row(setup, row, regime, seed, lr)
    curve = read_metrics(run_dir)
    weights, scores_dir = row.scored(run_dir, "test")
    return {"f1": score(weights, setup.data, "test_large", scores_dir, setup.task, {"max_new_tokens": setup.new_tokens}),
            "peak_memory_gb": max((r["peak_memory_gb"] for r in curve if "peak_memory_gb" in r), default=None),
            "sampled": on_policy_answers(run_dir)}


# ------------------------------------------------------------------------------------------------ main
@dataclass(frozen=True)
class DemoArgs:
    """Flags of `python -m examples.tiny.demo`."""

    output_dir: str = option("output/demo", "where the runs, results.md, results.png and results.json go")
    seeds: int = option(5, "test seeds 0..N-1 of every row (the same initial weights and data order within a seed)")
    rate_seed: int = option(100, "the seed of the runs that pick each row's learning rate on validation (not a "
                                 "test seed)")
    rows: str = option("default", "default (the cross-tokenizer table) | on_policy (the on-policy control table) | "
                                  "all | comma-separated row names")
    task: str = option("tiny_qa", "tiny_qa (one-line answers) | tiny_qa_worked (a worked step, then the answer: "
                                  "the teacher is trained on it first, the rows run the live teacher)")
    regimes: str = option("random,pretrained", "student regimes: random (untrained) and/or pretrained")
    jobs: int = option(2, "runs at a time (each on one thread)")
    quick: bool = option(False, "the mechanics on a few examples: one epoch, one rate, minutes")
    teacher: Optional[str] = option(None, "a trained teacher folder (default: assets/tiny/teacher)")
    train_teacher: bool = option(False, "train a fresh teacher with assets/tiny's recipe instead")


COMMAND = flags.Command(program="python -m examples.tiny.demo", summary=__doc__.strip().splitlines()[0],
                        sections={"args": DemoArgs})


def selected_rows(text: str) -> tuple:
    """--rows: a set's name (ROW_SETS) or comma-separated row names (ALL_ROWS), with SFT rows kept."""
    if text in ROW_SETS:
        return ROW_SETS[text]
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in {row.name for row in ALL_ROWS}]
    if unknown or not names:
        raise UserError(f"--rows {text!r}: unknown row {', '.join(unknown) or '(none given)'}; use "
                        f"{' | '.join(ROW_SETS)} or names among: {', '.join(row.name for row in ALL_ROWS)}")
    return tuple(row for row in ALL_ROWS if row.name in names or row.loss == "none")


def run_demo(args: DemoArgs) -> dict:
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if args.seeds < 1 or args.jobs < 1:
        raise UserError(f"--seeds and --jobs must be positive integers, got {args.seeds} and {args.jobs}")
    if not regimes or any(r not in REGIMES for r in regimes):
        raise UserError(f"--regimes must be a comma-separated subset of {', '.join(REGIMES)}, got {args.regimes!r}")
    if args.teacher is not None and not (Path(args.teacher) / "config.json").is_file():
        raise UserError(f"--teacher {args.teacher} is not a model folder (no config.json): pass a trained teacher")
    seeds = list(range(args.seeds))
    if args.rate_seed in seeds:
        raise UserError(f"--rate_seed {args.rate_seed} is one of the test seeds 0..{args.seeds - 1}: a rate picked "
                        "on a test seed's run favours that seed; choose another")
    rows = selected_rows(args.rows)
    if args.task not in ("tiny_qa", "tiny_qa_worked"):
        raise UserError(f"--task must be tiny_qa or tiny_qa_worked, got {args.task!r}")
    if args.task == "tiny_qa_worked" and any("teacher_cache" in row.flags for row in rows):
        raise UserError("--task tiny_qa_worked has no teacher cache: choose --rows on_policy or rows without it")
    setup = prepare(args)
    step("inits: untrained and pretrained students of every seed")
    for s in [setup.rate_seed] + seeds:  # the untrained ones first, one at a time: a pretrained init starts from them
        for st in ("student", "student_same"):
            student_init(setup, st, "random", s)
    if "pretrained" in regimes:
        in_parallel(setup.jobs, [lambda s=s, st=st: student_init(setup, st, "pretrained", s)
                                 for s in [setup.rate_seed] + seeds for st in ("student", "student_same")])
    step(f"learning rates: every row at {', '.join(f'{lr:g}' for lr in setup.lr_grid)} (seed {setup.rate_seed}, "
         "validation F1)")
    rates = dict(zip([(r, row.name) for r in regimes for row in rows], in_parallel(
        setup.jobs, [lambda r=r, row=row: select_rate(setup, row, r) for r in regimes for row in rows])))
    step(f"test: every row, seeds 0..{args.seeds - 1}, at its rate")
    keys = [(r, row, s) for r in regimes for row in rows for s in seeds]
    finals = dict(zip([(r, row.name, s) for r, row, s in keys], in_parallel(
        setup.jobs, [lambda r=r, row=row, s=s: final_run(setup, row, r, s, rates[(r, row.name)]["lr"])
                     for r, row, s in keys])))
    results = {"task": setup.task, "seeds": seeds, "rate_seed": setup.rate_seed, "machine": machine_info(), "tables": [
        {"students": r, "rows": [{"name": row.name, "tokenizers": row.tokenizers, "loss": row.loss,
                                  "alignment": row.alignment, "f1": [finals[(r, row.name, s)]["f1"] for s in seeds]}
                                 for row in rows]} for r in regimes]}
    details = {"rates": {r: {row.name: rates[(r, row.name)] for row in rows} for r in regimes},
               "rate_seed": setup.rate_seed,
               "peak_memory_gb": {f"{r}/{name}/{s}": v["peak_memory_gb"] for (r, name, s), v in finals.items()},
               "sampled_answers": {f"{r}/{name}/{s}": v["sampled"] for (r, name, s), v in finals.items()
                                   if v["sampled"] is not None},
               "teacher": str(setup.teacher), "quick": args.quick, "jobs": args.jobs,
               "teacher_test_f1": score(setup.teacher, setup.data, "test_large", setup.out / "teacher-test",
                                        setup.task, {"max_new_tokens": setup.new_tokens}),
               "total_minutes": (time.time() - STARTED) / 60}
    print(write_report(results, details, setup.out))
    step(f"done: {setup.out / 'results.md'}, {setup.out / 'results.png'}")
    return results


main, cli = flags.entry_points(COMMAND, lambda parsed: run_demo(parsed["args"]))

if __name__ == "__main__":
    cli()
