"""Batched Higham polar: QR first, scaled Newton with inverses, an inverse-free Newton–Schulz tail.

The method of Higham & Schreiber, "Fast polar decomposition of an arbitrary matrix" (1990), for
G of shape (B, m, n):

* Tall orientation, QR first: T = G (m ≥ n) or Gᵀ (m < n), T = Q·R (Householder, backward
  stable); polar(T) = Q·polar(R), so the iteration runs on the square N×N factor R (N = min(m, n)).
  A square G is iterated directly (the QR would cost 4n³ more and buy nothing there). The start is
  T/max|T|/‖T‖_F (``frobenius_start``: no overflow or underflow for inputs near the dtype's limits).
  Nothing is ever formed from GᵀG: the condition number that matters is κ(R) = κ(G), not κ².
* Scaled Newton: X ← ½(μX + μ⁻¹X⁻ᵀ), i.e. σ ← ½(μσ + 1/(μσ)) for every singular value (the
  singular vectors stay). Scalings (``scaling=``):
  ``"norm"`` (default): Frobenius μ = (‖X⁻¹‖_F/‖X‖_F)^{1/2} (Higham 1986), ≈ (σ_max·σ_min)^{-1/2};
  ``"1inf"``: μ = (‖X⁻¹‖₁‖X⁻¹‖_∞ / (‖X‖₁‖X‖_∞))^{1/4} (Higham 1986, cheaper with LU but estimated);
  ``"fro"``: μ = 1 after the Frobenius start (the unscaled iteration, for comparison).
  Measured iteration counts (``bench/RESULTS.md``): Frobenius ≤ 1,∞ at every κ tested, hence the
  default. Scaling is dropped once the relative step is below 1e-2 (μ ≈ 1 there; the quadratic
  phase of unscaled Newton is then exact). The first inverse is triangular (R), later ones are
  LU inverses (``torch.linalg.inv_ex``: no host sync on failure).
* Switch to the inverse-free tail (Higham–Schreiber's test): after a Newton step whose relative
  step is ≤ 0.2 the next iterate has ‖XXᵀ − I‖ ≈ 2·(step²/2), and the matrix switches to
  Newton–Schulz X ← ½(3I − XXᵀ)X = 1.5X − 0.5·(XXᵀ)X (two products, matmuls only; σ ← ½σ(3 − σ²)
  converges quadratically for σ ∈ (0, √3)). Each tail step forms A = XXᵀ first and checks
  ‖A − I‖_F ≤ ½ (spectral ≤ Frobenius, so every σ² ∈ [½, 3/2]); a matrix that fails the test takes
  a Newton step instead. On CUDA the tail runs in fastortho's Triton kernels: A in the symmetric
  kernel, (−½A)X + 1.5X in the apply kernel, both with 3xTF32 (fp32-accurate) dots.
* Stop: per matrix, when the relative step ‖X_{k+1} − X_k‖_F/‖X_{k+1}‖_F ≤ tol (default √u:
  quadratic convergence lands the step just taken at ~u). Converged matrices are
  frozen (``torch.where``), so a batch returns the same result as each matrix alone.
* Rank (the canonical factor U_rV_rᵀ: σ ≤ rtol·σ_max map to 0). Column-pivoted QR is not in torch;
  the numerical rank is decided in two tests and, where needed, one rank-revealing SVD:
  1. From the first inverse (Newton needs it anyway): σ_min ≥ 1/‖R⁻¹‖_F and σ_max ≤ ‖R‖_F, so
     2·rtol·‖R‖_F‖R⁻¹‖_F < 1 certifies that every σ is above the cut (no further check). A
     non-finite inverse (exact zeros: rank-deficient or zero matrices) or ‖R‖_F‖R⁻¹‖_F·u ≥ 1
     (the inverse is noise) sends the matrix straight to the SVD below.
  2. The others run Newton; the converged U gives R = U·H with H = UᵀR, eig(H) = σ(R), and a
     Cholesky of H − rtol·‖R‖_F·I (N³/3 flops) succeeds iff every σ is above rtol·‖R‖_F
     (≥ the cut). If it fails (Newton completed noise directions to 1), the SVD below decides.
  3. SVD of the small N×N factor (working precision): R = UΣVᵀ, X = U·diag(σ > rtol·σ_max)·Vᵀ.
  No NaN, no orthogonal completion of noise. Matrices not converged in ``max_iter`` also go to the
  SVD. Default rtol = max(m, n)·u with u the unit roundoff of the data (float64 when the input and
  working dtype are float64; float32 otherwise: bf16/fp16 input is exact in float32): the cut of
  ``numpy.linalg.matrix_rank``. Matrices that took the SVD report 0 iterations.
* ``storage``: a numerical experiment, not a speed path: round X to bfloat16/float16 after every
  step (products accumulate in the working dtype), the storage model of a low-precision iteration;
  with ``storage_tail_only`` only after the Newton–Schulz tail steps.

The result P = Q·X (cast to ``dtype``), transposed back for wide G.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._polar_step import frobenius_start, fused_update, gram, ns_product

__all__ = ["higham_polar", "higham_default_rtol", "SWITCH_STEP", "SWITCH_GRAM"]

#: A Newton step with relative step ≤ SWITCH_STEP sends the matrix to the Newton–Schulz tail.
SWITCH_STEP = 0.2
#: Higham–Schreiber's test: a tail step is taken only where ‖XXᵀ − I‖_F ≤ SWITCH_GRAM.
SWITCH_GRAM = 0.5
#: Scaling stops once the relative step is below this (μ ≈ 1 there).
SCALE_OFF = 1e-2


def _default_tol(dtype: torch.dtype) -> float:
    # Quadratic convergence: the step just taken lands at ~step². The relative Frobenius step is
    # an RMS over the singular values, so √u (not √(N·u)) keeps the largest deviation at ~u·N:
    # measured 1.9e-5 with √(N·u) against 3.6e-7 with √u (float32 64×96 Gaussian).
    return torch.finfo(dtype).eps ** 0.5


def higham_default_rtol(m: int, n: int, input_dtype: torch.dtype, dtype: torch.dtype) -> float:
    """max(m, n)·u, u the unit roundoff the data carries: float64 only when both the input and the
    working dtype are float64; float32 otherwise (bf16/fp16 inputs are exact in float32)."""
    both64 = input_dtype == torch.float64 and dtype == torch.float64
    return max(m, n, 1) * torch.finfo(torch.float64 if both64 else torch.float32).eps


def _mu(X: Tensor, Xi: Tensor, scaling: str) -> Tensor:
    tiny = torch.finfo(X.dtype).tiny
    if scaling == "norm":
        a = torch.linalg.matrix_norm(Xi)
        b = torch.linalg.matrix_norm(X)
        return (a / b.clamp_min(tiny)).sqrt()
    # 1,∞-norm scaling: ‖·‖₁ = max column sum, ‖·‖_∞ = max row sum.
    a = torch.linalg.matrix_norm(Xi, 1) * torch.linalg.matrix_norm(Xi, float("inf"))
    b = torch.linalg.matrix_norm(X, 1) * torch.linalg.matrix_norm(X, float("inf"))
    return (a / b.clamp_min(tiny)).sqrt().sqrt()


def higham_polar(
    G: Tensor,
    *,
    tol: float | None = None,
    max_iter: int = 20,
    scaling: str = "norm",
    dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
    storage: torch.dtype | None = None,
    storage_tail_only: bool = False,
) -> tuple[Tensor, Tensor]:
    """Canonical polar factor of G (B, m, n) by Higham's QR + scaled Newton + Newton–Schulz tail.

    See the module docstring for the algorithm, the scaling and the rank rule.
    Returns (P in ``dtype`` with G's shape, iterations per matrix (B,) int64; 0 for matrices that
    took the rank-revealing SVD). G must be finite (the caller checks).
    """
    if scaling not in ("norm", "1inf", "fro"):
        raise ValueError(f"scaling must be 'norm', '1inf' or 'fro', got {scaling!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"higham_polar: dtype must be float32 or float64, got {dtype}")
    if storage not in (None, torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise TypeError(f"higham_polar: storage must be None, bfloat16 or float16, got {storage}")
    B, m, n = G.shape
    wide = m < n
    T = frobenius_start((G.mT if wide else G).to(dtype))
    M, N = T.shape[-2:]
    dev = G.device
    u = torch.finfo(dtype).eps
    tol = _default_tol(dtype) if tol is None else tol
    rtol = higham_default_rtol(m, n, G.dtype, dtype) if rtol is None else rtol
    if rtol < 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")

    def store(X: Tensor) -> Tensor:
        return X if storage is None else X.to(storage).to(dtype)

    if M > N:
        Q, X = torch.linalg.qr(T)  # T = Q·R: Newton on the square R
        triangular = True
    else:
        Q, X = None, T
        triangular = False
    X0 = X
    X = store(X)
    eye = torch.eye(N, dtype=dtype, device=dev).expand(B, N, N)
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    tail = torch.zeros(B, dtype=torch.bool, device=dev)
    scale_on = torch.full((B,), scaling != "fro", dtype=torch.bool, device=dev)
    ones = torch.ones(B, dtype=dtype, device=dev)
    flagged = torch.zeros(B, dtype=torch.bool, device=dev)
    check = torch.zeros(B, dtype=torch.bool, device=dev)

    for k in range(max_iter):
        ns = active & tail
        ok = torch.zeros(B, dtype=torch.bool, device=dev)
        Xn, step = X, torch.zeros(B, dtype=dtype, device=dev)
        if bool(ns.any()):
            A = gram(X)  # XXᵀ
            gap = torch.linalg.matrix_norm(A - eye)
            ok = ns & (gap <= SWITCH_GRAM)
            tail = tail & ~(ns & ~ok)  # failed Higham–Schreiber test: back to Newton
            Z = ns_product(A, X)  # 1.5X − 0.5·A·X
            Xn, step = fused_update(X, Z, 0 * ones, ones, ok)
        newton = active & ~tail
        if bool(newton.any()):
            if k == 0 and triangular:
                Xi = torch.linalg.solve_triangular(X, eye, upper=True)
                bad = torch.zeros(B, dtype=torch.bool, device=dev)
            else:
                Xi, info = torch.linalg.inv_ex(X)
                bad = info != 0
            if k == 0:
                # Rank, first test (see the module docstring): certified full rank when
                # 2·rtol·‖R‖_F‖R⁻¹‖_F < 1; sent to the SVD when the inverse is non-finite or
                # meaningless (‖R‖_F‖R⁻¹‖_F·u ≥ 1); checked after convergence otherwise.
                cond = torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(Xi)
                certified = torch.isfinite(cond) & (2 * rtol * cond < 1)
                flagged = bad | ~torch.isfinite(cond) | ((cond * u >= 1) & ~certified)
                check = ~flagged & ~certified
                active = active & ~flagged
                newton = newton & ~flagged
                X = torch.where(flagged[:, None, None], eye, X)
                Xn = torch.where(flagged[:, None, None], eye, Xn)
                Xi = torch.where(flagged[:, None, None], eye, Xi)
            else:
                Xi = torch.where((newton & ~bad)[:, None, None], Xi, eye)
            mu = torch.where(scale_on, _mu(X, Xi, scaling) if scaling != "fro" else ones, ones)
            mu = torch.where(torch.isfinite(mu) & (mu > 0), mu, ones)
            Xw, sw = fused_update(X, Xi.mT, 0.5 * mu, 0.5 / mu, newton)
            Xn = torch.where(newton[:, None, None], Xw, Xn)
            step = torch.where(newton, sw, step)
            scale_on = scale_on & ~(newton & (step <= SCALE_OFF))
            tail = tail | (newton & (step <= SWITCH_STEP))
        moved = active
        rounded = ok if storage_tail_only else moved
        X = torch.where(rounded[:, None, None], store(Xn), torch.where(moved[:, None, None], Xn, X))
        iters = iters + moved.to(torch.int64)
        active = active & ~(step <= tol)
        if not bool(active.any()):
            break

    # Not converged: the SVD decides (never returns a half-converged iterate).
    flagged = flagged | active
    check = check & ~flagged
    if bool(check.any()):
        # Rank, second test, on the converged U = X: R = U·H with H = UᵀR symmetric, eig(H) = σ(R).
        # Cholesky of H − c·I with c = rtol·‖R‖_F ≥ rtol·σ_max succeeds iff every σ > c.
        R, U = X0[check], X[check]
        H = U.mT @ R
        H = 0.5 * (H + H.mT)
        c = rtol * torch.linalg.matrix_norm(R)
        _, info = torch.linalg.cholesky_ex(H - c[:, None, None] * eye[: H.shape[0]])
        failed = torch.zeros(B, dtype=torch.bool, device=dev)
        failed[check] = info != 0
        flagged = flagged | failed
    if bool(flagged.any()):
        # Rank-revealing step on the small factor: R = UΣVᵀ, X = U·diag(σ > rtol·σ_max)·Vᵀ.
        U, S, Vh = torch.linalg.svd(X0[flagged], full_matrices=False)
        keep = (S > rtol * S[..., :1]) & (S > 0)
        X = X.clone()
        X[flagged] = (U * keep.to(dtype)[:, None, :]) @ Vh
        iters = torch.where(flagged, 0, iters)
    if Q is not None:
        X = Q @ X
    P = X.mT if wide else X
    return P, iters
