"""Where an on-policy step's time goes: against an off-policy step with the live teacher, and an SFT step.

    python -m benchmarks.bench_on_policy                              # the tiny pair (tiny_qa), a minute
    python -m benchmarks.bench_on_policy --pair real --teacher DIR    # Gemma 3 270M -> SmolLM2 on people_qa_worked

Each mode trains through the trainer's own `setup` and `train_step` on the same batches (the same seed):
- sft: the student's CE on the data set's answers (no teacher);
- off-policy: CE + the projected teacher on the data set's answers (the teacher's forward live);
- on-policy: --distillation_config.lmbda 1, every step on the student's own sampled answers;
- on-policy, no continuation: the same without --distillation_config.projected_continuation (its cost);
- on-policy + CE: with --distillation_config.on_policy_ce (the data set's CE on the same prompts kept).
A step is split (wall clock) into the student's generation (llm_recipes.on_policy.sample_answers), rebuilding
the batch (the teacher's tokenization of the answers, their text alignment), the teacher's forward
(objective.teacher_forward), and the rest: the student's forward and backward, the loss (including the teacher's
output layer at the answer rows) and the optimizer step. Median over --steps steps after --warmup.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch

MODES = {"sft": {"distillation_config.distil_factor": 0},
         "off-policy": {"distillation_config.loss": "projected"},
         "on-policy": {"distillation_config.loss": "projected", "distillation_config.lmbda": 1.0},
         # what --distillation_config.projected_continuation (on by default when lmbda > 0) costs
         "on-policy, no continuation": {"distillation_config.loss": "projected", "distillation_config.lmbda": 1.0,
                                        "distillation_config.projected_continuation": False},
         # --distillation_config.on_policy_ce: the data set's CE kept (one more student pass per micro-batch)
         "on-policy + CE": {"distillation_config.loss": "projected", "distillation_config.lmbda": 1.0,
                            "distillation_config.on_policy_ce": True}}


def synchronize() -> None:
    """Wall clock on CUDA measures finished kernels, not queued ones."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """Seconds spent inside the wrapped functions during one step."""

    def __init__(self):
        self.spent: dict = {}

    @contextmanager
    def timing(self, name: str):
        synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, module, attribute: str, name: str) -> None:
        original = getattr(module, attribute)

        def timed(*args, **kwargs):
            with self.timing(name):
                return original(*args, **kwargs)

        setattr(module, attribute, timed)


def pair_flags(args) -> dict:
    if args.pair == "tiny":
        from configs.paths import TINY_ASSETS

        return {"model_name": str(TINY_ASSETS / "student_pretrained"), "batch_size_training": 16,
                "distillation_config.on_policy_max_new_tokens": 16}
    from examples.real_pair.fetch_models import default_cache_dir

    cache = default_cache_dir()
    data = args.data or str(write_worked_data(tempfile.mkdtemp(prefix="bench_on_policy_")))
    return {"model_name": args.student or str(cache / "smollm2-135m-instruct"),
            "distillation_config.model_name": args.teacher or str(cache / "gemma-3-270m"),
            "dataset.file": "llm_distillation/datasets/loader/people_qa_worked.py", "dataset.source": data,
            "dataset.training_size": 0.25, "dataset.few_shot": 0, "batch_size_training": 8, "mixed_precision": True,
            "distillation_config.on_policy_max_new_tokens": 160}


def write_worked_data(folder: str):
    from examples.real_pair import people_qa

    return people_qa.write_splits(folder, {"train": 400, "validation": 10, "test": 10})


def measure(mode: str, args) -> dict:
    from llm_recipes import objective, on_policy
    from llm_recipes.config import parse_flags
    from llm_recipes.finetuning import epoch_micro_batches, setup, train_step
    from llm_recipes.metrics_log import peak_memory_gb

    flags = {"distillation": True, "output_dir": tempfile.mkdtemp(prefix=f"bench_{mode}_"), "run_validation": False,
             "save_model": False, "lr": 1e-4, "scheduler": "constant", "seed": 0, **pair_flags(args), **MODES[mode]}
    if "distillation_config.lmbda" not in MODES[mode]:
        flags.pop("distillation_config.on_policy_max_new_tokens")
    state = setup(parse_flags(flags))
    clock = Clock()
    clock.wrap(on_policy, "sample_answers", "generation")
    clock.wrap(objective, "teacher_forward", "teacher forward")
    clock.wrap(on_policy, "on_policy_batch", "rebuild")
    batches = epoch_micro_batches(state, 0)
    rows = []
    for i in range(args.warmup + args.steps):
        clock.spent = {}
        synchronize()
        start = time.perf_counter()
        train_step(state, [next(batches)])
        synchronize()
        total = time.perf_counter() - start
        if i >= args.warmup:
            rows.append({"total": total, **clock.spent})
    tokens = state.on_policy.stats.tokens / max(state.on_policy.stats.answers, 1) if state.on_policy else None
    keys = ("total", "generation", "rebuild", "teacher forward")
    result = {key: statistics.median(row.get(key, 0.0) for row in rows) for key in keys}
    result["student"] = statistics.median(row["total"] - sum(row.get(k, 0.0) for k in keys[1:]) for row in rows)
    result["sampled_tokens"] = tokens
    result["peak_memory_gb"] = peak_memory_gb(state.info.device)
    return result


def table(results: dict, args) -> str:
    import platform

    off = results.get("off-policy", {}).get("total")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [f"{args.pair} pair; torch {torch.__version__}, {where}; median of {args.steps} steps after "
             f"{args.warmup} warm-up (wall clock)",
             "| step | s / step | generation | rebuild (tokenize, align) | teacher forward | student forward, "
             "backward, loss, optimizer | time / off-policy | sampled tokens (mean) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, r in results.items():
        ratio = f"{r['total'] / off:.2f}" if off else "—"
        sampled = f"{r['sampled_tokens']:.1f}" if r["sampled_tokens"] is not None else "—"
        lines.append(f"| {mode} | {r['total']:.2f} | {r['generation']:.2f} | {r['rebuild']:.2f} | "
                     f"{r['teacher forward']:.2f} | {r['student']:.2f} | {ratio} | {sampled} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--student", help="real pair: a student folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--teacher", help="real pair: a teacher folder (default: the converted Gemma 3 270M)")
    parser.add_argument("--data", help="real pair: a people_qa folder (default: generated)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=tuple(MODES),
                        help="the steps to time (default: all; the ratio column needs off-policy)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the trainer runs (it takes CUDA whenever there is one)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if (args.device == "cuda") != torch.cuda.is_available():
        parser.error(f"--device {args.device}: the trainer runs on CUDA exactly when there is a device; "
                     "hide it with CUDA_VISIBLE_DEVICES= for a CPU run" if args.device == "cpu" else
                     "--device cuda: no CUDA device here")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {mode: measure(mode, args) for mode in args.modes}
    text = table(results, args)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"pair": args.pair, "device": args.device, "steps": args.steps, "warmup": args.warmup,
                       "torch": torch.__version__, "modes": results}, handle, indent=1)
    return text


if __name__ == "__main__":
    main()
