"""Naive implementations of the published losses, the way the public code computes them.

The baseline of `bench_losses.py`: full [batch, seq, vocab] logits from the output layer, a
full-vocabulary softmax (and, for ULD and MultiLevelOT, a full-vocabulary sort or ranking) on the
answer rows, plain autograd through everything. Written from the formulas of
/work/shared/reference/losses.md (docs/losses.md), not from any project's code. Same pairing
conventions as llm_recipes.losses (causal shift, answers paired by index from their start, the
student's last answer position dropped by `skip_student_eos`), so the values must agree.
"""
import math

import torch

IGNORE_INDEX = -100


def answer_rows(labels: torch.Tensor, skip_last: bool = False):
    """Per sequence, the rows whose logits predict an answer token (causal: row t predicts label t+1)."""
    rows = []
    for b in range(labels.shape[0]):
        found = (labels[b, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
        rows.append(found[:-1] if skip_last and found.numel() else found)
    return rows


def paired_index(student_labels, teacher_labels, skip_student_eos=True):
    """-> (student rows [B, m], teacher rows [B, m], valid [B, m]) paired by index, m the longest pairing."""
    s_rows = answer_rows(student_labels, skip_student_eos)
    t_rows = answer_rows(teacher_labels)
    lengths = [min(len(s), len(t)) for s, t in zip(s_rows, t_rows)]
    m = max(lengths + [1])
    s_index = torch.zeros(len(lengths), m, dtype=torch.long)
    t_index = torch.zeros_like(s_index)
    valid = torch.zeros(len(lengths), m, dtype=torch.bool)
    for b, n in enumerate(lengths):
        s_index[b, :n], t_index[b, :n], valid[b, :n] = s_rows[b][:n], t_rows[b][:n], True
    return s_index, t_index, valid


def _gather_rows(logits, index):
    """logits [B, S, V], index [B, m] -> [B, m, V] (a copy, as the public code's roll and crop make)."""
    return logits.gather(1, index.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1]))


# ------------------------------------------------------------------------------------------------ ULD
def uld(student_logits, student_labels, teacher_logits, teacher_labels, *, student_temperature=1.0,
        teacher_temperature=1.0, skip_student_eos=True):
    """ULD: softmax, full sort, zero padding of the smaller vocabulary, L1 per position; mean per
    sequence, then over sequences."""
    s_index, t_index, valid = paired_index(student_labels, teacher_labels, skip_student_eos)
    q = torch.softmax(_gather_rows(student_logits, s_index).float() / student_temperature, dim=-1)
    with torch.no_grad():
        p = torch.softmax(_gather_rows(teacher_logits, t_index).float() / teacher_temperature, dim=-1)
    q = q.sort(dim=-1, descending=True).values
    p = p.sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    dist = (q - p).abs().sum(dim=-1)
    return _per_sequence_mean(dist, valid.to(dist.device))


def _per_sequence_mean(per_position, valid):
    per_position = torch.where(valid, per_position, 0.0)
    counts = valid.sum(dim=1)
    used = counts > 0
    return (per_position.sum(dim=1)[used] / counts[used]).mean()


# --------------------------------------------------------------------------------------- MultiLevelOT
def _greedy_python(teacher_columns, student_probs, k):
    """The public code's greedy matching: for each teacher column in order, a Python loop over every
    student column for the unused one with the smallest L1 distance (first found wins ties)."""
    student_columns = student_probs.t().contiguous()  # [V, L]
    used = [False] * student_columns.shape[0]
    picks = []
    for j in range(k):
        target = teacher_columns[:, j]
        best, best_v = math.inf, -1
        for v in range(student_columns.shape[0]):
            if used[v]:
                continue
            cost = float((student_columns[v] - target).abs().sum())
            if cost < best:
                best, best_v = cost, v
        used[best_v] = True
        picks.append(best_v)
    return torch.tensor(picks, dtype=torch.long, device=student_probs.device)


