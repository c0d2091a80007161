"""Our distillation step against the peers' on the same inputs: Liger-Kernel's chunked JSD and TRL's GKD loss.

    python -m benchmarks.bench_peers                      # CPU: a small vocabulary, minutes
    python -m benchmarks.bench_peers --device cuda        # the GPU anchors: V 128,256, 8,192 tokens
    pip install liger-kernel trl                          # the peers (rows are skipped without them)

One training step's loss, 0.5 x CE + 0.5 x divergence per answer token, one tokenizer, from the last
hidden states [batch, seq, d] of both models and their output layers, forward and backward to the
student's hidden states and output layer:
- ours: llm_recipes.losses.distillation_terms (the trainer's engine: logits at answer rows only, in row
  chunks, one fused pass per chunk);
- Liger: `LigerFusedLinearJSDLoss` (chunked fused linear + JSD; beta 0 is the forward KL), given every row
  as its users call it, and given the answer rows only (what our engine gathers first);
- TRL GKD: `GKDTrainer.generalized_jsd_loss` on full [batch, seq, vocab] logits plus torch's CE, as its
  trainer computes them.
All compute the same value (checked: relative differences in the table). Divergences: JSD at beta 0.5
(m = 0.5 p + 0.5 q) and the forward KL(p || q), temperature 1. Each case runs in a fresh process
(benchmarks/measure.py: wall time and the CUDA allocator's peak on GPU; CPU time and peak RSS on CPU).
TRL's GOLD computes ULD over its own byte-offset alignment (its collator's inputs), not one of these values:
it is not a row (our ULD against the naive published algorithm: benchmarks/bench_losses.py).
"""
import argparse
import json
import statistics
from dataclasses import asdict, dataclass

import torch

from benchmarks.measure import (PeakMemory, add_common_arguments, check_supported, clock, clock_name, machine,
                                memory_name, run_worker)

IMPLS = ("ours", "liger (every row)", "liger (answer rows)", "trl gkd")
KINDS = {"jsd": 0.5, "forward kl": 0.0}  # divergence -> the peers' beta
WEIGHTS = (0.5, 0.5)  # CE, divergence (Liger's default weights)


@dataclass
class Case:
    impl: str
    kind: str
    vocab: int
    hidden: int
    batch: int
    seq: int
    answer: int
    device: str
    dtype: str
    chunk_size: int
    repeats: int
    warmup: int
    threads: int = 0


