"""The published pipeline at toy scale, offline, on a CPU: SFT vs ULD vs MultiLevelOT vs KL.

    python -m examples.tiny.demo [--output_dir output/demo] [--seeds 1] [--quick] [--teacher PATH]
    (scripts/demo.sh)

Steps, each through the project's real command lines (subprocesses), so the demo exercises exactly
what a user runs:

1. the synthetic QA data and the two tokenizers (`examples/tiny/assets.py`, deterministic);
2. a fresh tiny teacher trained on the gold answers of freshly generated examples of the task
   (`finetuning.py`, distillation off, the flags of `tiny_assets.teacher_training_flags`: what
   python -m examples.tiny.build_assets does; --teacher PATH uses a trained one instead);
3. the teacher answers the train split (`llm_distillation.generate`): the students' labels;
4. students trained on those answers: with the other tokenizer by SFT (distil_factor 0), ULD,
   MultiLevelOT fast and greedy; with the teacher's tokenizer by SFT and forward KL;
5. every model benchmarked on the held-out test split (`llm_distillation.benchmark`, gold answers).

Output in --output_dir: `results.md` (the table), `results.png` (learning curves and scores),
`results.json` (every number), and the runs themselves. Teacher and answers are made once; with
`--seeds N` each student is trained N times (seeds 0..N-1: initialisation and data order) and the
table shows mean +- standard deviation, so a difference between methods can be told from noise.
Scores are deterministic for a seed on a given machine and torch build; times are not.

Every step runs with OMP_NUM_THREADS=--threads (default 1): on a shared 2-core machine the default
distillation run took 128 s with torch's 2 intra-op threads and 30 s with 1 (measured; these models'
matrices are too small to gain from a second thread, and a busy core stalls both).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from configs.paths import REPO_ROOT, TINY_QA_LOADER, TINY_TEACHER
from llm_recipes import flags
from llm_recipes.errors import UserError
from llm_recipes.flags import option


@dataclass(frozen=True)
class Method:
    name: str
    student: str  # "student" (the other tokenizer) or "student_same" (the teacher's tokenizer)
    flags: dict = field(default_factory=dict)


METHODS = (
    Method("SFT", "student", {"distillation_config.distil_factor": 0}),
    Method("ULD", "student", {"distillation_config.loss": "uld"}),
    Method("MultiLevelOT fast", "student", {"distillation_config.loss": "multilevel_ot",
                                            "distillation_config.multilevel_ot_mode": "fast"}),
    Method("MultiLevelOT greedy", "student", {"distillation_config.loss": "multilevel_ot",
                                              "distillation_config.multilevel_ot_mode": "greedy"}),
    Method("SFT (same tokenizer)", "student_same", {"distillation_config.distil_factor": 0}),
    Method("KL (same tokenizer)", "student_same", {"distillation_config.loss": "kl"}),
)

# Student training on the teacher's answers (the published runs: lr 1e-6 on 410M-parameter pretrained
# students; these students start from random weights and need a far larger rate). Measured on gold
# answers: 2e-3 with a cosine decay learns faster than 3e-3 and 1e-3; after 3 epochs the students are
# still learning the task (the teacher needed 1,500 steps of batch 16), where the training signal
# matters most.
STUDENT_TRAINING = {"num_epochs": 3, "lr": 2e-3, "batch_size_training": 16, "val_batch_size": 32,
                    "scheduler": "cosine", "warmup_steps": 50, "weight_decay": 0.0, "save_step": 0,
                    "save_optimizer": False}
QUICK = {"examples": 64, "student_epochs": 1, "test_examples": 16}


def _flags(flags: dict) -> list[str]:
    out = []
    for name, value in flags.items():
        out += [f"--{name}", str(value)]
    return out


def run(command: list[str], log: Path, threads: int = 1) -> float:
    """Run a project command line (`threads` intra-op threads), its output to `log`; return its wall time.
    Fails loudly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"demo step failed ({' '.join(command[:4])} ...), see {log}:\n" + "\n".join(tail))
    return time.time() - start


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def peak_memory_gb(records: list[dict]) -> Optional[float]:
    peaks = [r["peak_memory_gb"] for r in records if r.get("peak_memory_gb") is not None]
    return max(peaks) if peaks else None


