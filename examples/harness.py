"""What the paired benchmarks (examples/tiny/demo.py, examples/real_pair/demo.py) share: a row, running the
project's command lines, resuming a stopped run, scoring, timing the stages, the statistics of paired seeds
and the report (results.md, results.json, results.png, details.json).

Every step runs the project's real command lines as subprocesses, so a benchmark exercises exactly what a user
runs.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from configs.paths import REPO_ROOT
from llm_recipes.checkpoint import holds_a_run, saved_checkpoints


@dataclass(frozen=True)
class Row:
    name: str
    student: str  # "student" (its own tokenizer) or "student_same" (the teacher's tokenizer)
    loss: str  # the loss table's name, "none" for SFT
    alignment: Optional[str]  # "text" | "index" | None (one tokenizer, or no logit term)
    flags: dict = field(default_factory=dict)

    @property
    def tokenizers(self) -> str:
        return "same" if self.student == "student_same" else "different"

    @property
    def on_policy(self) -> bool:
        return float(self.flags.get("distillation_config.lmbda", 0.0)) > 0

    def scored(self, run_dir: Path, split: str) -> tuple[Path, Path]:
        """(the weights a row is scored with, the folder of its scores on `split`). A run's `best` is its lowest
        eval loss on the data set's answers, which an on-policy row's sampled-answer steps do not train on: with
        on_policy_start it is the checkpoint before the first on-policy step. So on-policy rows are scored with
        their final weights (`last`, in `<split>-last`), the others with `best` (the same weights wherever the
        eval loss fell to the end of the run, as in every off-policy run of the published tables)."""
        if self.on_policy:
            return run_dir / "last", run_dir / f"{split}-last"
        return run_dir / "best", run_dir / split

    @property
    def slug(self) -> str:
        return re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in self.name.lower())).strip("-")


# ------------------------------------------------------------------------------------ running commands
def command_flags(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        out += [f"--{name}", str(value)]
    return out


def run(command: list[str], log: Path) -> float:
    """Run a project command line on one intra-op thread (these models' matrices gain nothing from a
    second: measured 4x slower on a busy 2-core machine), its output to `log`; return its wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"benchmark step failed ({' '.join(command[:4])} ...), see {log}:\n" + "\n".join(tail))
    return time.time() - start


