"""fastortho.diagnostics against Monte Carlo (seed 000 Claims 5, 6, 8-10; seed 001).

Tolerances: a Monte Carlo mean is compared with theory within Z = 5 standard errors (a false alarm
rate below 1e-6 per check), plus, for the delta-method (second-order) formulas, a stated relative
allowance for their O(‖Σ‖²/ρ⁴) remainder. Every check fixes its generator seed.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastortho import diagnostics as D
from fastortho.reference import polar_svd

Z = 5.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ema_paths(mu: float, sigma: float, gamma: float, t: int, n: int, seed: int) -> torch.Tensor:
    """m_1..m_t of the EMA m_s = γ m_{s-1} + (1-γ) g_s, m_0 = 0, for n independent scalar paths."""
    g = mu + sigma * torch.randn(n, t, dtype=torch.float64, generator=_gen(seed))
    m = torch.zeros(n, dtype=torch.float64)
    out = []
    for s in range(t):
        m = gamma * m + (1 - gamma) * g[:, s]
        out.append(m)
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------
# orthogonality
# ---------------------------------------------------------------------------------------------
def test_orthogonality_error_zero_on_polar_factor_and_rms_of_sigma2():
    G = torch.randn(7, 12, dtype=torch.float64, generator=_gen(0))
    assert D.orthogonality_error(polar_svd(G)) < 1e-13
    assert D.orthogonality_error(polar_svd(G.mT)) < 1e-13  # tall: short side is the column side
    S = torch.tensor([1.2, 1.0, 0.5], dtype=torch.float64)
    X = torch.zeros(3, 5, dtype=torch.float64)
    X[range(3), range(3)] = S
    expect = math.sqrt(((S**2 - 1) ** 2).mean())
    assert D.orthogonality_error(X).item() == pytest.approx(expect, rel=1e-12)
    lo, hi = D.singular_band(X)
    assert (lo.item(), hi.item()) == pytest.approx((0.5, 1.2))


def test_orthogonality_error_rejects_vectors():
    with pytest.raises(ValueError):
        D.orthogonality_error(torch.ones(3))


# ---------------------------------------------------------------------------------------------
# momentum: Claims 5-6
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_momentum_bias_variance_mse_match_monte_carlo(gamma):
    mu, sigma, n = 1.5, 2.0, 40_000
    paths = _ema_paths(mu, sigma, gamma, 30, n, seed=1)
    for t in (1, 3, 10, 30):
        m = paths[:, t - 1]
        var = D.momentum_variance(sigma**2, gamma, t)
        bias = D.momentum_bias(mu, gamma, t)
        # standard errors of the sample mean and of the sample variance (Gaussian m_t)
        assert abs((m.mean() - mu) - bias) <= Z * math.sqrt(var / n)
        assert abs(m.var() - var) <= Z * var * math.sqrt(2 / (n - 1))
        mse = ((m - mu) ** 2).mean()
        se_mse = ((m - mu) ** 2).std() / math.sqrt(n)
        assert abs(mse - D.momentum_mse(mu, sigma**2, gamma, t)) <= Z * se_mse


def test_momentum_formulas_accept_tensors():
    t = torch.arange(1, 6)
    v = D.momentum_variance(1.0, 0.9, t)
    assert v.shape == (5,) and bool((v.diff() > 0).all())
    with pytest.raises(ValueError):
        D.momentum_bias(1.0, 1.0, 3)


def test_warmup_length_is_where_momentum_mse_crosses_sigma2():
    # r = μ²/σ² = 4, γ = 0.9: T* = ln(1.8 / (1.9·4 − 0.1)) / (2 ln 0.9) ≈ 6.77
    mu, sigma, gamma = 2.0, 1.0, 0.9
    T = D.warmup_length(mu**2 / sigma**2, gamma)
    assert T == pytest.approx(math.log(1.8 / 7.5) / (2 * math.log(0.9)))
    before, after = math.floor(T), math.ceil(T)
    assert D.momentum_mse(mu, sigma**2, gamma, before) > sigma**2
    assert D.momentum_mse(mu, sigma**2, gamma, after) < sigma**2
    # Monte Carlo: clearly above σ² well before T*, clearly below well after (and at the neighbours
    # of T*, agreement with the exact MSE within Z standard errors)
    n = 40_000
    paths = _ema_paths(mu, sigma, gamma, 20, n, seed=2)
    for t, side in ((2, +1), (before, 0), (after, 0), (14, -1)):
        err2 = (paths[:, t - 1] - mu) ** 2
        mse, se = err2.mean().item(), err2.std().item() / math.sqrt(n)
        assert abs(mse - D.momentum_mse(mu, sigma**2, gamma, t)) <= Z * se
        if side:
            assert side * (mse - sigma**2) > Z * se


def test_warmup_length_edge_cases():
    assert D.warmup_length(0.5, 0.9) == 0.0  # r ≤ 1: momentum wins from the first step
    assert D.warmup_length(0.01, 0.9) == 0.0  # the seed's r ≤ (1-γ)/(1+γ) case
    assert D.warmup_length(10.0, 0.0) == 0.0
    assert D.warmup_length(100.0, 0.99) > D.warmup_length(100.0, 0.9) > 0
    with pytest.raises(ValueError):
        D.warmup_length(-1.0, 0.9)


# ---------------------------------------------------------------------------------------------
# ortho-of-sum vs sum-of-ortho: Claims 8-9, seed 001
# ---------------------------------------------------------------------------------------------
def test_ema_weights():
    w = D.ema_weights(0.9, 50)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[-1] > w[0]
    assert D.ema_weights(0.9, 2000).square().sum().item() == pytest.approx(0.1 / 1.9, rel=1e-9)
    assert D.ema_weights(0.0, 4).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_direction_bias_matches_monte_carlo_vector_case():
    """Seed 001: normalize-after-averaging has bias × (1−γ)/(1+γ); normalize-before does not."""
    g = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    std = torch.tensor([0.05, 0.15, 0.10], dtype=torch.float64)
    gamma, T, n = 0.8, 40, 20_000
    post_th, pre_th = D.direction_bias(g, torch.diag(std**2), gamma)
    w = D.ema_weights(gamma, T)
    y = g + std * torch.randn(n, T, 3, dtype=torch.float64, generator=_gen(3))
    post = (w[None, :, None] * y).sum(1)
    post = post / post.norm(dim=-1, keepdim=True)
    pre = (w[None, :, None] * (y / y.norm(dim=-1, keepdim=True))).sum(1)
    sw2 = w.square().sum().item()  # finite-T weights: Σw² instead of the stationary (1−γ)/(1+γ)
    post_th = post_th * sw2 / ((1 - gamma) / (1 + gamma))
    for est, th in ((post, post_th), (pre, pre_th)):
        b = est.mean(0) - g / g.norm()
        se = est.std(0) / math.sqrt(n)
        # delta-method remainder O(‖Σ‖²/ρ⁴): allow 10% of the predicted bias
        assert bool(((b - th).abs() <= Z * se + 0.1 * th.abs().max()).all()), (b, th, se)
    assert pre_th[0] / post_th[0] == pytest.approx(1 / sw2)


def test_direction_bias_isotropic_scalar_sigma():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    post, pre = D.direction_bias(g, torch.tensor(0.01, dtype=torch.float64))
    # tr(P⊥ Σ) = 0.01 (one orthogonal direction), ρ² = 25
    assert torch.allclose(pre, -0.01 / 50 * g / 5)
    assert torch.equal(post, pre)  # gamma=None: one sample, no averaging


def _separated_matrix(m: int, n: int, sv: list[float], seed: int) -> torch.Tensor:
    gen = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return U[:, : len(sv)] @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ V[:, : len(sv)].mT


def test_ortho_bias_estimate_matches_monte_carlo_matrix_case():
    """Claim 9: msign of the EMA sum has Σw² times the bias of the EMA of msigns."""
    G = _separated_matrix(3, 5, [1.0, 0.7, 0.5], seed=4)
    s, gamma, T, n = 0.03, 0.7, 12, 6000
    w = D.ema_weights(gamma, T)
    post_th, pre_th = D.ortho_bias_estimate(G, s, gamma, t=T)
    mc = D.ortho_bias_monte_carlo(
        G, lambda k, gen: s * torch.randn(k, 3, 5, dtype=torch.float64, generator=gen), w, n, _gen(5)
    )
    for name, th in (("post", post_th), ("pre", pre_th)):
        b, se = mc[f"bias_{name}"], mc[f"se_{name}"]
        # O(s⁴/σ⁴) remainder: 15% of the predicted bias
        assert bool(((b - th).abs() <= Z * se + 0.15 * th.abs().max()).all()), (name, b, th)
    ratio = pre_th.norm() / post_th.norm()
    assert ratio.item() == pytest.approx(1 / w.square().sum().item(), rel=1e-9)
    # sum-of-ortho's bias is the larger one, measured too
    assert mc["bias_pre"].norm() > 2 * mc["bias_post"].norm()


def test_ortho_bias_estimate_rank1_reduces_to_vector_formula():
    # a 1×n matrix: msign(g) = g/‖g‖, so the matrix estimate equals seed 001's vector formula
    g = torch.tensor([[0.6, 0.8, 0.0, 0.0]], dtype=torch.float64)
    s = 0.05
    _, pre = D.ortho_bias_estimate(g, s)
    _, pre_vec = D.direction_bias(g.reshape(-1), torch.tensor(s**2, dtype=torch.float64))
    assert torch.allclose(pre.reshape(-1), pre_vec, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Riemannian variance: Claim 10
# ---------------------------------------------------------------------------------------------
def _random_spd(d: int, seed: int) -> torch.Tensor:
    A = torch.randn(d, d, dtype=torch.float64, generator=_gen(seed))
    return A @ A.mT + d * torch.eye(d, dtype=torch.float64)


def _sym_pow(A: torch.Tensor, p: float) -> torch.Tensor:
    e, V = torch.linalg.eigh(A)
    return (V * e.pow(p)) @ V.mT


def test_riemannian_variance_two_points_is_geodesic_midpoint():
    A, B = _random_spd(4, 6), _random_spd(4, 7)
    var, mean = D.riemannian_variance(torch.stack([A, B]))
    ra, ira = _sym_pow(A, 0.5), _sym_pow(A, -0.5)
    mid = ra @ _sym_pow(ira @ B @ ira, 0.5) @ ra  # A # B
    d2 = torch.linalg.matrix_norm(D.spd_log(ira @ B @ ira)) ** 2
    assert torch.allclose(mean, mid, atol=1e-9)
    assert var.item() == pytest.approx(d2.item() / 4, rel=1e-9)


def test_riemannian_variance_commuting_and_congruence_invariant():
    logs = torch.randn(6, 5, dtype=torch.float64, generator=_gen(8))
    H = torch.diag_embed(logs.exp())
    var, mean = D.riemannian_variance(H)
    assert var.item() == pytest.approx((logs - logs.mean(0)).square().sum(1).mean().item(), rel=1e-9)
    assert torch.allclose(mean, torch.diag(logs.mean(0).exp()), atol=1e-10)
    A = torch.randn(5, 5, dtype=torch.float64, generator=_gen(9)) + 3 * torch.eye(5, dtype=torch.float64)
    var2, _ = D.riemannian_variance(A @ H @ A.mT)
    assert var2.item() == pytest.approx(var.item(), rel=1e-8)


def test_riemannian_variance_monte_carlo_small_noise():
    """H_i = C^{1/2} exp(Z_i) C^{1/2}, Z_i symmetric Gaussian: E σ_R² ≈ (k−1)/k · E‖Z‖_F²."""
    d, k, s, trials = 4, 5, 0.05, 300
    C = _random_spd(d, 10)
    rc = _sym_pow(C, 0.5)
    gen = _gen(11)
    vals = []
    for _ in range(trials):
        Zm = s * torch.randn(k, d, d, dtype=torch.float64, generator=gen)
        Zm = (Zm + Zm.mT) / math.sqrt(2)
        H = rc @ torch.linalg.matrix_exp(Zm) @ rc
        vals.append(D.riemannian_variance(H)[0])
    v = torch.stack(vals)
    # E‖Z‖_F²: diagonal: (2 z_ii)/√2 → var 2s²; off-diagonal: (z_ij+z_ji)/√2 → var s², d(d−1) of them
    ez2 = d * 2 * s**2 + d * (d - 1) * s**2
    expect = (k - 1) / k * ez2
    se = v.std().item() / math.sqrt(trials)
    # second-order (non-commutativity) terms are O(s²) relative: allow 5%
    assert abs(v.mean().item() - expect) <= Z * se + 0.05 * expect


def test_curvature_monitor_scale_free_and_detects_change():
    gen = _gen(12)
    W = torch.randn(6, 6, dtype=torch.float64, generator=gen)
    stable, scaled, changing = D.CurvatureMonitor(4), D.CurvatureMonitor(4), D.CurvatureMonitor(4)
    assert math.isnan(stable.sigma_r)
    for i in range(6):
        G = W @ torch.randn(6, 40, dtype=torch.float64, generator=gen)
        stable.update(G)
        scaled.update(G * 10.0 ** i)
        Wi = torch.linalg.matrix_power(W, i % 3 + 1)
        changing.update(Wi @ torch.randn(6, 40, dtype=torch.float64, generator=gen))
    assert len(stable) == 4
    assert scaled.sigma_r == pytest.approx(stable.sigma_r, rel=1e-6)
    assert changing.sigma_r > 2 * stable.sigma_r
