"""The same-tokenizer divergences with masked vocabulary entries (-inf logits), against float64 references.

A -inf logit is a vocabulary entry with probability exactly 0 on that side (a banned token, a padding
id masked out, a teacher cache that keeps only its top entries). The limits (docs/losses.md, "Masked
vocabulary entries"), with p the teacher's and q the student's distribution:

- an entry -inf on BOTH sides is outside both distributions: it contributes exactly 0 to every
  divergence and receives gradient 0;
- a term a log(a / b) with a = 0 is 0 (0 log 0 = 0), whatever b is;
- a term a log(a / b) with a > 0 = b is +inf, a real property of the divergence, not a NaN: forward
  KL(p || q) is +inf at a row where the student is -inf at an entry the teacher is not, and reverse
  KL(q || p) where the teacher is -inf at an entry the student is not. JSD, the skew divergences
  (alpha > 0) and TVD are always finite: their second argument mixes in the first;
- the gradient is the limit of the gradient as the masked logits go to -inf. It is finite for every
  kind and every mask, but one: reverse KL at a row where it is +inf, where the limit diverges (like
  the teacher's logit gap). That row's divergence is +inf in a whole neighbourhood of the student's
  logits: it contributes gradient 0, and its value, +inf, says so.

The reference is autograd through the masked formulation: log-ratios only where the weighting
probability is > 0, and torch.where on both sides so that no 0 * inf reaches the backward pass. It
shares no code with llm_recipes.losses.
"""
import pytest
import torch

from configs.distillation import distillation_config
from llm_recipes.losses import LossSpec, distillation_terms, kl_loss, table
from llm_recipes.losses.divergences import divergence_rows

NEG_INF = float("-inf")
RTOL = 1e-5
KINDS = table.DIVERGENCE_KINDS
KIND_TO_LOSS = {kind: table.by_divergence(kind).name for kind in KINDS}
SIDES = ("student", "teacher", "both")
BETA, ALPHA = 0.3, 0.2
# where the TRUE value is +inf: the side whose -inf entries sit in the divergence's denominator
INFINITE = {("forward", "student"), ("reverse", "teacher")}


# ----------------------------------------------------------------------------- reference (float64)

def masked_log(x):
    """log x, -inf where x = 0, with a backward that never divides by 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).log(), NEG_INF)


def ref_kl_rows(log_a, log_b):
    """sum_v a_v (log a_v - log b_v) per row over the entries with a_v > 0 (0 log 0 = 0, also where
    b_v = 0); +inf where a_v > 0 = b_v."""
    positive = log_a > NEG_INF
    la = torch.where(positive, log_a, 0.0)
    lb = torch.where(positive, log_b, 0.0)
    return torch.where(positive, la.exp() * (la - lb), 0.0).sum(-1)


def ref_rows(kind, zs, zt, temperature=1.0, beta=BETA, alpha=ALPHA):
    """The divergence of each row of zs [n, V] (student) and zt [n, V] (teacher), unscaled."""
    log_q, log_p = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if kind == "forward":
        return ref_kl_rows(log_p, log_q)
    if kind == "reverse":
        return ref_kl_rows(log_q, log_p)
    if kind == "jsd":
        log_m = masked_log(beta * p + (1 - beta) * q)
        return beta * ref_kl_rows(log_p, log_m) + (1 - beta) * ref_kl_rows(log_q, log_m)
    if kind == "skew_forward":
        return ref_kl_rows(log_p, masked_log(alpha * p + (1 - alpha) * q))
    if kind == "skew_reverse":
        return ref_kl_rows(log_q, masked_log(alpha * q + (1 - alpha) * p))
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def ref_rows_with_convention(kind, zs, zt, temperature=1.0, beta=BETA, alpha=ALPHA):
    """ref_rows, where a reverse-KL row that is +inf takes no gradient (its limit diverges): its
    student logits enter detached (torch.where's backward selects, so the NaN that autograd makes
    inside that row never reaches zs)."""
    plain = "reverse" if kind == "skew_reverse" and alpha == 0 else kind
    if plain == "reverse":
        with torch.no_grad():
            infinite = torch.isinf(ref_rows(kind, zs, zt, temperature, beta, alpha))
        zs = torch.where(infinite[:, None], zs.detach(), zs)
    return ref_rows(kind, zs, zt, temperature, beta, alpha)


# ----------------------------------------------------------------------------- helpers

def assert_close(actual, expected, rtol=RTOL):
    """Same +inf entries; elsewhere |a - e| <= rtol * max|e| (finite entries)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape
    assert not torch.isnan(actual).any() and not torch.isnan(expected).any()
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), (actual, expected)
    assert (actual[torch.isinf(actual)] > 0).all(), "only +inf is a divergence's value"
    finite = torch.isfinite(expected)
    a, e = actual[finite], expected[finite]
    if e.numel():
        scale = e.abs().max().clamp(min=1e-12)
        err = (a - e).abs().max()
        assert err <= rtol * scale, f"max error {err:.3e} > {rtol} x {scale:.3e}"


