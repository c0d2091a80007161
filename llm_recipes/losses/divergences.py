"""The KL family's divergences, row-wise, with analytic gradients.

With p = softmax(z_t / T) (teacher) and q = softmax(z_s / T) (student) over the shared vocabulary,
per answer position:
    forward       KL(p || q)
    reverse       KL(q || p)
    jsd           beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (TRL GKD)
    skew_forward  KL(p || alpha p + (1 - alpha) q)                                         (DistiLLM)
    skew_reverse  KL(q || alpha q + (1 - alpha) p)                                         (DistiLLM)
    tvd           0.5 sum |p - q|
each multiplied by T^2 (Hinton's convention, kept for every kind so the temperature never changes
the scale of the gradient).

The gradient w.r.t. the student logits is written out (for f(q): q * (df/dq - <q, df/dq>) / T):
llm_recipes.losses.token_terms evaluates these row functions block by block, together with the CE,
and keeps no autograd graph over [rows, vocab].

Masked vocabulary entries (a -inf logit: probability exactly 0 on that side; docs/losses.md). Every
row must keep at least one finite logit on each side. Values are the extended-real limits:
- an entry -inf on both sides is outside both distributions: it adds exactly 0 and gets gradient 0;
- a term a log(a / b) with a = 0 is 0 (0 log 0 = 0), whatever b;
- a term a log(a / b) with a > 0 = b is +inf: forward KL is +inf at a row where the student is -inf
  at an entry the teacher is not, reverse KL where the teacher is -inf at an entry the student is
  not (skew_* with alpha = 0 are these two). JSD, skew_* with alpha > 0 and TVD stay finite (their
  second argument contains the first). +inf is returned as +inf, never as NaN.
The gradient is the limit of the gradient as the masked logits go to -inf. It is finite everywhere
but at a reverse-KL row that is +inf: there the limit diverges (like the teacher's logit gap), the
row is +inf in a whole neighbourhood of the student's logits, and its gradient is 0.
"""
import math

import torch

# The kinds, in the order of the loss table's KL-family rows (llm_recipes.losses.kl maps loss names to them).
DIVERGENCE_KINDS = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tvd")


def scaled(logits, temperature):
    """z / T, without the copy when T = 1 (the default); every loss module scales its logits with it."""
    return logits if temperature == 1 else logits / temperature


def _p_log_ratio(p, log_p, log_r):
    """sum_v p (log p - log r), with 0 log 0 = 0: the only NaN a term can hold is 0 * -inf or 0 * NaN
    (p = 0 at a -inf logit, r = 0 or not), which nansum counts as 0; p > 0 = r gives +inf, kept."""
    return torch.nansum(p * (log_p - log_r), dim=-1)


def _project(q, g):
    """q * (g - <q, g>): the softmax Jacobian applied to df/dq (up to 1/T). g must be finite where
    q > 0; where q = 0 (a -inf student logit) it may be +-inf or NaN (a log-ratio at 0), and q * g
    tends to 0 there for every caller: g is set to 0 at those entries first (in place, one pass)."""
    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return g.sub_((q * g).sum(dim=-1, keepdim=True)).mul_(q)


def _log_mixture(log_a, log_b, weight_a):
    """log(weight_a * a + (1 - weight_a) * b) of two log-distributions."""
    if weight_a == 0:
        return log_b.clone()
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def divergence_rows(kind, log_q, log_p, beta=0.5, alpha=0.1, with_grad=False, with_value=True):
    """-> (value per row [n] or None, T * d value / d z_s [n, V] or None). log_q, log_p: fp32 log-softmax.

    Computes only what is asked for (backward asks for the gradient alone)."""
    value = grad = None
    if alpha == 0 and kind in ("skew_forward", "skew_reverse"):  # the plain KLs, with their own limits
        kind = "forward" if kind == "skew_forward" else "reverse"
    if kind == "forward":
        p = log_p.exp()
        if with_value:
            value = _p_log_ratio(p, log_p, log_q)
        if with_grad:
            grad = log_q.exp().sub_(p)
    elif kind == "reverse":
        q = log_q.exp()
        # q log(q / p): NaN where q = 0 (0 * -inf, or 0 * NaN when p = 0 too) -> 0; +inf where q > 0 = p
        terms = (log_q - log_p).mul_(q).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        value = terms.sum(dim=-1)  # the gradient needs it too
        if with_grad:  # q (log(q / p) - value), finite in a finite row; 0 in a +inf row (its limit diverges):
            # there every entry is now -inf (q > 0) or NaN (q = 0, or a +inf term), so zeroing the non-finite
            # entries zeroes exactly those rows, in one pass (a broadcast masked_fill_ costs ten times more)
            grad = terms.addcmul_(q, value[:, None], value=-1.0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    elif kind == "jsd":
        q = log_q.exp()
        log_m = _log_mixture(log_p, log_q, beta)
        if with_value:
            value = beta * _p_log_ratio(log_p.exp(), log_p, log_m) + (1 - beta) * _p_log_ratio(q, log_q, log_m)
        if with_grad:
            grad = _project(q, (log_q - log_m).mul_(1 - beta))
    elif kind == "skew_forward":
        log_m = _log_mixture(log_p, log_q, alpha)
        if with_value:
            value = _p_log_ratio(log_p.exp(), log_p, log_m)
        if with_grad:
            grad = _project(log_q.exp(), (log_p - log_m).exp_().mul_(-(1 - alpha)))
    elif kind == "skew_reverse":
        q = log_q.exp()
        log_m = _log_mixture(log_q, log_p, alpha)
        if with_value:
            value = _p_log_ratio(q, log_q, log_m)
        if with_grad:
            grad = _project(q, (log_q - log_m).sub_((log_q - log_m).exp_().mul_(alpha)))
    elif kind == "tvd":
        diff = log_q.exp() - log_p.exp()
        if with_value:
            value = 0.5 * diff.abs().sum(dim=-1)
        if with_grad:
            grad = _project(log_q.exp(), diff.sign_().mul_(0.5))
    else:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")
    return value, grad
