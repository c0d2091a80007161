"""The hybrid cross-tokenizer loss (TRL GOLD's `uld_use_hybrid_loss`), row-wise math.

The two vocabularies share some tokens: identical text after canonicalising space markers and byte
pieces (`llm_recipes.alignment.shared_token_pairs`, one to one). At a pair of text-aligned rows (both
predict the first token of the same text), with q = softmax(z_s / T) and p = softmax(z_t / T) over
each model's whole vocabulary:

    matched   = JSD_beta(p_M || q_M) = beta KL(p_M || m) + (1 - beta) KL(q_M || m),  m = beta p_M + (1 - beta) q_M
                on the shared tokens' probabilities, token by token (not renormalised: sub-distributions)
    unmatched = sum_i |sort(q_U)_i - sort(p_U)_i|   ULD on every other token's probabilities, the shorter
                side zero-padded
    value     = w_M matched + w_U unmatched

with w_M = --distillation_config.hybrid_matched_weight and w_U = hybrid_unmatched_weight; unset, GOLD's
default: w_M = |shared| / V_t, w_U = 1 - w_M. No T^2 factor (ULD has none). One unit per paired row.

As for ULD, the non-differentiable work (the sort of the unmatched part) runs once per chunk in
`hybrid_plan`, which also keeps d value / d q ([rows, V_s] fp32: (1 - beta) log(q / m) on shared
tokens, the sign of the sorted difference on the others); `hybrid_sum`'s backward is that gradient
through the softmax Jacobian.
"""
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional

import torch

from llm_recipes.losses.cross_entropy import cross_entropy_sum
from llm_recipes.losses.divergences import scaled
from llm_recipes.losses.family import Family, PairArtifacts, non_negative
from llm_recipes.losses.kl import kl_options
from llm_recipes.losses.uld import sort_descending


@dataclass(frozen=True)
class HybridOptions:
    temperature: float = 1.0
    beta: float = 0.5
    matched_weight: Optional[float] = None  # None: shared share of the teacher vocabulary (GOLD)
    unmatched_weight: Optional[float] = None  # None: 1 - matched weight
    teacher_shared: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)  # [K] teacher ids
    student_shared: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)  # [K] student ids

    def weights(self, teacher_vocab: int) -> tuple[float, float]:
        shared = int(self.teacher_shared.numel()) if self.teacher_shared is not None else 0
        matched = self.matched_weight if self.matched_weight is not None else shared / max(teacher_vocab, 1)
        unmatched = self.unmatched_weight if self.unmatched_weight is not None else 1.0 - matched
        return float(matched), float(unmatched)


class HybridPlan(NamedTuple):
    values: torch.Tensor  # [n] fp32, the hybrid value of each row
    gradient: torch.Tensor  # [n, V_s] fp32, d value / d q


