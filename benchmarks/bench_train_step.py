"""Training-step throughput and peak memory: SFT versus each distillation loss, through the trainer's step.

    python -m benchmarks.bench_train_step                    # Qwen-2.5 student / Llama-3 teacher vocabularies
    python -m benchmarks.bench_train_step --vocab-pairs pythia-llama2 --quick

Models: small random Llama-architecture models built from configs (no download) with real vocabulary
sizes: a student (V_s), a teacher with another tokenizer (V_t, for ULD and MultiLevelOT) and a
teacher with the student's tokenizer (V_s, for the KL family), each answer 128 of 512 tokens.
One optimizer step is the trainer's own `llm_recipes.finetuning.train_step` on one micro-batch and one
process (unit counts, teacher forward to its last hidden states, student forward, CE and the logit
term from the answer rows, backward, clipping, AdamW step, zero_grad, schedule), on a `TrainState`
built here around the benchmark's models instead of by `setup`.
Two baselines, each the SFT step plus a teacher forward with no logit term, on the same two models:
"SFT + teacher body" runs the teacher up to its last hidden states; "SFT + teacher forward" also
applies the teacher's output layer at its answer rows (a forward pass that yields the teacher's
logits, where the trainer needs them; the logits are then dropped). Each loss's step is divided by
both: the first ratio charges the loss with the teacher's output layer, the second does not.

The steps that share a teacher run in one process on the same models, interleaved (one step of each
kind per round, `--repeats` rounds after `--warmup`), so that a ratio compares steps timed side by
side: on a shared machine the speed of a core drifts with what else runs. Peak memory is measured
per step (the peak resident set size is reset before each).

These bodies are tiny next to their output layers (V x d), so the logit term's share of a step is
far larger than with real models (a 7B teacher's forward dwarfs its output layer on the answer rows):
the ratios here are upper bounds.
"""
import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.bench_losses import VOCAB_PAIRS, parse_vocab_pairs
from benchmarks.measure import (
    PeakMemory,
    add_common_arguments,
    check_supported,
    clock,
    clock_name,
    machine,
    memory_name,
    run_worker,
)
from llm_recipes.losses import table

KL_LOSSES = table.SAME_TOKENIZER_LOSSES


@dataclass
class Step:
    key: str  # what --only selects
    label: str
    loss: str  # "sft" (no teacher), "none" (SFT + teacher body), or a --distillation_config.loss
    teacher_logits: bool = False  # "none" plus the teacher's output layer at its answer rows
    uld_top_k: int = 0
    mode: str = "fast"
    cache_k: int = 0  # > 0: the teacher's logits from a top-K cache (llm_recipes.teacher_cache), no teacher forward


@dataclass
class Group:
    """Steps on one student and one teacher, timed interleaved in one process."""

    same_tokenizer: bool
    vocab_student: int
    vocab_teacher: int
    steps: list = field(default_factory=list)
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


