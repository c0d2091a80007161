"""Loss library against plain float64 references written from the published definitions.

The references (llm_recipes.losses.reference) use the full softmax and a full sort and share no code
with the engine: they are the formulas of docs/losses.md, written obviously.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from configs.distillation import distillation_config
from conftest import DEVICE
from llm_recipes.errors import UserError
from llm_recipes.losses import (
    LossSpec,
    count_units,
    distillation_terms,
    kl_loss,
    multilevel_ot_loss,
    reference,
    table,
    uld_loss,
)

RTOL = 1e-5
KINDS = table.DIVERGENCE_KINDS
KIND_TO_LOSS = {kind: table.by_divergence(kind).name for kind in KINDS}


# ----------------------------------------------------------------------------- references (float64)
# llm_recipes.losses.reference: the formulas of docs/losses.md written obviously (also the benchmarks'
# naive baseline); the short names below keep the calls of this file readable.
answer_rows, paired = reference.answer_rows, reference.paired


def softmax(x):
    return torch.softmax(x, dim=-1)


def ref_ce_sum(z, labels, ed=False):
    return reference.cross_entropy_sum(z, labels, ed)


def ref_uld(zs, s_labels, zt, t_labels, ts=1.0, tt=1.0, skip_eos=True, s_ed=False, t_ed=False):
    return reference.uld(zs, s_labels, zt, t_labels, student_temperature=ts, teacher_temperature=tt,
                         skip_student_eos=skip_eos, student_encoder_decoder=s_ed, teacher_encoder_decoder=t_ed)


def ref_uld_top_k(zs, s_labels, zt, t_labels, k, skip_eos=True):
    return reference.uld(zs, s_labels, zt, t_labels, skip_student_eos=skip_eos, top_k=k)


def ref_divergence(p, q, kind, beta, alpha):
    return reference.divergence_of(p, q, kind, beta, alpha)


def ref_kl(zs, zt, labels, kind="forward", temperature=1.0, beta=0.5, alpha=0.1, ed=False, t_labels=None):
    return reference.divergence(zs, zt, labels, kind=kind, temperature=temperature, beta=beta, alpha=alpha,
                                encoder_decoder=ed, teacher_labels=t_labels)


def ref_multilevel_ot(zs, s_labels, zt, t_labels, *, skip_eos=True, ts=1.0, tt=1.0, s_ed=False, t_ed=False, **options):
    return reference.multilevel_ot(zs, s_labels, zt, t_labels, skip_student_eos=skip_eos, student_temperature=ts,
                                   teacher_temperature=tt, student_encoder_decoder=s_ed,
                                   teacher_encoder_decoder=t_ed, **options)


# ----------------------------------------------------------------------------- helpers

def make_labels(answer_lengths, seq_len, vocab, seed, prompt=None):
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((len(answer_lengths), seq_len), -100, dtype=torch.long)
    for b, n in enumerate(answer_lengths):
        start = prompt[b] if prompt else int(torch.randint(1, seq_len - n + 1, (1,), generator=g)) if n else 0
        labels[b, start:start + n] = torch.randint(0, vocab, (n,), generator=g)
    return labels


def logits(batch, seq, vocab, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(batch, seq, vocab, generator=g)).to(device=DEVICE, dtype=dtype).requires_grad_()


def assert_close(actual, expected, rtol=RTOL):
    """Elementwise |a - e| <= rtol * max|e| (relative to the tensor's scale; exact relative for scalars)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol} x {scale:.3e}"


def value_and_grad(fn, *tensors):
    value = fn(*tensors)
    grads = torch.autograd.grad(value, tensors)
    return value, grads


# ragged answers (student: one answer-free row, a single-token answer); teacher longer in row 0
S_LEN, T_LEN, VS, VT = 12, 14, 23, 31
S_ANS, T_ANS = [5, 0, 1, 4], [7, 3, 2, 2]


@pytest.fixture
def cross_batch():
    s_labels = make_labels(S_ANS, S_LEN, VS, seed=1)
    t_labels = make_labels(T_ANS, T_LEN, VT, seed=2)
    return logits(4, S_LEN, VS, 3), s_labels, logits(4, T_LEN, VT, 4).detach(), t_labels


# ----------------------------------------------------------------------------- ULD

@pytest.mark.device
@pytest.mark.parametrize("skip_eos", [True, False])
@pytest.mark.parametrize("temps", [(1.0, 1.0), (2.0, 0.5)])
def test_uld_matches_reference(cross_batch, skip_eos, temps):
    zs, sl, zt, tl = cross_batch
    ours, (g_ours,) = value_and_grad(lambda z: uld_loss(z, sl, zt, tl, student_temperature=temps[0],
                                                        teacher_temperature=temps[1], skip_student_eos=skip_eos), zs)
    zs64 = zs.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_uld(z, sl, zt.double(), tl, *temps, skip_eos=skip_eos), zs64)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert_close(ours, ref)
    assert_close(g_ours, g_ref)

@pytest.mark.device

