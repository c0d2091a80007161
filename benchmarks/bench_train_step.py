"""Training-step throughput and peak memory: SFT versus each distillation loss, through the trainer's code.

    python benchmarks/bench_train_step.py                    # Qwen-2.5 student / Llama-3 teacher vocabularies
    python benchmarks/bench_train_step.py --vocab-pairs pythia-llama2 --quick

Models: small random Llama-architecture models built from configs (no download) with real vocabulary
sizes: a student (V_s), a teacher with another tokenizer (V_t, for ULD and MultiLevelOT) and a
teacher with the student's tokenizer (V_s, for the KL family), each answer 128 of 512 tokens.
One optimizer step is what llm_recipes/finetuning.py's loop does for one micro-batch on one process:
Objective.counts (step totals), Objective.terms (teacher forward to its last hidden states, student
forward, CE and the logit term from the answer rows by llm_recipes.losses), Objective.combine,
backward, finetuning.clip_gradients, AdamW (llm_recipes.optim.build_optimizer) step, zero_grad.
"SFT + teacher forward" is the same step with the teacher's forward and no logit term: the ratio
column divides each loss's step time by it, on the same two models.

These bodies are tiny next to their output layers (V x d), so the logit term's share of a step is
far larger than with real models (a 7B teacher's forward dwarfs its output layer on the answer rows):
the ratios here are upper bounds.
"""
import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.bench_losses import VOCAB_PAIRS, parse_vocab_pairs  # noqa: E402
from benchmarks.measure import PeakMemory, check_supported, clock, clock_name, machine, memory_name, run_worker  # noqa: E402,E501

KL_LOSSES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


@dataclass
class Case:
    key: str  # what --only selects
    label: str
    loss: str  # "sft" (no teacher), "none" (SFT + teacher forward), or a --distillation_config.loss
    same_tokenizer: bool
    vocab_student: int
    vocab_teacher: int
    uld_top_k: int = 0
    mode: str = "fast"
    batch: int = 4
    seq: int = 512
    answer: int = 128
    student_hidden: int = 256
    student_layers: int = 4
    teacher_hidden: int = 512
    teacher_layers: int = 4
    chunk_size: int = 1024
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 3
    threads: int = 0


def llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def make_side(case: Case, vocab: int, generator) -> dict:
    ids = torch.randint(0, vocab, (case.batch, case.seq), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, case.seq - case.answer:] = ids[:, case.seq - case.answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def setup(case: Case):
    """(objective, optimizer, batch, cfg) as finetuning.train builds them."""
    from llm_recipes import distributed, models
    from llm_recipes.config import RunConfig
    from llm_recipes.finetuning import Objective
    from llm_recipes.losses import LossSpec
    from llm_recipes.optim import build_optimizer

    cfg = RunConfig()
    cfg.train.distillation = case.loss != "sft"
    cfg.train.logits_chunk_size = case.chunk_size
    d = cfg.distillation
    d.loss = case.loss if case.loss not in ("sft", "none") else "auto"
    d.distil_factor = 0.15 if case.loss == "multilevel_ot" else 1.5
    d.uld_top_k = case.uld_top_k
    d.multilevel_ot_mode = case.mode
    vocab_t = case.vocab_student if case.same_tokenizer else case.vocab_teacher
    name = case.loss if case.loss not in ("sft",) else "none"
    spec = LossSpec.from_config(d, name=name, student_vocab_size=case.vocab_student, teacher_vocab_size=vocab_t,
                                same_tokenizer=case.same_tokenizer, chunk_size=case.chunk_size)
    device = torch.device(case.device)
    student = llama(case.vocab_student, case.student_hidden, case.student_layers, seed=0).to(device).train()
    teacher = None
    if case.loss != "sft":
        teacher = models.freeze_teacher(llama(vocab_t, case.teacher_hidden, case.teacher_layers, seed=1).to(device))
    generator = torch.Generator().manual_seed(0)
    batch = {"student": make_side(case, case.vocab_student, generator)}
    batch["teacher"] = batch["student"] if case.same_tokenizer else make_side(case, vocab_t, generator)
    batch = {side: {k: v.to(device) for k, v in tensors.items()} for side, tensors in batch.items()}
    objective = Objective(cfg, spec, student, teacher, distributed.DistInfo(device=device))
    return objective, build_optimizer(student, cfg.train), batch, cfg


def train_step(objective, optimizer, batch, cfg) -> float:
    """One optimizer step of one micro-batch on one process, as finetuning.train's loop runs it."""
    from llm_recipes.finetuning import Counts, check_finite, clip_gradients

    totals = Counts(*objective.counts(batch))  # the step's totals: this micro-batch's counts
    terms = objective.terms(batch)
    loss = objective.combine(terms, totals)
    check_finite(loss, "the loss", "benchmark")
    loss.backward()
    clip_gradients(objective.student, cfg.train)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(case: Case) -> dict:
    if case.threads:
        torch.set_num_threads(case.threads)
    objective, optimizer, batch, cfg = setup(case)
    device = torch.device(case.device)
    for _ in range(case.warmup):  # also allocates the optimizer state, which stays out of the peak
        train_step(objective, optimizer, batch, cfg)
    memory = PeakMemory(device)
    memory.start()
    times, walls = [], []
    for _ in range(case.repeats):
        started, wall = clock(device), time.perf_counter()
        loss = train_step(objective, optimizer, batch, cfg)
        times.append(clock(device) - started)
        walls.append(time.perf_counter() - wall)
    tokens = int(batch["student"]["attention_mask"].sum())
    head_params = sum(p.numel() for p in objective.student.get_output_embeddings().parameters())
    return {"time_s": statistics.median(times), "times_s": times, "wall_s": walls, "tokens": tokens,
            "peak_bytes": memory.peak(), "loss": loss,
            "student_params": sum(p.numel() for p in objective.student.parameters()), "head_params": head_params,
            "teacher_params": sum(p.numel() for p in objective.teacher.parameters()) if objective.teacher else 0}


def build_cases(args) -> list[Case]:
    common = dict(batch=args.batch, seq=args.seq, answer=args.answer, student_hidden=args.student_hidden,
                  student_layers=args.student_layers, teacher_hidden=args.teacher_hidden,
                  teacher_layers=args.teacher_layers, chunk_size=args.chunk_size, device=args.device,
                  warmup=args.warmup, repeats=args.repeats, threads=args.threads)
    cases = []
    for vocab_s, vocab_t in args.vocab_pairs:
        pair = dict(vocab_student=vocab_s, vocab_teacher=vocab_t, **common)
        cases += [Case("sft", "SFT", "sft", True, **pair),
                  Case("teacher-same", "SFT + teacher forward (same tokenizer)", "none", True, **pair),
                  Case("teacher-other", "SFT + teacher forward (other tokenizer)", "none", False, **pair)]
        cases += [Case(loss, loss, loss, True, **pair) for loss in (("kl",) if args.quick else KL_LOSSES)]
        cases += [Case("uld", "uld (exact)", "uld", False, **pair)]
        cases += [Case(f"uld-top-{k}", f"uld top-{k}", "uld", False, uld_top_k=k, **pair) for k in args.uld_top_k]
        cases += [Case(f"multilevel_ot-{mode}", f"multilevel_ot {mode}", "multilevel_ot", False, mode=mode, **pair)
                  for mode in (("fast",) if args.quick else ("fast", "greedy"))]
    if args.only:
        unknown = set(args.only) - {case.key for case in cases}
        if unknown:
            raise SystemExit(f"error: --only {','.join(sorted(unknown))}: not a step of this run; choose from "
                             + ", ".join(dict.fromkeys(case.key for case in cases)))
        cases = [case for case in cases if case.key in args.only]
    return cases


def report(results, args) -> str:
    lines = ["| vocab student / teacher | step | teacher tokenizer | tokens/s | s/step | "
             "ratio to SFT + teacher forward | peak MiB |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    checks = []
    for vocab_s, vocab_t in args.vocab_pairs:
        rows = [(c, r) for c, r in results if c.vocab_student == vocab_s and c.vocab_teacher == vocab_t]
        base = {c.same_tokenizer: r for c, r in rows if c.loss == "none" and "time_s" in r}
        for case, result in rows:
            if "error" in result:
                lines.append(f"| {vocab_s:,} / {vocab_t:,} | {case.label} | | error: {result['error']} | | | |")
                continue
            reference = base.get(case.same_tokenizer) if case.loss not in ("sft", "none") else None
            ratio = result["time_s"] / reference["time_s"] if reference else None
            teacher = "—" if case.loss == "sft" else ("same" if case.same_tokenizer else f"other ({vocab_t:,})")
            lines.append(f"| {vocab_s:,} / {vocab_t:,} | {case.label} | {teacher} | "
                         f"{result['tokens'] / result['time_s']:,.0f} | {result['time_s']:.2f} | "
                         f"{'—' if ratio is None else f'{ratio:.2f}'} | {result['peak_bytes'] / 2**20:,.0f} |")
            if case.loss == "kl" and ratio is not None:
                checks.append(f"| same-tokenizer KL step <= 1.3 x SFT + teacher forward ({vocab_s:,}) | "
                              f"{'yes' if ratio <= 1.3 else 'NO'} | {ratio:.2f} x |")
    text = "\n".join(lines)
    if checks:
        text += "\n\n" + "\n".join(["| target | met | measured |", "| --- | --- | --- |"] + checks)
    return text


def describe(args, sizes: dict) -> str:
    millions = {key: sizes.get(key, 0) / 1e6 for key in ("student_params", "head_params", "teacher_params")}
    params = (f"student {millions['student_params']:.1f}M parameters ({millions['head_params']:.1f}M in its output "
              f"layer), teacher {millions['teacher_params']:.1f}M" if sizes else "")
    return (f"{machine(args.threads or torch.get_num_threads())}; device {args.device}; random Llama models: student "
            f"d={args.student_hidden}, {args.student_layers} layers; teacher d={args.teacher_hidden}, "
            f"{args.teacher_layers} layers ({params}); batch {args.batch} x {args.seq} tokens, {args.answer} answer "
            f"tokens; fp32, AdamW, chunk size {args.chunk_size}; distil_factor 1.5 (MultiLevelOT 0.15); time: median "
            f"of {args.repeats} steps after {args.warmup} warm-up, {clock_name(args.device)}; tokens/s = student "
            f"tokens (attention mask) per second of that time; peak memory: {memory_name(args.device)} (after the "
            "warm-up step: models and optimizer state excluded); each case in a fresh process.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab-pairs", type=parse_vocab_pairs, default=[VOCAB_PAIRS["qwen-llama3"]],
                        help="comma-separated STUDENT:TEACHER vocabulary sizes or names ("
                             + ", ".join(f"{k}={s}:{t}" for k, (s, t) in VOCAB_PAIRS.items()) + ")")
    parser.add_argument("--quick", action="store_true", help="SFT, SFT + teacher, kl, uld, multilevel_ot fast; 1 step")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--answer", type=int, default=128)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=1024, help="--logits_chunk_size")
    parser.add_argument("--uld-top-k", type=lambda s: [int(x) for x in s.split(",") if x], default=[512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated steps to run: sft, teacher-same, teacher-other, kl, reverse_kl, jsd, "
                             "skew_kl, skew_reverse_kl, tvd, uld, uld-top-K, multilevel_ot-fast, multilevel_ot-greedy")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import json

        print(json.dumps(measure(Case(**json.loads(args.worker)))))
        return
    if args.quick:
        args.repeats, args.uld_top_k = 1, []
    check_supported(args.device)
    results = [(case, run_worker(__file__, asdict(case)))
               for case in tqdm(build_cases(args), desc="cases", dynamic_ncols=True)]
    sizes = next((r for c, r in results if c.loss not in ("sft",) and "teacher_params" in r), {})
    print(describe(args, sizes))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps([{"case": asdict(c), "result": r} for c, r in results], indent=1))
    print(report(results, args))


if __name__ == "__main__":
    main()
