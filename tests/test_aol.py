"""The AOL-preconditioned 4-step schedule (Turbo-Muon, Boissin et al., arXiv 2512.04632).

X₀ = diag(d)·G with d_i = (Σ_j |(GGᵀ)_ij|)^{-1/2} replaces the division by a norm, then the paper's 4
quintic steps. Checked here: the rescale against a float64 hand computation and its bound σ_max(X₀) ≤ 1,
accuracy against 5 Polar Express steps (error vs the float64 SVD polar factor) with fewer matmul flops,
batch invariance, zeros, NaN locality, routing, and the Muon optimizer.
"""
from __future__ import annotations

import pytest
import torch

import fastortho
from fastortho.bench import gaussian, log_spaced, ns_bf16_model
from fastortho.coefficients import SCHEDULES, Schedule, composed_band, get_schedule, schedule_precondition
from fastortho.flops import ns_flops
from fastortho.newton_schulz import _resolve_backend
from fastortho.ns_torch import scale_input
from fastortho.reference import polar_error, polar_svd

EPS64 = torch.finfo(torch.float64).eps


def hand_aol(G: torch.Tensor) -> torch.Tensor:
    """diag(d)·G in float64 on the short side, d_i = (Σ_j |(GGᵀ)_ij|)^{-1/2}, straight from the definition."""
    tall = G.shape[-2] > G.shape[-1]
    X = (G.mT if tall else G).to(torch.float64)
    A = X @ X.mT
    r = A.abs().sum(-1, keepdim=True)
    out = torch.where(r > 0, X / r.sqrt(), torch.zeros_like(X))  # a zero row stays zero
    return out.mT if tall else out


