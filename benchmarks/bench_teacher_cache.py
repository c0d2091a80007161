"""The teacher cache: its error against the live teacher by K, its size, and what it saves in training.

    python -m benchmarks.bench_teacher_cache                  # everything (about 15 min on 2 cores)
    python -m benchmarks.bench_teacher_cache --only error     # or size, time

1. error: the distillation term computed from a top-K cache (float16 log-probabilities) against the
   exact one, relative difference, K = 8, 32, 128, 512:
   - on the tiny pair: the trainer's own evaluation (`finetuning.evaluate`, validation split) of the
     pretrained student with the tiny teacher live and from caches, for every cross-tokenizer loss and
     forward KL with the same-tokenizer student;
   - on random logits at a 151,936 vocabulary (4 x 128 answer positions; teacher rows Zipf-shaped,
     p(rank r) ~ r^-1.5 in a random order, the student's the teacher's logits plus noise), through the
     trainer's loss engine as a cached run computes it, with the gradient's relative error too.
2. size: bytes per answer row of the tiny caches (float16) and the format's bytes per row.
3. time and memory (subprocesses, one thread each; wall time and peak resident set size of the
   process): writing the cache, 2 epochs of training with the live teacher, from the cache, and SFT,
   on the tiny pair and with a teacher 8x deeper than the student (16 layers, random weights: only
   its cost matters); per-step time from metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

KS = (8, 32, 128, 512)
LOSSES_TINY = (("student_pretrained", "uld"), ("student_pretrained", "projected"), ("student_pretrained", "hybrid"),
               ("student_pretrained", "multilevel_ot"), ("student_same_pretrained", "kl"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_cache(folder: Path, teacher: str, k: int, storage: str = "float16", splits: str = "train,validation") -> dict:
    from configs.datasets import dataset
    from configs.paths import TINY_QA_LOADER
    from llm_distillation import cache_teacher

    summary = folder / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    return cache_teacher.write_cache(cache_teacher.CacheArgs(model_name=teacher, output_dir=str(folder), topk=k,
                                                             storage=storage, splits=splits, progress=False),
                                     dataset(file=TINY_QA_LOADER))


# -------------------------------------------------------------------------------------------- 1. error
def evaluate_once(student: str, loss: str, cache, out: Path) -> float:
    """The validation split's distillation term of an untrained run (the trainer's set-up and evaluation)."""
    from configs.paths import TINY_ASSETS
    from llm_recipes.config import parse_flags
    from llm_recipes.finetuning import evaluate, setup

    flags = {"model_name": str(TINY_ASSETS / student), "distillation": True, "distillation_config.loss": loss,
             "output_dir": str(out), "overwrite_output_dir": True, "val_batch_size": 50}
    if cache is not None:
        flags["distillation_config.teacher_cache"] = str(cache)
    state = setup(parse_flags(flags))
    return evaluate(state)["eval_distill"]


def tiny_errors(work: Path) -> list[dict]:
    from configs.paths import TINY_TEACHER

    caches = {k: work / f"cache-k{k}" for k in KS}
    for k, folder in caches.items():
        write_cache(folder, TINY_TEACHER, k)
    rows = []
    for student, loss in LOSSES_TINY:
        exact = evaluate_once(student, loss, None, work / "eval")
        row = {"loss": loss, "exact": exact}
        for k, folder in caches.items():
            row[k] = abs(evaluate_once(student, loss, folder, work / "eval") - exact) / abs(exact)
        rows.append(row)
    return rows


def zipf_logits(rows: int, vocab: int, exponent: float, generator) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    base = -exponent * ranks.log()
    return torch.stack([base[torch.randperm(vocab, generator=generator)] for _ in range(rows)])


def random_errors(vocab: int = 151_936, batch: int = 4, answer: int = 128) -> list[dict]:
    """Through the trainer's loss engine, as a cached run computes it: the live teacher's logits against the
    cache's rows (`CachedHead`; ULD as top-K ULD, as the ULD family's options make it from a cache)."""

    from configs import distillation_config
    from llm_recipes import teacher_cache
    from llm_recipes.losses import LossSpec, distillation_terms, table

    generator = torch.Generator().manual_seed(0)
    rows = batch * answer
    teacher = zipf_logits(rows, vocab, 1.5, generator)
    student = teacher + torch.randn(rows, vocab, generator=generator)
    labels = torch.full((batch, answer + 1), -100)
    labels[:, 1:] = torch.randint(0, vocab, (batch, answer), generator=generator)

    def shaped(x):  # rows -> [B, answer + 1, width]: position t predicts label t + 1
        return torch.cat([x.reshape(batch, answer, x.shape[-1]), torch.zeros(batch, 1, x.shape[-1])], 1)

    def term(loss, teacher_rows, head, cache=None):  # from a cache, the family sets what it can compute (top-K ULD)
        spec = LossSpec.from_config(distillation_config(loss=loss, alignment="index"), name=loss,
                                    student_vocab_size=vocab, teacher_vocab_size=vocab,
                                    same_tokenizer=table.LOSSES[loss].same_tokenizer, cache=cache)
        s = shaped(student).requires_grad_(True)
        terms = distillation_terms(spec, s, labels, lambda r: r, teacher_rows, labels, head, with_ce=False)
        (grad,) = torch.autograd.grad(terms.distill_sum, s)
        return float(terms.distill_sum.detach()), grad

    out = []
    for loss in ("kl", "reverse_kl", "jsd", "uld", "multilevel_ot"):
        exact, grad_exact = term(loss, shaped(teacher), lambda r: r)
        row = {"loss": loss, "exact": exact}
        for k in KS:
            ids, logprobs, tail = teacher_cache.summarize_rows(teacher, k, 1.0, torch.float16)
            packed = shaped(torch.cat([ids.float(), logprobs.float(), tail[:, None]], 1))
            meta = teacher_cache.CacheMeta("bench", "", vocab, k, 1.0, "float16", False, None, True, {})
            value, grad = term(loss, packed, teacher_cache.CachedHead(vocab, k, 1.0), cache=meta)
            row[k] = abs(value - exact) / abs(exact)
            row[f"grad {k}"] = float((grad - grad_exact).norm() / grad_exact.norm())
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------- 2. size
def sizes(work: Path) -> list[dict]:
    from configs.paths import TINY_TEACHER

    out = []
    for k in KS:
        summary = write_cache(work / f"cache-k{k}", TINY_TEACHER, k)
        out.append({"k": k, "bytes_per_row": summary["bytes_per_row"], "rows": summary["answer_rows"],
                    "format_bytes_per_row": 4 * k + 2 * k + 4})
    return out


# ---------------------------------------------------------------------------------------------- 3. time
def timed(command: list[str], log: Path) -> dict:
    """Wall seconds and peak resident set size (MiB) of one subprocess."""
    from configs.paths import REPO_ROOT

    with open(log, "w") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command[:6])} ... (see {log})")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024}


def step_seconds(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    return statistics.median(1.0 / r["tokens_per_s"] for r in train[5:])  # seconds per token, past the warm-up


def deep_teacher(work: Path) -> str:
    """The tiny teacher's architecture and tokenizer at 16 layers (8x the student's 2), random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from configs.paths import TINY_TEACHER

    folder = work / "teacher-16-layers"
    if not (folder / "config.json").exists():
        config = AutoConfig.from_pretrained(TINY_TEACHER)
        config.num_hidden_layers = 16
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(TINY_TEACHER).save_pretrained(folder)
    return str(folder)


