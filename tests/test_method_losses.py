"""Hidden-state, token-selection and feature-selection math against plain float64 references.

The references loop over rows, layer pairs and sequences and share no code with llm_recipes.losses
(the selection references reuse the logit-loss references of test_losses.py on the kept positions).
"""
import math

import pytest
import torch

from configs.distillation import distillation_config
from llm_recipes.errors import UserError
from llm_recipes.losses import LossSpec, count_units, distillation_terms
from llm_recipes.losses.hidden import hidden_distance_sum, hidden_row_pairs, hidden_states_sum
from llm_recipes.losses.selection import (
    correlation_loss,
    feature_selection_sum,
    kept_per_sequence,
    select_top,
    top_units,
    unit_scores,
)
from test_losses import (
    CountingHead,
    assert_close,
    make_labels,
    paired,
    ref_multilevel_ot,
    ref_uld,
    softmax,
)

RTOL = 1e-5




# ------------------------------------------------------------------------------------ hidden states
def ref_distance(s, t, distance):
    """One row, float64, written from the definition."""
    if distance == "mse":
        return sum((s[i] - t[i]) ** 2 for i in range(len(s))) / len(s)
    dot = sum(s[i] * t[i] for i in range(len(s)))
    return 1 - dot / (torch.sqrt(sum(x * x for x in s)) * torch.sqrt(sum(x * x for x in t)))