def _sinkhorn(cost, reg, iters):
    """Entropic plan with uniform marginals, plain domain: u = a / K v, v = b / K^T u."""
    n_rows, n_cols = cost.shape
    kernel = torch.exp(-cost / reg)
    a = torch.full((n_rows,), 1.0 / n_rows, dtype=cost.dtype, device=cost.device)
    b = torch.full((n_cols,), 1.0 / n_cols, dtype=cost.dtype, device=cost.device)
    v = torch.ones_like(b)
    for _ in range(iters):
        u = a / (kernel @ v)
        v = b / (kernel.t() @ u)
    plan = u[:, None] * kernel * v[None, :]
    return (plan * cost).sum()


def multilevel_ot(student_logits, student_labels, teacher_logits, teacher_labels, *, mode="fast", top_k=50,
                  sl_weight=0.1, sd_weight=0.1, sl_temperature=1.0, sd_temperature=2.0, sinkhorn_reg=0.1,
                  sinkhorn_iters=20, skip_student_eos=True, greedy_vocab_limit=None):
    """MultiLevelOT with the paper's constants, per sequence: full-vocabulary softmaxes at each
    temperature, a full sort of the summed column mass (sequence ranking), top-k columns, then
    HAD + beta SL per position and gamma x Sinkhorn distance per sequence; mean over sequences.

    `greedy_vocab_limit`: run the Python-loop greedy on the first that many student columns only
    (the full loop takes hours); the benchmark then scales its time, not its value."""
    s_index, t_index, valid = paired_index(student_labels, teacher_labels, skip_student_eos)
    values = []
    for b in range(s_index.shape[0]):
        n = int(valid[b].sum())
        if n == 0:
            continue
        zs = student_logits[b, s_index[b, :n].to(student_logits.device)].float()
        with torch.no_grad():
            zt = teacher_logits[b, t_index[b, :n].to(teacher_logits.device)].float()
        k = min(top_k, zs.shape[-1], zt.shape[-1])
        q, p = torch.softmax(zs, dim=-1), torch.softmax(zt, dim=-1)
        with torch.no_grad():
            cols_t = torch.argsort(p.sum(dim=0), descending=True)[:k]
            if mode == "fast":
                cols_s = torch.argsort(q.sum(dim=0), descending=True)[:k]
            else:
                limit = greedy_vocab_limit or q.shape[1]
                cols_s = _greedy_python(p[:, cols_t], q[:, :limit], k)
        had = (q[:, cols_s] - p[:, cols_t]).abs().sum(dim=-1)
        s_sl = torch.softmax(zs / sl_temperature, dim=-1)[:, cols_s]
        t_sl = torch.softmax(zt / sl_temperature, dim=-1)[:, cols_t]
        sl = -(t_sl * torch.log(s_sl)).sum(dim=-1)
        s_sd = torch.softmax(zs / sd_temperature, dim=-1)[:, cols_s]
        t_sd = torch.softmax(zt / sd_temperature, dim=-1)[:, cols_t]
        cost = torch.cdist(t_sd, s_sd, p=1)
        values.append((had + sl_weight * sl).mean() + sd_weight * _sinkhorn(cost, sinkhorn_reg, sinkhorn_iters))
    return torch.stack(values).mean()


# ----------------------------------------------------------------------------------------- KL family
def _kl(log_a, log_b):
    """sum_v a (log a - log b) per position, 0 log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(dim=-1)


def divergence(student_logits, teacher_logits, labels, *, kind="forward", temperature=1.0, beta=0.5, skew=0.1):
    """Same-tokenizer divergence x T^2 on the full [B, S, V] logits, masked by the labels (the row
    at t predicts label t+1), mean over the answer tokens."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward":
        value = _kl(log_p, log_q)
    elif kind == "reverse":
        value = _kl(log_q, log_p)
    elif kind == "jsd":
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        value = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    elif kind == "skew_forward":
        value = _kl(log_p, torch.log(skew * log_p.exp() + (1 - skew) * log_q.exp()))
    elif kind == "skew_reverse":
        value = _kl(log_q, torch.log(skew * log_q.exp() + (1 - skew) * log_p.exp()))
    elif kind == "tvd":
        value = 0.5 * (log_q.exp() - log_p.exp()).abs().sum(dim=-1)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    mask = mask.to(value.device)
    return (value * mask).sum() / mask.sum() * temperature**2
