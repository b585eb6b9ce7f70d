"""Batched Higham (scaled Newton) polar iteration with Cholesky solves: the accurate polar path.

On the short side (X of shape (B, m, n), m ≤ n) the Newton step for XXᵀ = I is

    Φ(X) = ½ (μX + μ⁻¹ (XXᵀ)⁻¹ X),

the wide-matrix form of seed 000's Φ(X) = ½X(I + (XᵀX)⁻¹) (with μ = 1): each singular value maps
as σ ← ½(μσ + 1/(μσ)), so every σ > 0 converges quadratically to 1 and the singular vectors stay.

* Start: X₀ = G/‖G‖_F (seed 000: σ_max ≤ 1).
* Scaling: ``"norm"`` (default) is Higham's μ_k = (‖(XXᵀ)⁻¹X‖_F / ‖X‖_F)^{1/2} ≈ (σ_max σ_min)^{-1/2},
  which balances the extreme singular values; ``"fro"`` is μ = 1 after the Frobenius start
  (the seed's iteration). ``bench/bench_polar.py`` measures both: norm scaling needs ~8 iterations
  at κ = 1e8 where unscaled Newton needs ~30, hence the default. Scaling stops once the update is
  small (μ ≈ 1 there and dropping it keeps the quadratic phase exact).
* Solve: Y = XXᵀ + δI, Cholesky (``cholesky_ex``, no host sync), two triangular solves.
  δ = m·u·max diag(Y) keeps Y numerically positive definite on rank-deficient input. With μ = 1
  the regularized map σ ← ½σ(1 + 1/(σ² + δ)) has the fixed point σ* = √(1 − δ) (and converges to it
  at rate δ), so the result is divided by √(1 − δ) of the last step: no O(δ) bias remains.
* Rank: the result is the canonical polar factor (singular values ≤ rtol·σ_max map to 0, as for
  Newton–Schulz and ``fastortho.reference.polar_svd``). Before iterating, X is rotated into the
  eigenbasis W of its Gram matrix XXᵀ = W Λ Wᵀ and the rows with λ ≤ rtol_λ·λ_max (default
  rtol_λ = 4u√m, the rounding level of a computed Gram eigenvalue) are set to exactly zero; zero rows
  stay exactly zero through the Cholesky solves, so noise is never inverted (inverting it pollutes
  the signal directions: 1e-2 error in float64 on a rank-7 matrix without this step). The rotation
  also helps accuracy: the iteration then runs on a nearly diagonal Gram matrix. The price: a
  working precision resolves σ/σ_max ≳ (4u√m)^{1/2} (≈ 2e-3 in float32, 5e-8 in float64 at m = 64);
  directions below that are treated as zero. Use float64 for ill-conditioned inputs.
* Backends: the Gram matrix XXᵀ and the update ½(μX + μ⁻¹Z) with its step norm go through
  ``fastortho._polar_step`` (symmetric Triton Gram kernel and a fused Triton epilogue on CUDA,
  torch elsewhere); Cholesky and solves are ``torch.linalg`` (cuSOLVER / LAPACK).
* Why QDWH is the default of ``polar()``: this Gram-based iteration squares κ, so float32 drops
  every σ/σ_max ≲ 2e-3 (error 0.33 at κ = 1e3 where ``polar_qdwh`` reaches 7e-6), and it needs an
  eigh up front. It is kept as ``method="higham"``: the seed's iteration, and in float64 it is as
  accurate as QDWH up to κ ≈ 1e6.
* Stop: per matrix, when ‖X_{k+1} − X_k‖_F / ‖X_{k+1}‖_F ≤ tol; converged matrices are frozen
  (``torch.where``) so a batch returns the same bits as each matrix alone.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._polar_step import frobenius_start, fused_update, gram

__all__ = ["higham_polar"]


def _default_tol(dtype: torch.dtype, m: int) -> float:
    # Quadratic convergence: once the relative step is ~√(m·u) the next step lands at ~m·u.
    return (max(m, 1) * torch.finfo(dtype).eps) ** 0.5


def higham_polar(
    G: Tensor,
    *,
    tol: float | None = None,
    max_iter: int = 20,
    scaling: str = "norm",
    dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Polar factor of G (B, m, n) by the scaled Newton iteration; see the module docstring.

    Returns (P in ``dtype`` with G's shape, iterations per matrix (B,) int64).
    G must be finite (the caller checks).
    """
    if scaling not in ("norm", "fro"):
        raise ValueError(f"scaling must be 'norm' or 'fro', got {scaling!r}")
    tall = G.shape[-2] > G.shape[-1]
    Gs = (G.mT if tall else G).to(dtype)
    B, m, _ = Gs.shape
    u = torch.finfo(dtype).eps
    tol = _default_tol(dtype, m) if tol is None else tol
    # Gram eigenvalues carry an absolute error of about u·√m·λ_max: below that, a direction is noise.
    rtol = 4 * u * m**0.5 if rtol is None else rtol

    X = frobenius_start(Gs)
    # Deflate: rotate into the eigenbasis of the Gram matrix and zero the rows whose eigenvalue is
    # rounding noise. Exact zero rows stay exactly zero through Cholesky and the solves, so the
    # iteration runs on the numerical range only and never inverts noise.
    lam, W = torch.linalg.eigh(X @ X.mT)
    keep = lam > rtol * lam[..., -1:].clamp_min(0)
    X = torch.where(keep[..., :, None], W.mT @ X, 0.0)
    eye = torch.eye(m, dtype=dtype, device=G.device)
    iters = torch.zeros(B, dtype=torch.int64, device=G.device)
    active = torch.ones(B, dtype=torch.bool, device=G.device)
    scale_on = torch.full((B,), scaling == "norm", dtype=torch.bool, device=G.device)
    last_delta = torch.zeros(B, dtype=dtype, device=G.device)
    for _ in range(max_iter):
        Y = gram(X)
        delta = (m * u * Y.diagonal(dim1=-2, dim2=-1).amax(-1)).clamp_min(torch.finfo(dtype).tiny)
        L, _ = torch.linalg.cholesky_ex(Y + delta[:, None, None] * eye)
        Z = torch.cholesky_solve(X, L)
        xn = torch.linalg.vector_norm(X, dim=(-2, -1))
        zn = torch.linalg.vector_norm(Z, dim=(-2, -1))
        mu = torch.where(scale_on & (xn > 0), (zn / xn.clamp_min(torch.finfo(dtype).tiny)).sqrt(), 1.0)
        # ½(μX + μ⁻¹Z), frozen where converged; a non-finite step never counts as converged.
        X, step = fused_update(X, Z, 0.5 * mu, 0.5 / mu, active)
        last_delta = torch.where(active, delta, last_delta)
        iters = iters + active.to(torch.int64)
        scale_on = scale_on & (step > 1e-2)
        active = active & ~(step <= tol)
        if not bool(active.any()):
            break
    X = W @ (X / (1 - last_delta).clamp_min(0.5).sqrt()[:, None, None])
    P = X.mT if tall else X
    return P, iters
