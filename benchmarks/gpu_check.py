"""The GPU path in one command: tests, training in every precision, FSDP2 on NCCL, resume, on-policy, timings.

    bash scripts/gpu_check.sh                 # on a machine with a CUDA GPU: at most ~8 minutes
    bash scripts/gpu_check.sh --dry-run       # anywhere: one line per part, what it would run
    bash scripts/gpu_check.sh --wheels DIR    # first install the Python packages of DIR (an offline node)

Each part runs as subprocesses under its own time limit, within one overall budget (--budget_s); a part that
cannot run says "skipped (why)" and a part that fails says "failed (why)", and the rest go on. After every
part the summary is written to --out (summary.json, summary.md, and each part's log), so a check that is
stopped keeps what it measured; the markdown is printed at the end. Without a CUDA device it prints what
it would run and exits 0: no line of it is a CPU figure.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from configs.paths import REPO_ROOT
from llm_recipes import flags
from llm_recipes.flags import option

# The embedded default (tiny teacher and student, other tokenizers, the projected teacher), shortened.
TRAIN = {"distillation": True, "max_train_step": 100, "save_step": 0, "max_eval_step": 5}
PRECISIONS = {"fp32": {}, "mixed_precision": {"mixed_precision": True, "distillation_config.mixed_precision": True},
              "pure_bf16": {"pure_bf16": True, "distillation_config.pure_bf16": True}}
REAL_PAIR_STEPS = 50


@dataclass
class Context:
    out: Path
    deadline: float  # time.time() after which no part starts
    device: str = "cuda"  # "cpu" in a rehearsal (the check checking itself; never a GPU figure)
    python: str = sys.executable

    @property
    def slack(self) -> float:
        """Per-command limits are sized for a GPU; a CPU rehearsal (maybe on a busy machine) gets 4x as long."""
        return 1.0 if self.device == "cuda" else 4.0

    def remaining(self) -> float:
        return self.deadline - time.time()


@dataclass
class Result:
    name: str
    status: str = "ok"  # ok | failed (why) | skipped (why) | timed out
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    table: str = ""  # a markdown table a benchmark printed


class PartFailed(Exception):
    pass


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO_ROOT), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def run(ctx: Context, command: list[str], log: str, limit: float, extra_env: Optional[dict] = None) -> str:
    """Run a command from the repository root, its output to OUT/log; its output, or PartFailed."""
    if ctx.remaining() < 5:
        raise PartFailed("skipped (the overall budget is spent)")
    limit = min(limit * ctx.slack, ctx.remaining())
    path = ctx.out / log
    with open(path, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**env(), **(extra_env or {})}, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise PartFailed(f"timed out after {limit:.0f} s (log: {log})")
    text = path.read_text()
    if code != 0:
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [f"exit {code}"]
        raise PartFailed(f"failed (exit {code}: {last[0][:160]}; log: {log})")
    return text


def metrics(folder: Path) -> dict:
    """Mean seconds per step (the first two left out), peak memory and the last evaluation of a run."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [line for line in lines if line.get("type") == "train"]
    steps = [line["step_s"] for line in train[2:] if "step_s" in line] or [line["step_s"] for line in train]
    evals = [line for line in lines if line.get("type") == "eval"]
    return {"steps": len(train), "s_per_step": round(sum(steps) / max(len(steps), 1), 4),
            "peak_memory_gb": round(max((line.get("peak_memory_gb", 0) for line in train), default=0), 3),
            "last_loss": round(train[-1]["loss"], 4) if train else None,
            "eval_loss": round(evals[-1]["eval_loss"], 4) if evals else None}


def as_flags(values: dict) -> list[str]:
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def finetune(ctx: Context, name: str, values: dict, limit: float, launcher: Optional[list] = None) -> dict:
    """finetuning.py with TRAIN and `values` (which replace TRAIN's) into OUT/name; its metrics."""
    folder = ctx.out / name
    values = {**TRAIN, **values, "output_dir": folder}
    if "resume_from" not in values:
        values["overwrite_output_dir"] = True
    run(ctx, (launcher or [ctx.python, "finetuning.py"]) + as_flags(values), f"{name}.log", limit)
    return metrics(folder)


