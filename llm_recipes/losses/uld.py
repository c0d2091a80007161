"""Universal Logit Distillation (Boizard et al., arXiv 2402.12030), row-wise math.

Per paired position: q = softmax(z_s / T_s), p = softmax(z_t / T_t), each sorted in descending
order, the shorter zero-padded to the longer vocabulary, distance = sum_i |q_sorted[i] - p_sorted[i]|
(the closed form of the Wasserstein-1 distance under the paper's uniform cost). No T^2 factor.

Top-k variant (`top_k > 0`, not exact): only the k largest probabilities of each side are compared
index by index; the rest of each distribution is one bucket, tail = 1 - sum(top k), compared as
|tail_q - tail_p|. By the triangle inequality this is a lower bound of the exact distance and
exact - top_k <= 2 * min(tail_q, tail_p). It replaces the full-vocabulary sort with torch.topk.

The expensive part, the sort (or top-k) of both sides, has no gradient: `uld_plan` does it once per
chunk of rows, under no_grad, and keeps only what the gradient needs: the sign of each difference at
the student entry it belongs to (exact: int8 [n, V_s], a quarter of the chunk's fp32 logits; top-k:
[n, k] signs, the k student ids and the tail's sign). `uld_sum` turns a plan into the differentiable
value: its backward is those signs through the softmax Jacobian, q * (g - <q, g>) / T. The trainer's
engine keeps a chunk's plan from the forward to backward's recompute of the chunk, so neither side
is sorted twice and the teacher is not recomputed (docs/losses.md, "Memory and time").
"""
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from llm_recipes.losses.divergences import scaled
from llm_recipes.losses.cross_entropy import cross_entropy_sum
from llm_recipes.losses.family import Family, non_negative_int, positive


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def sort_descending(probs: torch.Tensor):
    """torch.sort(probs, dim=-1, descending=True) of non-negative rows [n, V]; several times faster on CPU.

    Non-negative IEEE floats are ordered like their bit patterns read as integers, and torch sorts a
    1-D integer tensor with a radix sort (fbgemm) instead of the comparison sort it uses for float
    rows: about 6x faster at V = 152k on one core (benchmarks/RESULTS.md). Ties may come out in
    another order than torch.sort's, which changes neither the sorted values nor ULD (any order of
    ties gives a valid subgradient). Other devices keep torch.sort (CUDA sorts rows by radix already).
    """
    if probs.device.type != "cpu" or probs.dtype not in _BITS:
        return torch.sort(probs, dim=-1, descending=True)
    bits = probs.contiguous().view(_BITS[probs.dtype])
    values, order = torch.empty_like(probs), torch.empty(probs.shape, dtype=torch.long)
    for row in range(probs.shape[0]):
        row_bits, row_order = torch.sort(bits[row], stable=True)
        values[row] = row_bits.view(probs.dtype).flip(0)
        order[row] = row_order.flip(0)
    return values, order


class TeacherSorted(NamedTuple):
    """What ULD needs from the teacher at a row: its sorted probabilities (top-k: plus tail mass)."""

    probs: torch.Tensor  # [n, V_t] (exact) or [n, min(k, V_t)] (top-k), descending
    tail: Optional[torch.Tensor]  # [n] mass beyond the top k, None when exact


def teacher_sorted(teacher_logits: torch.Tensor, temperature: float, top_k: int = 0) -> TeacherSorted:
    """Sorted teacher probabilities of fp32 logits [n, V_t]."""
    probs = torch.softmax(scaled(teacher_logits, temperature), dim=-1)
    if top_k <= 0:
        return TeacherSorted(sort_descending(probs)[0], None)
    top = torch.topk(probs, min(top_k, probs.shape[1]), dim=-1, sorted=True).values
    return TeacherSorted(top, 1.0 - top.sum(dim=-1))


class ULDPlan(NamedTuple):
    """ULD's non-differentiable work for a chunk of rows: the values and the gradient's signs."""

    values: torch.Tensor  # [n] fp32, ULD per row
    signs: Optional[torch.Tensor]  # int8, exact: [n, V_s] per student entry; top-k: [n, k] at `columns`
    columns: Optional[torch.Tensor]  # top-k: [n, k] student ids of the top k; None when exact
    tail_signs: Optional[torch.Tensor]  # top-k: [n] int8, sign of tail_q - tail_p; None when exact


def _sign_int8(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).to(torch.int8) - (x < 0).to(torch.int8)