def prepare_assets(root: Path, quick: bool) -> None:
    """Data, tokenizers and the untrained models (the same ones assets/tiny ships, rebuilt here)."""
    from examples.tiny import assets as tiny_assets

    tiny_assets.save_untrained_models(root, tiny_assets.build_data_and_tokenizers(root)["tokenizers"])
    if quick:  # a few examples per split: the pipeline's mechanics in seconds
        for split in ("train", "validation", "test"):
            path = root / "data" / f"{split}.jsonl"
            lines = path.read_text().splitlines()[:QUICK["examples"]]
            path.write_text("\n".join(lines) + "\n")


def student_init(assets: Path, student: str, seed: int, out: Path) -> Path:
    """The untrained student for a seed (seed 0: the shipped initialisation)."""
    if seed == 0:
        return assets / student
    from transformers import AutoTokenizer

    from examples.tiny import assets as tiny_assets

    folder = out / f"{student}-init-seed{seed}"
    if not (folder / "config.json").exists():
        tiny_assets.save_untrained(student, AutoTokenizer.from_pretrained(assets / student), folder, seed)
    return folder


def benchmark(model: Path, data: Path, out: Path, quick: bool, threads: int = 1) -> dict:
    command = [sys.executable, "-m", "llm_distillation.benchmark", "--model_name", str(model), "--task", "tiny_qa",
               "--source", str(data), "--split", "test", "--output_dir", str(out), "--max_new_tokens", "16",
               "--batch_size", "50", "--progress", "False"]
    if quick:
        command += ["--number_of_examples", str(QUICK["test_examples"])]
    out.mkdir(parents=True, exist_ok=True)
    run(command, out / "log.txt", threads)
    return json.loads((out / "scores.json").read_text())["scores"]