# ------------------------------------------------------------------------------------------------- parts
def environment(ctx: Context) -> dict:
    import platform

    import torch

    if ctx.device == "cpu":
        return {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu (rehearsal)"}
    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    figures = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
               "device": torch.cuda.get_device_name(0), "capability": capability,
               "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
               "bf16": torch.cuda.is_bf16_supported()}
    for package in ("transformers", "datasets", "peft", "accelerate", "liger_kernel", "trl"):
        try:
            from importlib.metadata import version

            figures[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001 - absent: said so
            figures[package] = "missing"
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    figures["commit"] = done.stdout.strip() or "unknown"
    return figures


def tests(ctx: Context) -> dict:
    text = run(ctx, [ctx.python, "-m", "pytest", "-q", "-m", "device", "-p", "no:cacheprovider", "tests"],
               "tests.log", 150, {"LLM_DISTILL_TEST_DEVICE": ctx.device})
    summary = re.findall(r"(\d+) (passed|failed|error|errors|skipped)", text.strip().splitlines()[-1])
    return {kind: int(count) for count, kind in summary}


def train(ctx: Context) -> dict:
    return {name: finetune(ctx, f"train-{name}", extra, 60) for name, extra in PRECISIONS.items()}


def fsdp(ctx: Context) -> dict:
    torchrun = str(Path(ctx.python).with_name("torchrun"))
    launcher = ([torchrun] if Path(torchrun).exists() else [ctx.python, "-m", "torch.distributed.run"]) + \
        ["--standalone", "--nproc_per_node", "1", "finetuning.py"]
    values = {"enable_fsdp": True, "distillation_config.enable_fsdp": True, "mixed_precision": True}
    return finetune(ctx, "fsdp", values, 90, launcher)


def resume(ctx: Context) -> dict:
    """An unbroken run, the same again (CUDA's run-to-run difference), and one stopped by SIGTERM after step 20
    and resumed: the weights compared tensor by tensor."""
    from safetensors.torch import load_file

    extra = {"max_train_step": 60, "save_step": 30, "run_validation": False}
    for name in ("resume-a", "resume-a2"):
        finetune(ctx, name, extra, 45)
    folder = ctx.out / "resume-b"
    command = [ctx.python, "finetuning.py"] + as_flags({**TRAIN, **extra, "output_dir": folder,
                                                         "overwrite_output_dir": True})
    with open(ctx.out / "resume-b.log", "w") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env())
        stop_at = time.time() + min(45 * ctx.slack, ctx.remaining())
        while process.poll() is None and time.time() < stop_at:
            path = folder / "metrics.jsonl"
            if path.exists() and sum('"train"' in line for line in path.read_text().splitlines()) >= 20:
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        code = process.wait(timeout=60 * ctx.slack)
    if code not in (0, 143):
        raise PartFailed(f"failed (the stopped run exited {code}; log: resume-b.log)")
    stopped = code == 143
    if stopped:
        finetune(ctx, "resume-b", {**extra, "resume_from": folder}, 45)

    def weights(name):
        return load_file(str(ctx.out / name / "last" / "model.safetensors"))

    a, a2, b = weights("resume-a"), weights("resume-a2"), weights("resume-b")
    worst = (lambda x, y: max(float((x[k].double() - y[k].double()).abs().max()) for k in x))
    return {"stopped_by_sigterm": stopped, "max_abs_diff_resumed_vs_unbroken": worst(b, a),
            "max_abs_diff_two_unbroken_runs": worst(a2, a)}


def bench(module: str, args: list[str], limit: float, rehearsal_args: list[str]) -> Callable[[Context], tuple]:
    """A benchmark script's run as a part; `rehearsal_args` replace `args` on the CPU (small sizes)."""
    def part(ctx: Context) -> tuple:
        name = module.rsplit(".", 1)[-1]
        text = run(ctx, [ctx.python, "-m", module, "--device", ctx.device, "--json", str(ctx.out / f"{name}.json"),
                         *(args if ctx.device == "cuda" else rehearsal_args)], f"{name}.log", limit)
        table = "\n".join(line for line in text.splitlines() if line.startswith("|") or line.startswith("torch "))
        return {"json": f"{name}.json"}, table
    return part


