"""Cross-tokenizer losses at real vocabulary sizes, text against index pairing, and the alignment's cost.

    python -m benchmarks.bench_cross_tokenizer                 # 151,936 (student) x 128,256 (teacher)
    python -m benchmarks.bench_cross_tokenizer --quick --vocab-pairs 500:400

1. Forward + backward time and peak memory of every cross-tokenizer loss (ULD by index, ULD by text,
   the projected teacher, the hybrid, MultiLevelOT fast by text) through the trainer's engine
   (`distillation_terms` from hidden states and output layers, logits at answer rows only), each in
   a fresh process, batch 4 x 512 tokens with 128 student answer tokens, as ratios to ULD by index.
   The text alignment is synthetic but shaped like a real pair's: 80% of groups 1:1, 15% one teacher
   token to 2-3 student tokens (served by the projection through the trie), 5% two teacher tokens to
   one student token (not served); the projection map gives every teacher token a random sigma of 1-3
   student tokens (the answer's student tokens are the sigmas of its teacher tokens), and the hybrid
   shares a third of the teacher's vocabulary with the student.
2. Text against index pairing alone: ULD with every group 1:1, so that both pair the same rows and
   only the pairing differs (the step time ratio is the pairing's overhead).
3. The data pipeline's alignment (`llm_recipes.data.attach_alignment`): seconds per 1,000 tiny-QA
   examples on the tiny pair, and on the real pair (Gemma 3 / SmolLM2 tokenizers) when
   scripts/real_pair.sh has converted it.
"""
import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.bench_losses import VOCAB_PAIRS, parse_vocab_pairs
from benchmarks.measure import PeakMemory, add_common_arguments, check_supported, clock, clock_name, machine, run_worker

LOSSES = ("uld index", "uld text", "projected", "hybrid", "multilevel_ot text", "uld text 1:1", "uld index 1:1")


@dataclass
class Case:
    loss: str
    vocab_student: int
    vocab_teacher: int
    batch: int = 4
    seq: int = 512
    answer: int = 128
    hidden: int = 256
    chunk_size: int = 1024
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 3
    threads: int = 0


# ------------------------------------------------------------------------------------------ inputs
def synthetic_map(vocab_teacher: int, vocab_student: int, rng: random.Random):
    from llm_recipes.alignment import VIEW_NAMES, ProjectionMap

    sigma = []
    for _ in range(vocab_teacher):
        length = rng.choices((1, 2, 3), (0.8, 0.15, 0.05))[0]
        sigma.append(tuple(rng.randrange(4, vocab_student) for _ in range(length)))
    return ProjectionMap.from_sigmas([sigma] * len(VIEW_NAMES), vocab_student, [False] * vocab_student), sigma


def synthetic_answers(case: Case, pmap, sigma, rng: random.Random, one_to_one: bool):
    """Per sequence: (teacher answer ids, student answer ids, teacher groups, student groups, student nodes)."""
    by_length = {n: [v for v, s in enumerate(sigma) if len(s) == n] for n in (1, 2, 3)}
    rows = []
    for _ in range(case.batch):
        t_ids, s_ids, t_groups, s_groups, nodes = [], [], [], [], []
        while len(s_ids) < case.answer - 3:
            g = len(set(t_groups))
            kind = "1:1" if one_to_one else rng.choices(("1:1", "1:n", "2:1"), (0.8, 0.15, 0.05))[0]
            if kind == "2:1":
                t_ids += [rng.randrange(vocab) for vocab in (case.vocab_teacher,) * 2]
                t_groups += [g, g]
                s_ids.append(rng.randrange(4, case.vocab_student))
                s_groups.append(g)
                nodes.append(-1)  # the student token ends beyond the group's first teacher token
                continue
            v = rng.choice(by_length[1] if kind == "1:1" else by_length[rng.choice((2, 3))])
            t_ids.append(v)
            t_groups.append(g)
            for k, u in enumerate(sigma[v]):
                nodes.append(pmap.node_of(sigma[v][:k]))
                s_ids.append(u)
                s_groups.append(g)
        rows.append((t_ids, s_ids + [1], t_groups, s_groups + [-1], nodes + [-1]))  # + the student's EOS
    return rows


