"""Summed token cross-entropy of one chunk of rows, with an analytic backward, for the losses that
still read the student's logits after the CE (ULD, MultiLevelOT; the others use token_terms).

Saves only the fp32 logits it was given (already alive in the chunk) and the per-row log-partition,
so backward needs one softmax and no autograd graph over [rows, vocab].
"""
import torch


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad = (logits - lse[:, None]).exp_()  # one [rows, vocab] allocation
        grad.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
        return grad.mul_(grad_out), None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_r -log softmax(logits_r)[targets_r]; logits [n, V] fp32, targets [n] long."""
    return _CrossEntropySum.apply(logits, targets)
