"""On-policy distillation: the student answers the step's prompts itself and the teacher scores its answers.

With probability `--distillation_config.lmbda` (GKD's name; 0, the default, never) an optimizer step is
on-policy: every micro-batch's prompts are answered by the student (sampled at
`on_policy_temperature` / `on_policy_top_p`, at most `on_policy_max_new_tokens` tokens, each row
stopping at its EOS, KV cache, batched), and the micro-batch is rebuilt exactly as the data pipeline
would build an example whose answer is that text (`on_policy_batch`):

- student: its prompt, then the sampled token ids as labels (its own tokens, not a re-tokenization; the
  EOS when it wrote one);
- teacher: its own prompt (the few-shot / chat prompt of the data set), then the answer's text tokenized
  by the teacher's tokenizer with the teacher's leading-space convention of that example (one tokenizer:
  the sampled ids themselves); a causal teacher's answer has no EOS, as in the data pipeline;
- text alignment (across tokenizers): the same aligner as the data pipeline (losses.label_alignment), the
  projection map's nodes for the projected teacher.

The loss term is then computed on the student's answer positions by the run's loss family, live teacher
only (a teacher cache holds rows for the data set's answers, not for sampled ones: refused before any
model loads). The CE applies where there is a label, i.e. on off-policy steps; on sampled answers it is
skipped (its units are 0), so an on-policy step trains the distillation term alone, unless
`--distillation_config.on_policy_ce` keeps the CE of the data set's answers to the same prompts (MiniLLM keeps
a language-modelling loss beside its on-policy term: one more student forward and backward per micro-batch,
no teacher; the step's loss is then the CE over the data set's answer tokens plus the term over the sampled
answers' units, each with its weight). Answers that give
the term nothing (an EOS at once, or a text the teacher's tokenizer does not reproduce byte for byte)
are counted and logged, never NaN (`Stats`).

Which steps are on-policy is a function of (--seed, the step) drawn by rank 0 and broadcast, so every
process agrees and a resumed run draws what an unbroken run drew; sampling uses torch's global random
state, which checkpoints save and resume restores.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from llm_recipes import distributed
from llm_recipes.losses.label_alignment import align_example
from llm_recipes.losses.pairing import IGNORE_INDEX


@dataclass(frozen=True)
class Sampling:
    """How the student's answers are drawn (from distillation_config)."""

    lmbda: float = 0.0
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    first_step: int = 0  # the first optimizer step (0-based) that may be on-policy (--on_policy_start)
    keep_ce: bool = False  # on-policy steps also train the CE of the data set's answers (--on_policy_ce)

    @classmethod
    def from_config(cls, distillation_config, total_steps: int = 0) -> "Sampling":
        d = distillation_config
        return cls(float(d.lmbda), int(d.on_policy_max_new_tokens), float(d.on_policy_temperature),
                   float(d.on_policy_top_p), math.ceil(float(d.on_policy_start) * total_steps),
                   bool(d.on_policy_ce))

    def describe(self) -> str:
        start = (f" from step {self.first_step + 1} (the steps before train on the data set's answers; best/ is "
                 "chosen among the evaluations from then on)") if self.first_step else ""
        return (f"on-policy with probability {self.lmbda:g}{start}: the student answers the prompts itself "
                f"(temperature {self.temperature:g}, top-p {self.top_p:g}, at most {self.max_new_tokens} tokens) and "
                "the teacher scores its answers; the CE is skipped on sampled answers" +
                ("; on-policy steps keep the CE of the data set's answers to the same prompts" if self.keep_ce else ""))


def is_on_policy_step(sampling: Sampling, seed: int, step: int, device: torch.device) -> bool:
    """Whether optimizer step `step` (0-based) trains on sampled answers: none before `sampling.first_step`, then
    rank 0's draw from a generator seeded by (seed, step), broadcast, so every process agrees and a resumed run
    draws the same."""
    lmbda = sampling.lmbda
    if lmbda <= 0 or step < sampling.first_step:
        return False
    if lmbda >= 1:
        return True
    draw = random.Random(f"on-policy/{seed}/{step}").random() < lmbda
    return distributed.broadcast_flag(draw, device)


# ----------------------------------------------------------------------------------------- sampling
def prompts_of(side: dict) -> list[list[int]]:
    """Each row's prompt ids: its tokens before its first answer label (a row without one: all its tokens)."""
    prompts = []
    for ids, labels, mask in zip(side["input_ids"].tolist(), side["labels"].tolist(),
                                 side["attention_mask"].tolist()):
        length = sum(mask)  # rows are right-padded
        first = next((i for i, label in enumerate(labels[:length]) if label != IGNORE_INDEX), length)
        prompts.append(ids[:first])
    return prompts


