"""Forward+backward time, peak memory and value of each loss: ours against the naive published algorithm.

    python -m benchmarks.bench_losses                 # full table, both vocabulary pairs (CPU: ~10 min)
    python -m benchmarks.bench_losses --quick         # a few rows, one repeat
    python -m benchmarks.bench_losses --device cuda --dtype bfloat16

Ours: last hidden states [batch, seq, d] and the output layer's weights go to
llm_recipes.losses.distillation_terms (the trainer's engine): logits only at answer rows, in row
chunks, recomputed in backward. Naive (llm_recipes.losses.reference): full [batch, seq, vocab] logits from the
same weights, then the published algorithm on them with plain autograd. Both get identical inputs
(seeded), so their values and gradients must agree.

Every case runs in a fresh subprocess, one at a time, so that its peak memory is its own
(benchmarks/measure.py: CPU time and peak resident set size on CPU, wall time and the CUDA allocator's
peak on GPU). Time: median of `--repeats` forward+backward runs after `--warmup` runs on one sequence.
"""
import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.measure import PeakMemory, add_common_arguments, check_supported, clock, clock_name, machine, memory_name, run_worker  # noqa: E501
from llm_recipes.losses import (
    KLOptions,
    LossSpec,
    MultiLevelOTOptions,
    ULDOptions,
    distillation_terms,
    reference,
    table,
)

VOCAB_PAIRS = {"pythia-llama2": (50304, 32000), "qwen-llama3": (151936, 128256)}
KL_KINDS = table.DIVERGENCE_KINDS
GREEDY_PROBE_COLUMNS = 2048  # student columns the naive Python-loop greedy is timed on


@dataclass
class Case:
    loss: str  # uld | multilevel_ot | a KL kind
    impl: str  # ours | naive
    vocab_student: int
    vocab_teacher: int
    top_k: int = 0  # ULD: 0 exact; MultiLevelOT: columns kept (50)
    mode: str = "fast"  # MultiLevelOT
    batch: int = 4
    seq: int = 512
    answer: int = 128
    hidden: int = 256
    logit_std: float = 5.0
    chunk_size: int = 1024
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 3
    threads: int = 0
    grad_path: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.loss == "uld":
            return f"ULD top-{self.top_k}" if self.top_k else "ULD exact"
        if self.loss == "multilevel_ot":
            return f"MultiLevelOT {self.mode}"
        return f"{table.by_divergence(self.loss).name} ({self.loss})"


# ------------------------------------------------------------------------------------------ inputs
def make_inputs(case: Case):
    """Seeded hidden states and output layers whose logits are N(0, logit_std^2) per entry; prompts
    of seq - answer tokens then `answer` answer tokens, the same positions for both models."""
    device, dtype = torch.device(case.device), getattr(torch, case.dtype)
    generator = torch.Generator().manual_seed(0)
    same_vocab = case.loss in table.DIVERGENCE_KINDS  # the KL family compares one vocabulary
    vocab_t = case.vocab_student if same_vocab else case.vocab_teacher

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    scale = case.logit_std / case.hidden**0.5
    h_s = randn(case.batch, case.seq, case.hidden).requires_grad_()
    w_s = randn(case.vocab_student, case.hidden, scale=scale).requires_grad_()
    h_t = randn(case.batch, case.seq, case.hidden)
    w_t = randn(vocab_t, case.hidden, scale=scale)
    labels = torch.full((case.batch, case.seq), -100, dtype=torch.long)
    labels[:, case.seq - case.answer:] = torch.randint(0, min(case.vocab_student, vocab_t),
                                                       (case.batch, case.answer), generator=generator)
    return h_s, w_s, h_t, w_t, labels.to(device)


def loss_spec(case: Case) -> LossSpec:
    if case.loss == "uld":
        return LossSpec("uld", chunk_size=case.chunk_size, options=ULDOptions(top_k=case.top_k))
    if case.loss == "multilevel_ot":
        return LossSpec("multilevel_ot", chunk_size=case.chunk_size,
                        options=MultiLevelOTOptions(mode=case.mode, top_k=case.top_k or 50))
    return LossSpec(table.by_divergence(case.loss).name, same_tokenizer=True, chunk_size=case.chunk_size,
                    skip_student_eos=False, options=KLOptions(case.loss))


