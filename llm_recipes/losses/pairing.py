"""Which rows of the hidden states (or logits) take part in each loss, and how student and teacher
rows are paired.

Conventions (docs/losses.md, "Units and normalisation"):
- an answer position is a label != -100;
- causal models: the row at t-1 predicts the label at t (a label at position 0 has no predicting row);
  encoder-decoder models: decoder row t predicts label t (no shift);
- by index (`pair_answers`, the seeds' pairing): student and teacher answers are paired by index from
  the start of each answer and cropped to the shorter one; `skip_student_eos` first drops the
  student's last answer position (it stays in CE);
- by text (`pair_by_groups`): the data pipeline gave every answer token the index of its text-aligned
  group (llm_recipes.alignment; -1: none, e.g. EOS), and the rows that predict the first token of a
  group are paired (both predict the start of the same text after the same text); with projection
  nodes, every student row that has a node is paired with the row predicting its group's first
  teacher token.

Everything here works on labels (and alignment ids) only, so the trainer can count units before any
forward pass.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from llm_recipes.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Pairing:
    """Rows of one micro-batch, as flat indices into `hidden.reshape(B * S, H)`.

    `student_rows` lists every student answer-predicting row (the CE rows): first the `num_paired`
    rows that have a teacher partner, in (sequence, answer index) order, then the unpaired ones.
    `teacher_rows[i]` is the partner of `student_rows[i]` for i < num_paired.
    """

    student_rows: torch.Tensor  # [N] long
    student_targets: torch.Tensor  # [N] long, the token each row predicts
    teacher_rows: torch.Tensor  # [num_paired] long
    pairs_per_sequence: torch.Tensor  # [B] long, m_b
    num_paired: int
    nodes: Optional[torch.Tensor] = None  # [num_paired] long: projection-map node of each paired row (projected loss)
    # projected_continuation, [num_paired] long each (-1: none): the trie node continuing the previous group, the
    # flat teacher row predicting that group's first token, and that token; then [K] long each: the flat teacher
    # rows predicting the previous group's other tokens, those tokens, and the paired row (0..num_paired-1) each
    # belongs to
    continuation_nodes: Optional[torch.Tensor] = None
    previous_teacher_rows: Optional[torch.Tensor] = None
    previous_teacher_ids: Optional[torch.Tensor] = None
    previous_inner_rows: Optional[torch.Tensor] = None
    previous_inner_ids: Optional[torch.Tensor] = None
    previous_inner_units: Optional[torch.Tensor] = None

    @property
    def ce_count(self) -> int:
        return int(self.student_rows.numel())

    @property
    def sequences_with_pairs(self) -> int:
        return int((self.pairs_per_sequence > 0).sum())


def predicting_rows(labels: torch.Tensor, encoder_decoder: bool):
    """-> (mask [B, S] bool: the row predicts an answer token, targets [B, S] long: that token)."""
    if labels.dim() != 2:
        raise UserError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    labels = labels.long()
    if encoder_decoder:
        return labels != IGNORE_INDEX, labels
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


def _rank_in_row(mask: torch.Tensor) -> torch.Tensor:
    """0-based index of each True entry among the True entries of its row."""
    return mask.long().cumsum(dim=1) - 1


def pair_answers(
    student_labels: torch.Tensor,
    teacher_labels: Optional[torch.Tensor],
    *,
    student_encoder_decoder: bool = False,
    teacher_encoder_decoder: bool = False,
    skip_student_eos: bool = False,
    check_same_targets: bool = False,
) -> Pairing:
    """Pair the answers of one micro-batch. `teacher_labels=None` (SFT) pairs nothing.

    `check_same_targets` (same-tokenizer losses): paired rows must predict the same token id,
    otherwise the two sides were tokenized differently and a token-wise KL would be meaningless.
    """
    s_mask, s_targets = predicting_rows(student_labels, student_encoder_decoder)
    s_len = s_mask.sum(dim=1)
    if teacher_labels is None:
        rows = s_mask.reshape(-1).nonzero().squeeze(1)
        empty = rows.new_zeros(0)
        return Pairing(rows, s_targets.reshape(-1)[rows], empty, torch.zeros_like(s_len), 0)

    if teacher_labels.shape[0] != student_labels.shape[0]:
        raise UserError(
            f"student and teacher batches differ in size ({student_labels.shape[0]} vs "
            f"{teacher_labels.shape[0]}); the loader must yield one teacher row per student row"
        )
    teacher_labels = teacher_labels.to(student_labels.device)
    t_mask, t_targets = predicting_rows(teacher_labels, teacher_encoder_decoder)
    t_len = t_mask.sum(dim=1)
    s_usable = (s_len - 1).clamp(min=0) if skip_student_eos else s_len
    pairs = torch.minimum(s_usable, t_len)

    s_paired = s_mask & (_rank_in_row(s_mask) < pairs[:, None])
    t_paired = t_mask & (_rank_in_row(t_mask) < pairs[:, None])
    s_paired_rows = s_paired.reshape(-1).nonzero().squeeze(1)
    t_paired_rows = t_paired.reshape(-1).nonzero().squeeze(1)
    s_unpaired_rows = (s_mask & ~s_paired).reshape(-1).nonzero().squeeze(1)
    rows = torch.cat([s_paired_rows, s_unpaired_rows])
    targets = s_targets.reshape(-1)[rows]

    if check_same_targets and s_paired_rows.numel():
        t_paired_targets = t_targets.reshape(-1)[t_paired_rows]
        differ = (targets[: s_paired_rows.numel()] != t_paired_targets).nonzero()
        if differ.numel():
            i = int(differ[0])
            b = int(s_paired_rows[i]) // student_labels.shape[1]
            raise UserError(
                f"student and teacher answer tokens differ at {differ.numel()} paired positions "
                f"(first in sequence {b}: student id {int(targets[i])} vs teacher id "
                f"{int(t_paired_targets[i])}); a same-tokenizer loss needs both sides tokenized "
                f"identically: fix the loader, or use --distillation_config.loss uld or multilevel_ot"
            )
    return Pairing(rows, targets, t_paired_rows, pairs, int(s_paired_rows.numel()))


def _row_values(values: torch.Tensor, encoder_decoder: bool) -> torch.Tensor:
    """Per-label values -> per predicting row (causal: row t carries label t + 1's value; -1 elsewhere)."""
    values = values.long()
    if encoder_decoder:
        return values
    rows = torch.full_like(values, -1)
    rows[:, :-1] = values[:, 1:]
    return rows


def _group_starts(row_groups: torch.Tensor) -> torch.Tensor:
    """Rows that predict the first token of their group."""
    previous = torch.cat([row_groups.new_full((row_groups.shape[0], 1), -1), row_groups[:, :-1]], dim=1)
    return (row_groups >= 0) & (row_groups != previous)


def pair_by_groups(
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    student_groups: torch.Tensor,
    teacher_groups: torch.Tensor,
    *,
    student_encoder_decoder: bool = False,
    teacher_encoder_decoder: bool = False,
    student_nodes: Optional[torch.Tensor] = None,
    student_continuations: Optional[torch.Tensor] = None,
) -> Pairing:
    """Pair by text. `student_groups` / `teacher_groups` [B, S] hold each answer token's group (-1 elsewhere),
    aligned with the labels. Without `student_nodes`: the rows predicting each group's first token, one pair
    per group present on both sides. With `student_nodes` [B, S] (projection-map node per student answer token,
    -1: not served): every student row with a node, paired with the teacher row predicting its group's first
    teacher token (a teacher row can serve several student rows). `student_continuations` [B, S] (with nodes;
    projected_continuation): per student token that starts a group, the trie node continuing the group before
    (-1: none); the pairing then names the teacher row predicting the group before's token, and that token."""
    if teacher_labels.shape[0] != student_labels.shape[0]:
        raise UserError(f"student and teacher batches differ in size ({student_labels.shape[0]} vs "
                        f"{teacher_labels.shape[0]}); the loader must yield one teacher row per student row")
    device = student_labels.device
    s_mask, s_targets = predicting_rows(student_labels, student_encoder_decoder)
    t_mask, t_targets = predicting_rows(teacher_labels.to(device), teacher_encoder_decoder)
    s_groups = torch.where(s_mask, _row_values(student_groups.to(device), student_encoder_decoder), -1)
    t_groups = torch.where(t_mask, _row_values(teacher_groups.to(device), teacher_encoder_decoder), -1)
    batch, t_len = t_groups.shape
    t_starts = _group_starts(t_groups)
    n_groups = int(max(int(t_groups.max()) + 1, int(s_groups.max()) + 1, 1))
    teacher_row_of = torch.full((batch, n_groups), -1, dtype=torch.long, device=device)  # [b, g] -> flat row
    b_index, t_index = t_starts.nonzero(as_tuple=True)
    teacher_row_of[b_index, t_groups[b_index, t_index]] = b_index * t_len + t_index
    if student_nodes is None:
        selected = _group_starts(s_groups)
        s_nodes = None
    else:
        s_nodes = torch.where(s_mask, _row_values(student_nodes.to(device), student_encoder_decoder), -1)
        selected = (s_nodes >= 0) & (s_groups >= 0)
    partner = teacher_row_of.gather(1, s_groups.clamp(min=0))
    selected &= partner >= 0
    paired_rows = selected.reshape(-1).nonzero().squeeze(1)
    unpaired_rows = (s_mask & ~selected).reshape(-1).nonzero().squeeze(1)
    rows = torch.cat([paired_rows, unpaired_rows])
    nodes = s_nodes.reshape(-1)[paired_rows] if s_nodes is not None else None
    continued = {}
    if student_continuations is not None and s_nodes is not None:
        continued = _continuations(student_continuations, s_mask, s_groups, t_groups, t_starts, t_targets,
                                   teacher_row_of, paired_rows, student_encoder_decoder)
    return Pairing(rows, s_targets.reshape(-1)[rows], partner.reshape(-1)[paired_rows], selected.sum(dim=1),
                   int(paired_rows.numel()), nodes, **continued)


def _continuations(student_continuations, s_mask, s_groups, t_groups, t_starts, t_targets, teacher_row_of,
                   paired_rows, student_encoder_decoder) -> dict:
    """pair_by_groups' projected_continuation fields (see `Pairing`)."""
    batch, n_groups = teacher_row_of.shape
    following = torch.where(s_mask, _row_values(student_continuations.to(s_mask.device), student_encoder_decoder), -1)
    previous = teacher_row_of.gather(1, (s_groups - 1).clamp(min=0))
    following = torch.where((s_groups >= 1) & (previous >= 0), following, -1).reshape(-1)[paired_rows]
    previous = torch.where(following >= 0, previous.reshape(-1)[paired_rows], -1)
    ids = torch.where(previous >= 0, t_targets.reshape(-1)[previous.clamp(min=0)], -1)
    # the previous group's other teacher tokens: the rows predicting them, keyed by (sequence, group)
    mixed = (following >= 0).nonzero().squeeze(1)
    unit_of = torch.full((batch * n_groups,), -1, dtype=torch.long, device=s_mask.device)
    sequence = paired_rows[mixed] // s_groups.shape[1]
    unit_of[sequence * n_groups + s_groups.reshape(-1)[paired_rows[mixed]] - 1] = mixed
    inner = (t_groups >= 0) & ~t_starts
    b_index, t_index = inner.nonzero(as_tuple=True)
    units = unit_of[b_index * n_groups + t_groups[b_index, t_index]]
    keep = units >= 0
    rows = (b_index * t_groups.shape[1] + t_index)[keep]
    return {"continuation_nodes": following, "previous_teacher_rows": previous, "previous_teacher_ids": ids,
            "previous_inner_rows": rows, "previous_inner_ids": t_targets.reshape(-1)[rows],
            "previous_inner_units": units[keep]}


def check_head_width(width: int, vocab_size: int, side: str) -> None:
    """The head may have padding rows beyond the tokenizer, never fewer rows."""
    if width < vocab_size:
        raise UserError(
            f"the {side} output layer has {width} rows but its tokenizer has {vocab_size} tokens; "
            f"resize the model's embeddings to the tokenizer (model.resize_token_embeddings)"
        )