def test_uld_teacher_vocab_smaller_than_student():
    sl, tl = make_labels([3, 2], 8, 40, 5), make_labels([2, 4], 9, 17, 6)
    zs, zt = logits(2, 8, 40, 7), logits(2, 9, 17, 8).detach()
    ours, (g,) = value_and_grad(lambda z: uld_loss(z, sl, zt, tl), zs)
    zs64 = zs.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_uld(z, sl, zt.double(), tl), zs64)
    assert_close(ours, ref)
    assert_close(g, g_ref)

@pytest.mark.device

def test_uld_bf16_inputs(cross_batch):
    zs, sl, zt, tl = cross_batch
    zs16 = zs.detach().bfloat16().requires_grad_()
    zt16 = zt.bfloat16()
    ours, (g,) = value_and_grad(lambda z: uld_loss(z, sl, zt16, tl), zs16)
    zs64 = zs16.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_uld(z, sl, zt16.double(), tl), zs64)
    assert ours.dtype == torch.float32
    assert_close(ours, ref)
    assert g.dtype == torch.bfloat16  # the gradient has the input's dtype: compare at bf16 precision
    assert_close(g, g_ref, rtol=2**-8)

@pytest.mark.device

def test_uld_encoder_decoder_has_no_shift():
    sl, tl = make_labels([3, 1], 6, 11, 9, prompt=[0, 2]), make_labels([4, 2], 7, 13, 10, prompt=[0, 1])
    zs, zt = logits(2, 6, 11, 11), logits(2, 7, 13, 12).detach()
    ours, (g,) = value_and_grad(lambda z: uld_loss(z, sl, zt, tl, encoder_decoder=True), zs)
    zs64 = zs.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_uld(z, sl, zt.double(), tl, s_ed=True, t_ed=True), zs64)
    assert_close(ours, ref)
    assert_close(g, g_ref)
    causal = ref_uld(zs.detach().double(), sl, zt.double(), tl)
    assert not torch.isclose(ours.double(), causal, rtol=1e-3)  # the shift matters here


@pytest.mark.device
@pytest.mark.parametrize("k", [1, 4, 17, 40])
def test_uld_top_k_matches_its_definition_and_bounds_exact(cross_batch, k):
    zs, sl, zt, tl = cross_batch
    ours, (g,) = value_and_grad(lambda z: uld_loss(z, sl, zt, tl, top_k=k), zs)
    zs64 = zs.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_uld_top_k(z, sl, zt.double(), tl, k), zs64)
    assert_close(ours, ref)
    assert_close(g, g_ref)
    exact = uld_loss(zs, sl, zt, tl)
    assert ours <= exact + 1e-6
    if k >= max(VS, VT):
        assert_close(ours, exact)


def test_uld_answer_free_batch_is_zero_not_nan():
    sl = torch.full((2, 6), -100)
    tl = make_labels([2, 2], 6, 9, 1)
    zs = logits(2, 6, 9, 2)
    value = uld_loss(zs, sl, logits(2, 6, 9, 3).detach(), tl)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(zs.grad).all() and zs.grad.abs().sum() == 0


def test_uld_normalisation_is_mean_of_sequence_means():
    """Two sequences of 1 and 3 paired positions: (d0 + mean(d1, d2, d3)) / 2, not the token mean."""
    sl = torch.full((2, 8), -100)
    sl[0, 3:5] = 1  # 2 answer tokens -> 1 after skipping EOS
    sl[1, 2:6] = 2  # 4 -> 3
    tl = sl.clone()
    zs, zt = logits(2, 8, 7, 4), logits(2, 8, 7, 5).detach()
    total = uld_loss(zs, sl, zt, tl).item()

    def single(b, row):
        lab = torch.tensor([[-100, 0]])  # one answer token, predicted by the first row
        return uld_loss(zs[b:b + 1, row:row + 2], lab, zt[b:b + 1, row:row + 2], lab, skip_student_eos=False).item()

    d0 = single(0, 2)
    d1 = [single(1, r) for r in (1, 2, 3)]
    assert total == pytest.approx((d0 + sum(d1) / 3) / 2, rel=1e-6)
    assert total != pytest.approx((d0 + sum(d1)) / 4, rel=1e-3)


# ----------------------------------------------------------------------------- KL family

@pytest.mark.device
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_family_matches_reference(kind, temperature):
    labels = make_labels([5, 0, 1, 4], S_LEN, VS, seed=7)
    zs, zt = logits(4, S_LEN, VS, 8), logits(4, S_LEN, VS, 9).detach()
    kw = dict(kind=kind, temperature=temperature, beta=0.3, skew=0.2)
    ours, (g,) = value_and_grad(lambda z: kl_loss(z, zt, labels, **kw), zs)
    zs64 = zs.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_kl(z, zt.double(), labels, kind, temperature, 0.3, 0.2), zs64)
    assert_close(ours, ref)
    assert_close(g, g_ref)