@torch.no_grad()
def uld_plan(student_logits: torch.Tensor, teacher: TeacherSorted, temperature: float, top_k: int = 0,
             with_signs: bool = True) -> ULDPlan:
    """Per-row ULD of fp32 student logits [n, V_s] against the sorted teacher (exact when top_k <= 0,
    else the top-k + tail variant), and, `with_signs`, the signs its gradient needs."""
    q = torch.softmax(scaled(student_logits, temperature), dim=-1)
    p = teacher.probs
    if top_k <= 0:
        diff, order = sort_descending(q)
        del q
    else:
        diff, order = torch.topk(q, min(top_k, q.shape[1]), dim=-1, sorted=True)
        tail = 1.0 - diff.sum(dim=-1) - teacher.tail
    shared = min(diff.shape[1], p.shape[1])
    diff[:, :shared] -= p[:, :shared]  # past `shared`: the zero padding of the shorter side, |x - 0| = x
    signs = _sign_int8(diff) if with_signs else None
    values = diff.abs_().sum(dim=-1) + p[:, shared:].sum(dim=-1)
    if top_k > 0:
        values += tail.abs()
        return ULDPlan(values, signs, order, _sign_int8(tail) if with_signs else None)
    if with_signs:  # back from rank order to vocabulary order
        signs = torch.empty_like(signs).scatter_(1, order, signs)
    return ULDPlan(values, signs, None, None)


def _softmax_backward(q: torch.Tensor, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d/dz of sum(g * q) for q = softmax(z / T): q * (g - <q, g>) / T, times `scale` per row."""
    g.sub_((q * g).sum(dim=-1, keepdim=True)).mul_(q).mul_(scale[:, None])
    return g


class _ULDSum(torch.autograd.Function):
    """sum_r w_r ULD_r from a plan; the gradient w.r.t. the student logits is the plan's signs through
    the softmax Jacobian. Saves q and the (int8) signs, never an autograd graph over [rows, vocab]."""

    @staticmethod
    def forward(ctx, student_logits, weights, values, signs, columns, tail_signs, temperature):
        q = torch.softmax(scaled(student_logits, temperature), dim=-1)
        ctx.temperature = temperature
        ctx.top_k = columns is not None
        if ctx.top_k:
            ctx.save_for_backward(q, weights, signs, columns, tail_signs)
        else:
            ctx.save_for_backward(q, weights, signs)
        return (weights * values).sum()

    @staticmethod
    def backward(ctx, grad_out):
        q, weights, signs, *top = ctx.saved_tensors
        if ctx.top_k:
            columns, tail_signs = top
            g = tail_signs.to(q.dtype)[:, None].expand_as(q).clone().scatter_(1, columns, signs.to(q.dtype))
        else:
            g = signs.to(q.dtype)
        return _softmax_backward(q, g, weights * grad_out / ctx.temperature), None, None, None, None, None, None


def uld_sum(student_logits: torch.Tensor, plan: ULDPlan, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_r weights_r * ULD_r over paired rows, differentiable w.r.t. student_logits [n, V_s] fp32 (the
    logits the plan was made from); weights [n] fp32."""
    return _ULDSum.apply(student_logits, weights, plan.values, plan.signs, plan.columns, plan.tail_signs,
                         temperature)


# ------------------------------------------------------------------------------------------- the family
@dataclass(frozen=True)
class ULDOptions:
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    top_k: int = 0  # 0 = exact (full sort)


def uld_rows(student_logits: torch.Tensor, teacher: TeacherSorted, temperature: float, top_k: int = 0) -> torch.Tensor:
    """ULD's per-position distance (exact, or its top-k + tail variant), without gradient."""
    return uld_plan(student_logits, teacher, temperature, top_k, with_signs=False).values


class ULDFamily(Family):
    name = "ULD"
    per_sequence = True
    teacher_temperature_field = "teacher_temperature"
    scores_positions = True
    reads = ("student_temperature", "teacher_temperature", "uld_top_k")

    def options(self, loss, cfg, cache=None) -> ULDOptions:
        """From a top-K teacher cache, ULD is top-K ULD (the K cached probabilities rank by rank, the rest one
        bucket): exactly what the cache determines."""
        positive("student_temperature", cfg.student_temperature)
        positive("teacher_temperature", cfg.teacher_temperature)
        non_negative_int("uld_top_k", cfg.uld_top_k)
        opts = ULDOptions(float(cfg.student_temperature), float(cfg.teacher_temperature), int(cfg.uld_top_k))
        if cache is not None and cache.topk < cache.vocab_size:
            opts = replace(opts, top_k=min(opts.top_k or cache.topk, cache.topk))
        return opts

    def terms(self, batch, chunk, checkpointed, z, targets):
        ce = cross_entropy_sum(z, targets) if batch.with_ce else z[:0].sum()
        zs = z[: chunk.paired, : batch.student_vocab(z)]
        opts = batch.options

        def make_plan():
            teacher = teacher_sorted(batch.teacher_logits(chunk), opts.teacher_temperature, opts.top_k)
            return uld_plan(zs.detach(), teacher, opts.student_temperature, opts.top_k)

        plan = batch.plan(chunk, checkpointed, make_plan)
        return ce, uld_sum(zs, plan, batch.weights(chunk), opts.student_temperature)

    def position_scores(self, options, student_logits, teacher_logits):
        teacher = teacher_sorted(teacher_logits, options.teacher_temperature, options.top_k)
        return uld_rows(student_logits, teacher, options.student_temperature, options.top_k)


ULD = ULDFamily()