def aol_bf16_model(G: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """AOL-4 in the bf16 storage model of ``fastortho.bench.ns_bf16_model`` (every stored tensor rounded to
    bf16, fp32 matmuls): X₀ and its Gram matrix D·A·D from the fp32 rescale, rounded once."""
    return ns_bf16_model(G, get_schedule("aol", steps)[0], 1.0, "aol")


# ---- the rescale itself ------------------------------------------------------------------------------


def adversarial_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    rank1 = r(12, 1) @ r(1, 30)                      # all rows parallel: the bound is attained (σ_max = 1)
    orth = torch.linalg.qr(r(30, 12))[0].mT * torch.logspace(0, -6, 12, dtype=torch.float64)[:, None]
    huge_row = r(10, 25)
    huge_row[3] *= 1e8                               # one row dominates every other
    signs = torch.ones(16, 16, dtype=torch.float64).triu() - torch.ones(16, 16, dtype=torch.float64).tril(-1)
    zero_rows = r(9, 20)
    zero_rows[[1, 5]] = 0
    return dict(rank1=rank1, orthogonal_rows=orth, huge_row=huge_row, sign_pattern=signs, zero_rows=zero_rows,
                tall=r(40, 7), wide=r(7, 40), square=r(20, 20), tiny=r(5, 6) * 1e-30, big=r(5, 6) * 1e30)


@pytest.mark.parametrize("name", sorted(adversarial_inputs()))
def test_aol_rescale_matches_float64_hand_computation_and_bounds_sigma_max(name):
    G = adversarial_inputs()[name]
    # steps=0: newton_schulz returns X₀ itself, so this runs the public path end to end (eps tiny: the
    # floor is tested on its own below).
    X0 = fastortho.newton_schulz(G, steps=0, coefficients="aol", dtype=torch.float64, eps=1e-300)
    ref = hand_aol(G)
    # The power-of-two prescale is exact, so only the rounding of A, the sum and rsqrt remain:
    # measured ≤ 4.4e-16 relative; bound 16 ulps.
    torch.testing.assert_close(X0, ref, rtol=16 * EPS64, atol=16 * EPS64 * ref.abs().max().item())
    smax = torch.linalg.svdvals(X0)[0].item()
    assert smax <= 1 + 16 * EPS64, f"{name}: sigma_max(DX) = {smax!r}"
    if name == "rank1":
        assert smax == pytest.approx(1.0, abs=1e-14)  # the bound is tight, so it cannot be improved
    # the Gram matrix handed to step 1 is X₀X₀ᵀ (reused, not recomputed)
    Gs = G.mT if G.shape[-2] > G.shape[-1] else G
    X, A = scale_input(Gs[None], safety=1.0, normalize="aol", eps=1e-300)
    torch.testing.assert_close(A, X @ X.mT, rtol=64 * EPS64, atol=64 * EPS64 * A.abs().max().item())


def test_eps_floor_is_the_norm_paths():
    """A row whose √(Σ_j |(GGᵀ)_ij|) is below eps (in G's units) is divided by eps, as the norm scaling
    divides a matrix with ν < eps by eps; zero rows and a zero matrix stay zero, also in huge matrices."""
    G = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 1e-12
    X0 = fastortho.newton_schulz(G, steps=0, coefficients="aol", dtype=torch.float64, eps=1e-7)
    torch.testing.assert_close(X0, G / 1e-7, rtol=4 * EPS64, atol=0)
    for scale, dtype in [(1e30, torch.float32), (1e300, torch.float64)]:
        H = torch.randn(6, 9, dtype=dtype, generator=torch.Generator().manual_seed(4)) * scale
        H[2] = 0
        Y = fastortho.newton_schulz(H, coefficients="aol", dtype=dtype)
        assert torch.isfinite(Y).all() and torch.equal(Y[2], torch.zeros_like(Y[2]))


def test_aol_rescale_bound_on_random_matrices_in_float32():
    g = torch.Generator().manual_seed(0)
    for m, n in [(3, 50), (50, 3), (64, 64), (33, 70)]:
        G = torch.randn(4, m, n, generator=g) * torch.logspace(-3, 3, n)  # columns of wildly different size
        X0 = fastortho.newton_schulz(G, steps=0, coefficients="aol", dtype=torch.float32)
        smax = torch.linalg.svdvals(X0.double()).max().item()
        # fp32 rescale: measured max 1 - 3e-8; bound 1 + 64 fp32 ulps
        assert smax <= 1 + 64 * torch.finfo(torch.float32).eps, (m, n, smax)


# ---- accuracy: 4 AOL steps vs 5 Polar Express steps ---------------------------------------------


def errors(G: torch.Tensor, dtype: str) -> tuple[float, float]:
    """(AOL-4 error, PE-5 error) vs the float64 SVD polar factor: max over the batch."""
    ref = polar_svd(G)
    G32 = G.to(torch.float32)
    if dtype == "fp32":
        aol = fastortho.newton_schulz(G32, 4, "aol", dtype=torch.float32)
        pe = fastortho.newton_schulz(G32, 5, "polar_express", dtype=torch.float32)
    else:
        pe_rows, safety = get_schedule("polar_express", 5)
        Gb = G32.reshape(-1, *G.shape[-2:])
        aol = torch.stack([aol_bf16_model(x) for x in Gb]).reshape(G.shape)
        pe = torch.stack([ns_bf16_model(x, pe_rows, safety) for x in Gb]).reshape(G.shape)
    return polar_error(aol, G, reference=ref).max().item(), polar_error(pe, G, reference=ref).max().item()


SHAPES = {"wide": (64, 256), "tall": (256, 64), "square": (128, 128), "batched": (3, 48, 80)}


def _input(kind: str, shape: tuple[int, ...], smallest: float = 1e-2) -> torch.Tensor:
    make = (lambda m, n, seed: gaussian(m, n, seed=seed)) if kind == "gaussian" else (
        lambda m, n, seed: log_spaced(m, n, smallest=smallest, seed=seed))
    if len(shape) == 3:
        return torch.stack([make(*shape[1:], seed) for seed in range(shape[0])])
    return make(*shape, 0)


# Measured errors (AOL-4 / PE-5), fp32; the bf16 model within ±0.003 of these, same winner:
#   Gaussian: wide 0.020/0.090, tall 0.020/0.089, square 0.096/0.118 (σ_min/σ_max ≈ 4e-4 there),
#   batched 3x48x80 0.026/0.103.
#   decaying spectrum, Haar singular vectors, σ from 1 to 1e-1: wide 0.034/0.093, tall 0.038/0.093,
#   square 0.029/0.094, batched 0.043/0.083;
#   σ from 1 to 1e-2: wide 0.087/0.094, tall 0.092/0.094, square 0.083/0.093, and AOL LOSES on the
#   batched 3x48x80: 0.105/0.098 (fp32), 0.106/0.101 (bf16 model).
#   The κ = 1e2 wins are a small-size effect: at 1024x4096 AOL-4 loses, 0.141/0.097 (bench/RESULTS.md),
#   too slow for this suite; κ = 10 holds there (0.019/0.094).
# Losing cases are strict xfails: they report the shortfall, and fail the suite if AOL ever wins there.
LOSES = {("decaying-1e-2", "batched", "fp32"), ("decaying-1e-2", "batched", "bf16-model")}
ACCURACY_CASES = [
    pytest.param(kind, shape, dtype, marks=pytest.mark.xfail(strict=True, reason="measured: AOL-4 less accurate "
                 "than PE-5 on this class (bench/RESULTS.md, AOL schedule)")) if (kind, shape, dtype) in LOSES
    else pytest.param(kind, shape, dtype)
    for kind in ["gaussian", "decaying-1e-1", "decaying-1e-2"] for shape in SHAPES for dtype in ["fp32", "bf16-model"]
]


@pytest.mark.parametrize("kind,shape,dtype", ACCURACY_CASES)
def test_four_aol_steps_at_least_as_accurate_as_five_polar_express_steps(kind, shape, dtype):
    smallest = float(kind.split("-", 1)[1]) if kind.startswith("decaying") else 0.0
    G = _input("gaussian" if kind == "gaussian" else "decaying", SHAPES[shape], smallest)
    e_aol, e_pe = errors(G, dtype)
    assert e_aol <= e_pe, f"{kind} {shape} {dtype}: AOL-4 {e_aol:.3e} > PE-5 {e_pe:.3e}"


# Where AOL-4 clearly does NOT reach PE-5: decaying spectra with condition number ≥ 1e3 and Haar singular
# vectors (rows of nearly equal norm, so the row scaling gains little while Σ_j|A_ij| overestimates the
# row's share of σ_max², starting the small singular values lower than ‖G‖_F does). Measured fp32,
# AOL-4 vs PE-5: κ = 1e3: 0.39 vs 0.17 (64x256), 0.41 vs 0.22 (128x128); κ = 1e4: 0.58 vs 0.43, 0.59 vs 0.47.
@pytest.mark.xfail(strict=True, reason="AOL-4 is less accurate than PE-5 on decaying spectra with κ ≥ 1e3 "
                   "(bench/RESULTS.md, AOL schedule)")
@pytest.mark.parametrize("smallest", [1e-3, 1e-4])
@pytest.mark.parametrize("shape", ["wide", "square"])
def test_aol_loses_on_ill_conditioned_decaying_spectra(shape, smallest):
    e_aol, e_pe = errors(_input("decaying", SHAPES[shape], smallest), "fp32")
    assert e_aol <= e_pe, f"AOL-4 {e_aol:.3e} > PE-5 {e_pe:.3e}"


@pytest.mark.parametrize("m,n", [(64, 256), (256, 64), (128, 128), (768, 3072), (4096, 4096)])
def test_four_aol_steps_cost_fewer_matmul_flops_than_five(m, n):
    s, l = min(m, n), max(m, n)
    # AOL adds no matmul (step 1 reuses A = GGᵀ): |A| row sums (2s²), D·G (s·l) and D·A·D (2s²).
    aol = ns_flops(m, n, 4) + 4 * s * s + s * l
    assert aol < ns_flops(m, n, 5)
    assert aol <= 0.81 * ns_flops(m, n, 5)  # 4/5 of the matmuls plus O(s² + sl): < 1% more at s ≥ 64


# ---- batches, zeros, NaN ---------------------------------------------------------------------------


def test_batch_invariance():
    g = torch.Generator().manual_seed(5)
    G = torch.randn(4, 24, 40, generator=g)
    X = fastortho.newton_schulz(G, coefficients="aol", dtype=torch.float32)
    for i in range(4):
        alone = fastortho.newton_schulz(G[i], coefficients="aol", dtype=torch.float32)
        torch.testing.assert_close(X[i], alone, rtol=0, atol=0)
    # transposed (tall) batch gives the transpose
    Xt = fastortho.newton_schulz(G.mT, coefficients="aol", dtype=torch.float32)
    torch.testing.assert_close(Xt, X.mT, rtol=0, atol=0)


def test_zero_matrix_gives_zeros_and_nan_stays_in_its_matrix():
    g = torch.Generator().manual_seed(6)
    G = torch.randn(3, 10, 14, generator=g)
    G[0] = 0
    G[2, 4, 7] = float("nan")
    X = fastortho.newton_schulz(G, coefficients="aol", dtype=torch.float32)
    assert torch.equal(X[0], torch.zeros_like(X[0]))
    assert torch.isfinite(X[1]).all()
    torch.testing.assert_close(X[1], fastortho.newton_schulz(G[1], coefficients="aol", dtype=torch.float32),
                               rtol=0, atol=0)
    assert torch.isnan(X[2]).all()  # the NaN row reaches every row through A's column sums
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastortho.newton_schulz(G, coefficients="aol", check_finite=True)


def test_scale_invariance_over_many_decades():
    G = torch.randn(12, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    X = fastortho.newton_schulz(G, coefficients="aol", dtype=torch.float64, eps=1e-300)
    for s in (2.0**-100, 1e-25, 1e25, 2.0**100):  # every row's AOL norm stays far above eps=1e-300
        Xs = fastortho.newton_schulz(G * s, coefficients="aol", dtype=torch.float64, eps=1e-300)
        if s in (2.0**-100, 2.0**100):
            assert torch.equal(Xs, X)  # a power of two is absorbed by the exact prescale: same bits
        torch.testing.assert_close(Xs, X, rtol=1e-12, atol=1e-12)


# ---- schedule, routing, optimizer ----------------------------------------------------------------------


def test_schedule_flags_and_values():
    s = SCHEDULES["aol"]
    assert s.precondition == "aol" and s.safety == 1.0 and s.steps == 4
    assert s.coefficients == SCHEDULES["you"].coefficients[1:]  # Turbo-Muon's reference code: You's last 4 rows
    assert s.coefficients[0] == (3.9505, -6.3029, 2.6377) and s.coefficients[-1] == (2.8366, -3.0525, 1.2012)
    assert schedule_precondition("aol") == "aol" and schedule_precondition(s) == "aol"
    assert schedule_precondition("polar_express") is None and schedule_precondition([(1.0, 0.0, 0.0)]) is None
    assert all(v.precondition is None for k, v in SCHEDULES.items() if k != "aol")
    with pytest.raises(ValueError, match="precondition must be one of"):
        Schedule("x", ((1.0, 0.0, 0.0),), precondition="jacobi")
    # more steps continue with the convergent quintic tail (no row of the list fixes 1 with zero slope)
    assert get_schedule("aol", 6)[0][4:] == ((15 / 8, -10 / 8, 3 / 8),) * 2


def test_composed_polynomial_keeps_every_direction_positive():
    """AOL puts σ anywhere in (0, 1] (exactly 1 for a rank-1 G), so the composed polynomial must map all of
    (0, 1] to positive values near 1, or the update points against the gradient there. The 4-row list
    other packages ship as "aol" ((4.0098, −7.0585, 2.4635), …) fails this: its band over [1e-3, 1] is
    [−1.084, 1.084] (σ ∈ (0.88, 1] goes to ≈ −1), and a 3x1000 Gaussian comes out ≈ −UVᵀ (error 1.996)."""
    lo, hi = composed_band(SCHEDULES["aol"].coefficients, 1.0, lower=1e-3)
    assert 0.1 < lo and hi < 1.2  # measured [0.120, 1.145]
    lo, hi = composed_band(SCHEDULES["aol"].coefficients, 1.0, lower=0.05)
    assert 0.97 < lo and hi < 1.04  # measured [0.978, 1.032]
    G = torch.randn(3, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X = fastortho.newton_schulz(G, coefficients="aol", dtype=torch.float64)
    assert polar_error(X, G).item() < 2e-2  # measured 1.05e-2; PE-5: 8.6e-2; the other "aol" list: 1.996
    R = G[:1].mT @ G[:1]  # rank 1: AOL scales its one singular value to exactly 1
    X1 = fastortho.newton_schulz(R, coefficients="aol", dtype=torch.float64)
    target = polar_svd(fastortho.newton_schulz(R, 0, "aol", dtype=torch.float64))  # polar(DR): see below
    assert polar_error(X1, R, reference=target).item() < 1.2e-2  # measured 5.9e-3


def test_aol_targets_the_polar_factor_of_the_rescaled_matrix():
    """D·G has other left singular vectors than G, so AOL iterates towards polar(D·G), not polar(G): an
    error floor ‖polar(DG) − polar(G)‖ that more steps do not remove (measured 5.5e-3 on a 128x512
    Gaussian, where 4 steps give 1.9e-2 and PE-5 9e-2; 0.27 for a rank-1 matrix with uneven rows)."""
    G = torch.randn(128, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    floor = polar_error(polar_svd(fastortho.newton_schulz(G, 0, "aol", dtype=torch.float64)), G).item()
    assert 1e-3 < floor < 1e-2
    for k in (8, 16):
        X = fastortho.newton_schulz(G, k, "aol", dtype=torch.float64)
        assert polar_error(X, G).item() == pytest.approx(floor, rel=1e-6)


def test_normalize_is_not_used_by_aol():
    G = torch.randn(16, 24, generator=torch.Generator().manual_seed(8))
    a = fastortho.newton_schulz(G, coefficients="aol", normalize="fro", dtype=torch.float32)
    b = fastortho.newton_schulz(G, coefficients="aol", normalize="gram", dtype=torch.float32)
    assert torch.equal(a, b)


def test_routing_aol_runs_where_the_norm_schedules_run():
    """AOL runs on both backends: "auto" picks Triton on CUDA (when installed) as for every schedule,
    "triton" is accepted (the Triton-vs-torch comparison is tests/interpret/test_aol_interpret.py)."""
    from fastortho.ops._load import triton_available
    cuda = "triton" if triton_available() else "torch"
    assert _resolve_backend("auto", torch.device("cuda"), "aol") == cuda
    assert _resolve_backend("triton", torch.device("cuda"), "aol") == "triton"
    assert _resolve_backend("torch", torch.device("cuda"), "aol") == "torch"
    assert _resolve_backend("auto", torch.device("cpu"), "aol") == "torch"
    assert _resolve_backend("auto", torch.device("cpu"), None) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_matches_cpu():
    G = torch.randn(4, 64, 160, generator=torch.Generator().manual_seed(9))
    X = fastortho.newton_schulz(G.cuda(), coefficients="aol", dtype=torch.float32).cpu()
    ref = fastortho.newton_schulz(G, coefficients="aol", dtype=torch.float32)
    torch.testing.assert_close(X, ref, rtol=1e-4, atol=1e-4)


def test_muon_accepts_aol():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(16, 24))
    W0 = W.detach().clone()
    opt = fastortho.Muon([W], lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, coefficients="aol",
                         adjust_lr_fn="original")
    grad = torch.randn(16, 24)
    W.grad = grad.clone()
    opt.step()
    step = W0 - W.detach()
    assert torch.isfinite(step).all()
    O = fastortho.newton_schulz(grad, coefficients="aol", dtype=torch.float32)
    # the update is a positive multiple of the AOL-4 orthogonalization of the gradient
    scale = (step * O).sum() / (O * O).sum()
    assert scale > 0
    torch.testing.assert_close(step, scale * O, rtol=1e-5, atol=1e-6)