@pytest.mark.device
@pytest.mark.parametrize("kind", ["forward", "jsd", "tvd"])
def test_kl_bf16_and_encoder_decoder(kind):
    labels = make_labels([3, 2, 1], 7, 19, seed=3, prompt=[0, 4, 6])
    zs = logits(3, 7, 19, 1, torch.bfloat16)
    zt = logits(3, 7, 19, 2, torch.bfloat16).detach()
    ours, (g,) = value_and_grad(lambda z: kl_loss(z, zt, labels, kind=kind, encoder_decoder=True), zs)
    zs64 = zs.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_kl(z, zt.double(), labels, kind, ed=True), zs64)
    assert_close(ours, ref)
    assert_close(g, g_ref, rtol=2**-8)


def test_kl_shift_and_token_mean():
    """Identical predicting rows give 0 only with the causal shift; the mean is over tokens."""
    labels = torch.full((2, 6), -100)
    labels[0, 2:4] = 1
    labels[1, 5] = 2
    zt = logits(2, 6, 5, 1).detach()
    zs = logits(2, 6, 5, 2).detach().clone()
    rows = [(0, 1), (0, 2), (1, 4)]
    for b, r in rows:
        zs[b, r] = zt[b, r]
    assert kl_loss(zs, zt, labels).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_loss(zs, zt, labels, encoder_decoder=True).item() > 1e-3
    zs[1, 4] += torch.tensor([3.0, 0, 0, 0, 0])
    one = ref_kl(zs.double(), zt.double(), labels).item()
    assert kl_loss(zs, zt, labels).item() == pytest.approx(one, rel=1e-5)
    lone = ref_divergence(softmax(zt[1, 4].double()), softmax(zs[1, 4].double()), "forward", 0.5, 0.1).item()
    assert one == pytest.approx(lone / 3, rel=1e-9)  # token mean over 3 answer tokens


class Vocabulary:
    """A stand-in tokenizer: its vocabulary and length."""

    def __init__(self, tokens):
        self.tokens = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self):
        return dict(self.tokens)

    def __len__(self):
        return len(self.tokens)


def test_kl_vocab_padding_rows_are_truncated():
    labels = make_labels([3, 2], 6, 10, seed=1)
    zs, zt = logits(2, 6, 12, 2), logits(2, 6, 16, 3).detach()
    with pytest.raises(UserError, match="tokenizers="):
        kl_loss(zs, zt, labels)
    with pytest.raises(UserError, match="vocab_size=10 compares the first 10 ids"):
        kl_loss(zs, zt, labels, vocab_size=10)  # unchecked: it could compare unrelated ids
    same = (Vocabulary("abcdefghij"), Vocabulary("abcdefghij"))
    with pytest.raises(UserError, match="id 3 is 'd' for the student and 'x' for the teacher"):
        kl_loss(zs, zt, labels, tokenizers=(same[0], Vocabulary("abcxefghij")))
    ours, (g,) = value_and_grad(lambda z: kl_loss(z, zt, labels, tokenizers=same), zs)
    zs64 = zs.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_kl(z[..., :10], zt.double()[..., :10], labels), zs64)
    assert_close(ours, ref)
    assert_close(g, g_ref)
    assert g[..., 10:].abs().sum() == 0


def test_kl_bad_arguments():
    labels = make_labels([2], 5, 4, 0)
    zs, zt = logits(1, 5, 4, 1), logits(1, 5, 4, 2).detach()
    with pytest.raises(UserError, match="kind"):
        kl_loss(zs, zt, labels, kind="kld")
    with pytest.raises(UserError, match="jsd_beta"):
        kl_loss(zs, zt, labels, kind="jsd", beta=0.0)
    with pytest.raises(UserError, match="temperature"):
        kl_loss(zs, zt, labels, temperature=-1.0)
    with pytest.raises(UserError, match="batch, seq"):
        kl_loss(zs, zt[:, :4], labels)


# ----------------------------------------------------------------------------- MultiLevelOT

MLOT_CASES = {
    "paper_fast": dict(),
    "paper_greedy": dict(mode="greedy"),
    "temperatures": dict(ts=1.5, tt=0.7, sl_temperature=2.0, sd_temperature=3.0, sinkhorn_iters=5),
    "public_variants": dict(logit_norm="std", sl_form="public", sd_scale=0.001, sinkhorn_iters=10),
    "public_greedy": dict(mode="greedy", logit_norm="std", sl_form="public"),
    "token_ranking": dict(ranking="token"),
    "no_eos_skip": dict(skip_eos=False, sd_weight=0.5),
}


@pytest.mark.device
@pytest.mark.parametrize("case", sorted(MLOT_CASES))
def test_multilevel_ot_matches_reference(cross_batch, case):
    zs, sl, zt, tl = cross_batch
    kw = dict(MLOT_CASES[case])
    kw.setdefault("top_k", 6)
    api = {("student_temperature" if k == "ts" else "teacher_temperature" if k == "tt" else
            "skip_student_eos" if k == "skip_eos" else k): v for k, v in kw.items()}
    ours, (g,) = value_and_grad(lambda z: multilevel_ot_loss(z, sl, zt, tl, **api), zs)
    zs64 = zs.detach().double().requires_grad_()
    ref, (g_ref,) = value_and_grad(lambda z: ref_multilevel_ot(z, sl, zt.double(), tl, **kw), zs64)
    assert_close(ours, ref)
    assert_close(g, g_ref)

