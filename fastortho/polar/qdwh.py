"""Batched QDWH polar (QR-based dynamically weighted Halley): the accurate path for ill-conditioned G.

Why not Newton on the Gram matrix: an iteration that forms XXᵀ squares the condition number, so
float32 resolves only σ/σ_max ≳ 2e-3. QDWH (Nakatsukasa, Bai & Gygi 2010; the method behind
``jax.scipy.linalg.polar``) never inverts a Gram matrix while it is ill-conditioned:

* Short side, QR first: for G (m×n, m ≤ n) take T = Gᵀ (n×m) = Q₀R (Householder QR, backward
  stable), so polar(T) = Q₀·polar(R) and the iteration runs on the square m×m factor R (n > m only;
  a square G is iterated directly). X₀ = R/‖R‖_F (σ_max ≤ 1).
* Step: X ← X(aI + bXᵀX)(I + cXᵀX)⁻¹, i.e. σ ← f(σ) = σ(a + bσ²)/(1 + cσ²). With l a lower bound on
  σ_min the weights are γ = (4(1−l²)/l⁴)^{1/3}, a = √(1+γ) + ½√(8 − 4γ + 8(2−l²)/(l²√(1+γ))),
  b = (a−1)²/4, c = a + b − 1, and l ← f(l): f maps [l, 1] into [f(l), 1] and f(1) = 1, so every
  σ ≥ l₀ reaches 1 in ≤ 6 steps for l₀ ≥ 1e-16 (cubic convergence once a ≈ 3).
* While c > 100 the step is evaluated through the QR of the stack [√c·X; I] = [Q₁; Q₂]R':
  X ← (b/c)X + (a − b/c)/√c · Q₁Q₂ᵀ (no Gram matrix is formed: backward stable). After that
  I + cXᵀX has condition ≤ 101, and the cheaper Cholesky form is used:
  X ← (b/c)X + (a − b/c)·X(I + cXᵀX)⁻¹ (``cholesky_ex`` + ``cholesky_solve``).
* Fixed l₀ for the whole batch: l₀ = 10·τ/√m with τ the rank tolerance (default max(m, n)·u of the
  working dtype, that of ``fastortho.reference.polar_svd`` at that precision) and √m from the
  Frobenius start. The weight schedule is the same scalar list for every matrix (computed once on
  the host, in float64) and ends when 1 − l ≤ u: 4 steps in float32, 6 in float64 for 64×128.
  No σ_min estimate is needed; well-conditioned matrices stop earlier on the step test. No plain
  Halley steps follow the schedule: f'(0) = a > 1, so extra steps would lift the directions below
  l₀ (noise) towards 1.
* Stop: per matrix when ‖X_{k+1} − X_k‖_F/‖X_{k+1}‖_F ≤ tol (default (4u)^{1/3}: cubic
  convergence lands the next error at ~u) after the schedule's QR phase; converged matrices are
  frozen (batch result = each matrix alone). Then one Newton–Schulz step X ← 1.5X − 0.5XXᵀX
  polishes orthogonality (error e → 1.5e²; zero directions stay zero).
* Rank: every f fixes 0 and amplifies σ < l₀ only partly, so the composed map sends σ ≥ 0.3·l₀
  to 1 (to u), crosses 1/√2 at σ ≈ 0.1·l₀ (float32) / 0.03·l₀ (float64), and leaves rounding noise
  (σ ~ u·‖G‖_F ≪ l₀) small. Matrices with ‖XᵀX − I‖_F > √u after the loop are finished by
  X ← X·W·diag(λ^{-1/2}·[λ > ½])·Wᵀ from XᵀX = WΛWᵀ: an eigh of a matrix whose kept eigenvalues
  lie in [½, 1] (condition ≤ 2, where the original Gram matrix has κ²), which maps the kept
  singular values to exactly 1 and the rest to 0 with G's singular vectors. The result is the
  canonical factor U_rV_rᵀ with the cut at σ ≈ τ·‖G‖_F/√m (float32 64×128 at κ ≥ 1e6: every
  σ ≥ 3e-6·σ_max kept). Exact zeros stay exactly 0; a zero matrix maps to zeros.
* Backends: XᵀX + I of the Cholesky steps and the fused update X' = αX + βZ (with the per-matrix
  step norm) go through ``fastortho.polar._gpu_step`` (Triton on CUDA, torch elsewhere); QR, Cholesky
  and the solves are ``torch.linalg`` (cuSOLVER / LAPACK).

Cost (``qdwh_flops``): for a 64×128 float32 G about 8.7 MFLOP (first QR 2.8, one QR step 2.3,
three Cholesky steps 2.6, polish and check 1.0), less than 5 / 8 Newton–Schulz steps on G
(13.1 / 21.0 MFLOP, naive) because QR-first shrinks the iterate to 64×64; but LAPACK/cuSOLVER QR
and Cholesky run far below GEMM rate. Measured numbers: ``bench/RESULTS.md``.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ._gpu_step import frobenius_start, fused_update, gram

__all__ = ["qdwh_polar", "qdwh_schedule", "qdwh_flops"]


def _weights(l: float) -> tuple[float, float, float]:
    """Dynamic Halley weights (a, b, c) for the lower bound l ∈ (0, 1] (Nakatsukasa et al. 2010, eq. 3.13)."""
    l2 = l * l
    g = (4.0 * (1.0 - l2) / (l2 * l2)) ** (1.0 / 3.0)
    s = math.sqrt(1.0 + g)
    a = s + 0.5 * math.sqrt(max(8.0 - 4.0 * g + 8.0 * (2.0 - l2) / (l2 * s), 0.0))
    b = (a - 1.0) ** 2 / 4.0
    return a, b, a + b - 1.0


@functools.lru_cache(maxsize=64)
def qdwh_schedule(l0: float, eps: float, max_iter: int) -> tuple[tuple[float, float, float], ...]:
    """Weights (a, b, c) per step from l₀ until 1 − l ≤ eps (every σ ≥ l₀ is then 1 to working
    precision), at most max_iter steps. No plain-Halley tail on purpose: f'(0) = a > 1 amplifies
    the directions below l₀ at every extra step, until they too would converge to 1."""
    out = []
    l = l0
    while len(out) < max_iter and 1.0 - l > eps:
        a, b, c = _weights(l)
        out.append((a, b, c))
        l = min(1.0, l * (a + b * l * l) / (1.0 + c * l * l))
    return tuple(out)


def qdwh_flops(m: int, n: int, n_qr: int, n_chol: int) -> float:
    """Flops of one call on an m×n G (m ≤ n), n_qr QR steps and n_chol Cholesky steps (+1 NS polish).

    Householder QR of a p×q matrix: 2pq² − ⅔q³ (+ the same to form Q explicitly).
    QR first (n > m): QR of n×m + forming Q₀ (4nm² − 4/3m³) and the final Q₀·X (2nm²).
    QR step on 2m×m: 2·(2·2m·m² − ⅔m³) + Q₁Q₂ᵀ (2m³) = 26/3 m³ + 2m³.
    Cholesky step: XᵀX (m³, symmetric), chol (⅓m³), solve (2m³). NS polish: m³ + 2m³.
    """
    first = (4 * n * m * m - 4 / 3 * m**3 + 2 * n * m * m) if n > m else 0.0
    qr_step = 2 * (4 * m**3 - 2 / 3 * m**3) + 2 * m**3
    chol_step = m**3 + m**3 / 3 + 2 * m**3
    return first + n_qr * qr_step + n_chol * chol_step + 3 * m**3


def _default_tol(dtype: torch.dtype) -> float:
    return (4 * torch.finfo(dtype).eps) ** (1.0 / 3.0)


def qdwh_polar(
    G: Tensor,
    *,
    tol: float | None = None,
    max_iter: int = 12,
    dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Canonical polar factor of G (B, m, n) by QDWH; see the module docstring.

    Returns (P in ``dtype`` with G's shape, iterations per matrix (B,) int64). G must be finite.
    """
    B, m0, n0 = G.shape
    # Tall form T (n×m, n ≥ m): the iteration's Gram matrices XᵀX are m×m on the short side.
    T = (G if m0 > n0 else G.mT).to(dtype)
    n, m = T.shape[-2:]
    u = torch.finfo(dtype).eps
    tol = _default_tol(dtype) if tol is None else tol
    tau = max(m, n) * u if rtol is None else rtol
    dev = G.device

    if n > m:
        Q0, X = torch.linalg.qr(T)  # T = Q₀R: iterate on the square R
    else:
        Q0, X = None, T
    X = frobenius_start(X)
    eye = torch.eye(m, dtype=dtype, device=dev)
    ones = torch.ones(B, dtype=dtype, device=dev)
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    active = X.flatten(1).abs().amax(1) > 0  # a zero matrix is its own canonical factor
    # l₀ sits 10x above the cut so that the kept directions (σ ≳ 3l₀/10) converge to 1 within the
    # schedule: the composed map crosses 1/√2 at σ ≈ 0.1·l₀ (float32) / 0.03·l₀ (float64).
    l0 = min(max(10 * tau / math.sqrt(m), 1e-300), 0.5)
    for a, b, c in qdwh_schedule(l0, u, max_iter):
        if c > 100:
            # Backward-stable form: never forms XᵀX while I + cXᵀX is ill-conditioned.
            Q, _ = torch.linalg.qr(torch.cat([math.sqrt(c) * X, eye.expand(B, m, m)], dim=-2))
            Z, beta = Q[:, :m] @ Q[:, m:].mT, (a - b / c) / math.sqrt(c)
            qr_phase = True
        else:
            # I + c·XᵀX has condition ≤ 1 + c ≤ 101 here: Cholesky is accurate.
            L, _ = torch.linalg.cholesky_ex(gram(X.mT, c, identity=True))
            Z, beta = torch.cholesky_solve(X.mT, L).mT, a - b / c
            qr_phase = False
        X, step = fused_update(X, Z, ones * (b / c), ones * beta, active)
        iters = iters + active.to(torch.int64)
        # Stop only after the QR phase: while l ≪ 1 a single step can be small for a matrix whose
        # smallest directions have not moved yet. A non-finite step never counts as converged.
        if not qr_phase:
            active = active & ~(step <= tol)
        if not bool(active.any()):
            break
    X = _canonical(X, eye, u)
    # Newton–Schulz polish: σ ← 1.5σ − 0.5σ³ squares the distance to 1 and fixes 0.
    X = 1.5 * X - 0.5 * X @ (X.mT @ X)
    if Q0 is not None:
        X = Q0 @ X
    P = X if m0 > n0 else X.mT
    return P, iters


def _canonical(X: Tensor, eye: Tensor, u: float) -> Tensor:
    """Map every singular value of X above 1/√2 to exactly 1 and the rest to 0, where needed.

    Only matrices with ‖XᵀX − I‖_F > √u are touched (a converged full-rank X is left to the NS
    polish, which turns √u into u). For those, XᵀX = WΛWᵀ and X ← X·W·diag(λ^{-1/2}·[λ > ½])·Wᵀ:
    this is the canonical polar factor of X itself, computed from a Gram matrix whose kept
    eigenvalues lie in [½, 1] (condition ≤ 2, unlike the original Gram matrix with κ²). Singular
    vectors of X are those of G, so the kept directions are exactly G's, with no O(κ) loss.
    """
    Y = X.mT @ X
    off = torch.linalg.matrix_norm(Y - eye) > torch.finfo(X.dtype).eps ** 0.5
    if bool(off.any()):
        lam, W = torch.linalg.eigh(Y[off])
        w = torch.where(lam > 0.5, lam.clamp_min(0.5).rsqrt(), 0.0)
        X = X.clone()
        X[off] = X[off] @ ((W * w[..., None, :]) @ W.mT)
    return X