def real_pair(ctx: Context) -> dict:
    """50 steps of SFT, projected (live and from a top-32 teacher cache) and ULD on the converted real pair."""
    from examples.real_pair.fetch_models import MARKER, default_cache_dir

    cache = default_cache_dir()
    if not (cache / MARKER).is_file():
        raise PartFailed(f"skipped (the real pair is not converted in {cache}: bash scripts/real_pair.sh)")
    data = ctx.out / "people_qa"
    run(ctx, [ctx.python, "-m", "examples.real_pair.people_qa", "--output_dir", str(data)], "people_qa.log", 60)
    loader = "llm_distillation/datasets/loader/people_qa.py"
    common = {"model_name": cache / "smollm2-135m-instruct", "dataset.file": loader, "dataset.source": data,
              "dataset.training_size": 0.15, "dataset.few_shot": 0, "batch_size_training": 8,
              "max_train_step": REAL_PAIR_STEPS if ctx.device == "cuda" else 3, "mixed_precision": True,
              "run_validation": False,
              "save_model": False, "max_eval_step": 0}
    teacher_cache = ctx.out / "people_qa_teacher_cache"
    run(ctx, [ctx.python, "-m", "llm_distillation.cache_teacher", "--model_name", str(cache / "gemma-3-270m"),
              "--output_dir", str(teacher_cache), "--topk", "32", "--bf16", "True", "--splits", "train",
              *as_flags({k: common[k] for k in ("dataset.file", "dataset.source", "dataset.training_size",
                                                 "dataset.few_shot")}), "--progress", "False"],
        "people_qa_cache.log", 90)
    live = {"distillation_config.model_name": cache / "gemma-3-270m"}
    rows = {"SFT": {**live, "distillation_config.distil_factor": 0},
            "projected (live)": {**live, "distillation_config.loss": "projected"},
            "projected (cache)": {"distillation_config.loss": "projected",  # a cached teacher is never loaded
                                  "distillation_config.teacher_cache": teacher_cache},
            "ULD index 1.5": {**live, "distillation_config.loss": "uld", "distillation_config.alignment": "index"}}
    out = {}
    for name, values in rows.items():
        folder = f"real-{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}"
        out[name] = finetune(ctx, folder, {**common, **values}, 120)
    return out


@dataclass(frozen=True)
class Part:
    name: str
    what: str  # one line: what it runs
    run: Callable


PARTS = (
    Part("environment", "torch, CUDA, the device, package versions, the commit", environment),
    Part("tests", "LLM_DISTILL_TEST_DEVICE=cuda python -m pytest -m device tests (losses against float64 references "
                  "in fp32/bf16, the engine, the cached terms)", tests),
    Part("train", "the embedded default, 100 steps, fp32 / --mixed_precision / --pure_bf16: s per step, peak CUDA "
                  "memory, eval loss", train),
    Part("fsdp", "torchrun --nproc_per_node 1 finetuning.py --enable_fsdp --distillation_config.enable_fsdp "
                 "(FSDP2 on NCCL), 100 steps", fsdp),
    Part("resume", "60 steps unbroken (twice) against a run stopped by SIGTERM at step 20 and resumed: weight "
                   "differences", resume),
    Part("losses", "python -m benchmarks.bench_losses --device cuda --quick at V 151,936 / 128,256 (ours against "
                   "the naive published algorithms: time, peak CUDA memory)",
         bench("benchmarks.bench_losses", ["--quick", "--vocab-pairs", "151936:128256"], 90,
               ["--quick", "--vocab-pairs", "4000:3000", "--seq", "128", "--answer", "32"])),
    Part("peers", "python -m benchmarks.bench_peers --device cuda: ours against Liger-Kernel's chunked JSD and TRL "
                  "GKD's loss at V 128,256, 8,192 tokens (needs liger-kernel, trl)",
         bench("benchmarks.bench_peers", ["--repeats", "3"], 120,
               ["--vocab", "4000", "--hidden", "64", "--batch", "2", "--seq", "128", "--answer", "32",
                "--repeats", "1"])),
    Part("train_step", "python -m benchmarks.bench_train_step --device cuda --quick (SFT, KL, ULD, MultiLevelOT "
                       "steps at 152k vocabularies)",
         bench("benchmarks.bench_train_step", ["--quick"], 90, ["--quick", "--vocab-pairs", "4000:3000", "--seq", "128",
                                                                 "--answer", "32"])),
    Part("on_policy", "python -m benchmarks.bench_on_policy --device cuda (the tiny pair): SFT, off-policy and "
                      "on-policy steps (the student's sampling on CUDA), split into generation / teacher / student",
         bench("benchmarks.bench_on_policy", ["--steps", "5"], 120,
               ["--steps", "1", "--warmup", "0", "--modes", "off-policy", "on-policy + CE"])),
    Part("real_pair", f"{REAL_PAIR_STEPS} steps of SFT, projected (live, cached) and ULD on Gemma 3 270M -> "
                      "SmolLM2-135M (only if scripts/real_pair.sh converted them)", real_pair),
)