def make_side(group: Group, vocab: int, generator) -> dict:
    ids = torch.randint(0, vocab, (group.batch, group.seq), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, group.seq - group.answer:] = ids[:, group.seq - group.answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_state(step: Step, group: Group, student, teacher, optimizer=None):
    """A TrainState for one step kind, with what `setup` would resolve for it (`llm_recipes.finetuning`);
    `optimizer`: share that one (the steps of a group train the same student)."""
    from configs import distillation_config, train_config
    from llm_recipes import distributed, objective
    from llm_recipes.config import RunConfig
    from llm_recipes.finetuning import TrainState
    from llm_recipes.losses import LossSpec
    from llm_recipes.objective import Models
    from llm_recipes.optim import build_optimizer, build_scheduler

    loss = "none" if step.loss in ("sft", "none") else step.loss
    run = RunConfig(train=train_config(distillation=step.loss != "sft", logits_chunk_size=group.chunk_size,
                                       scheduler="constant"),
                    distillation=distillation_config(uld_top_k=step.uld_top_k, multilevel_ot_mode=step.mode,
                                                    alignment="index"))
    vocab_t = group.vocab_student if group.same_tokenizer else group.vocab_teacher
    cache = None
    if step.cache_k:  # what `setup` resolves for --distillation_config.teacher_cache
        from llm_recipes.teacher_cache import CacheMeta

        cache = CacheMeta("bench", "", vocab_t, step.cache_k, 1.0, "float16", False, None, True, {})
    spec = LossSpec.from_config(run.distillation, name=loss, student_vocab_size=group.vocab_student,
                                teacher_vocab_size=vocab_t, same_tokenizer=group.same_tokenizer,
                                chunk_size=group.chunk_size, cache=cache)
    factor = table.LOSSES[loss].distil_factor if loss in table.LOSSES else 0.0
    goal = objective.build_objective(run, factor, spec, None, cache)
    goal = objective.Objective(**{**vars(goal), "uses_teacher": step.loss != "sft"})  # "none": teacher, no term
    optimizer = optimizer or build_optimizer(student, run.train)
    live_teacher = teacher if step.loss != "sft" and not step.cache_k else None
    return TrainState(run, None, distributed.DistInfo(device=torch.device(group.device)),
                      Models(student, student, live_teacher), goal, optimizer,
                      build_scheduler(optimizer, run.train, 10**6), torch.amp.GradScaler("cuda", enabled=False))


@torch.no_grad()
def cached_rows(teacher, side: dict, k: int) -> torch.Tensor:
    """The batch's packed top-K cache rows [B, S, 2K + 1] (float16 log-probabilities), made from the teacher
    once, as llm_distillation.cache_teacher writes them and the data pipeline reads them."""
    from llm_recipes import models, teacher_cache
    from llm_recipes.losses.pairing import predicting_rows

    hidden = models.forward_hidden(teacher, side, False)
    mask, _ = predicting_rows(side["labels"], False)
    ids, logprobs, tail = teacher_cache.summarize_rows(models.output_head(teacher)(hidden[mask]), k, 1.0,
                                                       torch.float16)
    packed = torch.zeros(*side["labels"].shape, 2 * k + 1)
    packed[mask] = torch.cat([ids.float(), logprobs.float(), tail[:, None]], 1)
    return packed


def teacher_logits_hook(teacher, labels: torch.Tensor):
    """For "SFT + teacher forward": the teacher's output layer applied at its answer rows inside its forward
    (what a logit term needs from it), by a hook on the input of its output layer; the logits are dropped.
    The layer's weights are applied directly: calling the module would run the trainer's own pre-hook, which
    empties what it is given."""
    answer = labels[:, 1:] != -100

    def hook(module, args):
        if args[0].dim() == 3:  # the model's forward (the loss calls the layer on [rows, hidden] afterwards)
            with torch.no_grad():
                torch.nn.functional.linear(args[0][:, :-1][answer], module.weight, module.bias)
    return teacher.get_output_embeddings().register_forward_pre_hook(hook, prepend=True)


def measure(group: Group) -> dict:
    """Every step of the group, interleaved: {step key: result}."""
    from llm_recipes import models
    from llm_recipes.finetuning import train_step

    if group.threads:
        torch.set_num_threads(group.threads)
    device = torch.device(group.device)
    vocab_t = group.vocab_student if group.same_tokenizer else group.vocab_teacher
    student = llama(group.vocab_student, group.student_hidden, group.student_layers, seed=0).to(device).train()
    teacher = models.freeze_teacher(llama(vocab_t, group.teacher_hidden, group.teacher_layers, seed=1).to(device))
    generator = torch.Generator().manual_seed(0)
    batch = {"student": make_side(group, group.vocab_student, generator)}
    batch["teacher"] = batch["student"] if group.same_tokenizer else make_side(group, vocab_t, generator)
    batch = {side: {k: v.to(device) for k, v in tensors.items()} for side, tensors in batch.items()}
    steps = [Step(**step) for step in group.steps]
    cache_k = {step.cache_k for step in steps if step.cache_k}
    if len(cache_k) > 1:
        raise SystemExit("error: one cache size per run")
    if cache_k:
        batch["teacher"] = {**batch["teacher"], "cache": cached_rows(teacher, batch["teacher"], cache_k.pop())}
    states = [train_state(steps[0], group, student, teacher)]
    states += [train_state(step, group, student, teacher, states[0].optimizer) for step in steps[1:]]
    memory = PeakMemory(device)
    results = {step.key: {"times_s": [], "wall_s": [], "peak_bytes": 0} for step in steps}
    for round_ in range(group.warmup + group.repeats):  # the warm-up also allocates the optimizer state
        for step, state in zip(steps, states):
            hook = teacher_logits_hook(teacher, batch["teacher"]["labels"]) if step.teacher_logits else None
            memory.start()
            started, wall = clock(device), time.perf_counter()
            loss = train_step(state, [batch])["loss"]
            elapsed, wall = clock(device) - started, time.perf_counter() - wall
            if hook is not None:
                hook.remove()
            if round_ >= group.warmup:
                result = results[step.key]
                result["times_s"].append(elapsed)
                result["wall_s"].append(wall)
                result["peak_bytes"] = max(result["peak_bytes"], memory.peak())
                result["loss"] = loss
    tokens = int(batch["student"]["attention_mask"].sum())
    sizes = {"student_params": sum(p.numel() for p in student.parameters()),
             "head_params": sum(p.numel() for p in student.get_output_embeddings().parameters()),
             "teacher_params": sum(p.numel() for p in teacher.parameters())}
    for result in results.values():
        result.update(time_s=statistics.median(result["times_s"]), tokens=tokens, **sizes)
    return results


def build_groups(args) -> list[Group]:
    common = dict(batch=args.batch, seq=args.seq, answer=args.answer, student_hidden=args.student_hidden,
                  student_layers=args.student_layers, teacher_hidden=args.teacher_hidden,
                  teacher_layers=args.teacher_layers, chunk_size=args.chunk_size, device=args.device,
                  warmup=args.warmup, repeats=args.repeats, threads=args.threads)
    same = [Step("sft", "SFT", "sft"), Step("teacher-same", "SFT + teacher body", "none"),
            Step("logits-same", "SFT + teacher forward", "none", teacher_logits=True)]
    same += [Step(loss, loss, loss) for loss in (("kl",) if args.quick else KL_LOSSES)]
    same += [Step(f"kl-cached-{args.cache_k}", f"kl, teacher from a top-{args.cache_k} cache", "kl",
                  cache_k=args.cache_k)] if args.cache_k else []
    other = [Step("teacher-other", "SFT + teacher body", "none"),
             Step("logits-other", "SFT + teacher forward", "none", teacher_logits=True),
             Step("uld", "uld (exact)", "uld")]
    other += [Step(f"uld-top-{k}", f"uld top-{k}", "uld", uld_top_k=k) for k in args.uld_top_k]
    other += [Step(f"multilevel_ot-{mode}", f"multilevel_ot {mode}", "multilevel_ot", mode=mode)
              for mode in (("fast",) if args.quick else ("fast", "greedy"))]
    other += [Step(f"uld-cached-{args.cache_k}", f"uld, teacher from a top-{args.cache_k} cache", "uld",
                   cache_k=args.cache_k)] if args.cache_k else []
    known = [step.key for step in same + other]
    if args.only:
        unknown = set(args.only) - set(known)
        if unknown:
            raise SystemExit(f"error: --only {','.join(sorted(unknown))}: not a step of this run; choose from "
                             + ", ".join(known))
        same = [step for step in same if step.key in args.only]
        other = [step for step in other if step.key in args.only]
    groups = []
    for vocab_s, vocab_t in args.vocab_pairs:
        for same_tokenizer, steps in ((True, same), (False, other)):
            if steps:
                groups.append(Group(same_tokenizer, vocab_s, vocab_t, [asdict(step) for step in steps], **common))
    return groups


def report(results, args) -> str:
    """results: [(group, {key: result})] -> Markdown table and the KL target."""
    lines = ["| vocabulary student / teacher | teacher tokenizer | step | tokens/s | s/step | "
             "ratio to SFT + teacher body | ratio to SFT + teacher forward | peak MiB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    checks = []
    sft_of = {(g.vocab_student, g.vocab_teacher): r["sft"] for g, r in results if "sft" in r}  # the other group's
    for group, by_key in results:
        vocab = f"{group.vocab_student:,}" + (" (both)" if group.same_tokenizer else f" / {group.vocab_teacher:,}")
        teacher = "same" if group.same_tokenizer else "other"
        if "error" in by_key:
            lines.append(f"| {vocab} | {teacher} | error: {by_key['error']} | | | | | |")
            continue
        side = "same" if group.same_tokenizer else "other"
        bases = [by_key.get(f"teacher-{side}"), by_key.get(f"logits-{side}")]
        for step in group.steps:
            result = by_key[step["key"]]
            ratios = [result["time_s"] / base["time_s"] if base and step["loss"] not in ("sft", "none") else None
                      for base in bases]
            cells = " | ".join("—" if r is None else f"{r:.2f}" for r in ratios)
            lines.append(f"| {vocab} | {'—' if step['loss'] == 'sft' else teacher} | {step['label']} | "
                         f"{result['tokens'] / result['time_s']:,.0f} | {result['time_s']:.2f} | {cells} | "
                         f"{result['peak_bytes'] / 2**20:,.0f} |")
            sft = by_key.get("sft") or sft_of.get((group.vocab_student, group.vocab_teacher))
            if step.get("cache_k") and sft:
                ratio = result["time_s"] / sft["time_s"]
                checks.append(f"| {step['label']} step <= 1.1 x SFT ({vocab}) | {'yes' if ratio <= 1.1 else 'NO'} | "
                              f"{ratio:.2f} x |")
            elif step["loss"] == "kl":
                for ratio, base in zip(ratios, ("SFT + teacher body", "SFT + teacher forward")):
                    if ratio is not None:
                        checks.append(f"| same-tokenizer KL step <= 1.3 x {base} ({vocab}) | "
                                      f"{'yes' if ratio <= 1.3 else 'NO'} | {ratio:.2f} x |")
    text = "\n".join(lines)
    if checks:
        text += "\n\n" + "\n".join(["| target | met | measured |", "| --- | --- | --- |"] + checks)
    return text


def describe(args, sizes: dict) -> str:
    millions = {key: sizes.get(key, 0) / 1e6 for key in ("student_params", "head_params", "teacher_params")}
    params = (f" (student {millions['student_params']:.1f}M parameters, {millions['head_params']:.1f}M of them in its "
              f"output layer; teacher {millions['teacher_params']:.1f}M)" if sizes else "")
    return (f"{machine(args.threads or torch.get_num_threads())}; device {args.device}; random Llama models: student "
            f"d={args.student_hidden}, {args.student_layers} layers; teacher d={args.teacher_hidden}, "
            f"{args.teacher_layers} layers{params}; batch {args.batch} x {args.seq} tokens, {args.answer} answer "
            f"tokens; fp32, AdamW, chunk size {args.chunk_size}; distil_factor 1.5 (MultiLevelOT 0.15); time: median "
            f"of {args.repeats} steps after {args.warmup} warm-up, steps with one teacher interleaved in one process, "
            f"{clock_name(args.device)}; tokens/s = student tokens (attention mask) per second of that time; peak "
            f"memory per step: {memory_name(args.device)} (models and optimizer state excluded).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--vocab-pairs", type=parse_vocab_pairs, default=[VOCAB_PAIRS["qwen-llama3"]],
                        help="comma-separated STUDENT:TEACHER vocabulary sizes or names ("
                             + ", ".join(f"{k}={s}:{t}" for k, (s, t) in VOCAB_PAIRS.items()) + ")")
    parser.add_argument("--quick", action="store_true", help="SFT, SFT + teacher, kl, uld, multilevel_ot fast; 1 step")
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--uld-top-k", type=lambda s: [int(x) for x in s.split(",") if x], default=[512])
    parser.add_argument("--cache-k", type=int, default=32, help="K of the cached-teacher steps (0: none)")
    parser.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated steps to run: sft, teacher-same, logits-same, teacher-other, "
                             "logits-other, kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd, uld, uld-top-K, "
                             "multilevel_ot-fast, multilevel_ot-greedy, kl-cached-K, uld-cached-K")
    args = parser.parse_args(argv)

    if args.worker:
        import json

        print(json.dumps(measure(Group(**json.loads(args.worker)))))
        return
    if args.quick:
        args.repeats, args.uld_top_k = 1, []
    check_supported(args.device)
    results = [(group, run_worker("benchmarks.bench_train_step", asdict(group)))
               for group in tqdm(build_groups(args), desc="model pairs", dynamic_ncols=True)]
    sizes = next((r for _, by_key in results for r in by_key.values() if isinstance(r, dict)), {})
    print(describe(args, sizes))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps([{"group": asdict(g), "results": r} for g, r in results], indent=1))
    print(report(results, args))


if __name__ == "__main__":
    main()