@pytest.mark.device

def test_multilevel_ot_top_k_capped_by_vocabulary_and_bf16():
    sl, tl = make_labels([3, 1], 7, 9, 1), make_labels([2, 3], 8, 12, 2)
    zs, zt = logits(2, 7, 9, 3, torch.bfloat16), logits(2, 8, 12, 4, torch.bfloat16).detach()
    for mode in ("fast", "greedy"):
        ours, (g,) = value_and_grad(lambda z: multilevel_ot_loss(z, sl, zt, tl, mode=mode), zs)  # k=50 > 9
        zs64 = zs.detach().double().requires_grad_()
        ref, (g_ref,) = value_and_grad(lambda z: ref_multilevel_ot(z, sl, zt.double(), tl, mode=mode), zs64)
        assert_close(ours, ref)
        assert_close(g, g_ref, rtol=2**-8)


def test_multilevel_ot_greedy_differs_from_fast(cross_batch):
    zs, sl, zt, tl = cross_batch
    fast = multilevel_ot_loss(zs, sl, zt, tl, top_k=6)
    greedy = multilevel_ot_loss(zs, sl, zt, tl, top_k=6, mode="greedy")
    assert greedy < fast  # greedy minimises each column's L1 distance: HAD can only go down


def test_multilevel_ot_bad_arguments(cross_batch):
    zs, sl, zt, tl = cross_batch
    with pytest.raises(UserError, match="multilevel_ot_mode"):
        multilevel_ot_loss(zs, sl, zt, tl, mode="optimal")
    with pytest.raises(UserError, match="ranking sequence"):
        multilevel_ot_loss(zs, sl, zt, tl, mode="greedy", ranking="token")
    with pytest.raises(UserError, match="sinkhorn_reg"):
        multilevel_ot_loss(zs, sl, zt, tl, sinkhorn_reg=0.0)


# ----------------------------------------------------------------------------- engine (trainer path)

H, HT = 6, 5


class CountingHead:
    """A linear output layer that checks it never sees more rows than one chunk."""

    def __init__(self, weight, max_rows):
        self.weight, self.max_rows, self.calls = weight, max_rows, 0

    def __call__(self, rows):
        assert rows.dim() == 2 and rows.shape[0] <= self.max_rows, rows.shape
        self.calls += 1
        return rows @ self.weight.t()


