"""MultiLevelOT (Cui et al., AAAI 2025, arXiv 2412.14528), per-sequence math.

For one sequence of L paired positions (student logits [L, V_s], teacher logits [L, V_t]):

1. Optional logit normalisation (public code: z / (std(z) + 1e-4) per position; paper: none).
2. Base probabilities q = softmax(z_s / T_s), p = softmax(z_t / T_t).
3. Ranking (`ranking="sequence"`, paper): the teacher's columns ordered by their mass summed over
   the L positions, top k kept. Student columns: `mode="fast"` ranks its own columns the same way;
   `mode="greedy"` takes, for each kept teacher column in order, the unused student column with the
   smallest L1 distance to it over the L positions (ties: lowest student index, like the public
   code's loop). `ranking="token"` (public code before Feb 2026): each position's own top k of each
   side, in descending order.
   k is capped at the smaller vocabulary. The ranking itself is piecewise constant (no gradient).
4. On the ranked [L, k] matrices, probabilities taken at each term's temperature over the full
   vocabulary (not renormalised over the k columns), S student, T teacher:
     HAD = sum_j |S_j - T_j|                       per position, at T_s / T_t
     SL  = -sum_j T_j log S_j                      per position, at sl_temperature (paper)
           -sum_j softmax(S)_j log softmax(T)_j    (`sl_form="public"`: the public code's softmax over
                                                   the k probabilities, reverse direction)
     SD  = <P, C>, C[t, t'] = sum_j |T[t] - S[t']|_1 at sd_temperature, P the entropic transport
           plan with uniform marginals 1/L after `sinkhorn_iters` row/column normalisations of
           exp(-C / sinkhorn_reg) (computed in the log domain: same iterates, no underflow).
5. Sequence value = mean_l (HAD_l + sl_weight * SL_l) + sd_weight * sd_scale * SD.
   The caller multiplies by distil_factor (alpha; paper 0.15).

The [L, k] algebra runs in float64 (it is tiny); the [L, V] softmaxes run in fp32. The gradient
flows through the gathered probabilities and, for SD, through the unrolled Sinkhorn iterations
(as in the public code).
"""
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from llm_recipes.errors import UserError
from llm_recipes.losses.cross_entropy import cross_entropy_sum
from llm_recipes.losses.divergences import scaled
from llm_recipes.losses.family import Chunk, Family, choice, non_negative, positive, positive_int, row_chunks

MODES = ("fast", "greedy")
RANKINGS = ("sequence", "token")
LOGIT_NORMS = ("none", "std")
SL_FORMS = ("paper", "public")


@dataclass(frozen=True)
class MultiLevelOTOptions:
    mode: str = "fast"
    top_k: int = 50
    sl_weight: float = 0.1
    sd_weight: float = 0.1
    sl_temperature: float = 1.0
    sd_temperature: float = 2.0
    sinkhorn_reg: float = 0.1
    sinkhorn_iters: int = 20
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    ranking: str = "sequence"
    logit_norm: str = "none"
    sl_form: str = "paper"
    sd_scale: float = 1.0


class _GatheredLogSoftmax(torch.autograd.Function):
    """log_softmax(z / T) at columns idx, without materialising or saving the [n, V] result."""

    @staticmethod
    def forward(ctx, logits, idx, temperature):
        lse = torch.logsumexp(scaled(logits, temperature), dim=-1)
        ctx.temperature = temperature
        ctx.save_for_backward(logits, idx, lse)
        return logits.gather(1, idx) / temperature - lse[:, None]

    @staticmethod
    def backward(ctx, grad):
        logits, idx, lse = ctx.saved_tensors
        t = ctx.temperature
        grad_logits = (scaled(logits, t) - lse[:, None]).exp_().mul_(-grad.sum(dim=-1, keepdim=True))
        grad_logits.scatter_add_(1, idx, grad)
        return grad_logits if t == 1 else grad_logits.div_(t), None, None


def gathered_log_softmax(logits, idx, temperature):
    return _GatheredLogSoftmax.apply(logits, idx, temperature)


def std_normalize(logits):
    """The public code's normalisation: z / (std(z) + 1e-4), std unbiased over the vocabulary."""
    return logits / (logits.std(dim=-1, keepdim=True) + 1e-4)


def _greedy_columns(teacher_cols_probs, student_probs, k):
    """Greedy matching for one sequence: teacher_cols_probs [L, k], student_probs [L, V] -> [k] ids.

    All k x V L1 distances in one cdist call; the k picks are sequential (each excludes the
    previous ones), each an argmin over the vocabulary.
    """
    cost = torch.cdist(teacher_cols_probs.t()[None], student_probs.t()[None], p=1)[0]  # [k, V]
    picks = torch.empty(k, dtype=torch.long, device=cost.device)
    for j in range(k):
        pick = torch.argmin(cost[j])
        picks[j] = pick
        cost[:, pick] = float("inf")
    return picks


