"""Hidden-state distillation (as DistillKit): which rows pair up, and their distance.

Rows. Intermediate hidden states are compared at positions that correspond on both sides:
- `positions="answer"` (default): the answer-predicting rows of docs/losses.md (causal row t-1 for
  label t, encoder-decoder decoder row t for label t), paired by index from the start of each answer
  and cropped to the shorter answer, as the logit losses pair them. With `alignment="none"` the two
  models must share a tokenizer and the paired rows must predict the same token id (checked: a
  mismatch is a UserError); `alignment="answer_index"` pairs the i-th answer token of each side
  whatever the tokenizers (ULD's alignment) and drops the student's final (EOS) row first when
  `skip_student_eos`; `alignment="text"` pairs the rows that predict the first token of each text-aligned
  group (the data pipeline's `alignment_group` columns, llm_recipes.losses.pairing.pair_by_groups).
- `positions="all"`: every non-pad position of two causal models fed identical input ids (checked).

Distance per paired row, after the student row went through its learned projection P (identity when
the hidden sizes agree), computed in float32:
    mse     ||P h_s - h_t||^2 / d_t
    cosine  1 - <P h_s, h_t> / max(||P h_s|| ||h_t||, 1e-8)
`hidden_states_sum` averages over the mapped layer pairs and sums over rows; the trainer divides by
the step's row count (`RowPairs.count`, known from labels before the forward).
"""
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from llm_recipes.errors import UserError
from llm_recipes.losses.pairing import pair_answers, pair_by_groups, predicting_rows

HIDDEN_DISTANCES = ("mse", "cosine")
HIDDEN_POSITIONS = ("answer", "all")
HIDDEN_ALIGNMENTS = ("none", "answer_index", "text")
COSINE_EPS = 1e-8


@dataclass(frozen=True)
class RowPairs:
    """Flat row indices into `hidden.reshape(B * S, H)` of each side; student_rows[i] pairs teacher_rows[i]."""

    student_rows: torch.Tensor  # [N] long
    teacher_rows: torch.Tensor  # [N] long

    @property
    def count(self) -> int:
        return int(self.student_rows.numel())


def hidden_row_pairs(
    student: dict,
    teacher: dict,
    *,
    positions: str = "answer",
    alignment: str = "none",
    student_encoder_decoder: bool = False,
    teacher_encoder_decoder: bool = False,
    skip_student_eos: bool = True,
) -> RowPairs:
    """Pair rows of one micro-batch from its labels / masks / ids (no forward needed)."""
    if positions == "all":
        return _all_positions(student, teacher)
    if alignment == "text":
        if "alignment_group" not in student or "alignment_group" not in teacher:
            raise ValueError("hidden_alignment text needs the batch's alignment groups (llm_recipes.data)")
        pairing = pair_by_groups(student["labels"], teacher["labels"], student["alignment_group"],
                                 teacher["alignment_group"], student_encoder_decoder=student_encoder_decoder,
                                 teacher_encoder_decoder=teacher_encoder_decoder)
        return RowPairs(pairing.student_rows[: pairing.num_paired], pairing.teacher_rows)
    pairing = pair_answers(student["labels"], teacher["labels"], student_encoder_decoder=student_encoder_decoder,
                           teacher_encoder_decoder=teacher_encoder_decoder,
                           skip_student_eos=skip_student_eos and alignment == "answer_index")
    s_rows = pairing.student_rows[: pairing.num_paired]
    t_rows = pairing.teacher_rows
    if alignment == "none" and pairing.num_paired:
        _, t_targets = predicting_rows(teacher["labels"].to(s_rows.device), teacher_encoder_decoder)
        s_ids = pairing.student_targets[: pairing.num_paired]
        t_ids = t_targets.reshape(-1)[t_rows]
        differ = (s_ids != t_ids).nonzero()
        if differ.numel():
            i = int(differ[0])
            raise UserError(
                f"hidden-state/feature distillation pairs rows one to one, but {differ.numel()} paired answer tokens "
                f"differ (first in sequence {int(s_rows[i]) // student['labels'].shape[1]}: student id {int(s_ids[i])}"
                f" vs teacher id {int(t_ids[i])}): tokenize both answers identically, or set "
                f"--distillation_config.hidden_alignment answer_index")
    return RowPairs(s_rows, t_rows)


def _all_positions(student: dict, teacher: dict) -> RowPairs:
    s_ids, t_ids = student["input_ids"], teacher["input_ids"].to(student["input_ids"].device)
    s_mask = student["attention_mask"].bool()
    t_mask = teacher["attention_mask"].bool().to(s_mask.device)
    same = s_ids.shape == t_ids.shape and torch.equal(s_mask, t_mask) and torch.equal(s_ids[s_mask], t_ids[t_mask])
    if not same:
        raise UserError("--distillation_config.hidden_positions all compares every position, so the teacher and "
                        "student inputs must be identical (same tokenizer, same prompt); they differ: use "
                        "--distillation_config.hidden_positions answer")
    rows = s_mask.reshape(-1).nonzero().squeeze(1)
    return RowPairs(rows, rows.clone())


def hidden_distance_sum(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """sum over rows of the per-row distance; student (already projected) and teacher [N, d], any float dtype."""
    if student.shape != teacher.shape:
        raise ValueError(f"projected student rows {tuple(student.shape)} and teacher rows {tuple(teacher.shape)} "
                         "differ")
    s, t = student.float(), teacher.float()
    if distance == "mse":
        return (s - t).pow(2).sum() / s.shape[-1]
    if distance == "cosine":
        dot = (s * t).sum(dim=-1)
        norms = (s.pow(2).sum(dim=-1) * t.pow(2).sum(dim=-1)).clamp_min(COSINE_EPS**2).sqrt()
        return (1.0 - dot / norms).sum()
    raise ValueError(f"unknown hidden distance {distance!r}; expected one of {HIDDEN_DISTANCES}")


Project = Callable[[int, int, torch.Tensor], torch.Tensor]


def gather_rows(states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, S, H] hidden states -> [N, H] rows at flat indices."""
    return states.reshape(-1, states.shape[-1]).index_select(0, rows.to(states.device))


def hidden_states_sum(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    pairs: RowPairs,
    layer_pairs: Sequence[Tuple[int, int]],
    distance: str,
    project: Optional[Project] = None,
) -> torch.Tensor:
    """sum over paired rows of the mean over layer pairs (s, t) of distance(P_st h_s[s], h_t[t]).

    `student_states[i]` / `teacher_states[j]` are HF `hidden_states` tuples ([0] embeddings, [L] last);
    teacher states carry no gradient. `project(s, t, rows)` maps student rows to the teacher's width.
    """
    total = None
    for s, t in layer_pairs:
        rows = gather_rows(student_states[s], pairs.student_rows)
        if project is not None:
            rows = project(s, t, rows)
        with torch.no_grad():
            target = gather_rows(teacher_states[t].detach(), pairs.teacher_rows)
        value = hidden_distance_sum(rows, target, distance)
        total = value if total is None else total + value
    return total / len(layer_pairs)