def masks(shape, seed, entries=3, masked_rows=0.6):
    """A bool mask [*shape]: in about `masked_rows` of the rows, `entries` random vocabulary entries."""
    g = torch.Generator().manual_seed(seed)
    *rows, vocab = shape
    mask = torch.zeros(shape, dtype=torch.bool).reshape(-1, vocab)
    for r in range(mask.shape[0]):
        if torch.rand((), generator=g) < masked_rows:
            mask[r, torch.randperm(vocab, generator=g)[:entries]] = True
    return mask.reshape(shape)


def masked_logits(batch, seq, vocab, side, seed):
    g = torch.Generator().manual_seed(seed)
    zs, zt = 3 * torch.randn(batch, seq, vocab, generator=g), 3 * torch.randn(batch, seq, vocab, generator=g)
    mask = masks((batch, seq, vocab), seed + 1)
    if side in ("student", "both"):
        zs[mask] = NEG_INF
    if side in ("teacher", "both"):
        zt[mask] = NEG_INF
    return zs.requires_grad_(), zt, mask


def answer_rows(labels):
    """(batch, row) of the rows that predict an answer token (causal: row t predicts label t + 1)."""
    b, t = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    return b, t


def expected_infinite(kind, side, skew=ALPHA):
    plain = {("skew_forward", 0.0): "forward", ("skew_reverse", 0.0): "reverse"}.get((kind, skew), kind)
    return (plain, side) in INFINITE


# ----------------------------------------------------------------------------- the row function

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", SIDES)
def test_divergence_rows_values_and_gradients(kind, side):
    """kl.divergence_rows (token selection's scores, the fused pass's rows): value per row, and
    d value / d (z_s / T), against autograd on the masked reference."""
    zs, zt, mask = masked_logits(1, 40, 17, side, seed=5)
    zs, zt, mask = zs.detach()[0], zt[0], mask[0]
    log_q, log_p = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    value, grad = divergence_rows(kind, log_q.clone(), log_p.clone(), BETA, ALPHA, with_grad=True)
    value_only, none = divergence_rows(kind, log_q.clone(), log_p.clone(), BETA, ALPHA)
    assert none is None
    z64 = zs.double().requires_grad_()
    ref = ref_rows_with_convention(kind, z64, zt.double())
    (g_ref,) = torch.autograd.grad(ref.sum(), z64)
    assert_close(value, ref)
    assert_close(value_only, ref)
    assert torch.isfinite(grad).all() and torch.isfinite(g_ref).all()
    assert_close(grad, g_ref)
    masked_rows = mask.any(-1)
    assert torch.isinf(ref[masked_rows]).all() == expected_infinite(kind, side)
    assert torch.isfinite(ref[~masked_rows]).all()
    if side == "both":  # outside both distributions: no gradient
        assert (grad[mask] == 0).all()


# ----------------------------------------------------------------------------- the public API

def ref_kl_loss(kind, zs, zt, labels, temperature, alpha=ALPHA):
    b, t = answer_rows(labels)
    rows = ref_rows_with_convention(kind, zs[b, t], zt[b, t], temperature, BETA, alpha)
    return temperature**2 * rows.sum() / rows.numel()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("side", SIDES)
def test_kl_loss_with_masked_entries(kind, temperature, side):
    labels = torch.full((3, 9), -100)
    labels[0, 2:7], labels[1, 5:9], labels[2, 1:4] = 1, 2, 3
    zs, zt, _ = masked_logits(3, 9, 19, side, seed=11)
    value = kl_loss(zs, zt, labels, kind=kind, temperature=temperature, beta=BETA, skew=ALPHA, chunk_size=4)
    (grad,) = torch.autograd.grad(value, zs)
    with torch.no_grad():
        evaluated = kl_loss(zs, zt, labels, kind=kind, temperature=temperature, beta=BETA, skew=ALPHA)
    z64 = zs.detach().double().requires_grad_()
    ref = ref_kl_loss(kind, z64, zt.double(), labels, temperature)
    (g_ref,) = torch.autograd.grad(ref, z64)
    assert torch.isinf(ref).item() == expected_infinite(kind, side)  # +inf: the true value
    assert_close(value, ref)
    assert_close(evaluated, ref)
    assert torch.isfinite(grad).all() and torch.isfinite(g_ref).all()
    assert_close(grad, g_ref)