def answers_of(side: dict) -> list[list[int]]:
    """Each row's answer ids (its labels that are not -100)."""
    return [[label for label in row if label != IGNORE_INDEX] for row in side["labels"].tolist()]


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation config's."""
    found = getattr(model.generation_config, "eos_token_id", None)
    found = found if isinstance(found, (list, tuple)) else [found]
    return sorted({i for i in [tokenizer.eos_token_id, *found] if i is not None})


@torch.no_grad()
def sample_answers(model, prompts: list[list[int]], sampling: Sampling, eos: list[int], pad_id: int,
                   device: torch.device, synced: bool = False, autocast=None) -> list[list[int]]:
    """The student's sampled answer to every prompt (token ids, its EOS included when it wrote one), in eval
    mode (no dropout), with a KV cache; `synced`: every process runs as many decoding steps as the slowest
    (FSDP, whose units the processes gather together)."""
    from transformers import GenerationConfig

    ids, mask = _left_padded(prompts, pad_id)
    config = GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                              max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
    was_training = model.training
    model.eval()
    try:
        with distributed.gathered(model), (autocast or torch.autocast(device.type, enabled=False)):
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                    synced_gpus=synced)
    finally:
        model.train(was_training)
    answers = []
    for row in output[:, ids.shape[1]:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        answers.append(row[:end])
    return answers


# ------------------------------------------------------------------------------------ the new batch
@dataclass
class Stats:
    """What the sampled answers of the steps since the last log line looked like."""

    steps: int = 0  # optimizer steps in the window
    on_policy_steps: int = 0
    answers: int = 0
    tokens: int = 0  # sampled tokens, EOS included
    empty: int = 0  # EOS at once: no text
    cut: int = 0  # no EOS within --on_policy_max_new_tokens
    unaligned: int = 0  # a text the teacher's tokenizer does not reproduce (no distillation units)
    shapes: Counter = field(default_factory=Counter)  # (teacher tokens, student tokens) of the text groups
    continued: int = 0  # group starts whose projected target holds the longer teacher tokens (continuation)

    def line(self, device: Optional[torch.device] = None, continuation: bool = False) -> dict:
        """The metrics.jsonl fields (answers of every process): the share of on-policy steps; on sampled answers
        their mean length, the share of one-to-one text groups, and how many answers were empty, cut or
        unaligned; `continuation` (projected_continuation): the share of text groups that start after a token
        longer teacher tokens extend (their target mixes in the row before)."""
        answers, tokens, empty, cut, unaligned, one, groups, continued = distributed.all_reduce_sum(
            [self.answers, self.tokens, self.empty, self.cut, self.unaligned, self.shapes[(1, 1)],
             sum(self.shapes.values()), self.continued], device)
        out = {"on_policy": self.on_policy_steps / max(self.steps, 1)}
        if answers:
            out.update({"sampled_tokens": tokens / answers, "sampled_empty": int(empty), "sampled_cut": int(cut),
                        "sampled_unaligned": int(unaligned)})
            if groups:
                out["sampled_one_to_one"] = one / groups
                if continuation:
                    out["sampled_continued"] = continued / groups
        return out


def _leading_space(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def teacher_answer(sampled: list[int], text: str, data_answer: list[int], tokenizers: tuple,
                   same_tokenizer: bool, eos: list[int], end: bool = False) -> list[int]:
    """The teacher's answer ids for a sampled answer: one tokenizer, the sampled ids; two, the text with the leading
    whitespace the data set's teacher answer of this example has (a chat prompt: none; a plain prompt: its
    separator). A causal teacher's answers end with no EOS in the data pipeline, unless the end of the answer is
    distilled (`end`, --distillation_config.distill_eos): then with the teacher's EOS where the student wrote one."""
    stopped = bool(sampled) and sampled[-1] in eos
    if same_tokenizer:
        return list(sampled) if end or not stopped else sampled[:-1]
    body = text.lstrip()
    teacher_tokenizer = tokenizers[1]
    closing = [teacher_tokenizer.eos_token_id] if end and stopped else []
    if not body:
        return closing
    prefix = _leading_space(teacher_tokenizer.decode(data_answer, skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=False)) if data_answer else " "
    return teacher_tokenizer(prefix + body, add_special_tokens=False)["input_ids"] + closing


def on_policy_batch(batch: dict, sampled: list[list[int]], tokenizers: tuple, pad_ids: tuple, *, same_tokenizer: bool,
                    text_groups: bool, projection_map=None, eos: list[int] = (), stats: Optional[Stats] = None,
                    end: Optional[tuple] = None, continuation: bool = False) -> dict:
    """The micro-batch as the data pipeline would make it for the sampled answers (see the module docstring);
    `end` = (student EOS ids, teacher EOS ids): the end of the answer is distilled (distill_eos); `continuation`:
    the continuation_node column too (projected_continuation)."""
    from llm_recipes.data import collate

    stats = stats if stats is not None else Stats()
    student_tokenizer = tokenizers[0]
    rows = {"student": [], "teacher": []}
    counts = Counter()
    for s_prompt, t_prompt, answer, data_answer in zip(prompts_of(batch["student"]), prompts_of(batch["teacher"]),
                                                       sampled, answers_of(batch["teacher"])):
        text = student_tokenizer.decode(answer, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        t_answer = teacher_answer(answer, text, data_answer, tokenizers, same_tokenizer, eos, end is not None)
        s_labels = [IGNORE_INDEX] * len(s_prompt) + answer
        t_labels = [IGNORE_INDEX] * len(t_prompt) + t_answer
        student = {"input_ids": s_prompt + answer, "labels": s_labels, "attention_mask": [1] * len(s_labels)}
        teacher = {"input_ids": t_prompt + t_answer, "labels": t_labels, "attention_mask": [1] * len(t_labels)}
        if text_groups:  # an empty answer has no group to align (but its end): -1 everywhere
            s_groups, t_groups, nodes, following = align_example(
                s_labels, t_labels, *tokenizers, projection_map, counts, stats.shapes, end, continuation) \
                if t_answer else ([-1] * len(s_labels), [-1] * len(t_labels), [-1] * len(s_labels), [-1] * len(s_labels))
            student["alignment_group"], teacher["alignment_group"] = s_groups, t_groups
            if projection_map is not None:
                student["projection_node"] = nodes
                if continuation:
                    student["continuation_node"] = following
        rows["student"].append(student)
        rows["teacher"].append(teacher)
        stats.answers += 1
        stats.tokens += len(answer)
        stats.empty += not text.strip()
        stats.cut += not (answer and answer[-1] in eos)
    stats.unaligned += counts["unaligned_examples"]
    stats.continued += counts["continued"]
    return {"student": collate(rows["student"], pad_ids[0]), "teacher": collate(rows["teacher"], pad_ids[1])}


# ------------------------------------------------------------------------------------------ the run's
@dataclass
class OnPolicy:
    """What a run's on-policy steps need, made once at set-up (llm_recipes.finetuning.setup)."""

    sampling: Sampling
    tokenizers: tuple  # (student, teacher)
    eos: list[int]  # the ids that end a student's answer
    same_tokenizer: bool
    text_groups: bool  # align the answers by text (the logit term's or the hidden-state term's pairing)
    projection_map: object = None  # the projected teacher's map (its trie nodes for every served token)
    end: Optional[tuple] = None  # (student EOS ids, teacher EOS ids): the end of the answer is distilled
    continuation: bool = False  # group starts carry the previous group's continuation node (projected_continuation)
    stats: Stats = field(default_factory=Stats)

    def batches(self, student, micro_batches: list[dict], pad_ids: tuple, device: torch.device, synced: bool,
                autocast) -> list[dict]:
        """The step's micro-batches with the student's sampled answers (`autocast`: a context factory, the
        student's training precision)."""
        out = []
        for batch in micro_batches:
            sampled = sample_answers(student, prompts_of(batch["student"]), self.sampling, self.eos, pad_ids[0],
                                     device, synced, autocast())
            out.append(self.rebuild(batch, sampled, pad_ids))
        return out

    def metrics(self, device: Optional[torch.device] = None) -> dict:
        """The on-policy fields of a train line of metrics.jsonl (Stats.line); the window starts again."""
        line = self.stats.line(device, self.continuation)
        self.stats = Stats()
        return line

    def rebuild(self, batch: dict, sampled: list[list[int]], pad_ids: tuple) -> dict:
        """The micro-batch `batch` with the answers `sampled` (student ids), as the data pipeline makes a batch."""
        return on_policy_batch(batch, sampled, self.tokenizers, pad_ids, same_tokenizer=self.same_tokenizer,
                               text_groups=self.text_groups, projection_map=self.projection_map, eos=self.eos,
                               stats=self.stats, end=self.end, continuation=self.continuation)