def score(model: Path, data: Path, split: str, out: Path, task: str = "tiny_qa", options: Optional[dict] = None
          ) -> float:
    """F1 (x100) of a model's greedy 0-shot answers on a split of the task's gold answers (cached in `out`);
    `options`: benchmark flags that replace or add to the defaults below."""
    result = out / "scores.json"
    if not result.exists():
        values = {"model_name": model, "task": task, "source": data, "split": split, "output_dir": out,
                  "max_new_tokens": 16, "batch_size": 50, "progress": False, **(options or {})}
        run([sys.executable, "-m", "llm_distillation.benchmark", *command_flags(values)], out / "log.txt")
    return json.loads(result.read_text())["scores"]["f1"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def in_parallel(jobs: int, calls: list) -> list:
    """Run the zero-argument callables `calls`, `jobs` at a time (each runs its own subprocesses)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda call: call(), calls))


def finished(run_dir: Path, log: Optional[Path] = None) -> bool:
    """Whether the run in run_dir ran to its end: its best/ holds a model and its log (default run_dir/log.txt;
    a run made elsewhere may have none) ends with the trainer's "done:" line. A run stopped by SIGTERM also
    points best/ at the checkpoint it saved, and a killed one leaves the last it saved: neither is finished."""
    log = log if log is not None else run_dir / "log.txt"
    if not (run_dir / "best" / "config.json").exists():
        return False
    return not log.exists() or any(line.startswith("done: ") for line in log.read_text(errors="replace").splitlines())


def finetune(values: dict, run_dir: Path, log: Path) -> None:
    """`finetuning.py` with these flags into run_dir; a run of an earlier demo stopped there continues
    from its last checkpoint (bit for bit what an unbroken run gives) when that holds the optimizer state, or
    starts over (the demos save no optimizer state: a checkpoint per run would cost a GB on the real pair).
    Scores of the stopped run's weights (subfolders with a scores.json) are removed first."""
    values = {**values, "output_dir": run_dir}
    if holds_a_run(str(run_dir)):
        checkpoints = saved_checkpoints(run_dir)
        resumable = bool(checkpoints) and (checkpoints[-1] / "optimizer.pt").is_file()
        values["resume_from" if resumable else "overwrite_output_dir"] = run_dir if resumable else True
        for stale in run_dir.glob("*/scores.json"):
            shutil.rmtree(stale.parent)
    run([sys.executable, "finetuning.py", *command_flags(values)], log)



def cost(run_dir: Path) -> dict:
    """Mean seconds per optimizer step (the first two left out: warm-up) and peak memory of a run."""
    train = [r for r in read_metrics(run_dir) if r.get("type") == "train"]
    times = [r["step_s"] for r in train[2:] if "step_s" in r]
    return {"s_per_step": statistics.mean(times) if times else None,
            "peak_memory_gb": max((r["peak_memory_gb"] for r in train if "peak_memory_gb" in r), default=None)}


def on_policy_answers(run_dir: Path) -> Optional[dict]:
    """An on-policy run's sampled answers, from its train lines: the share of on-policy steps, the mean sampled
    length, the share of one-to-one text groups, and the empty, cut and unaligned answers (None: off-policy)."""
    train = [r for r in read_metrics(run_dir) if r.get("type") == "train" and "on_policy" in r]
    sampled = [r for r in train if "sampled_tokens" in r]
    if not train:
        return None
    mean = (lambda key: statistics.mean(r[key] for r in sampled if key in r) if any(key in r for r in sampled)
            else None)
    return {"on_policy_share": statistics.mean(r["on_policy"] for r in train), "sampled_tokens": mean("sampled_tokens"),
            "one_to_one": mean("sampled_one_to_one"),
            **{key: sum(r[f"sampled_{key}"] for r in sampled) for key in ("empty", "cut", "unaligned")}}


def machine_info() -> dict:
    """The processor and torch's CPU capability: per-seed scores move by 1-4 F1 between processors (AVX-512 and
    AVX2 round differently), so a table is comparable only within one machine's run."""
    import platform

    import torch

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return {"processor": name, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}


def mean_cost(runs: list[dict]) -> dict:
    """A row's seconds per step (mean over its seeds' runs) and peak memory (the highest)."""
    times = [r["s_per_step"] for r in runs if r["s_per_step"] is not None]
    peaks = [r["peak_memory_gb"] for r in runs if r["peak_memory_gb"] is not None]
    return {"s_per_step": statistics.mean(times) if times else None, "peak_memory_gb": max(peaks, default=None)}


# ------------------------------------------------------------------------------------------- statistics
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 14: 2.145, 19: 2.093, 29: 2.045}  # two-sided 95% Student's t by degrees of freedom


def t_quantile(dof: int) -> float:
    if dof in T_95:
        return T_95[dof]
    known = max(k for k in T_95 if k <= dof) if dof < 29 else 29
    return T_95[known] if dof < 29 else 1.96 + 2.4 / dof  # close to the table above 29


def paired(values: list[float], baseline: list[float]) -> dict:
    """Mean of the per-seed differences and its 95% interval (Student's t; none with a single seed)."""
    diffs = [a - b for a, b in zip(values, baseline)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": None, "high": None, "diffs": diffs}
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "diffs": diffs}


def regime_table(regime: dict) -> list[dict]:
    """Per row: mean F1, paired difference to its SFT, share of the same-tokenizer KL gain (where that gain's
    interval is above 0)."""
    rows = {row["name"]: row for row in regime["rows"]}
    sft = {"different": rows["SFT"]["f1"], "same": rows.get("SFT (same tokenizer)", {}).get("f1")}
    kl_gain = None  # only where the table has the same-tokenizer rows (the real pair has no such student)
    if sft["same"] is not None and "KL (same tokenizer)" in rows:
        gain = paired(rows["KL (same tokenizer)"]["f1"], sft["same"])
        # a share of a gain that may be nothing is noise (+0.2 F1 would make -10 F1 "-5000%"): only above 0
        kl_gain = gain["mean"] if gain["low"] is None or gain["low"] > 0 else None
    lines = []
    for row in regime["rows"]:
        diff = paired(row["f1"], sft[row["tokenizers"]]) if row["loss"] != "none" else None
        share = diff["mean"] / kl_gain if diff is not None and row["tokenizers"] == "different" and kl_gain else None
        lines.append({**row, "mean": statistics.mean(row["f1"]), "diff": diff, "share_of_kl_gain": share})
    return lines


