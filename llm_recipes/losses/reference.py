"""Plain reference implementations of every loss: the formulas of docs/losses.md, written the obvious way.

One per loss, used twice: the tests call them in float64 and compare the engine's values and gradients
with theirs; the benchmarks time them in float32 as the naive published algorithm (full
[batch, seq, vocab] logits, a full-vocabulary softmax and sort, plain autograd through everything,
positions of the whole batch at once as the public code does). They share nothing with the engine
but the conventions: the causal shift (row t predicts label t + 1; encoder-decoder: row t predicts
label t), answers paired by index from their start and cropped to the shorter one, the student's
last answer position dropped by `skip_student_eos`, and the units (ULD / MultiLevelOT: the mean over
a sequence's paired positions, then over the sequences that have one; the KL family: the mean over
paired answer tokens). A batch with nothing paired gives a zero that keeps the graph.
"""
import math

import torch

from llm_recipes.losses.pairing import IGNORE_INDEX


# ------------------------------------------------------------------------------------------- pairing
def answer_rows(labels_row: torch.Tensor, encoder_decoder: bool = False) -> list[tuple[int, int]]:
    """[(row, target)] of one sequence, in order: the rows whose logits predict an answer token."""
    labels_row = [int(x) for x in labels_row]
    if encoder_decoder:
        return [(t, label) for t, label in enumerate(labels_row) if label != IGNORE_INDEX]
    return [(t, labels_row[t + 1]) for t in range(len(labels_row) - 1) if labels_row[t + 1] != IGNORE_INDEX]


def paired(student_labels, teacher_labels, skip_student_eos=False, student_encoder_decoder=False,
           teacher_encoder_decoder=False):
    """Per sequence b: (b, student [(row, target)], teacher [(row, target)]) paired by index."""
    for b in range(student_labels.shape[0]):
        s = answer_rows(student_labels[b], student_encoder_decoder)
        t = answer_rows(teacher_labels[b], teacher_encoder_decoder)
        if skip_student_eos:
            s = s[:-1]
        m = min(len(s), len(t))
        yield b, s[:m], t[:m]


def text_paired(student_labels, teacher_labels, student_groups, teacher_groups, student_encoder_decoder=False,
                teacher_encoder_decoder=False, student_nodes=None):
    """Per sequence b, pairs by text: the student row predicting each group's first token with the teacher row
    predicting that group's first token (with `student_nodes`: every student row whose token has a node >= 0,
    with its group's first teacher row; then the student entries are (row, target, node))."""
    for b in range(student_labels.shape[0]):
        s_rows = answer_rows(student_labels[b], student_encoder_decoder)
        t_rows = answer_rows(teacher_labels[b], teacher_encoder_decoder)
        shift_s, shift_t = (0 if student_encoder_decoder else 1), (0 if teacher_encoder_decoder else 1)
        first_teacher = {}
        for row, _ in t_rows:
            group = int(teacher_groups[b][row + shift_t])
            if group >= 0 and group not in first_teacher:
                first_teacher[group] = row
        s, t, seen = [], [], set()
        for row, target in s_rows:
            group = int(student_groups[b][row + shift_s])
            if group < 0 or group not in first_teacher:
                continue
            if student_nodes is None:
                if group in seen:
                    continue
                seen.add(group)
                s.append((row, target))
            else:
                node = int(student_nodes[b][row + shift_s])
                if node < 0:
                    continue
                s.append((row, target, node))
            t.append((first_teacher[group], None))
        yield b, s, t


def _pairs(student_labels, teacher_labels, skip_student_eos, student_encoder_decoder, teacher_encoder_decoder,
           groups=None):
    if groups is not None:
        return list(text_paired(student_labels, teacher_labels, groups[0], groups[1], student_encoder_decoder,
                                teacher_encoder_decoder))
    return list(paired(student_labels, teacher_labels, skip_student_eos, student_encoder_decoder,
                       teacher_encoder_decoder))