def _unmatched(vocab: int, shared: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(vocab, dtype=torch.bool, device=shared.device)
    keep[shared[shared < vocab]] = False
    return keep.nonzero().squeeze(1)


@torch.no_grad()
def hybrid_plan(student_logits: torch.Tensor, teacher_logits: torch.Tensor, opts: HybridOptions) -> HybridPlan:
    """Values and gradient coefficients of fp32 logits [n, V_s] (student) and [n, V_t] (teacher)."""
    device = student_logits.device
    w_matched, w_unmatched = opts.weights(teacher_logits.shape[1])
    q = torch.softmax(scaled(student_logits, opts.temperature), dim=-1)
    p = torch.softmax(scaled(teacher_logits, opts.temperature), dim=-1)
    s_shared, t_shared = opts.student_shared.to(device), opts.teacher_shared.to(device)
    inside = (s_shared < q.shape[1]) & (t_shared < p.shape[1])
    s_shared, t_shared = s_shared[inside], t_shared[inside]
    gradient = torch.zeros_like(q)
    values = q.new_zeros(q.shape[0])
    if s_shared.numel() and w_matched:
        q_m, p_m = q[:, s_shared], p[:, t_shared]
        m = opts.beta * p_m + (1 - opts.beta) * q_m
        log_m = torch.log(m)
        kl_p = torch.where(p_m > 0, p_m * (torch.log(p_m) - log_m), 0.0).sum(dim=-1)
        log_q_m = torch.log(q_m)
        kl_q = torch.where(q_m > 0, q_m * (log_q_m - log_m), 0.0).sum(dim=-1)
        values += w_matched * (opts.beta * kl_p + (1 - opts.beta) * kl_q)
        gradient[:, s_shared] = torch.where(q_m > 0, w_matched * (1 - opts.beta) * (log_q_m - log_m), 0.0)
    if w_unmatched:
        s_rest, t_rest = _unmatched(q.shape[1], s_shared), _unmatched(p.shape[1], t_shared)
        q_sorted, order = sort_descending(q[:, s_rest].contiguous())
        p_sorted = sort_descending(p[:, t_rest].contiguous())[0]
        shared = min(q_sorted.shape[1], p_sorted.shape[1])
        diff = q_sorted[:, :shared] - p_sorted[:, :shared]
        values += w_unmatched * (diff.abs().sum(dim=-1) + q_sorted[:, shared:].sum(dim=-1)
                                 + p_sorted[:, shared:].sum(dim=-1))
        signs = torch.cat([diff.sign(), q_sorted.new_ones(q_sorted.shape[0], q_sorted.shape[1] - shared)], dim=1)
        columns = s_rest[order]  # the student column of each sorted entry
        gradient.scatter_(1, columns, w_unmatched * signs)
    return HybridPlan(values, gradient)


class _HybridSum(torch.autograd.Function):
    """sum_r w_r value_r from a plan; the gradient w.r.t. the student logits is the plan's d value / d q
    through the softmax Jacobian, q (g - <q, g>) / T."""

    @staticmethod
    def forward(ctx, student_logits, weights, values, gradient, temperature):
        q = torch.softmax(scaled(student_logits, temperature), dim=-1)
        ctx.temperature = temperature
        ctx.save_for_backward(q, weights, gradient)
        return (weights * values).sum()

    @staticmethod
    def backward(ctx, grad_out):
        q, weights, gradient = ctx.saved_tensors
        g = gradient.clone()
        g.sub_((q * g).sum(dim=-1, keepdim=True)).mul_(q).mul_((weights * grad_out / ctx.temperature)[:, None])
        return g, None, None, None, None


def hybrid_sum(student_logits: torch.Tensor, plan: HybridPlan, weights: torch.Tensor, temperature: float):
    """sum_r weights_r * hybrid_r, differentiable w.r.t. student_logits [n, V_s] fp32 (the plan's logits)."""
    return _HybridSum.apply(student_logits, weights, plan.values, plan.gradient, temperature)


# ------------------------------------------------------------------------------------------- the family
class HybridFamily(Family):
    name = "hybrid"
    alignments = ("text",)
    reads = ("temperature", "jsd_beta", "hybrid_matched_weight", "hybrid_unmatched_weight")

    def options(self, loss, cfg, cache=None) -> HybridOptions:
        kl_options("jsd", cfg)  # its temperature and jsd_beta, checked as the KL family checks them
        for field_name in ("hybrid_matched_weight", "hybrid_unmatched_weight"):
            if getattr(cfg, field_name) is not None:
                non_negative(field_name, getattr(cfg, field_name))
        return HybridOptions(float(cfg.temperature), float(cfg.jsd_beta), cfg.hybrid_matched_weight,
                             cfg.hybrid_unmatched_weight)

    def artifacts(self, student_tokenizer, teacher_tokenizer) -> PairArtifacts:
        from llm_recipes import alignment

        shared = alignment.shared_token_pairs(teacher_tokenizer, student_tokenizer)
        return PairArtifacts(shared_tokens=shared,
                             summary=f"hybrid: {shared[0].numel():,} tokens with the same text in both vocabularies")

    def with_artifacts(self, options, artifacts):
        return replace(options, teacher_shared=artifacts.shared_tokens[0], student_shared=artifacts.shared_tokens[1])

    def terms(self, batch, chunk, checkpointed, z, targets):
        opts = batch.options
        if opts.teacher_shared is None:
            raise ValueError("the hybrid loss needs the tokens the two vocabularies share (LossSpec.with_artifacts)")
        ce = cross_entropy_sum(z, targets) if batch.with_ce else z[:0].sum()
        zs = z[: chunk.paired, : batch.student_vocab(z)]
        plan = batch.plan(chunk, checkpointed, lambda: hybrid_plan(zs.detach(), batch.teacher_logits(chunk), opts))
        return ce, hybrid_sum(zs, plan, batch.weights(chunk), opts.temperature)


HYBRID = HybridFamily()