def pipeline(output_dir: Path, seeds: int, quick: bool, teacher: Optional[str] = None, threads: int = 1) -> dict:
    from examples.tiny import assets as tiny_assets

    assets, data = output_dir / "assets", output_dir / "assets" / "data"
    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": {"seeds": seeds, "quick": quick, "teacher": teacher, "threads": threads,
                                 "student_training": STUDENT_TRAINING,
                                 "teacher_training": {**tiny_assets.TEACHER_TRAINING,
                                                      "examples": tiny_assets.TEACHER_DATA_SIZE}},
                     "rows": []}
    started = time.time()

    def step(text: str) -> None:
        print(f"[{(time.time() - started) / 60:4.1f} min] {text}", flush=True)

    step("1/5 data, tokenizers, untrained models")
    prepare_assets(assets, quick)

    teacher_run = output_dir / "teacher"
    if teacher or quick:  # a few steps cannot make a teacher that answers: quick uses the shipped one
        teacher = Path(teacher or TINY_TEACHER).resolve()
        step(f"2/5 the given teacher, {teacher}")
        teacher_time = None
    else:
        step(f"2/5 training the teacher ({tiny_assets.TEACHER_DATA_SIZE} generated examples, gold answers)")
        teacher_data = tiny_assets.write_teacher_data(output_dir / "teacher-data")
        teacher_flags = tiny_assets.teacher_training_flags(assets / "teacher", teacher_data, teacher_run,
                                                           TINY_QA_LOADER)
        teacher_time = run([sys.executable, "finetuning.py", *_flags(teacher_flags)], logs / "teacher.txt", threads)
        teacher = teacher_run / "best"

    step("3/5 teacher answers for the train split")
    generated = output_dir / "generated"
    generate_time = run([sys.executable, "-m", "llm_distillation.generate", "--model_name", str(teacher),
                         "--task", "tiny_qa", "--source", str(data), "--split", "train", "--output_dir",
                         str(generated), "--batch_size", "64", "--max_new_tokens", "16", "--progress", "False"],
                        logs / "generate.txt", threads)
    summary = json.loads((generated / "summary.json").read_text())
    results["generation"] = {"time_s": generate_time, "summary": {k: v for k, v in summary.items()
                                                                  if not isinstance(v, dict)}}

    step("4/5 + 5/5 students, benchmarks")
    results["rows"].append({"model": "teacher", "seed": 0, "train_time_s": teacher_time,
                            "peak_memory_gb": peak_memory_gb(read_metrics(teacher_run)),
                            "scores": benchmark(teacher, data, output_dir / "bench" / "teacher", quick, threads),
                            "curve": read_metrics(teacher_run)})
    for student in ("student", "student_same"):
        results["rows"].append({"model": f"untrained {student.replace('_', ' ')}", "seed": 0, "train_time_s": None,
                                "peak_memory_gb": None, "curve": [],
                                "scores": benchmark(assets / student, data, output_dir / "bench" / student, quick,
                                                    threads)})
    for seed in range(seeds):
        for method in METHODS:
            slug = method.name.lower().replace(" ", "-").replace("(", "").replace(")", "")
            run_dir = output_dir / "students" / f"{slug}-seed{seed}"
            flags = {**STUDENT_TRAINING, "model_name": student_init(assets, method.student, seed, output_dir),
                     "dataset.file": TINY_QA_LOADER, "dataset.source": generated,
                     "dataset.answer_column": "answers_generated", "output_dir": run_dir, "seed": seed,
                     "distillation": True, "distillation_config.model_name": teacher, **method.flags}
            if quick:
                flags["num_epochs"] = QUICK["student_epochs"]
            step(f"    {method.name}, seed {seed}")
            train_time = run([sys.executable, "finetuning.py", *_flags(flags)], logs / f"{slug}-seed{seed}.txt",
                             threads)
            curve = read_metrics(run_dir)
            results["rows"].append({"model": method.name, "seed": seed, "train_time_s": train_time,
                                    "peak_memory_gb": peak_memory_gb(curve), "curve": curve,
                                    "scores": benchmark(run_dir / "best", data, output_dir / "bench" / run_dir.name,
                                                        quick, threads)})
    return results