def _cell(value, digits=1, signed=False) -> str:
    return "—" if value is None else f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(results: dict, details: dict) -> str:
    out = []
    for table in results["tables"]:
        regime = table["students"]
        lines = regime_table(table)
        with_share = any(line["name"] == "KL (same tokenizer)" for line in lines)  # none in the real pair's table
        out += [f"### {regime} students", "",
                "| row | tokenizers | lr | test F1 (mean of seeds) | paired difference to its SFT [95% interval] |" +
                (" share of the same-tokenizer KL gain |" if with_share else ""),
                "| --- | --- | ---: | ---: | --- |" + (" ---: |" if with_share else "")]
        for line in lines:
            lr = details["rates"][regime][line["name"]]["lr"]
            diff = line["diff"]
            cell = "—" if diff is None else f"{_cell(diff['mean'], signed=True)} [{_cell(diff['low'], signed=True)}, " \
                                            f"{_cell(diff['high'], signed=True)}]"
            share = "—" if line["share_of_kl_gain"] is None else f"{line['share_of_kl_gain']:.0%}"
            out.append(f"| {line['name']} | {line['tokenizers']} | {lr:g} | {line['mean']:.1f} | {cell} |" +
                       (f" {share} |" if with_share else ""))
        out.append("")
    seeds = len(results["seeds"])
    out.append(f"Test F1 x100 on the 1,000-example held-out split, {seeds} seed(s) (0..{seeds - 1}); differences are "
               "paired by seed (same initial weights and data order); intervals: Student's t over the per-seed "
               f"differences; learning rates picked on the validation split (seed {details.get('rate_seed', 0)}"
               f"{', not a test seed' if details.get('rate_seed', 0) not in results['seeds'] else ''}).")
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    """The paired differences to SFT (mean and 95% interval), one panel per regime, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["tables"]), figsize=(6.5 * len(results["tables"]), 4.8), squeeze=False)
    for ax, table in zip(axes[0], results["tables"]):
        lines = [line for line in regime_table(table) if line["diff"] is not None]
        for i, line in enumerate(lines):
            diff, color = line["diff"], "tab:blue" if line["tokenizers"] == "different" else "tab:gray"
            if diff["low"] is not None:
                ax.errorbar(diff["mean"], i, xerr=[[diff["mean"] - diff["low"]], [diff["high"] - diff["mean"]]],
                            fmt="o", color=color, capsize=4)
            else:
                ax.plot(diff["mean"], i, "o", color=color)
            ax.plot(diff["diffs"], [i] * len(diff["diffs"]), ".", color=color, alpha=0.4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(lines)), [line["name"] for line in lines], fontsize=8)
        ax.invert_yaxis()
        ax.set(title=f"{table['students']} students: F1 minus SFT, by seed", xlabel="test F1 difference (95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results: dict, details: dict, out: Path) -> str:
    text = markdown(results, details)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=1, default=str) + "\n")
    plot(results, out / "results.png")
    return text


# ----------------------------------------------------------------------------------------------- timing
STARTED = time.time()


def step(text: str) -> None:
    print(f"[{(time.time() - STARTED) / 60:5.1f} min] {text}", flush=True)


STAGES: dict = {}  # stage -> minutes it took in this invocation (0 when reused)


class stage:
    """Times one stage of the pipeline into STAGES."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.start = time.time()
        step(self.name)

    def __exit__(self, *exc):
        STAGES[self.name] = round((time.time() - self.start) / 60, 2)


