"""CE and the forward KL to a top-K teacher cache in one pass, without rebuilding the teacher's rows.

A cache row holds the teacher's top-K ids, their log-probabilities log p_k and the log of the rest of its
mass, log p_tail. The trainer reads that tail shaped like the student's own tail (teacher_cache.dense_logits),
which makes the forward KL exactly the KL between the two distributions coarsened to the K ids and one bucket:

    KL = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail),   q_tail = the student's mass off the K ids

with the gradient w.r.t. the student's logits q_j (1 - r) at the other ids and q_k - p_k at the K ids, where
r = p_tail / q_tail. This module computes exactly that from gathers at the K ids, one sum of the student's
tail (summed directly, not as 1 - sum_k q_k, which float32 cannot resolve for a confident student) and a
per-row scale of the softmax that CE's gradient writes anyway: no [rows, V] teacher tensor, no second
log-softmax. The engine uses it for the forward KL at temperature 1 with CE (the defaults); the other kinds
and temperatures take the dense row (`dense_logits`), which gives the same values at the cost of a few more
passes over the vocabulary.
"""
import math

import torch

from llm_recipes.losses.token_terms import block_rows


class _CachedForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, targets, packed, k, weights, need_grad):
        ctx.set_materialize_grads(False)
        n, width = z.shape
        paired = packed.shape[0]
        ids_all = packed[:, :k].long()
        scale = z.new_zeros(paired if need_grad else 0)  # 1 - r per paired row
        correction = z.new_zeros((paired, k) if need_grad else (0, k))  # q_k r - p_k at the K ids
        ce_parts, distill_parts = [], []
        step = block_rows(width, z.device)
        for start in range(0, n, step):
            end = min(n, start + step)
            s = z[start:end]  # logits in; q - onehot out
            log_q = torch.log_softmax(s, dim=-1)
            ce_parts.append(log_q.gather(1, targets[start:end, None]).sum().neg())
            torch.exp(log_q, out=s)
            if start < paired:
                stop = min(end, paired)
                q = s[: stop - start]
                ids = ids_all[start:stop]
                log_p = packed[start:stop, k:2 * k].to(z.dtype)
                log_p_tail = packed[start:stop, 2 * k].to(z.dtype)
                # renormalised (16-bit log-probabilities sum to 1 only within their rounding), as the dense row's
                # log-softmax does
                log_total = torch.logsumexp(torch.cat([log_p, log_p_tail[:, None]], dim=1), dim=1)
                log_p, log_p_tail = log_p - log_total[:, None], log_p_tail - log_total
                log_q_k, q_k = log_q[: stop - start].gather(1, ids), q.gather(1, ids)
                q_tail = q.scatter(1, ids, 0.0).sum(dim=-1)  # the student's mass off the K ids, summed directly
                p = log_p.exp()
                head = torch.where(p > 0, p * (log_p - log_q_k), 0.0).sum(dim=-1)  # 0 log 0 = 0; p > 0 = q: +inf
                has_tail = log_p_tail > -math.inf
                log_ratio = log_p_tail - q_tail.log()
                tail = torch.where(has_tail, log_p_tail.exp() * log_ratio, 0.0)
                broken = log_p.isnan().any(dim=-1) | log_p_tail.isnan()  # a broken cache row: NaN, never dropped
                value = (head + tail).masked_fill(broken, math.nan)
                distill_parts.append((weights[start:stop] * value).sum())
                if need_grad:
                    r = torch.where(has_tail & (q_tail > 0), log_ratio.exp(), 0.0)
                    scale[start:stop] = 1.0 - r
                    correction[start:stop] = q_k * r[:, None] - p
            if need_grad:
                s.scatter_add_(1, targets[start:end, None], s.new_full((end - start, 1), -1.0))
        ce = torch.stack(ce_parts).sum() if ce_parts else z.new_zeros(())
        distill = torch.stack(distill_parts).sum() if distill_parts else z.new_zeros(())
        ctx.mark_dirty(z)
        if need_grad:
            ctx.save_for_backward(z, targets, ids_all, weights, scale, correction)
        return ce, distill, z

    @staticmethod
    def backward(ctx, grad_ce, grad_distill, _grad_z):
        z, targets, ids, weights, scale, correction = ctx.saved_tensors
        paired = ids.shape[0]
        # z holds q - onehot. d/dz = grad_ce (q - onehot) + g w (q (1 - r) + scatter(ids, q_k r - p_k))
        #                          = (q - onehot)(grad_ce + c) + onehot c + g w scatter(...),  c = g w (1 - r)
        base = z.new_zeros(z.shape[0]) if grad_ce is None else grad_ce.expand(z.shape[0]).clone()
        if grad_distill is not None:
            c = torch.zeros_like(base)
            c[:paired] = grad_distill * weights * scale
            z.mul_((base + c)[:, None])
            z.scatter_add_(1, targets[:, None], c[:, None])
            z[:paired].scatter_add_(1, ids, (grad_distill * weights)[:, None] * correction)
        else:
            z.mul_(base[:, None])
        return z, None, None, None, None, None


def cached_forward_kl_sum(z: torch.Tensor, targets: torch.Tensor, packed: torch.Tensor, k: int,
                          weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum over every row, sum_r weights_r * KL(p_r || q_r) over the first packed.shape[0] rows), the
    teacher's p from packed cache rows [P, 2K + 1] (ids, log-probabilities, log tail mass; temperature 1).

    z [n, V] student logits is CONSUMED (overwritten); targets [n] long; weights [P]. Differentiable w.r.t. z."""
    if packed.shape[0] > z.shape[0] or packed.shape[1] != 2 * k + 1 or weights.shape[0] != packed.shape[0]:
        raise ValueError(f"cache rows {tuple(packed.shape)} (K {k}) must fit the student's {tuple(z.shape)}, "
                         "with one weight each")
    need_grad = torch.is_grad_enabled() and z.requires_grad
    ce, distill, _ = _CachedForwardKL.apply(z, targets, packed, k, weights, need_grad)
    return ce, distill
