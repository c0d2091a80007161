"""Chunked computation of the CE and distillation terms from last hidden states.

Never builds [batch, seq, vocab]: the answer rows of the hidden states are gathered ([rows, H]),
the output layer is applied to `spec.chunk_size` rows at a time, and every softmax / sort / loss
runs in fp32 inside the chunk (CE and the same-tokenizer family in one fused pass over the chunk's
two logits buffers: llm_recipes.losses.token_terms). Every chunk but the last is wrapped in
torch.utils.checkpoint (non-reentrant), so backward recomputes that chunk's logits instead of keeping
any chunk alive: peak extra memory is one chunk's [rows, vocab] working set, whatever the batch and
sequence. The last
chunk keeps its tensors: its backward is the first to run, right after the forward, so keeping them
costs what recomputing them would, and a batch whose answer rows fit in one chunk is never
recomputed. The non-differentiable work of ULD and MultiLevelOT (the teacher's logits, the sorts,
top-k and column rankings) is done once: a checkpointed chunk's first pass keeps its result, a plan
(ULD exact: one int8 per student logit; otherwise [rows, k] tensors), and backward's recompute of
the chunk reuses it instead of sorting again.
MultiLevelOT ranks columns over a whole sequence, so its chunks hold whole sequences (a sequence
longer than the chunk size becomes a chunk of its own). What a chunk computes, and how the rows are cut
into chunks, is the loss family's (llm_recipes.losses.family): this module only pairs, gathers, chunks
and checkpoints.

Units (see docs/losses.md): CE sums token losses over every student answer row; the distillation
sum counts one unit per paired answer token (same-tokenizer family) or one per sequence with at
least one paired position (ULD, MultiLevelOT: the sequence's mean over its positions).

Token selection (`spec.token_selection`, llm_recipes.losses.selection): a scoring pass without
gradient, chunked like the rest, scores every paired position; each sequence keeps its top
ceil(ratio * m) pairs and the distillation term sees only those (counts follow: kept tokens, or
sequences with a kept pair). CE is unchanged.
"""
from dataclasses import dataclass
from functools import partial
from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from llm_recipes.errors import UserError
from llm_recipes.losses.family import Chunk, ChunkBatch, Continuation, Head, own, row_chunks
from llm_recipes.losses.pairing import Pairing, pair_answers, pair_by_groups
from llm_recipes.losses.selection import cross_entropy_rows, entropy_rows, kept_per_sequence, select_pairs, select_top
from llm_recipes.losses.spec import LossSpec
from llm_recipes.losses.token_terms import token_terms_sum


@dataclass
class DistillationTerms:
    ce_sum: torch.Tensor  # 0-d fp32, summed token cross-entropy of the student's answer rows
    distill_sum: torch.Tensor  # 0-d fp32, summed distillation units
    ce_count: int  # answer tokens of the student
    distill_count: int  # distillation units (tokens or sequences, see module docstring)
    candidate_positions: int = 0  # paired answer positions before token selection
    kept_positions: int = 0  # paired answer positions the distillation term used


def _pairing(spec: LossSpec, student_labels, teacher_labels, alignment: Optional[dict] = None) -> Pairing:
    """The micro-batch's pairing: by index, or by text (`alignment`: the batch's "student_groups",
    "teacher_groups" and, for the projected loss, "student_nodes" tensors, aligned with the labels)."""
    if not spec.distills:
        teacher_labels = None
    if teacher_labels is not None and spec.alignment == "text":
        if alignment is None:
            raise ValueError(f"loss {spec.name} with text alignment needs the batch's alignment groups")
        return pair_by_groups(student_labels, teacher_labels, alignment["student_groups"], alignment["teacher_groups"],
                              student_encoder_decoder=spec.student_encoder_decoder,
                              teacher_encoder_decoder=spec.teacher_encoder_decoder,
                              student_nodes=alignment["student_nodes"] if spec.family.uses_nodes else None,
                              student_continuations=alignment.get("student_continuations")
                              if spec.family.continues_groups(spec.options) else None)
    return pair_answers(
        student_labels,
        teacher_labels,
        student_encoder_decoder=spec.student_encoder_decoder,
        teacher_encoder_decoder=spec.teacher_encoder_decoder,
        skip_student_eos=spec.skip_student_eos and spec.per_sequence,
        check_same_targets=spec.is_same_tokenizer_loss,
    )


def _kept(spec: LossSpec, pairing: Pairing):
    """Pairs kept per sequence by token selection (None without selection)."""
    if not spec.selects_tokens or pairing.num_paired == 0:
        return None
    return kept_per_sequence(pairing.pairs_per_sequence, spec.token_selection_ratio)


def _distill_count(spec: LossSpec, pairing: Pairing) -> int:
    if not spec.distills:
        return 0
    return pairing.sequences_with_pairs if spec.per_sequence else pairing.num_paired