def training_costs(work: Path, epochs: int = 2) -> list[dict]:
    from configs.paths import TINY_ASSETS, TINY_TEACHER

    out = []
    student = str(TINY_ASSETS / "student_pretrained")
    common = ["--model_name", student, "--num_epochs", str(epochs), "--batch_size_training", "16", "--lr", "2e-3",
              "--save_step", "0", "--save_model", "false", "--run_validation", "false", "--overwrite_output_dir",
              "--distillation_config.loss", "projected"]  # (SFT: distil_factor 0, no teacher term)
    teachers = (("tiny teacher (4 layers)", TINY_TEACHER), ("teacher 8x deeper (16 layers)", deep_teacher(work)))
    for name, teacher in teachers:
        cache = work / f"timing-cache-{len(out)}"
        shutil.rmtree(cache, ignore_errors=True)
        write = timed([sys.executable, "-m", "llm_distillation.cache_teacher", "--model_name", teacher,
                       "--output_dir", str(cache), "--topk", "32", "--splits", "train", "--progress", "false",
                       "--batch_size", "16"], work / f"write-{len(out)}.log")
        rows = {}
        for kind, extra in (("SFT", ["--distillation", "--distillation_config.distil_factor", "0"]),
                            ("live teacher", ["--distillation", "--distillation_config.model_name", teacher]),
                            ("cached teacher", ["--distillation", "--distillation_config.teacher_cache", str(cache)])):
            run_dir = work / f"train-{len(out)}-{kind.split()[0]}"
            rows[kind] = timed([sys.executable, "finetuning.py", *common, "--output_dir", str(run_dir), *extra],
                               work / f"{run_dir.name}.log")
            rows[kind]["seconds_per_token"] = step_seconds(run_dir)
        out.append({"teacher": name, "write": write, **rows})
    return out


