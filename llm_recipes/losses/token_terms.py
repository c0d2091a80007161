"""CE and the same-tokenizer divergence of one chunk in a single pass, in place, gradient in forward.

SFT and the KL family spend most of their logit work on element-wise passes over [rows, vocab]
(a 152k vocabulary makes every such tensor as large as the output layer's matmul): the separate CE
and divergence functions each took their own log-softmax of the student, each exp'd it again in
backward, and every step allocated a handful of fresh [rows, vocab] temporaries (on CPU each one
costs page faults worth more than the arithmetic). This function instead

- walks the rows in blocks (cache-sized on CPU, large on GPU) and takes each log-softmax there, in a
  block-sized temporary;
- shares the student's log-softmax between CE and the divergence (temperature 1, same width), and
  for the forward KL (the default) exp's each side once: q - p is the gradient;
- writes the CE gradient softmax - onehot over the student's logits and the divergence's gradient
  over the teacher's: no [rows, vocab] tensor besides the two logits buffers that exist anyway;
- keeps both gradients, so backward only scales and adds them (the loss weights are known then).

The logits buffers are consumed: the caller passes tensors nothing else reads (the engine clones a
buffer that aliases its input). The student buffer is marked dirty and returned as a third output
that callers ignore.

Masked vocabulary entries (-inf logits, on either side or both) follow llm_recipes.losses.kl: the
value is +inf where the true divergence is (never NaN) and every gradient is finite, with no extra
pass for the forward KL (nansum already drops its 0 * inf terms; q - p is its gradient's limit).
"""
import math

import torch

from llm_recipes.losses.divergences import DIVERGENCE_KINDS, divergence_rows, scaled


def block_rows(width: int, device: torch.device) -> int:
    """Rows per block: ~4 MB of fp32 on CPU (the temporaries stay in cache), ~128 MB on GPU."""
    elements = 2**20 if device.type == "cpu" else 2**25
    return max(1, elements // max(width, 1))


class _TokenTermsSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, targets, zt, weights, kind, temperature, beta, alpha, with_ce, need_grad):
        ctx.set_materialize_grads(False)
        n, width = z.shape
        paired, vocab = (0, width) if zt is None else zt.shape
        shared = temperature == 1 and vocab == width  # CE's log-softmax is the divergence's too
        ce_parts, distill_parts = [], []
        step = block_rows(width, z.device)
        for start in range(0, n if with_ce else paired, step):
            end = min(n, start + step)
            s = z[start:end]  # raw logits in; CE gradient out
            log_softmax = torch.log_softmax(s, dim=-1) if with_ce or shared else None
            if with_ce:
                ce_parts.append(log_softmax.gather(1, targets[start:end, None]).sum().neg())
            q_written = False
            if start < paired:
                stop = min(end, paired)
                rows = slice(0, stop - start)
                t = zt[start:stop]  # raw teacher logits in; T * dD/dz_s out
                log_q = log_softmax[rows] if shared else torch.log_softmax(scaled(s[rows, :vocab], temperature), dim=-1)
                log_p = torch.log_softmax(scaled(t, temperature), dim=-1)
                # a NaN or +inf teacher logit makes NaN entries in its row, which the divergences' nansum would
                # drop: such a row's value is NaN, so that the trainer stops and names the term
                broken = log_p.isnan().any(dim=-1)
                if kind == "forward":  # the default: q and p computed once, the gradient q - p written in place
                    p = log_p.exp()
                    # 0 log 0 = 0 (nansum drops 0 * -inf and 0 * NaN); p > 0 = q (a -inf student logit): +inf
                    value = torch.nansum(log_p.sub_(log_q).mul_(p), dim=-1)
                    if need_grad:
                        if shared and with_ce:
                            torch.exp(log_softmax, out=s)
                            q_written = True
                            torch.sub(s[rows], p, out=t)
                        else:  # log_q is not needed after this (no CE, or its own temporary)
                            torch.sub(log_q.exp_(), p, out=t)
                else:
                    value, grad = divergence_rows(kind, log_q, log_p, beta, alpha, with_grad=need_grad)
                    if need_grad:
                        t.copy_(grad)
                distill_parts.append((weights[start:stop] * value.masked_fill(broken, math.nan)).sum())
            if need_grad and with_ce:
                if not q_written:
                    torch.exp(log_softmax, out=s)
                s.scatter_add_(1, targets[start:end, None], s.new_full((end - start, 1), -1.0))
        ce = torch.stack(ce_parts).sum() if ce_parts else z.new_zeros(())
        distill = torch.stack(distill_parts).sum() * temperature**2 if distill_parts else z.new_zeros(())
        ctx.mark_dirty(z)
        ctx.options = (temperature, with_ce, paired, vocab)
        if need_grad:
            ctx.save_for_backward(z, zt, weights)
        return ce, distill, z

    @staticmethod
    def backward(ctx, grad_ce, grad_distill, _grad_z):
        temperature, with_ce, paired, vocab = ctx.options
        z, zt, weights = ctx.saved_tensors
        if grad_ce is None or not with_ce:
            z.zero_()
        else:
            z.mul_(grad_ce)
        if paired and grad_distill is not None:
            z[:paired, :vocab].addcmul_(zt, (weights * (grad_distill * temperature))[:, None])  # T^2 / T
        return z, None, None, None, None, None, None, None, None, None


def token_terms_sum(z, targets, zt=None, weights=None, kind="forward", temperature=1.0, beta=0.5, alpha=0.1,
                    with_ce=True):
    """(CE sum over every row, T^2 * sum_r weights_r * D_kind(row r) over the first zt.shape[0] rows).

    z [n, W] fp32 student logits and zt [P, V] fp32 teacher logits (P <= n, V <= W: the divergence
    uses the first V columns) are CONSUMED (overwritten); targets [n] long; weights [P] fp32.
    Differentiable w.r.t. z."""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")
    if zt is not None and (weights is None or zt.shape[0] > z.shape[0] or zt.shape[1] > z.shape[1]):
        raise ValueError(f"teacher logits {tuple(zt.shape)} must fit the student's {tuple(z.shape)}, with weights")
    need_grad = torch.is_grad_enabled() and z.requires_grad
    ce, distill, _ = _TokenTermsSum.apply(z, targets, zt, weights, kind, temperature, beta, alpha, with_ce, need_grad)
    return ce, distill