@pytest.mark.parametrize("kind", ["skew_forward", "skew_reverse"])
@pytest.mark.parametrize("side", SIDES)
def test_skew_with_alpha_zero_is_the_plain_divergence_with_masked_entries(kind, side):
    """alpha = 0 makes the skew divergences forward / reverse KL, +inf and limits included."""
    labels = torch.full((2, 8), -100)
    labels[0, 3:8], labels[1, 1:5] = 1, 2
    zs, zt, _ = masked_logits(2, 8, 13, side, seed=21)
    plain = {"skew_forward": "forward", "skew_reverse": "reverse"}[kind]
    value = kl_loss(zs, zt, labels, kind=kind, skew=0.0, temperature=2.0)
    (grad,) = torch.autograd.grad(value, zs)
    plain_value = kl_loss(zs, zt, labels, kind=plain, temperature=2.0)
    (plain_grad,) = torch.autograd.grad(plain_value, zs)
    z64 = zs.detach().double().requires_grad_()
    ref = ref_kl_loss(plain, z64, zt.double(), labels, 2.0)
    (g_ref,) = torch.autograd.grad(ref, z64)
    assert torch.isinf(ref).item() == expected_infinite(kind, side, skew=0.0)
    for v, g in ((value, grad), (plain_value, plain_grad)):
        assert_close(v, ref)
        assert torch.isfinite(g).all()
        assert_close(g, g_ref)


@pytest.mark.parametrize("kind", KINDS)
def test_one_hot_rows(kind):
    """Teacher one-hot (every entry but one -inf): forward KL is the student's -log q(y); the same
    one-hot student gives exactly 0 for every kind, with gradient 0."""
    labels = torch.tensor([[-100, 1, 1, -100]])
    zs = 3 * torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(0))
    zt = torch.full((1, 4, 7), NEG_INF)
    zt[0, :, 4] = 2.0
    zs.requires_grad_()
    kw = dict(kind=kind, beta=BETA, skew=ALPHA)
    value = kl_loss(zs, zt, labels, **kw)
    (grad,) = torch.autograd.grad(value, zs)
    assert torch.isfinite(grad).all()
    z64 = zs.detach().double().requires_grad_()
    ref = ref_kl_loss(kind, z64, zt.double(), labels, 1.0)
    (g_ref,) = torch.autograd.grad(ref, z64)
    assert_close(value, ref)
    assert_close(grad, g_ref)
    if kind == "forward":
        assert value.item() == pytest.approx(-torch.log_softmax(zs[0, :2].detach(), -1)[:, 4].mean().item(), rel=1e-6)
    if kind == "reverse":
        assert value.item() == float("inf")
    same = zt.clone().requires_grad_()
    value = kl_loss(same, zt, labels, **kw)
    (grad,) = torch.autograd.grad(value, same)
    assert value.item() == pytest.approx(0.0, abs=1e-7) and (grad == 0).all()  # jsd: log(b + (1 - b)) rounds


# ----------------------------------------------------------------------------- the trainer's engine

S_LEN, VOCAB, H, HT = 10, 21, 6, 5
MASKED_COLUMNS = (2, 5, 11, 17)


def masked_head(weight, column_mask):
    """A linear output layer that masks MASKED_COLUMNS (-inf) in the rows whose first feature is > 0."""
    def head(rows):
        return rows @ weight.t() + torch.where(rows[:, :1] > 0, column_mask, 0.0)
    return head


def column_mask(width, masked, dtype=torch.float32):
    mask = torch.zeros(width, dtype=dtype)
    if masked:
        mask[list(MASKED_COLUMNS)] = NEG_INF
    return mask


def engine_batch(side, seed, pad):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([v for v in range(VOCAB) if v not in MASKED_COLUMNS])  # CE stays finite
    labels = torch.full((3, S_LEN), -100)
    for b, (start, n) in enumerate([(2, 6), (5, 5), (1, 3)]):
        labels[b, start:start + n] = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
    hidden = torch.randn(3, S_LEN, H, generator=g).requires_grad_()
    t_hidden = torch.randn(3, S_LEN, HT, generator=g)
    t_hidden[..., 0] = hidden.detach()[..., 0]  # "both": the same rows masked on both sides
    w_s = torch.randn(VOCAB + pad, H, generator=g).requires_grad_()
    w_t = torch.randn(VOCAB + 2 * pad, HT, generator=g)
    return labels, hidden, t_hidden, w_s, w_t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("side", SIDES)