def engine_case(name, chunk, student_vocab=VS, teacher_vocab=VT, student_pad=3, teacher_pad=2, same=False,
                seed=0, dtype=torch.float32, s_ed=False, t_ed=False, **cfg):
    g = torch.Generator().manual_seed(seed)
    config = distillation_config(**{"alignment": "index", **cfg})
    spec = LossSpec.from_config(config, name=name, student_vocab_size=student_vocab, teacher_vocab_size=teacher_vocab,
                                same_tokenizer=same, student_encoder_decoder=s_ed, teacher_encoder_decoder=t_ed,
                                chunk_size=chunk)
    hidden = torch.randn(4, S_LEN, H, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_()
    w_s = torch.randn(student_vocab + student_pad, H, generator=g).to(DEVICE).requires_grad_()
    t_hidden = torch.randn(4, T_LEN, HT, generator=g).to(device=DEVICE, dtype=dtype)
    w_t = torch.randn(teacher_vocab + teacher_pad, HT, generator=g).to(DEVICE)
    s_labels = make_labels(S_ANS, S_LEN, student_vocab, seed + 1)
    t_labels = s_labels.clone() if same and T_LEN == S_LEN else make_labels(T_ANS, T_LEN, teacher_vocab, seed + 2)
    return spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels


def run_engine(spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels, chunk):
    s_head, t_head = CountingHead(w_s, chunk), CountingHead(w_t, chunk)
    terms = distillation_terms(spec, hidden, s_labels, s_head, t_hidden, t_labels, t_head)
    loss = 0.7 * terms.ce_sum + 1.3 * terms.distill_sum
    g_h, g_w = torch.autograd.grad(loss, (hidden, w_s))
    return terms, g_h, g_w


def reference_terms(ref_distill, spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels, distill_count):
    """CE over the full head width, the distillation term on the real vocabularies, as sums."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = w_s.detach().double().requires_grad_()
    z = h64 @ w64.t()
    zt = t_hidden.double() @ w_t.double().t()
    ce = ref_ce_sum(z, s_labels, spec.student_encoder_decoder)
    distill = ref_distill(z[..., :spec.student_vocab_size], zt[..., :spec.teacher_vocab_size]) * distill_count
    g_h, g_w = torch.autograd.grad(0.7 * ce + 1.3 * distill, (h64, w64))
    return ce, distill, g_h, g_w


def check_engine(case, ref_distill, chunk, expected_count):
    spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels = case
    terms, g_h, g_w = run_engine(spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels, chunk)
    assert (terms.ce_count, terms.distill_count) == count_units(spec, s_labels, t_labels)
    assert terms.distill_count == expected_count
    ce, distill, r_h, r_w = reference_terms(ref_distill, spec, hidden, w_s, t_hidden, w_t, s_labels, t_labels,
                                            terms.distill_count)
    assert terms.ce_count == sum(S_ANS)
    assert terms.ce_sum.dtype == terms.distill_sum.dtype == torch.float32
    assert_close(terms.ce_sum, ce)
    assert_close(terms.distill_sum, distill)
    rtol = RTOL if hidden.dtype == torch.float32 else 2**-8
    assert_close(g_h, r_h, rtol)
    assert_close(g_w, r_w, rtol if hidden.dtype == torch.float32 else 2e-2)


@pytest.mark.device
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_engine_uld(chunk):
    case = engine_case("uld", chunk)
    _, _, _, _, _, sl, tl = case
    check_engine(case, lambda z, zt: ref_uld(z, sl, zt, tl), chunk, expected_count=2)

@pytest.mark.device

def test_engine_uld_top_k_and_temperatures():
    case = engine_case("uld", 4, uld_top_k=5, student_temperature=2.0)
    _, _, _, _, _, sl, tl = case

    def ref(z, zt):
        return ref_uld_top_k(z / 2.0, sl, zt, tl, 5)

    check_engine(case, ref, 4, expected_count=2)


@pytest.mark.device
@pytest.mark.parametrize("mode,chunk", [("fast", 1), ("fast", 5), ("greedy", 3), ("greedy", 1000)])
def test_engine_multilevel_ot(mode, chunk):
    case = engine_case("multilevel_ot", chunk, multilevel_ot_mode=mode, top_k=7)
    spec, hidden, w_s, t_hidden, w_t, sl, tl = case
    longest = max(min(s - 1, t) for s, t in zip(S_ANS, T_ANS))  # a sequence is never split
    run_engine(spec, hidden, w_s, t_hidden, w_t, sl, tl, max(chunk, longest))
    check_engine(case, lambda z, zt: ref_multilevel_ot(z, sl, zt, tl, mode=mode, top_k=7), max(chunk, longest), 2)


@pytest.mark.device
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_engine_same_tokenizer_family_with_padding_rows(loss, chunk):
    """Same tokenizer, heads padded differently (like 151936 vs 152064): truncated to the tokenizer."""
    case = engine_case(loss, chunk, student_vocab=VS, teacher_vocab=VS, student_pad=3, teacher_pad=9, same=True,
                       temperature=2.0, jsd_beta=0.3, skew_alpha=0.2)
    spec, hidden, w_s, t_hidden, _, sl, _ = case
    t_hidden = torch.randn(4, S_LEN, HT, device=DEVICE)  # teacher sees the same tokens
    w_t = case[4]
    case = (spec, hidden, w_s, t_hidden, w_t, sl, sl)
    kind = {v: k for k, v in KIND_TO_LOSS.items()}[loss]
    check_engine(case, lambda z, zt: ref_kl(z, zt, sl, kind, 2.0, 0.3, 0.2), chunk, expected_count=sum(S_ANS))


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("rows_per_block", [1, 2, 1000])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_engine_same_tokenizer_shared_log_softmax_in_blocks(loss, rows_per_block, chunk, monkeypatch):
    """Temperature 1 and heads of the tokenizer's width: CE and the divergence share the student's
    log-softmax (and, for forward KL, its exp); row blocks smaller than a chunk, and a block that
    crosses the last paired row, give the reference values and gradients."""
    from llm_recipes.losses import token_terms

    monkeypatch.setattr(token_terms, "block_rows", lambda width, device: rows_per_block)
    case = engine_case(loss, chunk, student_vocab=VS, teacher_vocab=VS, student_pad=0, teacher_pad=0, same=True)
    spec, hidden, w_s, _, w_t, sl, _ = case
    case = (spec, hidden, w_s, torch.randn(4, S_LEN, HT), w_t, sl, sl)
    kind = {v: k for k, v in KIND_TO_LOSS.items()}[loss]
    check_engine(case, lambda z, zt: ref_kl(z, zt, sl, kind), chunk, expected_count=sum(S_ANS))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_kl_loss_leaves_the_callers_logits_unchanged(requires_grad):
    """The fused CE/divergence overwrites the logits buffers it is given: the API must hand it copies."""
    zs = torch.randn(3, 7, VS, requires_grad=requires_grad)
    zt = torch.randn(3, 7, VS)
    labels = make_labels([4, 0, 6], 7, VS, 0)
    before = zs.detach().clone(), zt.clone()
    for chunk in (2, 1000):
        value = kl_loss(zs, zt, labels, chunk_size=chunk)
        if requires_grad:
            value.backward()
    assert torch.equal(zs.detach(), before[0]) and torch.equal(zt, before[1])


class NewTensors(TorchDispatchMode):
    """Records the size of every tensor an op allocates (outputs that share no memory with its inputs)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("loss", ["sft", "kl", "jsd"])
def test_same_tokenizer_step_allocates_only_the_logits(loss, monkeypatch):
    """Forward + backward of CE and a same-tokenizer divergence allocate [rows, vocab] tensors only for
    the student's and the teacher's logits: every log-softmax, exp and gradient lives in row blocks or
    in those two buffers."""
    from llm_recipes.losses import token_terms

    monkeypatch.setattr(token_terms, "block_rows", lambda width, device: 2)
    rows, vocab, hidden_size = 24, 400, 4
    spec = LossSpec.from_config(distillation_config(alignment="index"), name="none" if loss == "sft" else loss,
                                student_vocab_size=vocab, teacher_vocab_size=vocab, same_tokenizer=True,
                                chunk_size=1000)
    labels = make_labels([rows], rows + 1, vocab, 0)  # rows answer rows after the causal shift
    hidden = torch.randn(1, rows + 1, hidden_size, requires_grad=True)
    w = torch.randn(vocab, hidden_size, requires_grad=True)
    with NewTensors() as mode:
        terms = distillation_terms(spec, hidden, labels, lambda r: r @ w.t(), torch.randn(1, rows + 1, hidden_size),
                                   labels, lambda r: r @ w.detach().t())
        (terms.ce_sum + terms.distill_sum).backward()
    large = [n for n in mode.sizes if n >= rows * vocab // 2]
    assert large == ([rows * vocab] if loss == "sft" else [rows * vocab] * 2), large


def test_engine_same_tokenizer_pairs_by_answer_index_with_different_prompts():
    """Teacher prompt longer than the student's (teacher-specific prompt), same answer tokens."""
    spec = LossSpec.from_config(distillation_config(alignment="index"), name="kl", student_vocab_size=VS, teacher_vocab_size=VS,
                                same_tokenizer=True, chunk_size=2)
    sl = make_labels([3, 2], 8, VS, 1, prompt=[2, 5])
    tl = torch.full((2, 11), -100)
    tl[0, 6:9] = sl[0, 2:5]
    tl[1, 3:5] = sl[1, 5:7]
    hidden, t_hidden = torch.randn(2, 8, H, requires_grad=True), torch.randn(2, 11, HT)
    w_s, w_t = torch.randn(VS, H), torch.randn(VS, HT)
    terms = distillation_terms(spec, hidden, sl, lambda r: r @ w_s.t(), t_hidden, tl, lambda r: r @ w_t.t())
    z, zt = hidden.detach().double() @ w_s.double().t(), t_hidden.double() @ w_t.double().t()
    assert terms.distill_count == 5
    assert_close(terms.distill_sum, 5 * ref_kl(z, zt, sl, t_labels=tl))
    tl[1, 4] = (tl[1, 4] + 1) % VS
    with pytest.raises(UserError, match="tokenized"):
        distillation_terms(spec, hidden, sl, lambda r: r @ w_s.t(), t_hidden, tl, lambda r: r @ w_t.t())


def test_engine_encoder_decoder_student_causal_teacher():
    case = engine_case("uld", 3, s_ed=True)
    spec, hidden, w_s, t_hidden, w_t, sl, tl = case
    sl = make_labels(S_ANS, S_LEN, VS, 11, prompt=[0, 0, 0, 0])  # decoder labels start at 0
    terms, g_h, g_w = run_engine(spec, hidden, w_s, t_hidden, w_t, sl, tl, 3)
    ce, distill, r_h, r_w = reference_terms(lambda z, zt: ref_uld(z, sl, zt, tl, s_ed=True), spec, hidden, w_s,
                                            t_hidden, w_t, sl, tl, terms.distill_count)
    assert_close(terms.ce_sum, ce)
    assert_close(terms.distill_sum, distill)
    assert_close(g_h, r_h)
    assert_close(g_w, r_w)

@pytest.mark.device

def test_engine_bf16_hidden():
    """A bf16 model: values equal the reference on the same bf16 logits, upcast. (Gradients in bf16
    are checked against the reference through an identity head in test_uld_bf16_inputs.)"""
    spec, hidden, w_s, t_hidden, w_t, sl, tl = engine_case("uld", 4, dtype=torch.bfloat16)
    w_s16, w_t16 = w_s.detach().bfloat16().requires_grad_(), w_t.bfloat16()
    terms = distillation_terms(spec, hidden, sl, lambda r: r @ w_s16.t(), t_hidden, tl, lambda r: r @ w_t16.t())
    g_h, g_w = torch.autograd.grad(terms.ce_sum + terms.distill_sum, (hidden, w_s16))
    z = (hidden.detach() @ w_s16.detach().t()).double()
    zt = (t_hidden @ w_t16.t()).double()
    assert terms.ce_sum.dtype == terms.distill_sum.dtype == torch.float32
    assert_close(terms.ce_sum, ref_ce_sum(z, sl))
    assert_close(terms.distill_sum, terms.distill_count * ref_uld(z[..., :VS], sl, zt[..., :VT], tl))
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    assert torch.isfinite(g_h.float()).all() and torch.isfinite(g_w.float()).all()


def test_engine_sft_only_and_answer_free_batch():
    spec = LossSpec.from_config(distillation_config(alignment="index"), name="none", student_vocab_size=VS, teacher_vocab_size=VS,
                                same_tokenizer=True, chunk_size=4)
    hidden = torch.randn(4, S_LEN, H, requires_grad=True)
    w = torch.randn(VS, H, requires_grad=True)
    sl = make_labels(S_ANS, S_LEN, VS, 3)
    terms = distillation_terms(spec, hidden, sl, lambda r: r @ w.t())
    assert (terms.ce_count, terms.distill_count) == (sum(S_ANS), 0) == count_units(spec, sl, sl)
    assert_close(terms.ce_sum, ref_ce_sum(hidden.detach().double() @ w.detach().double().t(), sl))
    assert terms.distill_sum.item() == 0
    empty = torch.full_like(sl, -100)
    uld = LossSpec.from_config(distillation_config(alignment="index"), name="uld", student_vocab_size=VS, teacher_vocab_size=VT,
                               same_tokenizer=False, chunk_size=4)
    terms = distillation_terms(uld, hidden, empty, lambda r: r @ w.t(), torch.randn(4, 5, HT), empty[:, :5],
                               lambda r: r @ torch.randn(VT, HT).t())
    (terms.ce_sum + terms.distill_sum).backward()  # still differentiable, reaches the head
    assert terms.ce_count == terms.distill_count == 0 and w.grad is not None and w.grad.abs().sum() == 0

@pytest.mark.device

def test_engine_eval_under_no_grad_matches_training_values():
    case = engine_case("multilevel_ot", 4, multilevel_ot_mode="greedy", top_k=5)
    spec, hidden, w_s, t_hidden, w_t, sl, tl = case
    train = distillation_terms(spec, hidden, sl, lambda r: r @ w_s.t(), t_hidden, tl, lambda r: r @ w_t.t())
    with torch.no_grad():
        ev = distillation_terms(spec, hidden, sl, lambda r: r @ w_s.t(), t_hidden, tl, lambda r: r @ w_t.t())
    assert ev.ce_sum.item() == train.ce_sum.item() and ev.distill_sum.item() == train.distill_sum.item()
    assert ev.distill_sum.grad_fn is None


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("loss", ["uld", "multilevel_ot", "kl"])
def test_engine_never_builds_batch_seq_vocab(loss):
    batch, seq, vocab, hidden_size, chunk = 8, 64, 500, 4, 8
    spec = LossSpec.from_config(distillation_config(alignment="index"), name=loss, student_vocab_size=vocab, teacher_vocab_size=vocab,
                                same_tokenizer=True, chunk_size=chunk)
    labels = make_labels([6] * batch, seq, vocab, 0)  # 5 paired per sequence (EOS skipped), 6 for KL
    hidden = torch.randn(batch, seq, hidden_size, requires_grad=True)
    w = torch.randn(vocab, hidden_size, requires_grad=True)
    with LargestTensor() as mode:
        terms = distillation_terms(spec, hidden, labels, lambda r: r @ w.t(), torch.randn(batch, seq, hidden_size),
                                   labels, lambda r: r @ w.detach().t())
        (terms.ce_sum + terms.distill_sum).backward()
    assert mode.largest <= max(chunk * vocab, vocab * hidden_size), mode.largest
    assert mode.largest * 20 < batch * seq * vocab


def test_sort_descending_matches_torch_sort():
    """The integer (radix) sort of probabilities gives torch.sort's values, ties and exact zeros included."""
    from llm_recipes.losses.uld import sort_descending

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 40000, generator=g) * 30, dim=-1)  # many exact zeros (underflow)
    probs[:, 100:200] = probs[:, :1]  # ties
    for rows in (probs, probs.double(), probs[:, ::2]):
        values, order = sort_descending(rows)
        expected = torch.sort(rows, dim=-1, descending=True).values
        assert torch.equal(values, expected) and torch.equal(rows.gather(1, order), expected)
    assert (probs == 0).any()


