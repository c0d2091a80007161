"""Chunked computation of the CE and distillation terms from last hidden states.

Never builds [batch, seq, vocab]: the answer rows of the hidden states are gathered ([rows, H]),
the output layer is applied to `spec.chunk_size` rows at a time, and every softmax / sort / loss
runs in fp32 inside the chunk (CE and the same-tokenizer family in one fused pass over the chunk's
two logits buffers: llm_recipes.losses.token_terms). Every chunk but the last is wrapped in
torch.utils.checkpoint (non-reentrant), so backward recomputes that chunk's logits instead of keeping any chunk alive: peak
extra memory is one chunk's [rows, vocab] working set, whatever the batch and sequence. The last
chunk keeps its tensors: its backward is the first to run, right after the forward, so keeping them
costs what recomputing them would, and a batch whose answer rows fit in one chunk is never
recomputed. The non-differentiable work of ULD and MultiLevelOT (the teacher's logits, the sorts,
top-k and column rankings) is done once: a checkpointed chunk's first pass keeps its result, a plan
(ULD exact: one int8 per student logit; otherwise [rows, k] tensors), and backward's recompute of
the chunk reuses it instead of sorting again.
MultiLevelOT ranks columns over a whole sequence, so its chunks hold whole sequences (a sequence
longer than the chunk size becomes a chunk of its own).

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
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from llm_recipes.errors import UserError
from llm_recipes.losses.hybrid import hybrid_plan, hybrid_sum
from llm_recipes.losses.pairing import Pairing, check_head_width, pair_answers, pair_by_groups
from llm_recipes.losses.projection import projected_target
from llm_recipes.losses.cached_terms import cached_forward_kl_sum
from llm_recipes.losses.cross_entropy import cross_entropy_sum
from llm_recipes.losses.kl import divergence_rows
from llm_recipes.losses.multilevel_ot import multilevel_ot_plan, multilevel_ot_sum
from llm_recipes.losses.selection import (
    cross_entropy_rows,
    entropy_rows,
    kept_per_sequence,
    select_pairs,
    select_top,
    uld_rows,
)
from llm_recipes.losses.spec import LossSpec
from llm_recipes.losses.table import CROSS_TOKENIZER_LOSSES, SFT_ONLY
from llm_recipes.losses.token_terms import token_terms_sum
from llm_recipes.losses.uld import teacher_sorted, uld_plan, uld_sum

Head = Callable[[torch.Tensor], torch.Tensor]


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
    if spec.name == SFT_ONLY:
        teacher_labels = None
    if teacher_labels is not None and spec.alignment == "text":
        if alignment is None:
            raise ValueError(f"loss {spec.name} with text alignment needs the batch's alignment groups")
        return pair_by_groups(student_labels, teacher_labels, alignment["student_groups"], alignment["teacher_groups"],
                              student_encoder_decoder=spec.student_encoder_decoder,
                              teacher_encoder_decoder=spec.teacher_encoder_decoder,
                              student_nodes=alignment["student_nodes"] if spec.family == "projection" else None)
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
    if spec.name == SFT_ONLY:
        return 0
    return pairing.sequences_with_pairs if spec.per_sequence else pairing.num_paired


def count_units(spec: LossSpec, student_labels: torch.Tensor, teacher_labels: Optional[torch.Tensor] = None,
                alignment: Optional[dict] = None) -> Tuple[int, int]:
    """(ce_tokens, distill_units) of one micro-batch, from labels (and alignment ids) only (call before the
    forward).

    Sum them over the micro-batches of an optimizer step and over ranks, and divide the summed
    terms of `distillation_terms` by those totals."""
    pairing = _pairing(spec, student_labels, teacher_labels, alignment)
    kept = _kept(spec, pairing)
    if kept is None:
        return pairing.ce_count, _distill_count(spec, pairing)
    units = int((kept > 0).sum()) if spec.per_sequence else int(kept.sum())
    return pairing.ce_count, units


class _Chunk(NamedTuple):
    start: int  # rows [start, end) of the gathered student rows
    end: int
    paired: int  # the first `paired` rows of the chunk have a teacher partner (same offsets)
    lengths: Tuple[int, ...]  # MultiLevelOT: paired rows per sequence in the chunk


def _plan_chunks(spec: LossSpec, pairing: Pairing) -> List[_Chunk]:
    size, n_paired, n_rows = spec.chunk_size, pairing.num_paired, pairing.ce_count
    chunks: List[_Chunk] = []
    if spec.family == "multilevel_ot" and n_paired:
        lengths = [int(m) for m in pairing.pairs_per_sequence.tolist() if m > 0]
        start, group = 0, []
        for length in lengths:
            if group and sum(group) + length > size:
                chunks.append(_Chunk(start, start + sum(group), sum(group), tuple(group)))
                start, group = start + sum(group), []
            group.append(length)
        chunks.append(_Chunk(start, start + sum(group), sum(group), tuple(group)))
        first_unpaired = n_paired
    else:
        first_unpaired = 0
    for start in range(first_unpaired, n_rows, size):
        end = min(start + size, n_rows)
        chunks.append(_Chunk(start, end, max(0, min(end, n_paired) - start), ()))
    return chunks


@dataclass
class _Batch:
    """Everything a chunk needs besides its student hidden rows."""

    spec: LossSpec
    student_head: Head
    targets: torch.Tensor  # [N]
    max_target: int
    teacher_rows: Optional[torch.Tensor]  # [P, H_t] hidden rows of the teacher, no grad
    teacher_head: Optional[Head]
    row_weights: Optional[torch.Tensor]  # [P] fp32: 1/m_b (ULD), 1 (KL family)
    nodes: Optional[torch.Tensor]  # [P] long: projection-map node of each paired row (projected loss)
    with_ce: bool
    plans: dict  # chunk start -> plan, from a checkpointed chunk's first pass to its recompute


def _teacher_logits(batch: _Batch, chunk: _Chunk, student: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 teacher logits [paired, V_t] of the chunk's paired rows, without gradient. `student`: the paired
    student logits over the same vocabulary, for a cached teacher's tail (llm_recipes.teacher_cache)."""
    with torch.no_grad():
        rows = batch.teacher_rows[chunk.start:chunk.start + chunk.paired]
        takes_student = student is not None and getattr(batch.teacher_head, "takes_student", False)
        t_logits = batch.teacher_head(rows, student) if takes_student else batch.teacher_head(rows)
        vocab_t = batch.spec.teacher_vocab_size or t_logits.shape[-1]
        check_head_width(t_logits.shape[-1], vocab_t, "teacher")
        return t_logits[:, :vocab_t].float()