def ours(case: Case):
    """forward+backward of our engine on (h_s, w_s, h_t, w_t, labels); returns the loss value."""
    spec = loss_spec(case)

    def run(h_s, w_s, h_t, w_t, labels):
        terms = distillation_terms(spec, h_s, labels, lambda rows: torch.nn.functional.linear(rows, w_s),
                                   h_t, labels, lambda rows: torch.nn.functional.linear(rows, w_t), with_ce=False)
        loss = terms.distill_sum / terms.distill_count
        loss.backward()
        return float(loss.detach())

    return run


def naive_run(case: Case):
    """forward+backward of the naive algorithm on full logits from the same weights."""
    def run(h_s, w_s, h_t, w_t, labels):
        student_logits = torch.nn.functional.linear(h_s, w_s)  # [B, S, V_s], as the model returns it
        with torch.no_grad():
            teacher_logits = torch.nn.functional.linear(h_t, w_t)
        if case.loss == "uld":
            loss = reference.uld(student_logits, labels, teacher_logits, labels)
        elif case.loss == "multilevel_ot":
            loss = reference.multilevel_ot(student_logits, labels, teacher_logits, labels, mode=case.mode,
                                           top_k=case.top_k or 50)
        else:
            loss = reference.divergence(student_logits, teacher_logits, labels, kind=case.loss)
        loss.backward()
        return float(loss.detach())

    return run


# ---------------------------------------------------------------------------------------- measuring
def measure(case: Case) -> dict:
    """One case, in this (fresh) process."""
    if case.threads:
        torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    inputs = make_inputs(case)
    if case.impl == "naive" and case.loss == "multilevel_ot" and case.mode == "greedy":
        return measure_naive_greedy(case, *inputs)
    h_s, w_s, h_t, w_t, labels = inputs
    run = (ours if case.impl == "ours" else naive_run)(case)
    for _ in range(case.warmup):  # on one sequence, before the memory baseline: one-time costs stay out
        run(h_s[:1], w_s, h_t[:1], w_t, labels[:1])
    h_s.grad = w_s.grad = None
    memory = PeakMemory(device)
    memory.start()
    times, walls, value = [], [], None
    for _ in range(case.repeats):
        h_s.grad = w_s.grad = None
        started, wall = clock(device), time.perf_counter()
        value = run(*inputs)
        times.append(clock(device) - started)
        walls.append(time.perf_counter() - wall)
    if case.grad_path:
        torch.save(h_s.grad.float().cpu(), case.grad_path)
    return {"time_s": statistics.median(times), "times_s": times, "wall_s": walls, "peak_bytes": memory.peak(),
            "value": value}


def measure_naive_greedy(case: Case, h_s, w_s, h_t, w_t, labels) -> dict:
    """The public code's Python-loop greedy would take hours at these vocabularies: time the loop on
    GREEDY_PROBE_COLUMNS student columns of one sequence and scale it to the whole vocabulary and
    batch. `report` adds the rest of the algorithm (the naive fast variant's time)."""
    with torch.no_grad():
        rows = (labels[0, 1:] != -100).nonzero().squeeze(1)[:-1]  # the first sequence's paired rows
        q = torch.softmax(torch.nn.functional.linear(h_s[0, rows], w_s).float(), dim=-1)
        p = torch.softmax(torch.nn.functional.linear(h_t[0, rows], w_t).float(), dim=-1)
        k = case.top_k or 50
        cols_t = torch.argsort(p.sum(dim=0), descending=True)[:k]
        started = clock(h_s.device)
        reference.greedy_columns_python(p[:, cols_t], q[:, :GREEDY_PROBE_COLUMNS], k)
        probe = clock(h_s.device) - started
    return {"loop_s": probe * case.vocab_student / GREEDY_PROBE_COLUMNS * case.batch, "loop_probe_s": probe,
            "peak_bytes": None, "value": None, "estimated": True}


# ------------------------------------------------------------------------------------------- cases
def build_cases(args) -> list[Case]:
    common = dict(batch=args.batch, seq=args.seq, answer=args.answer, hidden=args.hidden_size,
                  logit_std=args.logit_std, chunk_size=args.chunk_size, device=args.device, dtype=args.dtype,
                  warmup=args.warmup, repeats=args.repeats, threads=args.threads)
    cases = []
    for vocab_s, vocab_t in args.vocab_pairs:
        pair = dict(vocab_student=vocab_s, vocab_teacher=vocab_t, **common)
        cases += [Case("uld", "ours", **pair), Case("uld", "naive", **pair)]
        cases += [Case("uld", "ours", top_k=k, **pair) for k in args.uld_top_k]
        cases += [Case("multilevel_ot", impl, mode="fast", **pair) for impl in ("ours", "naive")]
        if not args.quick:
            cases += [Case("multilevel_ot", impl, mode="greedy", **pair) for impl in ("ours", "naive")]
        for kind in (("forward",) if args.quick else KL_KINDS):
            cases += [Case(kind, impl, **pair) for impl in ("ours", "naive")]
    return cases


