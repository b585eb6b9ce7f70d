"""polar(): Higham's scaled Newton iteration and the SVD path against the float64 oracle."""
import pytest
import torch

import fastortho
from fastortho.reference import polar_error, polar_svd, singular_band

from helpers import log_spectrum, low_rank, with_spectrum


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (3, 200), (200, 3), (65, 33), (4, 20, 30)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_higham_matches_svd_on_hostile_shapes(shape, dtype):
    G = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    P, it = fastortho.polar(G, return_iterations=True)
    assert P.shape == G.shape and P.dtype == dtype and it.shape == G.shape[:-2]
    # Converged to working precision: measured ≤ 1.3e-6 (fp32), ≤ 2e-15 (fp64) on these shapes.
    tol = 5e-6 if dtype == torch.float32 else 1e-13
    assert polar_error(P, G).max().item() < tol
    assert (it <= 8).all()


# Error vs the float64 SVD at condition number κ, 64x128, σ log-spaced over [1/κ, 1], norm scaling.
# Measured here: fp64 1.5e-14 / 3.6e-14 / 2.0e-11 at κ = 1e1 / 1e3 / 1e6 (5 / 7 / 8 iterations);
# fp32 4.7e-7 / 8.7e-7 at κ = 1e1 / 1e2. For scale, the fp32 SVD's own polar factor errs by
# ~1e-6 on these. Bounds: 3x measured.
CASES = [
    (torch.float64, 1e1, 4.5e-14),
    (torch.float64, 1e3, 1.1e-13),
    (torch.float64, 1e6, 6e-11),
    (torch.float32, 1e1, 1.5e-6),
    (torch.float32, 1e2, 2.7e-6),
]


@pytest.mark.parametrize("dtype, kappa, tol", CASES, ids=str)
def test_higham_ill_conditioned_accuracy(dtype, kappa, tol):
    G = with_spectrum((64, 128), log_spectrum(64, kappa))
    P, it = fastortho.polar(G.to(dtype), return_iterations=True)
    assert polar_error(P, G).item() < tol
    assert it.item() <= 8


def test_directions_below_the_working_resolution_map_to_zero():
    # σ = 1 .. 0.1 (10 values), 1e-6 (20 values), 0 (10 values). fp32 resolves σ/σ_max above
    # (4u·√m)^{1/2} ≈ 2e-3 through the Gram matrix, fp64 above ≈ 5e-8: so float32 returns the
    # canonical factor of the rank-10 part, float64 that of the rank-30 part.
    s = torch.cat([log_spectrum(10, 10.0), torch.full((20,), 1e-6, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)])
    G = with_spectrum((40, 70), s)
    P32 = fastortho.polar(G.float())
    assert polar_error(P32, G, reference=polar_svd(G, rtol=1e-3)).item() < 4e-6  # measured 1.8e-6
    P64 = fastortho.polar(G)
    assert torch.linalg.matrix_rank(polar_svd(G)).item() == 30
    assert polar_error(P64, G).item() < 1e-4  # measured 3.3e-5: σ = 1e-6 is near the resolution


@pytest.mark.parametrize("kappa", [1e1, 1e3, 1e6, 1e8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_higham_never_nan_never_hangs(kappa, dtype):
    G = with_spectrum((2, 48, 80), log_spectrum(48, kappa)).to(dtype)
    P, it = fastortho.polar(G, return_iterations=True, max_iter=20)
    assert torch.isfinite(P).all() and (it <= 20).all()
    smin, smax = singular_band(P)
    # Directions below the working precision's rank tolerance map to 0; the rest to 1.
    assert (smax < 1 + 1e-4).all() and (smin > -1e-12).all()


def test_norm_scaling_needs_fewer_iterations_than_the_seeds_unscaled_form():
    G = with_spectrum((64, 128), log_spectrum(64, 1e6))
    _, it_norm = fastortho.polar(G, scaling="norm", return_iterations=True, max_iter=60)
    _, it_fro = fastortho.polar(G, scaling="fro", return_iterations=True, max_iter=60)
    assert it_norm.item() <= 8 < it_fro.item()  # measured 8 vs 25


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rank_deficient_gives_the_canonical_factor(dtype):
    G = low_rank((3, 40, 70), rank=7)
    P = fastortho.polar(G.to(dtype))
    ref = polar_svd(G)
    assert torch.linalg.matrix_rank(ref).tolist() == [7, 7, 7]
    # smallest nonzero σ is 1e-2·σ_max: measured 1.9e-4 (fp32, Gram conditioning 1e4), 2.4e-13 (fp64)
    assert polar_error(P, G, reference=ref).max().item() < (4e-4 if dtype == torch.float32 else 5e-13)


def test_zeros_and_zero_rows():
    Z = fastortho.polar(torch.zeros(2, 5, 7))
    assert torch.equal(Z, torch.zeros(2, 5, 7))
    G = torch.randn(6, 9, dtype=torch.float64)
    G[2] = 0
    P = fastortho.polar(G)
    torch.testing.assert_close(P[2], torch.zeros(9, dtype=torch.float64), atol=1e-15, rtol=0)
    assert polar_error(P, G).item() < 1e-12


def test_nan_raises():
    G = torch.randn(5, 5)
    G[1, 1] = float("nan")
    for method in ("higham", "svd"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fastortho.polar(G, method=method)


def test_batch_result_equals_each_matrix_alone():
    G = torch.randn(4, 30, 50, dtype=torch.float64)
    G[1] *= 1e-3
    P, it = fastortho.polar(G, return_iterations=True)
    for i in range(4):
        Pi, iti = fastortho.polar(G[i], return_iterations=True)
        torch.testing.assert_close(P[i], Pi, rtol=0, atol=1e-14)
        assert it[i] == iti


def test_hermitian_factor_and_methods():
    G = torch.randn(12, 20, dtype=torch.float64)
    for method in ("higham", "svd"):
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


def test_bf16_input_is_upcast_and_empty_works():
    G = torch.randn(10, 14).bfloat16()
    P = fastortho.polar(G)
    assert P.dtype == torch.float32 and polar_error(P, G).item() < 5e-6
    E, it = fastortho.polar(torch.empty(3, 0, 4), return_iterations=True)
    assert E.shape == (3, 0, 4) and it.shape == (3,)


def test_bad_arguments():
    G = torch.randn(4, 4)
    with pytest.raises(ValueError):
        fastortho.polar(G, method="qr")
    with pytest.raises(ValueError):
        fastortho.polar(G, scaling="none")
    with pytest.raises(ValueError):
        fastortho.polar(G, method="svd", return_iterations=True)
    with pytest.raises(TypeError):
        fastortho.polar(G, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        fastortho.polar(G, max_iter=0)