def count_units(spec: LossSpec, student_labels: torch.Tensor, teacher_labels: Optional[torch.Tensor] = None,
                alignment: Optional[dict] = None) -> Tuple[int, int]:
    """(ce_tokens, distill_units) of one micro-batch, from labels (and alignment ids) only (call before the
    forward).

    Sum them over the micro-batches of an optimizer step and over ranks, and divide the summed
    terms of `distillation_terms` by those totals."""
    if alignment is not None and alignment.get("student_continuations") is not None:
        alignment = {**alignment, "student_continuations": None}  # the mixed targets add no units: not built here
    pairing = _pairing(spec, student_labels, teacher_labels, alignment)
    kept = _kept(spec, pairing)
    if kept is None:
        return pairing.ce_count, _distill_count(spec, pairing)
    units = int((kept > 0).sum()) if spec.per_sequence else int(kept.sum())
    return pairing.ce_count, units


def _ce_only(batch: ChunkBatch, z: torch.Tensor, targets: torch.Tensor):
    """CE of a chunk without paired rows (z consumed)."""
    return token_terms_sum(z, targets) if batch.with_ce else (z[:0].sum(), z[:0].sum())


def _chunk_terms(batch: ChunkBatch, chunk: Chunk, checkpointed: bool, hidden: torch.Tensor):
    logits = batch.student_head(hidden)
    width = logits.shape[-1]
    if batch.max_target >= width:
        raise UserError(
            f"a label id ({batch.max_target}) is outside the student's output layer ({width} rows): "
            f"the labels were made with another tokenizer"
        )
    z = logits.float()
    targets = batch.targets[chunk.start:chunk.end]
    if chunk.paired == 0:
        return _ce_only(batch, own(z, hidden), targets)
    family = batch.spec.family
    return family.terms(batch, chunk, checkpointed, own(z, hidden) if family.consumes_logits else z, targets)


@torch.no_grad()
def _selection_scores(spec: LossSpec, pairing: Pairing, h_rows: torch.Tensor, student_head: Head,
                      teacher_rows: torch.Tensor, teacher_head: Head) -> torch.Tensor:
    """Score of every paired position (llm_recipes.losses.selection), chunk by chunk, without gradient."""
    method, opts, scores = spec.token_selection, spec.options, []
    targets = pairing.student_targets[: pairing.num_paired].to(h_rows.device)
    for start in range(0, pairing.num_paired, spec.chunk_size):
        end = min(start + spec.chunk_size, pairing.num_paired)
        zt = None
        if method in ("teacher_entropy", "divergence"):
            t_logits = teacher_head(teacher_rows[start:end])
            zt = t_logits[:, : spec.teacher_vocab_size or t_logits.shape[-1]].float()
        zs = None
        if method != "teacher_entropy":
            s_logits = student_head(h_rows[start:end].detach())
            zs = s_logits[:, : spec.student_vocab_size or s_logits.shape[-1]].float()
        if method == "teacher_entropy":
            score = entropy_rows(zt)
        elif method == "student_entropy":
            score = entropy_rows(zs)
        elif method == "student_ce":
            score = cross_entropy_rows(zs, targets[start:end])
        else:  # the loss's own value (LossSpec refuses families without one)
            score = spec.family.position_scores(opts, zs, zt)
        scores.append(score.float())
    return torch.cat(scores)


def _select_tokens(spec: LossSpec, pairing: Pairing, kept: torch.Tensor, h_rows: torch.Tensor, student_head: Head,
                   teacher_hidden: torch.Tensor, teacher_head: Head, seq_len: int) -> Pairing:
    """The pairing reduced to each sequence's top positions (`kept` of them) by the token-selection score."""
    with torch.no_grad():
        t_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(
            0, pairing.teacher_rows.to(teacher_hidden.device))
    scores = _selection_scores(spec, pairing, h_rows[: pairing.num_paired], student_head, t_rows, teacher_head)
    sequence = pairing.student_rows[: pairing.num_paired] // seq_len
    keep = select_top(scores.cpu(), sequence.cpu(), kept.cpu())
    return select_pairs(pairing, keep, kept)


def _paired_teacher_rows(spec: LossSpec, pairing: Pairing, teacher_hidden: Optional[torch.Tensor], seq_len: int,
                         device: torch.device):
    """(the teacher's rows [P, H_t] paired with the student's, each paired row's weight [P] fp32: 1/m_b for a
    per-sequence unit, else 1); (None, None) without a teacher or pairs."""
    if teacher_hidden is None or not pairing.num_paired:
        return None, None
    with torch.no_grad():
        teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(
            0, pairing.teacher_rows.to(teacher_hidden.device))
    if spec.per_sequence:  # the mean over the sequence's positions
        seq = pairing.student_rows[: pairing.num_paired] // seq_len
        return teacher_rows, (1.0 / pairing.pairs_per_sequence[seq].float()).to(device)
    return teacher_rows, torch.ones(pairing.num_paired, device=device)