# ---------------------------------------------------------------------------------------- reporting
def _mean_spread(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def grouped(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["model"], []).append(row)
    return groups


def table(results: dict) -> str:
    """The Markdown table: one line per model, mean ± std over seeds where there are several."""
    seeds = results["settings"]["seeds"]
    lines = ["| model | F1 | EM | ROUGE-L | train time (s) | peak memory (GB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in grouped(results["rows"]).items():
        def cell(key, digits=1, rows=rows):
            values = [r["scores"][key] for r in rows]
            return _mean_spread(values, digits)
        times = [r["train_time_s"] for r in rows if r["train_time_s"] is not None]
        memory = [r["peak_memory_gb"] for r in rows if r["peak_memory_gb"] is not None]
        lines.append(f"| {name} | {cell('f1')} | {cell('em')} | {cell('rougeL')} | "
                     f"{_mean_spread(times, 0) if times else '-'} | {_mean_spread(memory, 2) if memory else '-'} |")
    note = (f"Held-out test split of the synthetic QA task, scores x100; students: {seeds} seed(s)"
            + (", mean ± standard deviation" if seeds > 1 else "")
            + "; train time is the wall time of the training command (model loading included) on this machine.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot(results: dict, path: Path) -> None:
    """Learning curves (train loss, eval loss per step) and the F1 of every model, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((ax_teacher, ax_train), (ax_eval, ax_f1)) = plt.subplots(2, 2, figsize=(13, 8.5))
    groups = grouped(results["rows"])
    for name, rows in groups.items():
        curve = rows[0]["curve"]  # seed 0
        train = [(r["step"], r["ce"]) for r in curve if "ce" in r and "eval_loss" not in r]
        evals = [(r["step"], r["eval_ce"]) for r in curve if "eval_ce" in r]
        if name == "teacher":
            if train:
                ax_teacher.plot(*zip(*train), color="black", linewidth=0.5, label="train CE")
            if evals:
                ax_teacher.plot(*zip(*evals), "o", color="tab:red", label="eval CE")
            continue
        if train:
            ax_train.plot(*zip(*train), label=name, linewidth=1)
        if evals:
            ax_eval.plot(*zip(*evals), marker="o", label=name)
    ax_teacher.set(title="teacher training (gold answers)", xlabel="optimizer step", ylabel="cross-entropy")
    if ax_teacher.lines:
        ax_teacher.legend(fontsize=7)
    else:
        ax_teacher.text(0.5, 0.5, "teacher given (--teacher):\nnot trained in this run", ha="center", va="center",
                        transform=ax_teacher.transAxes)
    ax_train.set(title="student train CE (seed 0)", xlabel="optimizer step", ylabel="cross-entropy")
    ax_eval.set(title="student eval CE on the teacher's answers\n(per token of each student's own tokenizer)",
                xlabel="optimizer step")
    ax_train.legend(fontsize=7)
    names = list(groups)
    means = [statistics.mean(r["scores"]["f1"] for r in groups[n]) for n in names]
    spread = [statistics.stdev([r["scores"]["f1"] for r in groups[n]]) if len(groups[n]) > 1 else 0 for n in names]
    ax_f1.barh(range(len(names)), means, xerr=spread, color="tab:blue")
    ax_f1.set_yticks(range(len(names)), names, fontsize=8)
    ax_f1.invert_yaxis()
    ax_f1.set(title="test F1 (x100)", xlabel="F1")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results: dict, output_dir: Path) -> str:
    text = table(results)
    (output_dir / "results.md").write_text(text)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot(results, output_dir / "results.png")
    return text


@dataclass(frozen=True)
class DemoArgs:
    """Flags of `python -m examples.tiny.demo`."""

    output_dir: str = option("output/demo", "where the runs, results.md, results.png and results.json go")
    seeds: int = option(1, "train each student this many times (seeds 0..N-1): mean and spread")
    quick: bool = option(False, "a smoke run of the mechanics on a few examples (the shipped teacher)")
    teacher: Optional[str] = option(None, "a trained teacher folder to use instead of training one")
    threads: int = option(1, "OMP_NUM_THREADS of every step")


COMMAND = flags.Command(program="python -m examples.tiny.demo", summary=__doc__.strip().splitlines()[0],
                        sections={"args": DemoArgs})


def run_demo(args: DemoArgs) -> None:
    """Run the toy pipeline into `output_dir` (see DemoArgs)."""
    if args.seeds < 1:
        raise UserError(f"--seeds must be a positive integer, got {args.seeds!r}")
    if args.threads < 1:
        raise UserError(f"--threads must be a positive integer, got {args.threads!r}")
    if args.teacher is not None and not (Path(args.teacher) / "config.json").is_file():
        raise UserError(f"--teacher {args.teacher} is not a model folder (no config.json): pass a trained "
                        "teacher such as assets/tiny/teacher, or leave it out to train one")
    out = Path(args.output_dir).resolve()
    start = time.time()
    results = pipeline(out, args.seeds, args.quick, args.teacher, args.threads)
    results["total_time_s"] = time.time() - start
    print(write_report(results, out))
    print(f"demo done in {results['total_time_s'] / 60:.1f} min: {out / 'results.md'}, {out / 'results.png'}")


main, cli = flags.entry_points(COMMAND, lambda parsed: run_demo(parsed["args"]))

if __name__ == "__main__":
    cli()