def _rank_columns(probs_s, probs_t, lengths, k, opts):
    """-> (student column ids [n, k], teacher column ids [n, k]) for every row."""
    if opts.ranking == "token":
        return probs_s.topk(k, dim=-1).indices, probs_t.topk(k, dim=-1).indices
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=probs_s.device),
                                  torch.as_tensor(lengths, device=probs_s.device))
    mass_t = probs_t.new_zeros(len(lengths), probs_t.shape[1]).index_add_(0, seq, probs_t)
    cols_t = mass_t.topk(k, dim=-1).indices  # [n_seq, k], descending mass
    if opts.mode == "fast":
        mass_s = probs_s.new_zeros(len(lengths), probs_s.shape[1]).index_add_(0, seq, probs_s)
        cols_s = mass_s.topk(k, dim=-1).indices
    else:
        cols_s = torch.empty_like(cols_t)
        start = 0
        for b, length in enumerate(lengths):
            rows = slice(start, start + length)
            cols_s[b] = _greedy_columns(probs_t[rows].gather(1, cols_t[b].expand(length, k)), probs_s[rows], k)
            start += length
    return cols_s[seq], cols_t[seq]


def _sinkhorn_distance(cost, reg, iters):
    """<P, C> for the entropic plan with uniform marginals, `iters` row-then-column scalings."""
    n_rows, n_cols = cost.shape
    log_a = -torch.log(cost.new_tensor(float(n_rows)))
    log_b = -torch.log(cost.new_tensor(float(n_cols)))
    log_plan = -cost / reg
    for _ in range(iters):
        log_plan = log_plan - (torch.logsumexp(log_plan, dim=1, keepdim=True) - log_a)
        log_plan = log_plan - (torch.logsumexp(log_plan, dim=0, keepdim=True) - log_b)
    return (log_plan.exp() * cost).sum()


class MultiLevelOTPlan(NamedTuple):
    """The non-differentiable part of a chunk (teacher side and ranking): all [n, k], made once."""

    student_columns: torch.Tensor  # [n, k] long, the student's ranked columns per row
    teacher: torch.Tensor  # [n, k] float64, teacher probabilities at teacher_temperature (HAD)
    teacher_sl: torch.Tensor  # [n, k] float64, teacher log-probabilities at sl_temperature
    teacher_sd: torch.Tensor  # [n, k] float64, teacher log-probabilities at sd_temperature


@torch.no_grad()
def multilevel_ot_plan(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    lengths: Sequence[int],
    opts: MultiLevelOTOptions,
) -> MultiLevelOTPlan:
    """Rank the columns of fp32 logits [n, V] (rows grouped by sequence, `lengths` rows each, all > 0)
    and gather the teacher's side of every term."""
    if opts.ranking == "token" and opts.mode == "greedy":
        raise ValueError("greedy matching needs ranking='sequence'")
    lengths = [int(x) for x in lengths]
    if opts.logit_norm == "std":
        student_logits = std_normalize(student_logits)
        teacher_logits = std_normalize(teacher_logits)
    k = min(opts.top_k, student_logits.shape[1], teacher_logits.shape[1])
    probs_s = torch.softmax(scaled(student_logits, opts.student_temperature), dim=-1)
    probs_t = torch.softmax(scaled(teacher_logits, opts.teacher_temperature), dim=-1)
    cols_s, cols_t = _rank_columns(probs_s, probs_t, lengths, k, opts)
    teacher = probs_t.gather(1, cols_t).double()
    del probs_s, probs_t

    def teacher_at(temperature):
        return gathered_log_softmax(teacher_logits, cols_t, temperature).double()

    return MultiLevelOTPlan(cols_s, teacher, teacher_at(opts.sl_temperature), teacher_at(opts.sd_temperature))


def multilevel_ot_sum(
    student_logits: torch.Tensor,
    plan: MultiLevelOTPlan,
    lengths: Sequence[int],
    opts: MultiLevelOTOptions,
) -> torch.Tensor:
    """Sum over sequences of the MultiLevelOT value, from the plan made of these logits (fp32 [n, V_s],
    rows grouped by sequence as in the plan). Differentiable w.r.t. student_logits."""
    lengths = [int(x) for x in lengths]
    if opts.logit_norm == "std":
        student_logits = std_normalize(student_logits)
    cols_s = plan.student_columns

    def student_at(temperature):
        return gathered_log_softmax(student_logits, cols_s, temperature).double()

    had = (student_at(opts.student_temperature).exp() - plan.teacher).abs().sum(dim=-1)
    log_s_sl = student_at(opts.sl_temperature)
    if opts.sl_form == "paper":
        sl = -(plan.teacher_sl.exp() * log_s_sl).sum(dim=-1)
    else:
        sl = -(torch.softmax(log_s_sl.exp(), dim=-1) * torch.log_softmax(plan.teacher_sl.exp(), dim=-1)).sum(dim=-1)
    per_row = had + opts.sl_weight * sl
    s_sd, t_sd = student_at(opts.sd_temperature).exp(), plan.teacher_sd.exp()

    total = per_row.new_zeros(())
    start = 0
    for length in lengths:
        rows = slice(start, start + length)
        value = per_row[rows].mean()
        if opts.sd_weight:
            cost = torch.cdist(t_sd[rows], s_sd[rows], p=1)
            sd = _sinkhorn_distance(cost, opts.sinkhorn_reg, opts.sinkhorn_iters)
            value = value + opts.sd_weight * opts.sd_scale * sd
        total = total + value
        start += length
    return total.float()