def inputs(case: Case):
    """Seeded hidden states, output layers and labels (the last `answer` positions of each sequence)."""
    device, dtype = torch.device(case.device), getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    scale = 5.0 / case.hidden ** 0.5  # logits ~ N(0, 25): entropy ~3 nats
    h_s = randn(case.batch, case.seq, case.hidden).requires_grad_()
    w_s = randn(case.vocab, case.hidden, scale=scale).requires_grad_()
    h_t, w_t = randn(case.batch, case.seq, case.hidden), randn(case.vocab, case.hidden, scale=scale)
    labels = torch.full((case.batch, case.seq), -100, dtype=torch.long)
    labels[:, case.seq - case.answer:] = torch.randint(0, case.vocab, (case.batch, case.answer), generator=g)
    return h_s, w_s, h_t, w_t, labels.to(device)


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """The target each row predicts (row t: label t + 1), -100 at the last row."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def ours(case: Case, h_s, w_s, h_t, w_t, labels):
    from configs import distillation_config
    from llm_recipes.losses import LossSpec, distillation_terms

    name = "jsd" if case.kind == "jsd" else "kl"
    spec = LossSpec.from_config(distillation_config(jsd_beta=KINDS["jsd"]), name=name, student_vocab_size=case.vocab,
                                teacher_vocab_size=case.vocab, same_tokenizer=True, chunk_size=case.chunk_size)
    terms = distillation_terms(spec, h_s, labels, lambda r: r @ w_s.t(), h_t, labels, lambda r: r @ w_t.t())
    count = max(terms.ce_count, 1)
    return WEIGHTS[0] * terms.ce_sum / count + WEIGHTS[1] * terms.distill_sum / count


def liger(case: Case, h_s, w_s, h_t, w_t, labels, answer_rows_only: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=WEIGHTS[0], weight_soft_loss=WEIGHTS[1], beta=KINDS[case.kind],
                                   compiled=case.device.startswith("cuda"), chunk_size=case.chunk_size)
    targets = shifted(labels).reshape(-1)
    s_rows, t_rows = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    if answer_rows_only:
        keep = (targets != -100).nonzero().squeeze(1)
        s_rows, t_rows, targets = s_rows.index_select(0, keep), t_rows.index_select(0, keep), targets[keep]
    return loss(s_rows, w_s, t_rows, w_t, targets)


def trl_gkd(case: Case, h_s, w_s, h_t, w_t, labels):
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student = h_s @ w_s.t()
    with torch.no_grad():
        teacher = h_t @ w_t.t()
    targets = shifted(labels)
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, case.vocab).float(), targets.reshape(-1),
                                           ignore_index=-100)
    jsd = GKDTrainer.generalized_jsd_loss(student.float(), teacher.float(), labels=targets, beta=KINDS[case.kind])
    return WEIGHTS[0] * ce + WEIGHTS[1] * jsd


def loss_of(case: Case, tensors):
    if case.impl == "ours":
        return ours(case, *tensors)
    if case.impl.startswith("liger"):
        return liger(case, *tensors, answer_rows_only="answer" in case.impl)
    return trl_gkd(case, *tensors)


def measure(case: Case) -> dict:
    """Median forward + backward time, peak memory, the value, and the gradient w.r.t. the student's hidden states
    at 8,192 seeded entries (the same for every implementation: compared with ours in the parent)."""
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    tensors = inputs(case)
    h_s, w_s = tensors[0], tensors[1]
    times, memory = [], PeakMemory(device)
    for i in range(case.warmup + case.repeats):
        h_s.grad = w_s.grad = None
        if i == case.warmup:
            memory.start()
        start = clock(device)
        value = loss_of(case, tensors)
        value.backward()
        elapsed = clock(device) - start
        if i >= case.warmup:
            times.append(elapsed)
    grad = h_s.grad.detach().double().flatten()
    sample = torch.randperm(grad.numel(), generator=torch.Generator().manual_seed(1))[:8192].to(grad.device)
    return {"time_s": statistics.median(times), "peak_bytes": memory.peak(), "value": float(value.detach()),
            "grad_h": grad[sample].cpu().tolist(), "grad_h_norm": float(grad.norm())}


def available(impl: str) -> str:
    """'' when the implementation can run here, else why not."""
    import importlib.util

    package = {"liger": "liger_kernel", "trl": "trl"}.get(impl.split()[0])
    if package and importlib.util.find_spec(package) is None:
        return f"pip install {package.replace('_', '-')}"
    return ""


def relative(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def table(results: list[tuple[Case, dict]]) -> str:
    rows = ["| divergence | implementation | s (fwd + bwd) | time / ours | peak MiB | memory / ours | "
            "value rel. diff | grad rel. diff |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = {case.kind: result for case, result in results if case.impl == "ours" and "time_s" in result}
    for case, result in results:
        if "time_s" not in result:
            rows.append(f"| {case.kind} | {case.impl} | skipped ({result.get('error', '?')}) | | | | | |")
            continue
        ref = base.get(case.kind)
        ratio = (lambda k: f"{result[k] / ref[k]:.2f}" if ref and ref[k] else "—")
        diff = (f"{abs(result['value'] - ref['value']) / abs(ref['value']):.1e}",
                f"{relative(result['grad_h'], ref['grad_h']):.1e}") if ref and case.impl != "ours" else ("—", "—")
        rows.append(f"| {case.kind} | {case.impl} | {result['time_s']:.4f} | {ratio('time_s')} | "
                    f"{result['peak_bytes'] / 2**20:,.0f} | {ratio('peak_bytes')} | {diff[0]} | {diff[1]} |")
    return "\n".join(rows)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--vocab", type=int, default=None, help="default: 128,256 on CUDA, 32,000 on CPU")
    parser.add_argument("--hidden", type=int, default=None, help="default: 4,096 on CUDA, 256 on CPU")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA")
    parser.add_argument("--impls", default=",".join(IMPLS))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(Case(**json.loads(args.worker)))))
        return ""
    cuda = args.device.startswith("cuda")
    check_supported(args.device)
    if cuda and args.batch == 4 and args.seq == 512:  # Liger's published anchor: B x T = 8,192
        args.batch, args.seq, args.answer = 8, 1024, 1024 - 1
    vocab, hidden = args.vocab or (128_256 if cuda else 32_000), args.hidden or (4096 if cuda else 256)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    results = []
    for kind in KINDS:
        for impl in [i for i in IMPLS if i in args.impls.split(",")]:
            case = Case(impl, kind, vocab, hidden, args.batch, args.seq, args.answer, args.device, dtype,
                        args.chunk_size, args.repeats, args.warmup, args.threads)
            why = available(impl)
            results.append((case, {"error": why} if why else run_worker("benchmarks.bench_peers", asdict(case))))
    text = (f"{machine(args.threads)}; device {args.device}; {dtype}; vocabulary {vocab:,}, hidden {hidden}, "
            f"batch {args.batch} x {args.seq} tokens, {args.answer} answer tokens each; loss 0.5 CE + 0.5 divergence "
            f"per answer token; time: median of {args.repeats} after {args.warmup} warm-up, {clock_name(args.device)}; "
            f"memory: {memory_name(args.device)}\n" + table(results))
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([{"case": asdict(c), **{k: v for k, v in r.items() if k != "grad_h"}} for c, r in results],
                      handle, indent=1)
    return text


if __name__ == "__main__":
    main()