# ------------------------------------------------------------------------------------------------ summary
def write_summary(out: Path, results: list[Result], meta: dict) -> str:
    """summary.json and summary.md in `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({**meta, "parts": [asdict(r) for r in results]}, indent=1,
                                                 default=str) + "\n")
    lines = [f"# GPU check ({meta.get('device', 'no CUDA device')}, {meta.get('date', '')})", "",
             "| part | status | seconds | figures |", "| --- | --- | ---: | --- |"]
    for result in results:
        figures = json.dumps(result.figures, default=str) if result.figures else ""
        lines.append(f"| {result.name} | {result.status} | {result.seconds:.0f} | {figures.replace('|', '/')} |")
    for result in results:
        if result.table:
            lines += ["", f"## {result.name}", "", result.table]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def run_part(part: Part, ctx: Context) -> Result:
    started = time.time()
    result = Result(part.name)
    try:
        found = part.run(ctx)
        result.figures, result.table = found if isinstance(found, tuple) else (found, "")
    except PartFailed as reason:
        result.status = str(reason)
    except Exception as error:  # noqa: BLE001 - one part's bug must not stop the others
        result.status = f"failed ({type(error).__name__}: {str(error)[:200]})"
    result.seconds = time.time() - started
    return result


# -------------------------------------------------------------------------------------------------- main
@dataclass(frozen=True)
class GpuCheckArgs:
    """Flags of `python -m benchmarks.gpu_check` (scripts/gpu_check.sh)."""

    out: str = option("output/gpu_check", "the folder of summary.json, summary.md and every part's log")
    dry_run: bool = option(False, "print one line per part, what it would run, and exit")
    only: Optional[str] = option(None, "comma-separated parts to run (default: all)")
    budget_s: float = option(480.0, "overall time budget in seconds; no part starts after it")
    rehearsal: bool = option(False, "run the parts on the CPU, to check the check itself (its figures are CPU ones, "
                                    "and the summary says so)")


COMMAND = flags.Command(program="python -m benchmarks.gpu_check", summary=__doc__.strip().splitlines()[0],
                        sections={"args": GpuCheckArgs})


def selected(only: Optional[str]) -> list[Part]:
    if not only:
        return list(PARTS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in {part.name for part in PARTS}]
    if unknown:
        from llm_recipes.errors import UserError

        raise UserError(f"--only {','.join(unknown)}: unknown part; the parts are {', '.join(p.name for p in PARTS)}")
    return [part for part in PARTS if part.name in names]


def check(args: GpuCheckArgs) -> int:
    import torch

    parts = selected(args.only)
    cuda = torch.cuda.is_available() and not args.rehearsal
    if args.dry_run or not (cuda or args.rehearsal):
        print("no CUDA device: nothing is run (on a GPU machine: bash scripts/gpu_check.sh)" if not cuda else
              "dry run: nothing is run")
        for part in parts:
            print(f"{part.name}: would run {part.what}")
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, time.time() + args.budget_s, "cuda" if cuda else "cpu")
    meta = {"device": torch.cuda.get_device_name(0) if cuda else "CPU rehearsal, not GPU figures",
            "date": time.strftime("%Y-%m-%d %H:%M"), "budget_s": args.budget_s}
    results: list[Result] = []
    for part in parts:
        print(f"[{time.time() - ctx.deadline + args.budget_s:5.0f} s] {part.name}: {part.what}", flush=True)
        results.append(run_part(part, ctx) if ctx.remaining() > 5 else
                       Result(part.name, "skipped (the overall budget is spent)"))
        write_summary(out, results, meta)
    print(write_summary(out, results, meta))
    return 0


main, cli = flags.entry_points(COMMAND, lambda parsed: check(parsed["args"]))

if __name__ == "__main__":
    cli()