# ------------------------------------------------------------------------------------------- the family
def validate_multilevel_ot(opts: MultiLevelOTOptions) -> None:
    choice("multilevel_ot_mode", opts.mode, MODES)
    choice("multilevel_ot_ranking", opts.ranking, RANKINGS)
    choice("multilevel_ot_logit_norm", opts.logit_norm, LOGIT_NORMS)
    choice("multilevel_ot_sl_form", opts.sl_form, SL_FORMS)
    if opts.ranking == "token" and opts.mode == "greedy":
        raise UserError(
            "multilevel_ot_mode greedy (--f 2) matches columns over a sequence and needs "
            "--distillation_config.multilevel_ot_ranking sequence"
        )
    positive_int("--distillation_config.top_k", opts.top_k)
    positive_int("--distillation_config.sinkhorn_iters", opts.sinkhorn_iters)
    for field in ("sl_temperature", "sd_temperature", "sinkhorn_reg", "student_temperature", "teacher_temperature"):
        positive(field, getattr(opts, field))
    for field in ("sl_weight", "sd_weight", "sd_scale"):
        non_negative(field, getattr(opts, field))


class MultiLevelOTFamily(Family):
    """Ranks columns and transports over whole sequences: a chunk holds whole sequences (one longer than the
    chunk size is a chunk of its own)."""

    name = "MultiLevelOT"
    per_sequence = True
    teacher_temperature_field = "teacher_temperature"
    no_position_scores = "MultiLevelOT (per-sequence ranking and transport) has no per-position value"
    reads = ("student_temperature", "teacher_temperature", "top_k", "multilevel_ot_mode", "multilevel_ot_ranking",
             "multilevel_ot_logit_norm", "multilevel_ot_sl_form", "sinkhorn_iters", "sinkhorn_reg", "sl_weight",
             "sl_temperature", "sd_weight", "sd_temperature", "sd_scale")

    def options(self, loss, cfg, cache=None) -> MultiLevelOTOptions:
        opts = MultiLevelOTOptions(
            mode=cfg.multilevel_ot_mode, top_k=cfg.top_k, sl_weight=float(cfg.sl_weight),
            sd_weight=float(cfg.sd_weight), sl_temperature=float(cfg.sl_temperature),
            sd_temperature=float(cfg.sd_temperature), sinkhorn_reg=float(cfg.sinkhorn_reg),
            sinkhorn_iters=cfg.sinkhorn_iters, student_temperature=float(cfg.student_temperature),
            teacher_temperature=float(cfg.teacher_temperature), ranking=cfg.multilevel_ot_ranking,
            logit_norm=cfg.multilevel_ot_logit_norm, sl_form=cfg.multilevel_ot_sl_form, sd_scale=float(cfg.sd_scale))
        validate_multilevel_ot(opts)
        return opts

    def chunks(self, pairing, size):
        if not pairing.num_paired:
            return super().chunks(pairing, size)
        chunks, start, group = [], 0, []
        for length in (int(m) for m in pairing.pairs_per_sequence.tolist() if m > 0):
            if group and sum(group) + length > size:
                chunks.append(Chunk(start, start + sum(group), sum(group), tuple(group)))
                start, group = start + sum(group), []
            group.append(length)
        chunks.append(Chunk(start, start + sum(group), sum(group), tuple(group)))
        return chunks + row_chunks(pairing.num_paired, pairing.ce_count, pairing.num_paired, size)

    def terms(self, batch, chunk, checkpointed, z, targets):
        ce = cross_entropy_sum(z, targets) if batch.with_ce else z[:0].sum()
        zs = z[: chunk.paired, : batch.student_vocab(z)]
        opts = batch.options
        plan = batch.plan(chunk, checkpointed, lambda: multilevel_ot_plan(
            zs.detach(), batch.teacher_logits(chunk), chunk.lengths, opts))
        return ce, multilevel_ot_sum(zs, plan, chunk.lengths, opts)


MULTILEVEL_OT = MultiLevelOTFamily()