def _plan(batch: _Batch, chunk: _Chunk, keep: bool, make):
    """The chunk's plan. `keep` (a checkpointed chunk): kept by its first pass, taken back by backward's
    recompute of the chunk, so that sorts, rankings and the teacher's logits are computed once."""
    plan = batch.plans.pop(chunk.start, None)
    if plan is None:
        plan = make()
        if keep:
            batch.plans[chunk.start] = plan
    return plan


def _own(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """x, or a copy when it shares memory with `source` (an identity head returns its input rows):
    token_terms_sum overwrites the buffers it is given."""
    return x.clone() if x.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else x


def _chunk_terms(batch: _Batch, chunk: _Chunk, checkpointed: bool, hidden: torch.Tensor):
    spec = batch.spec
    logits = batch.student_head(hidden)
    width = logits.shape[-1]
    if batch.max_target >= width:
        raise UserError(
            f"a label id ({batch.max_target}) is outside the student's output layer ({width} rows): "
            f"the labels were made with another tokenizer"
        )
    z = logits.float()
    targets = batch.targets[chunk.start:chunk.end]
    if chunk.paired == 0 or spec.family == "divergence":
        return _token_terms(batch, chunk, _own(z, hidden), targets)
    if spec.family == "projection":
        return _projection_terms(batch, chunk, checkpointed, _own(z, hidden), targets)
    ce = cross_entropy_sum(z, targets) if batch.with_ce else z[:0].sum()
    vocab_s = spec.student_vocab_size or width
    check_head_width(width, vocab_s, "student")
    zs = z[: chunk.paired, :vocab_s]
    weights = batch.row_weights[chunk.start:chunk.start + chunk.paired]
    opts = spec.options
    if spec.family == "uld":
        def make_uld_plan():
            teacher = teacher_sorted(_teacher_logits(batch, chunk), opts.teacher_temperature, opts.top_k)
            return uld_plan(zs.detach(), teacher, opts.student_temperature, opts.top_k)

        distill = uld_sum(zs, _plan(batch, chunk, checkpointed, make_uld_plan), weights, opts.student_temperature)
    elif spec.family == "hybrid":
        plan = _plan(batch, chunk, checkpointed, lambda: hybrid_plan(zs.detach(), _teacher_logits(batch, chunk), opts))
        distill = hybrid_sum(zs, plan, weights, opts.temperature)
    else:
        plan = _plan(batch, chunk, checkpointed, lambda: multilevel_ot_plan(
            zs.detach(), _teacher_logits(batch, chunk), chunk.lengths, opts))
        distill = multilevel_ot_sum(zs, plan, chunk.lengths, opts)
    return ce, distill


def _projection_terms(batch: _Batch, chunk: _Chunk, checkpointed: bool, z: torch.Tensor, targets: torch.Tensor):
    """CE and the divergence between the student and the projected teacher (llm_recipes.losses.projection),
    in the fused pass of the KL family: the projected target enters as teacher logits T * log q*, whose
    log-softmax at temperature T is log q* itself."""
    spec, opts = batch.spec, batch.spec.options
    vocab_s = spec.student_vocab_size or z.shape[-1]
    check_head_width(z.shape[-1], vocab_s, "student")

    def make():
        rows = slice(chunk.start, chunk.start + chunk.paired)
        target, served = projected_target(_teacher_logits(batch, chunk), batch.nodes[rows], opts.projection,
                                          opts.temperature, vocab_s)
        return target.log_().mul_(opts.temperature), served

    plan = batch.plans.pop(chunk.start, None)  # (log target, served), kept from a checkpointed chunk's first pass
    if plan is None:
        plan = make()
        if checkpointed:  # the fused pass overwrites its teacher buffer: the recompute gets the kept original
            batch.plans[chunk.start] = plan
            plan = (plan[0].clone(), plan[1])
    log_target, served = plan
    weights = batch.row_weights[chunk.start:chunk.start + chunk.paired] * served
    return token_terms_sum(z, targets, log_target, weights, opts.kind, opts.temperature, opts.beta, opts.alpha,
                           with_ce=batch.with_ce)


def _token_terms(batch: _Batch, chunk: _Chunk, z: torch.Tensor, targets: torch.Tensor):
    """CE, and the same-tokenizer divergence of the paired rows, in one pass over z (consumed)."""
    if not chunk.paired:
        return token_terms_sum(z, targets) if batch.with_ce else (z[:0].sum(), z[:0].sum())
    spec, opts = batch.spec, batch.spec.options
    vocab_s = spec.student_vocab_size or z.shape[-1]
    check_head_width(z.shape[-1], vocab_s, "student")
    weights = batch.row_weights[chunk.start:chunk.start + chunk.paired]
    head = batch.teacher_head
    if (getattr(head, "sparse_forward_kl", False) and opts.kind == "forward" and opts.temperature == 1
            and head.temperature == 1 and batch.with_ce and vocab_s == z.shape[-1] == head.vocab_size):
        packed = batch.teacher_rows[chunk.start:chunk.start + chunk.paired]  # a cache's rows: no dense teacher row
        return cached_forward_kl_sum(z, targets, packed, head.k, weights)
    zt = _own(_teacher_logits(batch, chunk, z[: chunk.paired, :vocab_s]), batch.teacher_rows)
    if vocab_s != zt.shape[1]:
        raise UserError(
            f"student and teacher vocabularies differ ({vocab_s} vs {zt.shape[1]}); a same-tokenizer "
            f"loss needs one vocabulary: use --distillation_config.loss {' or '.join(CROSS_TOKENIZER_LOSSES)}"
        )
    return token_terms_sum(z, targets, zt, weights, opts.kind, opts.temperature, opts.beta, opts.alpha,
                           with_ce=batch.with_ce)


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
        elif spec.family == "uld":
            teacher = teacher_sorted(zt, opts.teacher_temperature, opts.top_k)
            score = uld_rows(zs, teacher, opts.student_temperature, opts.top_k)
        else:  # the KL family (MultiLevelOT is refused by LossSpec)
            temperature = opts.temperature
            score, _ = divergence_rows(opts.kind, torch.log_softmax(zs / temperature, dim=-1),
                                       torch.log_softmax(zt / temperature, dim=-1), opts.beta, opts.alpha)
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
    if teacher_hidden is None or spec.name == SFT_ONLY:
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

    teacher_rows = row_weights = None
    if teacher_hidden is not None and pairing.num_paired:
        with torch.no_grad():
            teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(
                0, pairing.teacher_rows.to(teacher_hidden.device))
        seq = pairing.student_rows[: pairing.num_paired] // student_labels.shape[1]
        if spec.family == "uld":  # per-sequence mean over its positions
            row_weights = (1.0 / pairing.pairs_per_sequence[seq].float()).to(student_hidden.device)
        else:
            row_weights = torch.ones(pairing.num_paired, device=student_hidden.device)
    targets = pairing.student_targets.to(student_hidden.device)
    recompute = torch.is_grad_enabled() and student_hidden.requires_grad
    batch = _Batch(spec, student_head, targets, int(pairing.student_targets.max()), teacher_rows,
                   teacher_head, row_weights, pairing.nodes, with_ce, plans={})
    ce_sum = distill_sum = None
    chunks = _plan_chunks(spec, pairing)
    for i, chunk in enumerate(chunks):
        checkpointed = recompute and i < len(chunks) - 1
        fn = partial(_chunk_terms, batch, chunk, checkpointed)
        rows = h_rows[chunk.start:chunk.end]
        ce, distill = checkpoint(fn, rows, use_reentrant=False) if checkpointed else fn(rows)
        ce_sum = ce if ce_sum is None else ce_sum + ce
        distill_sum = distill if distill_sum is None else distill_sum + distill
    return DistillationTerms(ce_sum, distill_sum, ce_count, distill_count, candidates, pairing.num_paired)
