"""Universal Logit Distillation (Boizard et al., arXiv 2402.12030), row-wise math.

Per paired position: q = softmax(z_s / T_s), p = softmax(z_t / T_t), each sorted in descending
order, the shorter zero-padded to the longer vocabulary, distance = sum_i |q_sorted[i] - p_sorted[i]|
(the closed form of the Wasserstein-1 distance under the paper's uniform cost). No T^2 factor.

Top-k variant (`top_k > 0`, not exact): only the k largest probabilities of each side are compared
index by index; the rest of each distribution is one bucket, tail = 1 - sum(top k), compared as
|tail_q - tail_p|. By the triangle inequality this is a lower bound of the exact distance and
exact - top_k <= 2 * min(tail_q, tail_p). It replaces the full-vocabulary sort with torch.topk.

Both are custom autograd functions: the gradient of sum_i |q_sorted[i] - p_sorted[i]| w.r.t. q is
the sign of each difference scattered back through the sort permutation, then the softmax Jacobian.
They save q and the permutation, never an autograd graph over [rows, vocab].
"""
from typing import NamedTuple, Optional

import torch


class TeacherSorted(NamedTuple):
    """What ULD needs from the teacher at a row: its sorted probabilities (top-k: plus tail mass)."""

    probs: torch.Tensor  # [n, V_t] (exact) or [n, min(k, V_t)] (top-k), descending
    tail: Optional[torch.Tensor]  # [n] mass beyond the top k, None when exact


def teacher_sorted(teacher_logits: torch.Tensor, temperature: float, top_k: int = 0) -> TeacherSorted:
    """Sorted teacher probabilities of fp32 logits [n, V_t]."""
    probs = torch.softmax(teacher_logits / temperature, dim=-1)
    if top_k <= 0:
        return TeacherSorted(torch.sort(probs, dim=-1, descending=True).values, None)
    top = torch.topk(probs, min(top_k, probs.shape[1]), dim=-1, sorted=True).values
    return TeacherSorted(top, 1.0 - top.sum(dim=-1))


def _softmax_backward(q: torch.Tensor, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d/dz of sum(g * q) for q = softmax(z / T): q * (g - <q, g>) / T, times `scale` per row."""
    g.sub_((q * g).sum(dim=-1, keepdim=True)).mul_(q).mul_(scale[:, None])
    return g


class _ULDExactSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_probs_sorted, weights, temperature):
        q = torch.softmax(student_logits / temperature, dim=-1)
        q_sorted, order = torch.sort(q, dim=-1, descending=True)
        shared = min(q.shape[1], teacher_probs_sorted.shape[1])
        dist = (q_sorted[:, :shared] - teacher_probs_sorted[:, :shared]).abs_().sum(dim=-1)
        # the zero padding of the shorter vocabulary: |x - 0| = x
        dist += q_sorted[:, shared:].sum(dim=-1) + teacher_probs_sorted[:, shared:].sum(dim=-1)
        ctx.temperature = temperature
        ctx.save_for_backward(q, order, teacher_probs_sorted, weights)
        return (weights * dist).sum()

    @staticmethod
    def backward(ctx, grad_out):
        q, order, teacher_probs_sorted, weights = ctx.saved_tensors
        shared = min(q.shape[1], teacher_probs_sorted.shape[1])
        sign_sorted = q.gather(1, order)
        sign_sorted[:, :shared].sub_(teacher_probs_sorted[:, :shared])
        sign_sorted.sign_()
        g = torch.empty_like(q).scatter_(1, order, sign_sorted)
        del sign_sorted
        return _softmax_backward(q, g, weights * grad_out / ctx.temperature), None, None, None


class _ULDTopKSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_top, teacher_tail, weights, temperature, top_k):
        q = torch.softmax(student_logits / temperature, dim=-1)
        q_top, idx = torch.topk(q, min(top_k, q.shape[1]), dim=-1, sorted=True)
        shared = min(q_top.shape[1], teacher_top.shape[1])
        head = q_top[:, :shared] - teacher_top[:, :shared]
        tail_q = 1.0 - q_top.sum(dim=-1)
        dist = head.abs().sum(dim=-1) + q_top[:, shared:].sum(dim=-1) + teacher_top[:, shared:].sum(dim=-1)
        dist += (tail_q - teacher_tail).abs()
        top_sign = torch.ones_like(q_top)
        top_sign[:, :shared] = head.sign()
        ctx.temperature = temperature
        ctx.save_for_backward(q, idx, top_sign, (tail_q - teacher_tail).sign(), weights)
        return (weights * dist).sum()

    @staticmethod
    def backward(ctx, grad_out):
        q, idx, top_sign, tail_sign, weights = ctx.saved_tensors
        g = tail_sign[:, None].expand_as(q).clone().scatter_(1, idx, top_sign)
        grad = _softmax_backward(q, g, weights * grad_out / ctx.temperature)
        return grad, None, None, None, None, None


def uld_sum(
    student_logits: torch.Tensor,
    teacher: TeacherSorted,
    weights: torch.Tensor,
    temperature: float,
    top_k: int = 0,
) -> torch.Tensor:
    """sum_r weights_r * ULD_r over paired rows; student_logits [n, V_s] fp32, weights [n] fp32."""
    if top_k <= 0:
        return _ULDExactSum.apply(student_logits, teacher.probs, weights, temperature)
    return _ULDTopKSum.apply(student_logits, teacher.probs, teacher.tail, weights, temperature, top_k)