def test_engine_with_masked_entries(kind, temperature, side, monkeypatch):
    """The trainer's path: heads from hidden states, CE and the divergence fused in row blocks that
    cross chunk boundaries (temperature 1 without padding rows: CE and the divergence share the
    student's log-softmax), gradients w.r.t. the hidden states and the head."""
    from llm_recipes.losses import token_terms

    monkeypatch.setattr(token_terms, "block_rows", lambda width, device: 3)
    pad = 0 if temperature == 1 else 3
    labels, hidden, t_hidden, w_s, w_t = engine_batch(side, seed=3, pad=pad)
    config = distillation_config(temperature=temperature, jsd_beta=BETA, skew_alpha=ALPHA)
    spec = LossSpec.from_config(config, name=KIND_TO_LOSS[kind], student_vocab_size=VOCAB, teacher_vocab_size=VOCAB,
                                same_tokenizer=True, chunk_size=5)
    s_mask = column_mask(VOCAB + pad, side in ("student", "both"))
    t_mask = column_mask(VOCAB + 2 * pad, side in ("teacher", "both"))
    terms = distillation_terms(spec, hidden, labels, masked_head(w_s, s_mask), t_hidden, labels,
                               masked_head(w_t, t_mask))
    g_h, g_w = torch.autograd.grad(0.7 * terms.ce_sum + 1.3 * terms.distill_sum, (hidden, w_s))

    h64, w64 = hidden.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    z = masked_head(w64, s_mask.double())(h64.reshape(-1, H)).reshape(3, S_LEN, -1)
    zt = masked_head(w_t.double(), t_mask.double())(t_hidden.double().reshape(-1, HT)).reshape(3, S_LEN, -1)
    b, t = answer_rows(labels)
    ce = -torch.log_softmax(z[b, t], -1).gather(1, labels[b, t + 1][:, None]).sum()
    rows = ref_rows_with_convention(kind, z[b, t, :VOCAB], zt[b, t, :VOCAB], temperature)
    distill = temperature**2 * rows.sum()
    r_h, r_w = torch.autograd.grad(0.7 * ce + 1.3 * distill, (h64, w64))

    assert terms.distill_count == len(rows) == 14
    masked_rows = (h64[b, t, 0] > 0).sum().item()
    assert 0 < masked_rows < len(rows)
    assert torch.isinf(distill).item() == expected_infinite(kind, side)
    assert torch.isfinite(terms.ce_sum)
    assert_close(terms.ce_sum, ce)
    assert_close(terms.distill_sum, distill)
    assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all()
    assert torch.isfinite(r_h).all() and torch.isfinite(r_w).all()
    assert_close(g_h, r_h)
    assert_close(g_w, r_w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", SIDES)
def test_engine_divergence_token_selection_with_masked_entries(kind, side):
    """Token selection by the divergence scores masked rows (+inf ranks first, never NaN) and the step
    keeps finite gradients."""
    labels, hidden, t_hidden, w_s, w_t = engine_batch(side, seed=4, pad=0)
    config = distillation_config(token_selection="divergence", token_selection_ratio=0.5)
    spec = LossSpec.from_config(config, name=KIND_TO_LOSS[kind], student_vocab_size=VOCAB, teacher_vocab_size=VOCAB,
                                same_tokenizer=True, chunk_size=4)
    terms = distillation_terms(spec, hidden, labels, masked_head(w_s, column_mask(VOCAB, side != "teacher")),
                               t_hidden, labels, masked_head(w_t, column_mask(VOCAB, side != "student")))
    g_h, g_w = torch.autograd.grad(terms.ce_sum + terms.distill_sum, (hidden, w_s))
    assert terms.distill_count == 8  # ceil(0.5 m) of 6, 5, 3 answer rows
    assert not torch.isnan(terms.distill_sum) and torch.isinf(terms.distill_sum).item() == expected_infinite(kind, side)
    assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_engine_a_broken_teacher_row_makes_the_term_nan(kind, bad):
    """A NaN or +inf teacher logit (a broken teacher, not a masked entry) is never dropped by the
    divergences' 0 log 0 convention: the term is NaN, which the trainer reports naming it."""
    labels, hidden, t_hidden, w_s, w_t = engine_batch("student", seed=5, pad=0)
    spec = LossSpec.from_config(distillation_config(), name=KIND_TO_LOSS[kind], student_vocab_size=VOCAB,
                                teacher_vocab_size=VOCAB, same_tokenizer=True, chunk_size=4)
    clean = distillation_terms(spec, hidden, labels, masked_head(w_s, column_mask(VOCAB, False)), t_hidden, labels,
                               masked_head(w_t, column_mask(VOCAB, False)))
    broken_column = torch.zeros(VOCAB)
    broken_column[7] = bad
    terms = distillation_terms(spec, hidden, labels, masked_head(w_s, column_mask(VOCAB, False)), t_hidden, labels,
                               masked_head(w_t, broken_column))  # in the rows whose first feature is > 0
    assert torch.isfinite(clean.distill_sum) and torch.isnan(terms.distill_sum)
