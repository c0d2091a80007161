"""Selective distillation: which answer positions the logit term uses (token selection), and which
teacher hidden units the student matches (feature selection; where the method comes from: docs/methods.md).

Token selection, per sequence: a sequence with m paired answer positions keeps
k = min(m, max(1, ceil(ratio * m))) of them, those with the highest score (ties: the earlier
position). Scores are computed without gradient:
    teacher_entropy  H(p_t), p_t = softmax(z_t)          (temperature 1)
    student_entropy  H(q_s), q_s = softmax(z_s)          (temperature 1)
    student_ce       -log q_s(target token)
    divergence       the logit loss's own per-position value (ULD distance, or the KL-family divergence
                     with its temperature); not defined for MultiLevelOT, whose terms are per sequence
The logit loss is then computed on the kept pairs exactly as on a shorter answer: ULD averages over
the sequence's kept positions, the KL family counts kept tokens, MultiLevelOT ranks columns and
transports over the kept positions. k depends only on m (labels), so normalisation counts are known
before the forward, and a sequence's selection does not depend on the rest of its batch: gradient
accumulation and several processes train exactly what one big batch trains. CE keeps every position.

Feature selection: per micro-batch, each teacher hidden unit d of the chosen layer is scored by the
gradient of the summed target-token log-probabilities w.r.t. the teacher's hidden state,
    abs:    sum_{b,t} |d sum log p(y) / d h[b, t, d]|
    signed: sum_{b,t}  d sum log p(y) / d h[b, t, d]      (the published code's ranking, differentiating log p(y)
                                                        instead of its sum of softmax, which is 1)
and the top d_s units are kept, in increasing unit order (student unit i matches the i-th kept unit).
The student's hidden state at the mapped layer is matched to them without a projector by the
correlation loss, over the N paired rows of the micro-batch:
    z = (x - mean) / sqrt(var + eps) per unit over the rows (population variance, eps = 1e-5)
    C = z_s^T z_t / N,   loss = sum_i (C_ii - 1)^2 + w sum_{i != j} C_ij^2
"""
import math
from typing import Sequence, Tuple

import torch

from llm_recipes.losses.pairing import Pairing

TOKEN_SELECTIONS = ("none", "teacher_entropy", "student_entropy", "student_ce", "divergence")
FEATURE_ATTRIBUTIONS = ("abs", "signed")
CORRELATION_EPS = 1e-5


# ------------------------------------------------------------------------------------ token selection
def kept_per_sequence(pairs_per_sequence: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_b = min(m_b, max(1, ceil(ratio * m_b))) for m_b > 0, else 0 (integer-exact ceil)."""
    m = pairs_per_sequence.long()
    k = torch.tensor([min(int(v), max(1, math.ceil(int(v) * ratio - 1e-9))) if v > 0 else 0 for v in m.tolist()],
                     dtype=torch.long)
    return k.to(m.device)


def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) per row of fp32 logits [n, V] (0 log 0 = 0)."""
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)


def select_top(scores: torch.Tensor, sequence: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Bool mask [P]: the keep[b] highest-scoring rows of each sequence b (ties: the earlier row)."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(sequence[order], stable=True)]  # by sequence, descending score within
    grouped = sequence[order]
    counts = torch.bincount(grouped, minlength=keep.numel())
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - first[grouped]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order] = rank < keep.to(order.device)[grouped]
    return mask


def select_pairs(pairing: Pairing, keep: torch.Tensor, kept: torch.Tensor) -> Pairing:
    """The pairing restricted to the kept pairs; dropped pairs stay in CE as unpaired rows."""
    p = pairing.num_paired
    keep = keep.to(pairing.student_rows.device)
    rows, targets = pairing.student_rows, pairing.student_targets
    student_rows = torch.cat([rows[:p][keep], rows[:p][~keep], rows[p:]])
    student_targets = torch.cat([targets[:p][keep], targets[:p][~keep], targets[p:]])
    kept_part = lambda x: x[keep] if x is not None else None  # noqa: E731
    inner = {}
    if pairing.previous_inner_units is not None:  # renumber the paired rows they belong to; drop the dropped ones
        renumbered = torch.where(keep, keep.long().cumsum(0) - 1, -1)[pairing.previous_inner_units]
        stays = renumbered >= 0
        inner = {"previous_inner_rows": pairing.previous_inner_rows[stays],
                 "previous_inner_ids": pairing.previous_inner_ids[stays], "previous_inner_units": renumbered[stays]}
    return Pairing(student_rows, student_targets, pairing.teacher_rows[keep],
                   kept.to(pairing.pairs_per_sequence.device), int(keep.sum()), kept_part(pairing.nodes),
                   kept_part(pairing.continuation_nodes), kept_part(pairing.previous_teacher_rows),
                   kept_part(pairing.previous_teacher_ids), **inner)


# ---------------------------------------------------------------------------------- feature selection
def unit_scores(gradient: torch.Tensor, attribution: str) -> torch.Tensor:
    """[..., d] gradient of the target log-probabilities w.r.t. a hidden state -> [d] fp32 scores."""
    g = gradient.float().reshape(-1, gradient.shape[-1])
    if attribution == "abs":
        return g.abs().sum(dim=0)
    if attribution == "signed":
        return g.sum(dim=0)
    raise ValueError(f"unknown feature attribution {attribution!r}; expected one of {FEATURE_ATTRIBUTIONS}")


def top_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in increasing index order."""
    if k > scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} units")
    return torch.topk(scores, k).indices.sort().values


def correlation_loss(student: torch.Tensor, teacher: torch.Tensor, offdiag_weight: float,
                     eps: float = CORRELATION_EPS) -> torch.Tensor:
    """sum_i (C_ii - 1)^2 + w sum_{i != j} C_ij^2, C = z_s^T z_t / N over N >= 2 rows [N, d] (fp32)."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student {tuple(student.shape)} and selected teacher {tuple(teacher.shape)} rows differ")
    s, t = student.float(), teacher.float()
    n = s.shape[0]
    with torch.autocast(s.device.type, enabled=False):  # the [d, d] product in fp32 under bf16 autocast too
        z_s = (s - s.mean(dim=0)) / torch.sqrt(s.var(dim=0, unbiased=False) + eps)
        z_t = (t - t.mean(dim=0)) / torch.sqrt(t.var(dim=0, unbiased=False) + eps)
        c = z_s.t() @ z_t / n
    diagonal = torch.diagonal(c)
    return (diagonal - 1.0).pow(2).sum() + offdiag_weight * (c.pow(2).sum() - diagonal.pow(2).sum())


def feature_selection_sum(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    layer_pairs: Sequence[Tuple[int, int]],
    units: dict,
    offdiag_weight: float,
) -> torch.Tensor:
    """N * mean over layer pairs of correlation_loss(h_s[s] rows, h_t[t] rows at units[(s, t)]).

    N = number of paired rows (the term's unit count); below 2 rows the statistics are undefined and
    the term is a zero that still reaches the student's graph."""
    n = int(student_rows.numel())
    total = None
    for s, t in layer_pairs:
        states = student_states[s]
        rows = states.reshape(-1, states.shape[-1]).index_select(0, student_rows.to(states.device))
        if n < 2:
            value = rows.float().sum() * 0.0
        else:
            with torch.no_grad():
                t_states = teacher_states[t].detach()
                target = t_states.reshape(-1, t_states.shape[-1]).index_select(0, teacher_rows.to(t_states.device))
                target = target[:, units[(s, t)].to(target.device)]
            value = n * correlation_loss(rows, target, offdiag_weight)
        total = value if total is None else total + value
    return total / len(layer_pairs)