def _continuation(pairing: Pairing, teacher_hidden: Optional[torch.Tensor]) -> Optional[Continuation]:
    """projected_continuation's inputs (None when no paired row continues a group)."""
    if pairing.continuation_nodes is None or teacher_hidden is None:
        return None
    mix = pairing.continuation_nodes >= 0
    if not bool(mix.any()):
        return None
    with torch.no_grad():
        flat = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        hidden = flat.index_select(0, pairing.previous_teacher_rows[mix].to(flat.device))
        inner = flat.index_select(0, pairing.previous_inner_rows.to(flat.device))
    index = torch.where(mix, mix.long().cumsum(0) - 1, -1)
    return Continuation(nodes=pairing.continuation_nodes, previous_ids=pairing.previous_teacher_ids,
                        previous_rows=pairing.previous_teacher_rows, teacher_row_ids=pairing.teacher_rows,
                        hidden=hidden, index=index, inner_hidden=inner, inner_ids=pairing.previous_inner_ids,
                        inner_units=pairing.previous_inner_units)


def distillation_terms(
    spec: LossSpec,
    student_hidden: torch.Tensor,
    student_labels: torch.Tensor,
    student_head: Head,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_labels: Optional[torch.Tensor] = None,
    teacher_head: Optional[Head] = None,
    *,
    with_ce: bool = True,
    alignment: Optional[dict] = None,
) -> DistillationTerms:
    """CE and distillation sums of one micro-batch, computed chunk by chunk from hidden states.

    student_hidden [B, S, H] (after the final norm; any float dtype), student_head maps rows [n, H]
    to logits [n, V] (may have padding rows beyond the tokenizer). teacher_hidden [B, S', H'] or None
    for SFT only. `alignment`: the batch's text-alignment ids (see `_pairing`) when spec.alignment is
    "text". Works under torch.no_grad() too (evaluation): then nothing is checkpointed.
    """
    if teacher_hidden is None or not spec.distills:
        teacher_hidden = teacher_labels = None
    elif teacher_head is None or teacher_labels is None:
        raise ValueError("teacher_hidden needs teacher_labels and teacher_head")
    if student_hidden.dim() != 3:
        raise ValueError(f"student_hidden must be [batch, seq, hidden], got {tuple(student_hidden.shape)}")
    pairing = _pairing(spec, student_labels, teacher_labels, alignment)
    candidates = pairing.num_paired

    hidden_size = student_hidden.shape[-1]
    h_rows = student_hidden.reshape(-1, hidden_size).index_select(0, pairing.student_rows.to(student_hidden.device))
    kept = _kept(spec, pairing) if teacher_hidden is not None else None
    if kept is not None:
        pairing = _select_tokens(spec, pairing, kept, h_rows, student_head, teacher_hidden, teacher_head,
                                 student_labels.shape[1])
        h_rows = student_hidden.reshape(-1, hidden_size).index_select(0, pairing.student_rows.to(student_hidden.device))
    ce_count, distill_count = pairing.ce_count, _distill_count(spec, pairing)
    if ce_count == 0:  # keep the head in the graph: a zero that still reaches every parameter
        zero = student_head(h_rows).float().sum()
        return DistillationTerms(zero, zero.clone(), 0, 0, candidates, 0)

    teacher_rows, row_weights = _paired_teacher_rows(spec, pairing, teacher_hidden, student_labels.shape[1],
                                                     student_hidden.device)
    targets = pairing.student_targets.to(student_hidden.device)
    recompute = torch.is_grad_enabled() and student_hidden.requires_grad
    batch = ChunkBatch(spec, student_head, targets, int(pairing.student_targets.max()), teacher_rows,
                       teacher_head, row_weights, pairing.nodes, with_ce, plans={},
                       continuation=_continuation(pairing, teacher_hidden))
    ce_sum = distill_sum = None
    chunks = spec.family.chunks(pairing, spec.chunk_size) if spec.family is not None else \
        row_chunks(0, pairing.ce_count, 0, spec.chunk_size)
    for i, chunk in enumerate(chunks):
        checkpointed = recompute and i < len(chunks) - 1
        fn = partial(_chunk_terms, batch, chunk, checkpointed)
        rows = h_rows[chunk.start:chunk.end]
        ce, distill = checkpoint(fn, rows, use_reentrant=False) if checkpointed else fn(rows)
        ce_sum = ce if ce_sum is None else ce_sum + ce
        distill_sum = distill if distill_sum is None else distill_sum + distill
    return DistillationTerms(ce_sum, distill_sum, ce_count, distill_count, candidates, pairing.num_paired)