@pytest.mark.parametrize("distance", ["mse", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_distance_matches_reference_values_and_gradients(distance, dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g).to(dtype).requires_grad_()
    t = torch.randn(5, 7, generator=g).to(dtype)
    value = hidden_distance_sum(s, t, distance)
    (grad,) = torch.autograd.grad(value, s)
    s64 = s.detach().double().requires_grad_()
    ref = sum(ref_distance(s64[r], t[r].double(), distance) for r in range(5))
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert value.dtype == torch.float32
    assert_close(value, ref)
    assert_close(grad, ref_grad, RTOL if dtype == torch.float32 else 1e-2)


def test_hidden_distance_of_identical_rows_is_zero_and_zero_rows_give_no_nan():
    x = torch.randn(3, 4)
    assert hidden_distance_sum(x, x, "mse") == 0
    assert hidden_distance_sum(x, x, "cosine").abs() < 1e-6
    zeros = torch.zeros(2, 4, requires_grad=True)
    value = hidden_distance_sum(zeros, torch.randn(2, 4), "cosine")
    (grad,) = torch.autograd.grad(value, zeros)
    assert value == 2 and torch.isfinite(grad).all()
    assert hidden_distance_sum(torch.zeros(0, 4), torch.zeros(0, 4), "mse") == 0


def test_hidden_states_sum_averages_layer_pairs_over_projected_rows():
    """Two layer pairs, one projected (d_s=3 -> d_t=5), one not; rows from a ragged answer pairing."""
    g = torch.Generator().manual_seed(1)
    s_states = [torch.randn(2, 6, 3, generator=g, requires_grad=True) for _ in range(3)]
    t_states = [torch.randn(2, 8, 5, generator=g) for _ in range(2)] + [torch.randn(2, 8, 3, generator=g)]
    proj = torch.nn.Linear(3, 5).double()
    s_labels = torch.tensor([[-100, -100, 7, 8, 9, -100], [-100, 4, 5, -100, -100, -100]])
    t_labels = torch.tensor([[-100, -100, -100, -100, 7, 8, 9, 1], [-100, -100, -100, 4, 5, 6, -100, -100]])
    pairs = hidden_row_pairs({"labels": s_labels}, {"labels": t_labels}, alignment="answer_index",
                             skip_student_eos=False)

    def project(s, t, rows):
        return proj.float()(rows) if (s, t) == (1, 0) else rows

    value = hidden_states_sum(s_states, t_states, pairs, [(1, 0), (2, 2)], "mse", project)
    grads = torch.autograd.grad(value, [s_states[1], s_states[2]])
    # reference: causal rows t-1 predict label t; pair i-th answer rows; crop to the shorter answer
    s64 = [h.detach().double().requires_grad_() for h in s_states]
    p64 = torch.nn.Linear(3, 5).double()
    p64.load_state_dict(proj.state_dict())
    total = 0
    for b, s_rows, t_rows in paired(s_labels, t_labels, False):
        for (rs, _), (rt, _) in zip(s_rows, t_rows):
            a = ref_distance(p64(s64[1][b, rs]), t_states[0][b, rt].double(), "mse")
            c = ref_distance(s64[2][b, rs], t_states[2][b, rt].double(), "mse")
            total = total + (a + c) / 2
    ref_grads = torch.autograd.grad(total, [s64[1], s64[2]])
    assert pairs.count == 5  # sequence 0: min(3, 4) pairs, sequence 1: min(2, 3)
    assert_close(value, total)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)


def test_row_pairs_need_identical_tokens_without_alignment():
    s = {"labels": torch.tensor([[-100, 5, 6, 2]])}
    same = {"labels": torch.tensor([[-100, -100, 5, 6]])}  # teacher: longer prompt, no EOS
    other = {"labels": torch.tensor([[-100, -100, 5, 9]])}
    pairs = hidden_row_pairs(s, same)
    assert pairs.student_rows.tolist() == [0, 1] and pairs.teacher_rows.tolist() == [1, 2]
    with pytest.raises(UserError, match="hidden_alignment answer_index"):
        hidden_row_pairs(s, other)
    assert hidden_row_pairs(s, other, alignment="answer_index").count == 2  # EOS dropped, then cropped


def test_row_pairs_encoder_decoder_student_and_all_positions():
    s = {"labels": torch.tensor([[5, 6, 2, -100]])}  # decoder row t predicts label t
    t = {"labels": torch.tensor([[-100, -100, 5, 6, 7]])}
    pairs = hidden_row_pairs(s, t, alignment="answer_index", student_encoder_decoder=True)
    assert pairs.student_rows.tolist() == [0, 1] and pairs.teacher_rows.tolist() == [1, 2]
    ids = torch.tensor([[3, 4, 5, 0], [3, 4, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    assert hidden_row_pairs(batch, dict(batch), positions="all").student_rows.tolist() == [0, 1, 2, 4, 5]
    other = {**batch, "input_ids": ids.clone().index_fill_(1, torch.tensor([0]), 7)}
    with pytest.raises(UserError, match="inputs must be identical"):
        hidden_row_pairs(batch, other, positions="all")


# --------------------------------------------------------------------------------- feature selection
def ref_correlation(s, t, w, eps=1e-5):
    n, d = s.shape
    z = []
    for x in (s, t):
        cols = []
        for j in range(d):
            mean = sum(x[i, j] for i in range(n)) / n
            var = sum((x[i, j] - mean) ** 2 for i in range(n)) / n
            cols.append(torch.stack([(x[i, j] - mean) / torch.sqrt(var + eps) for i in range(n)]))
        z.append(torch.stack(cols, dim=1))
    total = 0
    for i in range(d):
        for j in range(d):
            c = sum(z[0][r, i] * z[1][r, j] for r in range(n)) / n
            total = total + ((c - 1) ** 2 if i == j else w * c**2)
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correlation_loss_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 3, generator=g).to(dtype).requires_grad_()
    t = (torch.randn(6, 3, generator=g) + 2).to(dtype)
    value = correlation_loss(s, t, 0.3)
    (grad,) = torch.autograd.grad(value, s)
    s64 = s.detach().double().requires_grad_()
    ref = ref_correlation(s64, t.double(), 0.3)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert_close(value, ref)
    assert_close(grad, ref_grad, 1e-4 if dtype == torch.float32 else 2e-2)
    assert correlation_loss(t.float(), t.float(), 0.0) < 1e-4  # a perfect match costs nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's --mixed_precision
        assert_close(correlation_loss(s, t, 0.3), ref)


def test_feature_sum_weights_by_rows_and_is_zero_below_two_rows():
    g = torch.Generator().manual_seed(3)
    s_states = [torch.randn(2, 5, 2, generator=g, requires_grad=True)]
    t_states = [torch.randn(2, 5, 4, generator=g)]
    rows = torch.tensor([0, 3, 6, 8])
    units = {(0, 0): torch.tensor([1, 3])}
    value = feature_selection_sum(s_states, t_states, rows, rows, [(0, 0)], units, 0.1)
    s_rows = s_states[0].reshape(-1, 2)[rows].double()
    t_rows = t_states[0].reshape(-1, 4)[rows][:, [1, 3]].double()
    assert_close(value, 4 * ref_correlation(s_rows, t_rows, 0.1))
    one = feature_selection_sum(s_states, t_states, rows[:1], rows[:1], [(0, 0)], units, 0.1)
    (grad,) = torch.autograd.grad(one, s_states[0])
    assert one == 0 and torch.equal(grad, torch.zeros_like(grad))


def test_unit_scores_and_top_units():
    grad = torch.tensor([[[1.0, -3.0, 0.5]], [[1.0, 1.0, 0.2]]])
    assert unit_scores(grad, "abs").tolist() == pytest.approx([2.0, 4.0, 0.7])
    assert unit_scores(grad, "signed").tolist() == pytest.approx([2.0, -2.0, 0.7])
    assert top_units(torch.tensor([0.1, 5.0, 3.0, 4.0]), 2).tolist() == [1, 3]  # increasing unit order


# ---------------------------------------------------------------------------------- token selection
def test_kept_per_sequence_is_an_exact_ceiling_with_at_least_one():
    m = torch.tensor([10, 3, 1, 0, 7])
    assert kept_per_sequence(m, 0.3).tolist() == [3, 1, 1, 0, 3]  # 0.3 * 10 is 3.0000000000000004 in floats
    assert kept_per_sequence(m, 1.0).tolist() == m.tolist()
    assert kept_per_sequence(m, 0.01).tolist() == [1, 1, 1, 0, 1]


def test_select_top_keeps_the_highest_of_each_sequence_and_breaks_ties_by_position():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 2.0, 1.0, 1.0])
    sequence = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    keep = select_top(scores, sequence, torch.tensor([2, 2]))
    assert keep.tolist() == [False, True, True, False, True, True, False]


VS, VT, H, HT = 23, 31, 8, 6
S_LEN, T_LEN = 12, 14
S_ANS, T_ANS = [6, 0, 1, 5], [7, 3, 2, 5]


def ref_scores(method, zs, zt, targets, spec):
    """float64 score of one paired position."""
    q, p = softmax(zs), softmax(zt)
    if method == "teacher_entropy":
        return -(p * torch.log(p)).sum()
    if method == "student_entropy":
        return -(q * torch.log(q)).sum()
    if method == "student_ce":
        return -torch.log(q[targets])
    if spec.name == "uld":
        width = max(len(q), len(p))
        qs = torch.cat([torch.sort(q, descending=True).values, q.new_zeros(width - len(q))])
        ps = torch.cat([torch.sort(p, descending=True).values, p.new_zeros(width - len(p))])
        return (qs - ps).abs().sum()
    return (p * (torch.log(p) - torch.log(q))).sum()  # forward KL, T = 1


def ref_kept_batches(method, ratio, zs, s_labels, zt, t_labels, spec, skip_eos, s_ed=False):
    """The kept pairs of each sequence laid out as encoder-decoder rows (no shift): (zs, labels, zt, labels)."""
    kept_rows = []
    for b, s, t in paired(s_labels, t_labels, skip_eos, s_ed, False):
        scores = [float(ref_scores(method, zs[b, rs].detach(), zt[b, rt], target, spec)) for (rs, target), (rt, _) in zip(s, t)]
        k = min(len(s), max(1, math.ceil(ratio * len(s) - 1e-9))) if s else 0
        best = sorted(sorted(range(len(s)), key=lambda i: (-scores[i], i))[:k])
        kept_rows.append([(s[i][0], t[i][0]) for i in best])
    width = max(1, max(len(r) for r in kept_rows))
    zs_k = torch.zeros(len(kept_rows), width, zs.shape[-1], dtype=zs.dtype)
    zt_k = torch.zeros(len(kept_rows), width, zt.shape[-1], dtype=zt.dtype)
    labels = torch.full((len(kept_rows), width), -100)
    for b, rows in enumerate(kept_rows):
        for i, (rs, rt) in enumerate(rows):
            zs_k[b, i] = zs[b, rs]
            zt_k[b, i] = zt[b, rt]
            labels[b, i] = 0
    return zs_k, labels, zt_k, sum(len(r) for r in kept_rows)


def selection_case(loss, method, ratio=0.5, chunk=3, **cfg):
    g = torch.Generator().manual_seed(7)
    config = distillation_config(alignment="index", token_selection=method, token_selection_ratio=ratio, **cfg)
    same = loss == "kl"
    vt, ht = (VS, H) if same else (VT, HT)
    spec = LossSpec.from_config(config, name=loss, student_vocab_size=VS, teacher_vocab_size=vt,
                                same_tokenizer=same, chunk_size=chunk)
    hidden = torch.randn(4, S_LEN, H, generator=g).requires_grad_()
    w_s = torch.randn(VS, H, generator=g).requires_grad_()
    t_hidden = torch.randn(4, T_LEN if not same else S_LEN, ht, generator=g)
    w_t = torch.randn(vt, ht, generator=g)
    s_labels = make_labels(S_ANS, S_LEN, VS, 11)
    t_labels = s_labels.clone() if same else make_labels(T_ANS, T_LEN, vt, 12)
    return spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels


@pytest.mark.parametrize("loss, method", [
    ("uld", "teacher_entropy"), ("uld", "divergence"), ("uld", "student_ce"),
    ("kl", "student_entropy"), ("kl", "divergence"), ("multilevel_ot", "teacher_entropy"),
])
def test_token_selection_matches_the_loss_on_the_kept_positions(loss, method):
    spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels = selection_case(loss, method, top_k=5)
    rows = 3 if loss != "multilevel_ot" else 10  # MultiLevelOT chunks hold whole sequences
    terms = distillation_terms(spec, hidden, s_labels, CountingHead(w_s, rows), t_hidden, t_labels,
                               CountingHead(w_t, rows))
    g_h, g_w = torch.autograd.grad(0.7 * terms.ce_sum + 1.3 * terms.distill_sum, (hidden, w_s))

    h64, w64 = hidden.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    zs, zt = h64 @ w64.t(), t_hidden.double() @ w_t.double().t()
    skip = spec.skip_student_eos and loss != "kl"
    zs_k, labels_k, zt_k, kept = ref_kept_batches(method, 0.5, zs, s_labels, zt, t_labels, spec, skip)
    if loss == "uld":
        ref = ref_uld(zs_k, labels_k, zt_k, labels_k, skip_eos=False, s_ed=True, t_ed=True) * terms.distill_count
    elif loss == "multilevel_ot":
        ref = ref_multilevel_ot(zs_k, labels_k, zt_k, labels_k, top_k=5, skip_eos=False, s_ed=True, t_ed=True)
        ref = ref * terms.distill_count
    else:
        ref = sum((softmax(zt_k[b, i]) * (torch.log(softmax(zt_k[b, i])) - torch.log(softmax(zs_k[b, i])))).sum()
                  for b in range(4) for i in range(labels_k.shape[1]) if labels_k[b, i] != -100)
    ce = sum(-torch.log(softmax(zs[b, r])[target]) for b in range(4)
             for r, target in [(r, int(s_labels[b, r + 1])) for r in range(S_LEN - 1) if s_labels[b, r + 1] != -100])
    r_h, r_w = torch.autograd.grad(0.7 * ce + 1.3 * ref, (h64, w64))
    assert terms.kept_positions == kept < terms.candidate_positions
    assert (terms.ce_count, terms.distill_count) == count_units(spec, s_labels, t_labels)
    sequences = int((labels_k != -100).any(dim=1).sum())
    assert terms.distill_count == (kept if loss == "kl" else sequences)  # tokens, or sequences with a kept pair
    assert_close(terms.ce_sum, ce)
    assert_close(terms.distill_sum, ref)
    assert_close(g_h, r_h, 1e-4)
    assert_close(g_w, r_w, 1e-4)


def test_token_selection_ratio_one_is_the_plain_loss():
    spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels = selection_case("uld", "student_ce", ratio=1.0)
    plain = LossSpec.from_config(distillation_config(alignment="index"), name="uld", student_vocab_size=VS, teacher_vocab_size=VT,
                                 same_tokenizer=False, chunk_size=3)
    a = distillation_terms(spec, hidden, s_labels, CountingHead(w_s, 3), t_hidden, t_labels, CountingHead(w_t, 3))
    b = distillation_terms(plain, hidden, s_labels, CountingHead(w_s, 3), t_hidden, t_labels, CountingHead(w_t, 3))
    assert_close(a.distill_sum, b.distill_sum)
    assert a.kept_positions == a.candidate_positions == b.kept_positions


def test_token_selection_refusals():
    config = distillation_config(alignment="index", token_selection="divergence")
    with pytest.raises(UserError, match="MultiLevelOT"):
        LossSpec.from_config(config, name="multilevel_ot", student_vocab_size=5, teacher_vocab_size=6,
                             same_tokenizer=False)
    config = distillation_config(alignment="index", token_selection="student_ce", token_selection_ratio=0.0)
    with pytest.raises(UserError, match="token_selection_ratio must be in"):
        LossSpec.from_config(config, name="uld", student_vocab_size=5, teacher_vocab_size=6, same_tokenizer=False)
