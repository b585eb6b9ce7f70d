"""``polar`` against an oracle this package did not write: ``scipy.linalg.polar`` (SVD-based, float64).

Inputs are full rank with singular values log-spaced over [1/κ, 1] and Haar-random singular vectors,
tall, wide and square. The oracle sees exactly the stored values (a float32 input is widened to
float64 for scipy), so the difference is the method's own error. Bounds are 3× the maximum measured
here over 3 seeds and 3 shapes, stated in units of eps of the precision each method computes in
(the SVD path works in float64 whatever the input, so its unit is float64's eps); the measured
values are in the tables. A polar factor moves by ≈ eps·κ under rounding, hence the growth with κ.

float32 stops at κ = 1e4: at κ = 1e6 the smallest directions lie below float32's rank cut
(max(m, n)·eps ≈ 1e-5·σ_max), which both methods drop on purpose (tested in test_polar.py).
"""
import pytest
import torch

scipy_linalg = pytest.importorskip("scipy.linalg",
                                   reason="scipy is in the test extra: pip install -e '.[test]'")

import fastortho  # noqa: E402

from helpers import log_spectrum, with_spectrum  # noqa: E402

SHAPES = [(80, 48), (48, 80), (64, 64)]
KAPPAS = {torch.float64: (1.0, 1e2, 1e4, 1e6), torch.float32: (1.0, 1e2, 1e4)}
# Measured max error / eps over seeds 0–2 and SHAPES (AMD EPYC, LAPACK via torch and scipy):
#   qdwh fp32: 2.0 / 9.4 / 375 at κ = 1 / 1e2 / 1e4
#   qdwh fp64: 5.3 / 16.5 / 552 / 4.9e4 at κ = 1 / 1e2 / 1e4 / 1e6
#   svd (fp64 eps, fp32 or fp64 input): 11.5 / 26 / 1097 / 8.9e4
BOUND_EPS = {
    ("qdwh", torch.float32): {1.0: 6, 1e2: 30, 1e4: 1200},
    ("qdwh", torch.float64): {1.0: 16, 1e2: 50, 1e4: 1700, 1e6: 1.5e5},
    ("svd", torch.float32): {1.0: 35, 1e2: 80, 1e4: 3300},
    ("svd", torch.float64): {1.0: 35, 1e2: 80, 1e4: 3300, 1e6: 2.7e5},
}
# One seed per shape in CI (the bounds hold for seeds 0–2, measured above).
CASES = [(method, dtype, kappa, shape, seed)
         for method in ("qdwh", "svd") for dtype in KAPPAS for kappa in KAPPAS[dtype]
         for seed, shape in enumerate(SHAPES)]


def _scipy_polar(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, H = scipy_linalg.polar(G.double().numpy(), side="right")
    return torch.from_numpy(U), torch.from_numpy(H)


@pytest.mark.parametrize("method, dtype, kappa, shape, seed", CASES, ids=str)
def test_polar_factor_matches_scipy(method, dtype, kappa, shape, seed):
    G = with_spectrum(shape, log_spectrum(min(shape), kappa), seed=seed).to(dtype)
    U, _ = _scipy_polar(G)
    P = fastortho.polar(G, method=method)
    assert P.shape == G.shape
    unit = torch.finfo(dtype if method == "qdwh" else torch.float64).eps
    err = ((P.double() - U).norm() / U.norm()).item()
    assert err < BOUND_EPS[method, dtype][kappa] * unit, f"{err / unit:.1f} eps"


@pytest.mark.parametrize("method", ["qdwh", "svd"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_hermitian_factor_matches_scipy(method, shape):
    # G = P·H with H = PᵀG symmetric PSD (n×n): scipy's right polar factor. float64, κ = 1e2.
    # Measured ‖H − H_scipy‖_F/‖H_scipy‖_F ≤ 1.2e-15 (qdwh) / 1.0e-15 (svd); bound 1e-14.
    G = with_spectrum(shape, log_spectrum(min(shape), 1e2), seed=0)
    U, H = _scipy_polar(G)
    P, Hf = fastortho.polar(G, method=method, return_hermitian=True)
    assert Hf.shape == H.shape == (shape[1], shape[1])
    assert ((Hf - H).norm() / H.norm()).item() < 1e-14
    assert ((P @ Hf - G).norm() / G.norm()).item() < 1e-14


def test_batched_input_matches_scipy_per_matrix():
    G = torch.stack([with_spectrum((40, 56), log_spectrum(40, k), seed=i)
                     for i, k in enumerate((1e1, 1e3, 1e5))])
    P = fastortho.polar(G)  # qdwh, float64
    for i in range(3):
        U, _ = _scipy_polar(G[i])
        assert ((P[i] - U).norm() / U.norm()).item() < 1e-10  # measured ≤ 1.3e-12 (κ = 1e5)
