"""polar(): QDWH (default), Higham's scaled Newton and the SVD path against the float64 oracle."""
import pytest
import torch

import fastortho
from fastortho.polar.qdwh import qdwh_schedule
from fastortho.reference import polar_error, polar_svd, singular_band

from helpers import log_spectrum, low_rank, with_spectrum

ITERATIVE = ("qdwh", "higham")


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (3, 200), (200, 3), (65, 33), (4, 20, 30)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("method", ITERATIVE)
def test_matches_svd_on_hostile_shapes(shape, dtype, method):
    G = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    P, it = fastortho.polar(G, method=method, return_iterations=True)
    assert P.shape == G.shape and P.dtype == dtype and it.shape == G.shape[:-2]
    # Converged to working precision: measured ≤ 1.3e-6 (fp32), ≤ 2e-15 (fp64) on these shapes.
    tol = 5e-6 if dtype == torch.float32 else 1e-13
    assert polar_error(P, G).max().item() < tol
    assert (it <= 8).all()


# Error vs the float64 SVD at condition number κ, 64x128, σ log-spaced over [1/κ, 1], measured here
# (iterations in brackets). The fp32 SVD's own polar factor errs by 1.7e-5 at κ = 1e3.
#   qdwh   fp64: 2.3e-15 / 3.7e-14 / 1.9e-11 / 1.4e-9 at κ = 1e1 / 1e3 / 1e6 / 1e8 [6 each]
#   qdwh   fp32: 4.1e-7 / 7.0e-6 at κ = 1e1 / 1e3 [4 each]
#   higham fp64: 1.5e-14 / 3.5e-14 / 2.0e-11 at κ = 1e1 / 1e3 / 1e6 [5 / 7 / 8]
#   higham fp32: 4.7e-7 / 8.7e-7 at κ = 1e1 / 1e2; 0.33 at κ = 1e3 (the Gram matrix squares κ)
# Bounds: 3x measured.
CASES = [
    ("qdwh", torch.float64, 1e1, 7e-15, 6),
    ("qdwh", torch.float64, 1e3, 1.1e-13, 6),
    ("qdwh", torch.float64, 1e6, 6e-11, 6),
    ("qdwh", torch.float64, 1e8, 4.5e-9, 6),
    ("qdwh", torch.float32, 1e1, 1.5e-6, 4),
    ("qdwh", torch.float32, 1e3, 2.1e-5, 4),
    ("higham", torch.float64, 1e1, 4.5e-14, 8),
    ("higham", torch.float64, 1e3, 1.1e-13, 8),
    ("higham", torch.float64, 1e6, 6e-11, 8),
    ("higham", torch.float32, 1e1, 1.5e-6, 8),
    ("higham", torch.float32, 1e2, 2.7e-6, 8),
]


@pytest.mark.parametrize("method, dtype, kappa, tol, max_it", CASES, ids=str)
def test_ill_conditioned_accuracy(method, dtype, kappa, tol, max_it):
    G = with_spectrum((64, 128), log_spectrum(64, kappa))
    P, it = fastortho.polar(G.to(dtype), method=method, return_iterations=True)
    assert polar_error(P, G).item() < tol
    assert it.item() <= max_it


def test_qdwh_and_higham_resolve_in_float32_what_the_gram_matrix_cannot():
    # At κ = 1e3 in float32 an iteration on the Gram matrix GᵀG drops directions (σ/σ_max < ~2e-3, error
    # 0.33: what "higham" did before it worked on the QR factor R). QDWH keeps them to 7.0e-6 and Higham's
    # QR-first Newton to 1.2e-5, both at or below the fp32 SVD's own error (1.7e-5).
    G = with_spectrum((64, 128), log_spectrum(64, 1e3))
    e_q = polar_error(fastortho.polar(G.float(), method="qdwh"), G).item()
    e_h = polar_error(fastortho.polar(G.float(), method="higham"), G).item()
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    e_svd = polar_error(U @ Vh, G).item()
    assert e_q < e_svd and e_h < e_svd


