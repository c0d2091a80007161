"""llm_recipes.losses.cached_terms: CE + forward KL from top-K cache rows, against a float64 reference of the
coarsened divergence (the K ids and one tail bucket) with autograd, and against the dense path it replaces."""
import math

import pytest
import torch

from conftest import DEVICE
from llm_recipes import teacher_cache
from llm_recipes.losses import token_terms
from llm_recipes.losses.cached_terms import cached_forward_kl_sum
from llm_recipes.losses.token_terms import token_terms_sum

V, K = 50, 6


def cache_rows(teacher_logits: torch.Tensor, k: int, storage=torch.float32) -> torch.Tensor:
    """Packed rows [n, 2K + 1] as the writer stores them (log-probabilities in `storage`)."""
    ids, logprobs, tail = teacher_cache.summarize_rows(teacher_logits, k, 1.0, storage)
    return torch.cat([ids.float(), logprobs.float(), tail.float()[:, None]], dim=1)


def reference(z: torch.Tensor, targets: torch.Tensor, packed: torch.Tensor, k: int, weights: torch.Tensor):
    """float64: CE over every row + sum_r w_r KL(coarsened p_r || coarsened q_r) over the packed rows."""
    log_q = torch.log_softmax(z, dim=-1)
    ce = -log_q.gather(1, targets[:, None]).sum()
    distill = z.new_zeros(())
    for r in range(packed.shape[0]):
        ids = packed[r, :k].long()
        log_p, log_p_tail = packed[r, k:2 * k].double(), packed[r, 2 * k].double()
        log_total = torch.logsumexp(torch.cat([log_p, log_p_tail[None]]), dim=0)  # stored rows sum to 1 +- rounding
        log_p, log_p_tail = log_p - log_total, log_p_tail - log_total
        log_q_k = log_q[r, ids]
        keep = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
        keep[ids] = False
        log_q_tail = torch.logsumexp(log_q[r, keep], dim=0) if keep.any() else z.new_tensor(-math.inf)
        value = (log_p.exp() * (log_p - log_q_k)).sum()
        if log_p_tail > -math.inf:
            value = value + log_p_tail.exp() * (log_p_tail - log_q_tail)
        distill = distill + weights[r] * value
    return ce, distill


@pytest.mark.device
@pytest.mark.parametrize("k", [1, K, V])
@pytest.mark.parametrize("block", [2, 1000])
def test_values_and_gradients_match_the_float64_reference(k, block, monkeypatch):
    monkeypatch.setattr(token_terms, "block_rows", lambda width, device: block)
    monkeypatch.setattr("llm_recipes.losses.cached_terms.block_rows", lambda width, device: block)
    g = torch.Generator().manual_seed(k)
    n, paired = 9, 7
    z = (3 * torch.randn(n, V, generator=g, dtype=torch.float64))
    z[2, 0] = 30.0  # a confident row: its tail mass is ~1e-12, beyond 1 - sum(top K) in float32
    teacher = 3 * torch.randn(paired, V, generator=g)
    packed = cache_rows(teacher, k).double()
    targets = torch.randint(0, V, (n,), generator=g)
    weights = torch.rand(paired, generator=g, dtype=torch.float64)
    z, packed, targets, weights = (t.to(DEVICE) for t in (z, packed, targets, weights))

    ours_z = z.clone().requires_grad_()
    ce, distill = cached_forward_kl_sum(ours_z.clone(), targets, packed, k, weights)
    g_ours, = torch.autograd.grad(0.7 * ce + 1.3 * distill, ours_z)
    ref_z = z.clone().requires_grad_()
    r_ce, r_distill = reference(ref_z, targets, packed, k, weights)
    g_ref, = torch.autograd.grad(0.7 * r_ce + 1.3 * r_distill, ref_z)

    assert ce.item() == pytest.approx(r_ce.item(), rel=1e-10)
    assert distill.item() == pytest.approx(r_distill.item(), rel=1e-10)
    assert torch.allclose(g_ours, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("storage", [torch.float16, torch.float32])
def test_the_dense_student_shaped_tail_gives_the_same_terms(storage):
    """The engine's two paths for a cache (sparse here, the dense teacher row otherwise) agree in float32,
    also from float16 log-probabilities (which both renormalise)."""
    g = torch.Generator().manual_seed(1)
    n, paired = 12, 10
    z = 4 * torch.randn(n, V, generator=g)
    packed = cache_rows(4 * torch.randn(paired, V, generator=g), K, storage)
    targets = torch.randint(0, V, (n,), generator=g)
    weights = torch.rand(paired, generator=g)

    sparse_z = z.clone().requires_grad_()
    ce_s, kl_s = cached_forward_kl_sum(sparse_z.clone(), targets, packed, K, weights)
    g_s, = torch.autograd.grad(ce_s + 1.5 * kl_s, sparse_z)
    dense_z = z.clone().requires_grad_()
    zt = teacher_cache.dense_logits(packed, V, K, 1.0, z[:paired])
    ce_d, kl_d = token_terms_sum(dense_z.clone(), targets, zt, weights, "forward", 1.0)
    g_d, = torch.autograd.grad(ce_d + 1.5 * kl_d, dense_z)
    assert ce_s.item() == pytest.approx(ce_d.item(), rel=1e-6)
    assert kl_s.item() == pytest.approx(kl_d.item(), rel=1e-5)
    assert (g_s - g_d).abs().max().item() <= 1e-6


def test_only_the_used_terms_get_gradient_and_broken_rows_are_nan():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, V, generator=g, dtype=torch.float64)
    packed = cache_rows(torch.randn(3, V, generator=g), K).double()
    targets = torch.randint(0, V, (4,), generator=g)
    weights = torch.ones(3, dtype=torch.float64)
    for use in ("ce", "distill"):
        x = z.clone().requires_grad_()
        ce, distill = cached_forward_kl_sum(x.clone(), targets, packed, K, weights)
        grad, = torch.autograd.grad(ce if use == "ce" else distill, x)
        y = z.clone().requires_grad_()
        r_ce, r_distill = reference(y, targets, packed, K, weights)
        ref, = torch.autograd.grad(r_ce if use == "ce" else r_distill, y)
        assert torch.allclose(grad, ref, rtol=1e-9, atol=1e-12)
    broken = packed.clone()
    broken[1, K] = math.nan  # a NaN log-probability in one cache row
    _, distill = cached_forward_kl_sum(z.clone(), targets, broken, K, weights)
    assert math.isnan(distill.item())