# ------------------------------------------------------------------------------------------ report
def _mib(value):
    return "—" if value is None else f"{value / 2**20:,.0f}"


def _secs(value, estimated=False):
    return "—" if value is None else ("~" if estimated else "") + (f"{value:.3f}" if value < 10 else f"{value:,.1f}")


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt_ratio(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def _rel(a, b):
    return None if a is None or b is None else abs(a - b) / max(abs(b), 1e-30)


def _grad_rel(path_a, path_b):
    if not (Path(path_a).exists() and Path(path_b).exists()):
        return None
    a, b = torch.load(path_a), torch.load(path_b)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _sci(value):
    return "—" if value is None else f"{value:.1e}"


def report(results: list[tuple[Case, dict]], args) -> str:
    """Markdown tables: ours vs naive per loss, top-k ULD against exact, and the targets."""
    by_key = {(c.loss, c.impl, c.top_k, c.mode, c.vocab_student): (c, r) for c, r in results}
    for (loss, impl, top_k, mode, vocab), (_, result) in by_key.items():
        if result.get("estimated"):  # naive greedy: the Python loop's estimate + the rest (naive fast)
            fast = by_key.get((loss, impl, top_k, "fast", vocab), (None, {}))[1]
            result["time_s"] = result["loop_s"] + fast["time_s"] if "time_s" in fast else None
    lines = ["| loss | vocab student / teacher | ours s | naive s | time ours/naive | ours peak MiB | "
             "naive peak MiB | memory ours/naive | value rel. diff | grad rel. diff |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    checks = []
    for vocab_s, vocab_t in args.vocab_pairs:
        for case, result in results:
            if case.impl != "ours" or case.vocab_student != vocab_s or (case.loss == "uld" and case.top_k):
                continue
            naive_case, naive_result = by_key.get((case.loss, "naive", case.top_k, case.mode, vocab_s), (None, {}))
            vocab = f"{vocab_s:,} / {vocab_t:,}" if case.loss in ("uld", "multilevel_ot") else f"{vocab_s:,} (both)"
            if "error" in result or "error" in naive_result:
                lines.append(f"| {case.name} | {vocab} | error: {result.get('error') or naive_result.get('error')} |")
                continue
            time_ratio = _ratio(result["time_s"], naive_result.get("time_s"))
            memory_ratio = _ratio(result["peak_bytes"], naive_result.get("peak_bytes"))
            value_diff = _rel(result["value"], naive_result.get("value"))
            grad_diff = _grad_rel(case.grad_path, naive_case.grad_path) if naive_case else None
            lines.append(
                f"| {case.name} | {vocab} | {_secs(result['time_s'])} | "
                f"{_secs(naive_result.get('time_s'), naive_result.get('estimated', False))} | "
                f"{_fmt_ratio(time_ratio, 3 if time_ratio and time_ratio < 0.01 else 2)} | "
                f"{_mib(result['peak_bytes'])} | "
                f"{_mib(naive_result.get('peak_bytes'))} | {_fmt_ratio(memory_ratio)} | {_sci(value_diff)} | "
                f"{_sci(grad_diff)} |")
            if case.loss == "uld":
                checks.append((f"ULD exact {vocab}: value within 1e-5 of naive",
                               value_diff is not None and value_diff <= 1e-5, f"rel. diff {_sci(value_diff)}"))
                checks.append((f"ULD exact {vocab}: peak memory <= 0.5 x naive",
                               memory_ratio is not None and memory_ratio <= 0.5, f"{_fmt_ratio(memory_ratio)} x"))
                checks.append((f"ULD exact {vocab}: time <= naive", time_ratio is not None and time_ratio <= 1.0,
                               f"{_fmt_ratio(time_ratio)} x"))
    text = ["\n".join(lines)]

    topk_lines = ["| vocab student / teacher | ULD | s | speed-up vs exact (ours) | speed-up vs naive | value | "
                  "deviation from exact (relative) | peak MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for vocab_s, vocab_t in args.vocab_pairs:
        _, exact = by_key.get(("uld", "ours", 0, "fast", vocab_s), (None, {}))
        _, naive_exact = by_key.get(("uld", "naive", 0, "fast", vocab_s), (None, {}))
        if "time_s" not in exact:
            continue
        for case, result in results:
            if case.loss != "uld" or case.impl != "ours" or case.vocab_student != vocab_s or "time_s" not in result:
                continue
            deviation = None if not case.top_k else (exact["value"] - result["value"]) / exact["value"]
            topk_lines.append(
                f"| {vocab_s:,} / {vocab_t:,} | {case.name} | {_secs(result['time_s'])} | "
                f"{_fmt_ratio(_ratio(exact['time_s'], result['time_s']), 1)} | "
                f"{_fmt_ratio(_ratio(naive_exact.get('time_s'), result['time_s']), 1)} | {result['value']:.6f} | "
                f"{'0 (exact)' if not case.top_k else _sci(deviation)} | {_mib(result['peak_bytes'])} |")
    text.append("\n".join(topk_lines))

    for vocab_s, vocab_t in args.vocab_pairs:
        _, fast = by_key.get(("multilevel_ot", "ours", 0, "fast", vocab_s), (None, {}))
        _, greedy = by_key.get(("multilevel_ot", "ours", 0, "greedy", vocab_s), (None, {}))
        ratio = _ratio(greedy.get("time_s"), fast.get("time_s"))
        if ratio is not None:
            checks.append((f"MultiLevelOT greedy / fast {vocab_s:,} / {vocab_t:,}: <= 5", ratio <= 5,
                           f"{ratio:.2f} x ({greedy['time_s']:.2f} s vs {fast['time_s']:.2f} s)"))
    if checks:
        rows = [f"| {name} | {'yes' if ok else 'NO'} | {measured} |" for name, ok, measured in checks]
        text.append("\n".join(["| target | met | measured |", "| --- | --- | --- |"] + rows))
    return "\n\n".join(text)


def describe(args) -> str:
    return (f"{machine(args.threads or torch.get_num_threads())}; device {args.device}, dtype {args.dtype}; "
            f"batch {args.batch}, {args.seq} tokens, {args.answer} answer tokens ({args.answer - 1} paired rows per "
            f"sequence for ULD/MultiLevelOT: the student's EOS only counts in CE), hidden size {args.hidden_size}, "
            f"logits N(0, {args.logit_std:g}^2), chunk size {args.chunk_size}; time: median of {args.repeats} "
            f"forward+backward after {args.warmup} warm-up on one sequence, {clock_name(args.device)}; peak memory: "
            f"{memory_name(args.device)}; each case in a fresh process. Naive MultiLevelOT greedy: the public "
            f"code's Python loop timed on {GREEDY_PROBE_COLUMNS} student columns of one sequence, scaled to the "
            "vocabulary and batch, plus the naive fast variant's time (~ marks the estimate).")


def parse_vocab_pairs(text: str):
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if item in VOCAB_PAIRS:
            pairs.append(VOCAB_PAIRS[item])
        else:
            try:
                student, teacher = (int(x) for x in item.split(":"))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"bad vocabulary pair {item!r}: use STUDENT:TEACHER sizes or one of {', '.join(VOCAB_PAIRS)}")
            pairs.append((student, teacher))
    return pairs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="of hidden states and output layers (the losses always run in fp32)")
    parser.add_argument("--vocab-pairs", type=parse_vocab_pairs, default=list(VOCAB_PAIRS.values()),
                        help="comma-separated STUDENT:TEACHER vocabulary sizes or names ("
                             + ", ".join(f"{k}={s}:{t}" for k, (s, t) in VOCAB_PAIRS.items())
                             + "); the KL family uses the student's for both models")
    parser.add_argument("--quick", action="store_true",
                        help="ULD, one top-k, MultiLevelOT fast and forward KL, 1 repeat")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--logit-std", type=float, default=5.0, help="std of the random logits (5: entropy ~3.3 nats)")
    parser.add_argument("--uld-top-k", type=lambda s: [int(x) for x in s.split(",")], default=[32, 512, 4096])
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(Case(**json.loads(args.worker)))))
        return
    if args.quick:
        args.repeats, args.uld_top_k = 1, args.uld_top_k[:1]
    check_supported(args.device)
    print(describe(args), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        cases = build_cases(args)
        for i, case in enumerate(tqdm(cases, desc="cases", dynamic_ncols=True)):
            case.grad_path = str(Path(folder) / f"grad{i}.pt")
            results.append((case, run_worker("benchmarks.bench_losses", asdict(case))))
        table = report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps([{"case": asdict(c), "result": r} for c, r in results], indent=1))
    print(table)


if __name__ == "__main__":
    main()