@pytest.mark.parametrize("kappa", [1e6, 1e8])
def test_qdwh_float32_beyond_its_resolution_is_the_truncated_factor(kappa):
    # fp32 keeps σ ≳ 3e-6·σ_max here (59 / 45 of 64 directions at κ = 1e6 / 1e8) and drops the rest.
    # vs the SVD factor truncated between the kept and the dropped σ: measured 1.2e-3 / 1.5e-3; the
    # fp32 SVD truncated at the same rank errs by 4.3e-3 / 3.9e-3.
    s = log_spectrum(64, kappa)
    G = with_spectrum((64, 128), s)
    P, it = fastortho.polar(G.float(), return_iterations=True)
    k = int((torch.linalg.svdvals(P.double()) > 0.5).sum())
    assert 40 <= k < 64 and it.item() == 4
    ref = polar_svd(G, rtol=float((s[k - 1] * s[k]).sqrt()))
    assert polar_error(P, G, reference=ref).item() < 4.5e-3
    assert s[k - 1].item() < 1e-5  # everything above 1e-5·σ_max is kept


def test_qdwh_schedule_reaches_one_in_the_documented_steps():
    # l₀ = 10·max(m, n)·u/√m for 64×128: 4 weights in float32 (1 QR step: c > 100), 6 in float64 (2 QR).
    for eps, n_all, n_qr in ((2.0**-23, 4, 1), (2.0**-52, 6, 2)):
        sched = qdwh_schedule(10 * 128 * eps / 8, eps, 20)
        assert len(sched) == n_all and sum(c > 100 for _, _, c in sched) == n_qr
        # f(1) = 1 for every step: c = a + b − 1.
        assert all(abs((a + b) / (1 + c) - 1) < 1e-12 for a, b, c in sched)


def test_directions_below_the_working_resolution_map_to_zero():
    # σ = 1 .. 0.1 (10 values), 1e-6 (20 values), 0 (10 values). fp32 Newton resolves σ/σ_max above
    # (4u·√m)^{1/2} ≈ 2e-3 through the Gram matrix: it returns the canonical factor of the rank-10 part.
    s = torch.cat([log_spectrum(10, 10.0), torch.full((20,), 1e-6, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)])
    G = with_spectrum((40, 70), s)
    P32 = fastortho.polar(G.float(), method="higham")
    assert polar_error(P32, G, reference=polar_svd(G, rtol=1e-3)).item() < 4e-6  # measured 1.8e-6
    # fp64: σ = 1e-6 is near its resolution (≈ 5e-8): measured 3.3e-5 .. 1.1e-4 depending on rounding.
    assert torch.linalg.matrix_rank(polar_svd(G)).item() == 30
    assert polar_error(fastortho.polar(G, method="higham"), G).item() < 3e-4
    # QDWH: float32 cuts near 3e-6·σ_max (rank 10 here, measured 9.3e-7 vs the rank-10 factor);
    # float64 keeps the rank-30 part (measured 1.7e-10, i.e. u·κ with κ = 1e6).
    P32 = fastortho.polar(G.float(), method="qdwh")
    assert polar_error(P32, G, reference=polar_svd(G, rtol=1e-3)).item() < 3e-6
    assert polar_error(fastortho.polar(G, method="qdwh"), G).item() < 5e-10