def paired_index(student_labels, teacher_labels, skip_student_eos=False, student_encoder_decoder=False,
                 teacher_encoder_decoder=False, groups=None):
    """-> (student rows [B, m], teacher rows [B, m], valid [B, m]), m the longest pairing of the batch; by
    index, or by text with `groups` = (student groups, teacher groups)."""
    pairs = _pairs(student_labels, teacher_labels, skip_student_eos, student_encoder_decoder,
                   teacher_encoder_decoder, groups)
    m = max([len(s) for _, s, _ in pairs] + [1])
    s_index = torch.zeros(len(pairs), m, dtype=torch.long)
    t_index = torch.zeros_like(s_index)
    valid = torch.zeros(len(pairs), m, dtype=torch.bool)
    for b, s, t in pairs:
        n = len(s)
        s_index[b, :n] = torch.tensor([pair[0] for pair in s], dtype=torch.long)
        t_index[b, :n] = torch.tensor([pair[0] for pair in t], dtype=torch.long)
        valid[b, :n] = True
    return s_index, t_index, valid


def gather_rows(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V], index [B, m] -> [B, m, V] (a copy, as the public code's roll and crop make)."""
    return logits.gather(1, index.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1]))


def per_sequence_mean(per_position: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's valid positions, then over the sequences that have one."""
    valid = valid.to(per_position.device)
    per_position = torch.where(valid, per_position, 0.0)
    counts = valid.sum(dim=1)
    used = counts > 0
    if not used.any():
        return per_position.sum() * 0.0
    return (per_position.sum(dim=1)[used] / counts[used]).mean()


def _softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (the tests); bf16 / fp16 logits are computed in fp32 (the trainer's rule)."""
    return logits if logits.dtype == torch.float64 else logits.float()


# ------------------------------------------------------------------------------------ cross-entropy
def cross_entropy_sum(logits, labels, encoder_decoder=False):
    """sum over answer rows of -log softmax(row)[target]."""
    total = logits.new_zeros(())
    for b in range(logits.shape[0]):
        for row, target in answer_rows(labels[b], encoder_decoder):
            total = total - torch.log_softmax(logits[b, row], dim=-1)[target]
    return total


# ---------------------------------------------------------------------------------------------- ULD
def uld(student_logits, student_labels, teacher_logits, teacher_labels, *, student_temperature=1.0,
        teacher_temperature=1.0, skip_student_eos=True, student_encoder_decoder=False,
        teacher_encoder_decoder=False, top_k=0, groups=None):
    """ULD: softmax, full sort, zero padding of the smaller vocabulary, L1 per paired position.
    `top_k > 0`: only the k largest of each side compared index by index, plus |tail_q - tail_p|.
    `groups` = (student groups, teacher groups): pairs by text (`text_paired`) instead of by index."""
    s_index, t_index, valid = paired_index(student_labels, teacher_labels, skip_student_eos,
                                           student_encoder_decoder, teacher_encoder_decoder, groups)
    q = _softmax(_at_least_fp32(gather_rows(student_logits, s_index)), student_temperature)
    with torch.no_grad():
        p = _softmax(_at_least_fp32(gather_rows(teacher_logits, t_index)), teacher_temperature)
    q = q.sort(dim=-1, descending=True).values
    p = p.sort(dim=-1, descending=True).values
    if top_k > 0:
        q, p = q[..., :top_k], p[..., :top_k]
    width = max(q.shape[-1], p.shape[-1])
    q_padded = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p_padded = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    distance = (q_padded - p_padded).abs().sum(dim=-1)
    if top_k > 0:
        distance = distance + ((1 - q.sum(dim=-1)) - (1 - p.sum(dim=-1))).abs()
    return per_sequence_mean(distance, valid)


# ---------------------------------------------------------------------------------------- KL family
def divergence_of(p, q, kind, beta=0.5, alpha=0.1):
    """One position's divergence of the KL family between probability vectors (0 log 0 = 0)."""
    def kl(a, b):
        return torch.where(a > 0, a * (torch.log(a) - torch.log(b)), 0.0).sum(dim=-1)

    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_forward":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_reverse":
        return kl(q, alpha * q + (1 - alpha) * p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(dim=-1)
    raise ValueError(f"unknown kind {kind!r}")


def divergence(student_logits, teacher_logits, labels, *, kind="forward", temperature=1.0, beta=0.5, alpha=0.1,
               encoder_decoder=False, teacher_labels=None):
    """Same-tokenizer divergence x T^2, mean over the paired answer tokens (teacher_labels: the teacher's
    own labels when its prompt differs; default the student's). As the public code, the softmaxes run
    over the full [batch, seq, vocab] logits before the answer rows are picked."""
    teacher_labels = labels if teacher_labels is None else teacher_labels
    s_index, t_index, valid = paired_index(labels, teacher_labels, False, encoder_decoder, encoder_decoder)
    q = gather_rows(_softmax(_at_least_fp32(student_logits), temperature), s_index)
    with torch.no_grad():
        p = gather_rows(_softmax(_at_least_fp32(teacher_logits), temperature), t_index)
    value = divergence_of(p, q, kind, beta, alpha)
    valid = valid.to(value.device)
    if not valid.any():
        return value.sum() * 0.0
    return torch.where(valid, value, 0.0).sum() / valid.sum() * temperature**2


# ------------------------------------------------------------------------------------- MultiLevelOT
def greedy_columns_python(teacher_columns, student_probs, k):
    """The public code's greedy matching: for each teacher column in order, a Python loop over every
    student column for the unused one with the smallest L1 distance (the first found wins ties)."""
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


def sinkhorn_distance(cost, reg, iters):
    """<P, C> for the entropic plan with uniform marginals: rows then columns normalised, `iters` times."""
    n_rows, n_cols = cost.shape
    plan = torch.exp(-cost / reg)
    for _ in range(iters):
        plan = plan / plan.sum(dim=1, keepdim=True) / n_rows
        plan = plan / plan.sum(dim=0, keepdim=True) / n_cols
    return (plan * cost).sum()


def _ranked_columns(q, p, k, mode, ranking, greedy_vocab_limit):
    """(student columns [L, k], teacher columns [L, k]) of one sequence."""
    if ranking == "token":
        return q.detach().argsort(dim=-1, descending=True)[:, :k], p.argsort(dim=-1, descending=True)[:, :k]
    cols_t = torch.argsort(p.sum(dim=0), descending=True)[:k]
    if mode == "fast":
        cols_s = torch.argsort(q.detach().sum(dim=0), descending=True)[:k]
    else:
        limit = greedy_vocab_limit or q.shape[1]
        cols_s = greedy_columns_python(p[:, cols_t], q.detach()[:, :limit], k)
    length = q.shape[0]
    return cols_s.expand(length, k), cols_t.expand(length, k)


def multilevel_ot(student_logits, student_labels, teacher_logits, teacher_labels, *, mode="fast", top_k=50,
                  sl_weight=0.1, sd_weight=0.1, sl_temperature=1.0, sd_temperature=2.0, sinkhorn_reg=0.1,
                  sinkhorn_iters=20, skip_student_eos=True, student_temperature=1.0, teacher_temperature=1.0,
                  ranking="sequence", logit_norm="none", sl_form="paper", sd_scale=1.0,
                  student_encoder_decoder=False, teacher_encoder_decoder=False, greedy_vocab_limit=None, groups=None):
    """MultiLevelOT per sequence: full-vocabulary softmaxes at each temperature, the ranking (the summed
    column mass, or each position's own top k), top-k columns, then HAD + sl_weight SL per position and
    sd_weight sd_scale x Sinkhorn distance per sequence; mean over sequences.

    `greedy_vocab_limit`: run the Python-loop greedy on the first that many student columns only (the
    full loop takes hours at real vocabularies); the benchmark then scales its time, not its value."""
    values = []
    for b, s, t in _pairs(student_labels, teacher_labels, skip_student_eos, student_encoder_decoder,
                          teacher_encoder_decoder, groups):
        if not s:
            continue
        zs = _at_least_fp32(student_logits[b, [r for r, _ in s]])
        with torch.no_grad():
            zt = _at_least_fp32(teacher_logits[b, [r for r, _ in t]])
        if logit_norm == "std":
            zs = zs / (zs.std(dim=-1, keepdim=True) + 1e-4)
            zt = zt / (zt.std(dim=-1, keepdim=True) + 1e-4)
        k = min(top_k, zs.shape[-1], zt.shape[-1])
        q, p = _softmax(zs, student_temperature), _softmax(zt, teacher_temperature)
        cols_s, cols_t = _ranked_columns(q, p, k, mode, ranking, greedy_vocab_limit)
        had = (q.gather(1, cols_s) - p.gather(1, cols_t)).abs().sum(dim=-1)
        q_sl = _softmax(zs, sl_temperature).gather(1, cols_s)
        p_sl = _softmax(zt, sl_temperature).gather(1, cols_t)
        if sl_form == "paper":
            sl = -(p_sl * torch.log(q_sl)).sum(dim=-1)
        else:
            sl = -(torch.softmax(q_sl, dim=-1) * torch.log_softmax(p_sl, dim=-1)).sum(dim=-1)
        q_sd = _softmax(zs, sd_temperature).gather(1, cols_s)
        p_sd = _softmax(zt, sd_temperature).gather(1, cols_t)
        cost = (p_sd[:, None, :] - q_sd[None, :, :]).abs().sum(dim=-1)  # [teacher row, student row]
        sd = sinkhorn_distance(cost, sinkhorn_reg, sinkhorn_iters)
        values.append((had + sl_weight * sl).mean() + sd_weight * sd_scale * sd)
    return torch.stack(values).mean() if values else student_logits.sum() * 0.0


# ---------------------------------------------------------------------------------- projected teacher
def projected_target(teacher_probs, node, projection_map, end=None):
    """The projected target of one row: sum p(v) into u over the node's pairs (v, u), normalised (None: no mass).
    `end` = (teacher EOS ids, student EOS id): at a root, the teacher's EOS probability goes to the student's EOS."""
    teacher_ids, student_ids = projection_map.node_pairs(node)
    target = teacher_probs.new_zeros(projection_map.student_vocab_size)
    for v, u in zip(teacher_ids.tolist(), student_ids.tolist()):
        target[u] += teacher_probs[v]
    if end is not None and node in projection_map.roots.tolist():
        for v in end[0]:
            target[end[1]] += teacher_probs[v]
    total = target.sum()
    return target / total if total > 0 else None


def continued_target(target, previous_probs, previous_id, node, projection_map, later=1.0):
    """projected_continuation: the target at a group's first student token when the group before starts with
    teacher token t (row probabilities `previous_probs`) and its student tokens lead to trie `node`: the teacher
    either wrote the group as it did and then the next row's target (weight p(t) x `later`, the probability of the
    group's other teacher tokens), or one longer token whose sigma continues the group's student tokens (weight
    p(v), into its next student token), normalised over both."""
    teacher_ids, student_ids = projection_map.node_pairs(node)
    longer = target.new_zeros(target.shape[0])
    for v, u in zip(teacher_ids.tolist(), student_ids.tolist()):
        longer[u] += previous_probs[v]
    wrote = previous_probs[previous_id] * later
    total = longer.sum() + wrote
    return (longer + wrote * target) / total if not total <= 0 else target  # NaN stays NaN


def projected(student_logits, student_labels, teacher_logits, teacher_labels, student_groups, teacher_groups,
              student_nodes, projection_map, *, kind="forward", temperature=1.0, beta=0.5, alpha=0.1,
              student_encoder_decoder=False, teacher_encoder_decoder=False, student_continuations=None, end=None):
    """The projected teacher: x T^2 KL-family divergence between the projected target and the student at
    every served student row, mean over the served rows (a row whose target has no mass counts, with 0).
    `student_continuations` [B, S] (projected_continuation): a row whose token has a continuation node takes
    `continued_target` with the row predicting the previous group's first teacher token; `end`: see
    `projected_target`."""
    values, count = [], 0
    shift_s, shift_t = (0 if student_encoder_decoder else 1), (0 if teacher_encoder_decoder else 1)
    for b, s, t in text_paired(student_labels, teacher_labels, student_groups, teacher_groups,
                               student_encoder_decoder, teacher_encoder_decoder, student_nodes):
        group_rows = {}  # group -> the teacher rows predicting its tokens, in order
        for row, _ in answer_rows(teacher_labels[b], teacher_encoder_decoder):
            if int(teacher_groups[b][row + shift_t]) >= 0:
                group_rows.setdefault(int(teacher_groups[b][row + shift_t]), []).append(row)
        first_teacher = {g: rows[0] for g, rows in group_rows.items()}
        for (s_row, _, node), (t_row, _) in zip(s, t):
            count += 1
            with torch.no_grad():
                p = _softmax(_at_least_fp32(teacher_logits[b, t_row]), temperature)
                target = projected_target(p, node, projection_map, end)
                following = int(student_continuations[b][s_row + shift_s]) if student_continuations is not None \
                    else -1
                group = int(student_groups[b][s_row + shift_s])
                if target is not None and following >= 0 and group - 1 in first_teacher:
                    previous_row = first_teacher[group - 1]
                    previous = _softmax(_at_least_fp32(teacher_logits[b, previous_row]), temperature)
                    previous_id = int(teacher_labels[b][previous_row + shift_t])
                    later = 1.0
                    for row in group_rows[group - 1][1:]:
                        later = later * _softmax(_at_least_fp32(teacher_logits[b, row]), temperature)[
                            int(teacher_labels[b][row + shift_t])]
                    target = continued_target(target, previous, previous_id, following, projection_map, later)
            if target is None:
                continue
            q = _softmax(_at_least_fp32(student_logits[b, s_row]), temperature)
            target = torch.nn.functional.pad(target, (0, q.shape[0] - target.shape[0]))[: q.shape[0]]
            values.append(divergence_of(target, q, kind, beta, alpha))
    if not values:
        return student_logits.sum() * 0.0
    return torch.stack(values).sum() / count * temperature**2


# --------------------------------------------------------------------------------------------- hybrid
def hybrid(student_logits, student_labels, teacher_logits, teacher_labels, student_groups, teacher_groups,
           teacher_shared, student_shared, *, temperature=1.0, beta=0.5, matched_weight=None, unmatched_weight=None,
           student_encoder_decoder=False, teacher_encoder_decoder=False):
    """GOLD's hybrid at every text-aligned pair: w_M JSD_beta on the shared tokens' probabilities (as they are)
    + w_U ULD on the other tokens' probabilities; mean over the pairs."""
    teacher_vocab = teacher_logits.shape[-1]
    w_m = matched_weight if matched_weight is not None else len(teacher_shared) / teacher_vocab
    w_u = unmatched_weight if unmatched_weight is not None else 1.0 - w_m
    t_shared, s_shared = list(map(int, teacher_shared)), list(map(int, student_shared))
    t_rest = [v for v in range(teacher_vocab) if v not in set(t_shared)]
    s_rest = [u for u in range(student_logits.shape[-1]) if u not in set(s_shared)]
    values = []
    for b, s, t in text_paired(student_labels, teacher_labels, student_groups, teacher_groups,
                               student_encoder_decoder, teacher_encoder_decoder):
        for (s_row, _), (t_row, _) in zip(s, t):
            q = _softmax(_at_least_fp32(student_logits[b, s_row]), temperature)
            with torch.no_grad():
                p = _softmax(_at_least_fp32(teacher_logits[b, t_row]), temperature)
            matched = divergence_of(p[t_shared], q[s_shared], "jsd", beta) if t_shared else q.sum() * 0.0
            q_u = q[s_rest].sort(descending=True).values
            p_u = p[t_rest].sort(descending=True).values
            width = max(len(q_u), len(p_u))
            unmatched = (torch.nn.functional.pad(q_u, (0, width - len(q_u)))
                         - torch.nn.functional.pad(p_u, (0, width - len(p_u)))).abs().sum()
            values.append(w_m * matched + w_u * unmatched)
    return torch.stack(values).mean() if values else student_logits.sum() * 0.0