def make_inputs(case: Case):
    """Hidden states, output layers, labels and the batch's alignment, seeded."""
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    pmap, sigma = synthetic_map(case.vocab_teacher, case.vocab_student, rng)
    answers = synthetic_answers(case, pmap, sigma, rng, one_to_one=case.loss.endswith("1:1"))

    def side(index_ids, index_groups):
        labels = torch.full((case.batch, case.seq), -100, dtype=torch.long)
        groups = torch.full_like(labels, -1)
        for b, row in enumerate(answers):
            ids, grp = row[index_ids], row[index_groups]
            labels[b, case.seq - len(ids):] = torch.tensor(ids)
            groups[b, case.seq - len(ids):] = torch.tensor(grp)
        return labels, groups

    t_labels, t_groups = side(0, 2)
    s_labels, s_groups = side(1, 3)
    nodes = torch.full_like(s_labels, -1)
    for b, row in enumerate(answers):
        nodes[b, case.seq - len(row[4]):] = torch.tensor(row[4])
    scale = 5.0 / case.hidden**0.5
    h_s = torch.randn(case.batch, case.seq, case.hidden, generator=generator).requires_grad_()
    w_s = (torch.randn(case.vocab_student, case.hidden, generator=generator) * scale).requires_grad_()
    h_t = torch.randn(case.batch, case.seq, case.hidden, generator=generator)
    w_t = torch.randn(case.vocab_teacher, case.hidden, generator=generator) * scale
    shared = torch.arange(case.vocab_teacher // 3)
    alignment = {"student_groups": s_groups, "teacher_groups": t_groups, "student_nodes": nodes}
    return (h_s, w_s, h_t, w_t, s_labels, t_labels, alignment), pmap, (shared, shared.clone())


def spec_for(case: Case, pmap, shared):
    from configs import distillation_config
    from llm_recipes.losses import LossSpec
    from llm_recipes.losses.family import PairArtifacts

    name, _, alignment = case.loss.partition(" ")
    alignment = alignment.split()[0] if alignment else "text"
    return LossSpec.from_config(distillation_config(alignment=alignment), name=name,
                                student_vocab_size=case.vocab_student, teacher_vocab_size=case.vocab_teacher,
                                same_tokenizer=False, chunk_size=case.chunk_size,
                                artifacts=PairArtifacts(projection_map=pmap, shared_tokens=shared))


# ---------------------------------------------------------------------------------------- measuring
def measure(case: Case) -> dict:
    from llm_recipes.losses import count_units, distillation_terms

    if case.threads:
        torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    inputs, pmap, shared = make_inputs(case)
    h_s, w_s, h_t, w_t, s_labels, t_labels, alignment = inputs
    spec = spec_for(case, pmap, shared)

    def step():
        count_units(spec, s_labels, t_labels, alignment)  # the trainer counts units before the forward
        terms = distillation_terms(spec, h_s, s_labels, lambda rows: torch.nn.functional.linear(rows, w_s), h_t,
                                   t_labels, lambda rows: torch.nn.functional.linear(rows, w_t), alignment=alignment)
        (terms.ce_sum + terms.distill_sum).backward()
        return terms

    for _ in range(case.warmup):
        step()
    memory = PeakMemory(device)
    memory.start()
    times = []
    for _ in range(case.repeats):
        h_s.grad = w_s.grad = None
        started = clock(device)
        terms = step()
        times.append(clock(device) - started)
    return {"time_s": statistics.median(times), "peak_bytes": memory.peak(), "paired": terms.candidate_positions,
            "units": terms.distill_count}


def alignment_cost(examples: int = 1000) -> list[dict]:
    """Seconds of `attach_alignment` per 1,000 tiny-QA answers, on the tiny pair and the real pair."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from configs.paths import TINY_ASSETS, TINY_QA_DATA
    from examples.tiny.assets import read_split
    from llm_recipes import alignment, data
    from llm_recipes.losses.pairing import IGNORE_INDEX

    answers = [row["answers"]["text"][0] for row in read_split(TINY_QA_DATA, "train")[:examples]]
    real = Path.home() / ".cache" / "llm-distill" / "real_pair"
    pairs = [("tiny (BPE teacher, Unigram student)", TINY_ASSETS / "teacher", TINY_ASSETS / "student")]
    if (real / "gemma-3-270m" / "tokenizer.json").exists():
        pairs.append(("Gemma 3 -> SmolLM2", real / "gemma-3-270m", real / "smollm2-135m-instruct"))
    out = []
    for name, teacher_path, student_path in pairs:
        teacher, student = AutoTokenizer.from_pretrained(teacher_path), AutoTokenizer.from_pretrained(student_path)
        started = time.perf_counter()
        pmap = alignment.ProjectionMap.build(teacher, student)
        build = time.perf_counter() - started
        prompt = [IGNORE_INDEX] * 4
        s_rows = [{"labels": prompt + student(" " + a, add_special_tokens=False)["input_ids"] + [student.eos_token_id]}
                  for a in answers]
        t_rows = [{"labels": prompt + teacher(" " + a, add_special_tokens=False)["input_ids"]} for a in answers]
        import datasets

        split = data.PairedSplit(datasets.Dataset.from_list(s_rows), datasets.Dataset.from_list(t_rows))
        started = time.perf_counter()
        aligned = data.attach_alignment(split, student, teacher, pmap)
        seconds = time.perf_counter() - started
        out.append({"pair": name, "map_build_s": build, "seconds_per_1000": seconds / len(answers) * 1000,
                    **{k: v for k, v in aligned.alignment.items() if k != "projection_skipped"}})
    return out


# ------------------------------------------------------------------------------------------- report
def report(results: list, costs: list) -> str:
    lines = ["| loss | vocab student / teacher | paired rows | s (fwd+bwd) | time / ULD index | peak MiB | "
             "memory / ULD index |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    by = {(c.loss, c.vocab_student): r for c, r in results}
    for case, result in results:
        vocab = f"{case.vocab_student:,} / {case.vocab_teacher:,}"
        if "error" in result:
            lines.append(f"| {case.loss} | {vocab} | error: {result['error']} | | | | |")
            continue
        base = by.get(("uld index 1:1" if case.loss.endswith("1:1") else "uld index", case.vocab_student), {})
        ratio = lambda key: f"{result[key] / base[key]:.2f}" if base.get(key) else "—"  # noqa: E731
        lines.append(f"| {case.loss} | {vocab} | {result['paired']} | {result['time_s']:.3f} | {ratio('time_s')} | "
                     f"{result['peak_bytes'] / 2**20:,.0f} | {ratio('peak_bytes')} |")
    lines += ["", "| pair | map build s | alignment s / 1,000 answers | groups | one-to-one | largest | unaligned | "
              "projection serves |", "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for cost in costs:
        largest = cost["largest_group"]
        lines.append(f"| {cost['pair']} | {cost['map_build_s']:.2f} | {cost['seconds_per_1000']:.3f} | "
                     f"{cost['groups']:,} | {cost['one_to_one_share']:.1%} | {largest['teacher_tokens']}:"
                     f"{largest['student_tokens']} | {cost['unaligned_examples']} | "
                     f"{cost['projection_served_share']:.1%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--vocab-pairs", type=parse_vocab_pairs, default=[VOCAB_PAIRS["qwen-llama3"]],
                        help="comma-separated STUDENT:TEACHER vocabulary sizes or names")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--hidden-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(Case(**json.loads(args.worker)))))
        return
    if args.quick:
        args.repeats = 1
    check_supported(args.device)
    print(f"{machine(args.threads or torch.get_num_threads())}; device {args.device}; batch {args.batch} x {args.seq} "
          f"tokens, {args.answer} student answer tokens; fp32; median of {args.repeats} forward+backward after "
          f"{args.warmup} warm-up, each loss in a fresh process; {clock_name(args.device)}", flush=True)
    results = []
    for vocab_s, vocab_t in args.vocab_pairs:
        for loss in LOSSES:
            case = Case(loss, vocab_s, vocab_t, batch=args.batch, seq=args.seq, answer=args.answer,
                        hidden=args.hidden_size, chunk_size=args.chunk_size, device=args.device, warmup=args.warmup,
                        repeats=args.repeats, threads=args.threads)
            results.append((case, run_worker("benchmarks.bench_cross_tokenizer", asdict(case))))
            print(f"  {loss}: {results[-1][1]}", flush=True)
    costs = alignment_cost()
    text = report(results, costs)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"losses": [{"case": asdict(c), "result": r} for c, r in results],
                                               "alignment": costs}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