@pytest.mark.parametrize("method", ITERATIVE)
@pytest.mark.parametrize("kappa", [1e1, 1e3, 1e6, 1e8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_never_nan_never_hangs(kappa, dtype, method):
    G = with_spectrum((2, 48, 80), log_spectrum(48, kappa)).to(dtype)
    P, it = fastortho.polar(G, method=method, return_iterations=True, max_iter=20)
    assert torch.isfinite(P).all() and (it <= 20).all()
    smin, smax = singular_band(P)
    # Directions below the rank cut map to 0, the rest to 1: no singular value in between.
    S = torch.linalg.svdvals(P.double())
    assert (smax < 1 + 1e-4).all() and (smin > -1e-12).all()
    assert ((S < 1e-3) | (S > 1 - 1e-3)).all()


@pytest.mark.parametrize("method", ITERATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rank_deficient_gives_the_canonical_factor(dtype, method):
    G = low_rank((3, 40, 70), rank=7)
    P = fastortho.polar(G.to(dtype), method=method)
    ref = polar_svd(G)
    assert torch.linalg.matrix_rank(ref).tolist() == [7, 7, 7]
    # smallest nonzero σ is 1e-2·σ_max. higham: 1.9e-4 (fp32, Gram conditioning 1e4), 2.4e-13 (fp64);
    # qdwh: 1.4e-6 (fp32), 6.8e-15 (fp64).
    tol = {("higham", torch.float32): 4e-4, ("higham", torch.float64): 5e-13,
           ("qdwh", torch.float32): 4e-6, ("qdwh", torch.float64): 2e-14}[method, dtype]
    assert polar_error(P, G, reference=ref).max().item() < tol


# Rank 20 of 48 with κ over the 20 nonzero σ (exact zeros after): QDWH, measured vs the float64 SVD
# factor: fp32 7.7e-7 / 6.3e-6 at κ = 1e1 / 1e3; fp64 3.3e-15 / 4.1e-14 / 2.9e-11 at κ = 1e1 / 1e3 / 1e6
# (4 / 6 iterations). fp32 at κ = 1e6 cuts below its resolution (0.22: tested above). Bounds: 3x.
@pytest.mark.parametrize("dtype, kappa, tol", [
    (torch.float32, 1e1, 2.5e-6), (torch.float32, 1e3, 2e-5),
    (torch.float64, 1e1, 1e-14), (torch.float64, 1e3, 1.2e-13), (torch.float64, 1e6, 9e-11),
], ids=str)
def test_qdwh_rank_deficient_and_ill_conditioned(dtype, kappa, tol):
    s = torch.zeros(48, dtype=torch.float64)
    s[:20] = log_spectrum(20, kappa)
    G = with_spectrum((2, 48, 80), s, seed=3)
    P, it = fastortho.polar(G.to(dtype), return_iterations=True)
    assert polar_error(P, G).max().item() < tol and (it <= 6).all()


@pytest.mark.parametrize("method", ITERATIVE)
def test_zeros_and_zero_rows(method):
    Z, it = fastortho.polar(torch.zeros(2, 5, 7), method=method, return_iterations=True)
    assert torch.equal(Z, torch.zeros(2, 5, 7))
    G = torch.randn(6, 9, dtype=torch.float64)
    G[2] = 0
    P = fastortho.polar(G, method=method)
    torch.testing.assert_close(P[2], torch.zeros(9, dtype=torch.float64), atol=1e-15, rtol=0)
    assert polar_error(P, G).item() < 1e-12


@pytest.mark.parametrize("method", ITERATIVE)
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_scales_do_not_overflow(method, scale):
    # ‖G‖_F² overflows (1e30) or underflows (1e-30) in float32: the start divides by max|g| first.
    G = torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    P = fastortho.polar((G * scale).float(), method=method)
    assert polar_error(P, G).item() < 2e-6  # measured 2.6e-7 / 2.4e-7 (qdwh), 4.2e-7 / 4.6e-7 (higham)


@pytest.mark.parametrize("method", ["qdwh", "higham", "svd"])
def test_nan_raises(method):
    G = torch.randn(5, 5)
    G[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastortho.polar(G, method=method)


@pytest.mark.parametrize("method", ITERATIVE)
def test_batch_result_equals_each_matrix_alone(method):
    G = torch.randn(4, 30, 50, dtype=torch.float64)
    G[1] *= 1e-3
    G[2] = with_spectrum((30, 50), log_spectrum(30, 1e3))
    P, it = fastortho.polar(G, method=method, return_iterations=True)
    for i in range(4):
        Pi, iti = fastortho.polar(G[i], method=method, return_iterations=True)
        torch.testing.assert_close(P[i], Pi, rtol=0, atol=1e-14)
        assert it[i] == iti


def test_hermitian_factor_and_methods():
    G = torch.randn(12, 20, dtype=torch.float64)
    for method in ("qdwh", "higham", "svd"):
        P, H = fastortho.polar(G, method=method, return_hermitian=True)
        assert H.shape == (20, 20)
        torch.testing.assert_close(P @ H, G, atol=1e-12, rtol=0)
        torch.testing.assert_close(H, H.mT)
    assert fastortho.polar(G, method="svd").dtype == torch.float64
    Pns = fastortho.polar(G, method="newton_schulz", coefficients="polar_express_paper", steps=10)
    assert polar_error(Pns, G).item() < 1e-6
    g = torch.randn(7, dtype=torch.float64)
    p, h = fastortho.polar(g, return_hermitian=True)
    torch.testing.assert_close(p, g / g.norm())
    torch.testing.assert_close(h, g.norm().reshape(1, 1))


def test_norm_scaling_needs_fewer_iterations_than_the_seeds_unscaled_form():
    G = with_spectrum((64, 128), log_spectrum(64, 1e6))
    _, it_norm = fastortho.polar(G, method="higham", scaling="norm", return_iterations=True, max_iter=60)
    _, it_fro = fastortho.polar(G, method="higham", scaling="none", return_iterations=True, max_iter=60)
    _, it_q = fastortho.polar(G, method="qdwh", return_iterations=True)
    assert it_q.item() <= 6 and it_norm.item() <= 8 < it_fro.item()  # measured 6 / 8 / 25


@pytest.mark.parametrize("method", ITERATIVE)
def test_bf16_input_is_upcast_and_empty_works(method):
    G = torch.randn(10, 14).bfloat16()
    P = fastortho.polar(G, method=method)
    assert P.dtype == torch.float32 and polar_error(P, G).item() < 5e-6
    E, it = fastortho.polar(torch.empty(3, 0, 4), method=method, return_iterations=True)
    assert E.shape == (3, 0, 4) and it.shape == (3,)
    assert fastortho.polar(G.float(), method=method, dtype=torch.float64).dtype == torch.float64


def test_bad_arguments():
    G = torch.randn(4, 4)
    with pytest.raises(ValueError):
        fastortho.polar(G, method="qr")
    with pytest.raises(ValueError):
        fastortho.polar(G, method="higham", scaling="spectral")
    with pytest.raises(ValueError):
        fastortho.polar(G, method="qdwh", scaling="none")
    with pytest.raises(ValueError):
        fastortho.polar(G, method="svd", return_iterations=True)
    with pytest.raises(TypeError):
        fastortho.polar(G, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        fastortho.polar(G, max_iter=0)


def test_bench_runs_without_jax():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_polar.py"
    spec = importlib.util.spec_from_file_location("bench_polar", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--tiny", "--no-jax", "--kappas", "1e3"])
    got = {(r["method"], r["dtype"]): r for r in rows}
    assert not any("jax" in m for m, _ in got)
    # 16×40 at κ = 1e3: measured 5.2e-6 (qdwh fp32) and 5.7e-6 (fp32 SVD); 2.3e-14 (qdwh fp64).
    assert got["qdwh", "float32"]["error"] < 2e-5 and got["qdwh", "float64"]["error"] < 1e-13
    assert got["qdwh", "float32"]["iters"] == 4 and got["higham scaling=fro", "float64"]["iters"] > 8


# Low-rank input stored in a low precision: the rounding of a rank-r product adds min(m, n) − r noise
# singular values at ~0.1–0.2·eps(dtype)·σ_max (measured 2e-8 fp32, 1e-4 fp16, 9e-4 bf16, 64×32).
# The canonical factor has exactly r unit singular values (Frobenius norm √r). With a float64 rank
# cut on float32 input, "svd" returned norm √32 = 5.66 (and "qdwh" did the same on bf16/fp16 input).
@pytest.mark.parametrize("method", ["svd", "qdwh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_low_rank_input_in_its_own_precision_gives_the_canonical_factor(rank, dtype, method):
    g = torch.Generator().manual_seed(rank)
    G = (torch.randn(64, rank, generator=g) @ torch.randn(rank, 32, generator=g)).to(dtype)
    P = fastortho.polar(G, method=method).double()
    S = torch.linalg.svdvals(P)
    # r singular values at 1 (to the working precision), the noise directions exactly or nearly 0.
    assert (S[:rank] - 1).abs().max().item() < 1e-5
    assert S[rank:].max().item() < 1e-5
    assert abs(P.norm().item() - rank ** 0.5) < 1e-4
    # Same factor as the float64 oracle on the rank-r matrix it rounds (kept directions move by
    # the rounding of G only: ≤ ~eps(dtype)·κ_r; measured ≤ 2.5e-2 bf16, 2.6e-3 fp16, 4e-7 fp32).
    ref = polar_svd(G.double(), rtol=fastortho.reference.default_rtol(64, 32, dtype))
    bound = {torch.float32: 2e-6, torch.float16: 1e-2, torch.bfloat16: 8e-2}[dtype]
    assert (P - ref).norm().item() / rank ** 0.5 < bound


def test_default_rtol_follows_the_storage_precision():
    dr = fastortho.reference.default_rtol
    assert dr(64, 32, torch.float64) == 64 * 2.0**-52
    assert dr(64, 32, torch.float32) == 64 * 2.0**-23
    # bf16: 64·2⁻⁷ = 0.5 would cut real directions; capped at √eps (and never reaches 1).
    assert dr(64, 32, torch.bfloat16) == 2.0**-3.5 and dr(4096, 4096, torch.bfloat16) < 0.1
    assert dr(8, 4, torch.float16) == 8 * 2.0**-10
    with pytest.raises(ValueError, match="rtol"):
        fastortho.polar(torch.randn(4, 3), method="svd", rtol=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_muon_svd_orthogonalizer_on_a_rank_one_gradient_moves_one_direction(dtype):
    # A rank-1 gradient (one token through a Linear) must give a rank-1 update: ‖Δ‖_F = lr·scale·1.
    # Before the precision-aware cut the update had 32 unit directions (8.0 vs 1.41 in the filed report).
    from fastortho.optim import Muon

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(64, 32, dtype=dtype))
    u, v = torch.randn(64, 1, generator=g), torch.randn(1, 32, generator=g)
    opt = Muon([p], lr=1.0, weight_decay=0.0, orthogonalizer="svd", adjust_lr_fn="original")
    p.grad = (u @ v).to(dtype)
    opt.step()
    S = torch.linalg.svdvals(p.detach().double())
    assert S[1].item() < 1e-3 * S[0].item()
    ref = (u @ v).double()
    ref = ref / ref.norm()
    cos = (p.detach().double() * ref).sum().abs() / p.detach().double().norm()
    assert cos.item() > 1 - 1e-3


def test_scaling_none_is_the_unscaled_iteration_and_fro_a_deprecated_alias():
    """``scaling="none"`` runs Newton with no per-step scaling (X₀ = G/‖G‖_F only); the old name "fro"
    gives the same bits with a DeprecationWarning."""
    G = with_spectrum((16, 24), log_spectrum(16, 1e3))
    P, it = fastortho.polar(G, method="higham", scaling="none", return_iterations=True, max_iter=60)
    with pytest.warns(DeprecationWarning, match=r'scaling="fro" is deprecated.*scaling="none"'):
        P_old, it_old = fastortho.polar(G, method="higham", scaling="fro", return_iterations=True, max_iter=60)
    assert torch.equal(P, P_old) and torch.equal(it, it_old)
    _, it_norm = fastortho.polar(G, method="higham", scaling="norm", return_iterations=True, max_iter=60)
    assert it_norm.item() < it.item()


@pytest.mark.parametrize("method", ["qdwh", "higham", "svd"])
def test_newton_schulz_options_for_another_method_raise(method):
    """``**ns_kwargs`` belong to method="newton_schulz": elsewhere (or misspelt) they raise, named."""
    G = torch.randn(6, 9, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"unexpected keyword argument.*'steps'"):
        fastortho.polar(G, method=method, steps=5)
    with pytest.raises(TypeError, match="max_iters"):
        fastortho.polar(G, method=method, max_iters=5)