class OpCounter(TorchDispatchMode):
    """Counts the torch ops run, by name (e.g. "sort")."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss,options", [("uld", {}), ("uld", {"uld_top_k": 3}),
                                          ("multilevel_ot", {"multilevel_ot_mode": "greedy", "top_k": 4})])
def test_engine_backward_recompute_reuses_sorts_and_teacher(loss, options):
    """Training (forward + backward's recompute of every chunk but the last) sorts and runs the teacher's
    head once per chunk, as evaluation does: the recompute reuses the chunk's plan. Values and
    gradients are checked above."""
    spec, hidden, w_s, t_hidden, w_t, sl, tl = engine_case(loss, 3, **options)
    rows = 1000

    def run(grad):
        s_head, t_head = CountingHead(w_s, rows), CountingHead(w_t, rows)
        with torch.set_grad_enabled(grad), OpCounter() as ops:
            terms = distillation_terms(spec, hidden, sl, s_head, t_hidden, tl, t_head)
            if grad:
                terms.distill_sum.backward()
        ranking_ops = {k: v for k, v in ops.counts.items() if k in ("sort", "topk", "_cdist_forward")}
        return s_head.calls, t_head.calls, ranking_ops

    (s_train, t_train, sorts_train), (s_eval, t_eval, sorts_eval) = run(True), run(False)
    assert s_eval > 1 and s_train == 2 * s_eval - 1  # the student's logits are recomputed, but the last chunk's
    assert t_train == t_eval > 0
    assert sorts_eval and all(sorts_eval.values())
    if loss == "multilevel_ot":  # the Sinkhorn cost [L, L] of each of the 2 sequences is differentiable: recomputed
        sorts_eval["_cdist_forward"] += 2
    assert sorts_train == sorts_eval


# ----------------------------------------------------------------------------- LossSpec / config

def test_spec_validation_messages():
    cfg = distillation_config(alignment="index")
    base = dict(student_vocab_size=10, teacher_vocab_size=12, same_tokenizer=False, chunk_size=8)
    with pytest.raises(UserError, match="must be one of auto, uld"):
        LossSpec.from_config(cfg, name="kd", **base)
    with pytest.raises(UserError, match="uld or multilevel_ot"):
        LossSpec.from_config(cfg, name="kl", **base)
    cfg = distillation_config(alignment="index", student_temperature=-1.0)
    with pytest.raises(UserError, match="student_temperature"):
        LossSpec.from_config(cfg, name="uld", **base)
    cfg = distillation_config(alignment="index", multilevel_ot_mode="2")
    with pytest.raises(UserError, match="multilevel_ot_mode"):
        LossSpec.from_config(cfg, name="multilevel_ot", **base)
    cfg = distillation_config(alignment="index", skew_alpha=1.0)
    with pytest.raises(UserError, match="skew_alpha"):
        LossSpec.from_config(cfg, name="skew_kl", **dict(base, teacher_vocab_size=10, same_tokenizer=True))
    with pytest.raises(UserError, match="logits_chunk_size"):
        LossSpec.from_config(distillation_config(alignment="index"), name="uld", **dict(base, chunk_size=0))


def test_spec_auto_and_defaults():
    cfg = distillation_config()
    same = LossSpec.from_config(cfg, student_vocab_size=10, teacher_vocab_size=10, same_tokenizer=True)
    by_index = LossSpec.from_config(distillation_config(alignment="index"), student_vocab_size=10,
                                    teacher_vocab_size=12, same_tokenizer=False)
    assert (same.name, by_index.name) == ("kl", "uld")
    assert (same.alignment, by_index.alignment) == ("index", "index")
    # across tokenizers auto is the projected teacher, paired by text, which needs the pair's projection map
    assert (table.auto_loss(True), table.auto_loss(False), table.auto_loss(False, "text"),
            table.auto_loss(False, "index")) == ("kl", "projected", "projected", "uld")
    projected = LossSpec.from_config(cfg, student_vocab_size=10, teacher_vocab_size=12, same_tokenizer=False)
    assert projected.name == "projected" and projected.options.projection is None  # the map: with_artifacts
    labels, groups = torch.tensor([[-100, 5, 6]]), torch.tensor([[-1, 0, 1]])
    with pytest.raises(ValueError, match="projection map"):
        distillation_terms(projected, torch.randn(1, 3, 10), labels, lambda h: h, torch.randn(1, 3, 12), labels,
                           lambda h: h, alignment={"student_groups": groups, "teacher_groups": groups,
                                                   "student_nodes": torch.tensor([[-1, 0, 0]])})
    assert set(table.LOSS_CHOICES) == {"auto", "uld", "multilevel_ot", "projected", "hybrid", "kl", "reverse_kl",
                                       "jsd", "skew_kl", "skew_reverse_kl", "tvd"}
    mlot = LossSpec.from_config(cfg, name="multilevel_ot", student_vocab_size=10, teacher_vocab_size=12,
                                same_tokenizer=False).options
    assert (mlot.top_k, mlot.sl_weight, mlot.sd_weight, mlot.sl_temperature, mlot.sd_temperature,
            mlot.sinkhorn_reg, mlot.sinkhorn_iters, mlot.mode) == (50, 0.1, 0.1, 1.0, 2.0, 0.1, 20, "fast")


def test_count_units_before_forward():
    spec = LossSpec.from_config(distillation_config(alignment="index"), name="uld", student_vocab_size=VS, teacher_vocab_size=VT,
                                same_tokenizer=False)
    sl, tl = make_labels(S_ANS, S_LEN, VS, 1), make_labels(T_ANS, T_LEN, VT, 2)
    # student answers 5, 0, 1, 4 -> usable 4, 0, 0, 3 after EOS; teacher 7, 3, 2, 2 -> sequences 0 and 3
    assert count_units(spec, sl, tl) == (10, 2)
    kl = LossSpec.from_config(distillation_config(alignment="index"), name="kl", student_vocab_size=VS, teacher_vocab_size=VS,
                              same_tokenizer=True)
    assert count_units(kl, sl, sl) == (10, 10)
    assert count_units(kl, sl, None) == (10, 0)