# -------------------------------------------------------------------------------------------- report
def report(results: dict) -> str:
    lines = []
    if "tiny_errors" in results:
        lines += ["### Error of the distillation term from a top-K cache (float16), relative to the live teacher", "",
                  "Tiny pair, validation split, the trainer's evaluation:", "",
                  "| loss | exact value | K=8 | K=32 | K=128 | K=512 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['loss']} | {r['exact']:.4f} | " + " | ".join(f"{r[k]:.1e}" for k in KS) + " |"
                  for r in results["tiny_errors"]]
    if "random_errors" in results:
        lines += ["", "Random logits, 151,936 ids, 512 answer rows (value; gradient w.r.t. the student's logits):", "",
                  "| loss | exact value | K=8 | K=32 | K=128 | K=512 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['loss']} | {r['exact']:.4f} | " + " | ".join(f"{r[k]:.1e}; {r[f'grad {k}']:.1e}" for k in KS)
                  + " |" for r in results["random_errors"]]
    if "sizes" in results:
        lines += ["", "### Size (tiny caches, float16 log-probabilities)", "",
                  "| K | bytes per answer row | of which the rows themselves (4K + 2K + 4) |", "| ---: | ---: | ---: |"]
        lines += [f"| {r['k']} | {r['bytes_per_row']:.0f} | {r['format_bytes_per_row']} |" for r in results["sizes"]]
    if "training" in results:
        lines += ["", "### Time and memory: 2 epochs of the tiny task (3,000 answers, batch 16, the projected "
                  "teacher), one thread", "",
                  "| teacher | run | wall s | peak RSS MiB | s per 1k tokens (median step) |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for r in results["training"]:
            lines.append(f"| {r['teacher']} | writing the cache (K 32) | {r['write']['seconds']:.1f} | "
                         f"{r['write']['peak_mib']:.0f} | |")
            for kind in ("SFT", "live teacher", "cached teacher"):
                lines.append(f"| {r['teacher']} | {kind} | {r[kind]['seconds']:.1f} | {r[kind]['peak_mib']:.0f} | "
                             f"{1000 * r[kind]['seconds_per_token']:.3f} |")
            cached_total = r["write"]["seconds"] + r["cached teacher"]["seconds"]
            lines.append(f"| {r['teacher']} | cache + cached training / live training | "
                         f"{cached_total / r['live teacher']['seconds']:.2f}x | | cached / SFT step: "
                         f"{r['cached teacher']['seconds_per_token'] / r['SFT']['seconds_per_token']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("error", "size", "time"), default=None)
    parser.add_argument("--work", default="output/bench_teacher_cache", help="caches and runs (reused when present)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only in (None, "error"):
        results["tiny_errors"] = tiny_errors(work)
        results["random_errors"] = random_errors()
    if args.only in (None, "size"):
        results["sizes"] = sizes(work)
    if args.only in (None, "time"):
        results["training"] = training_costs(work)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
