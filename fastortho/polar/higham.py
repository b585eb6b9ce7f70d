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
  batched LU inverses (``torch.linalg.inv_ex``: no host sync on failure).
* Switch to the inverse-free tail (Higham–Schreiber's test): Newton–Schulz
  X ← ½(3I − XXᵀ)X = 1.5X − 0.5·(XXᵀ)X (two products, matmuls only; σ ← ½σ(3 − σ²) converges
  quadratically for σ ∈ (0, √3)). Each tail step forms A = XXᵀ first and checks ‖A − I‖_F ≤ ½
  (spectral ≤ Frobenius, so every σ² ∈ [½, 3/2]); a matrix that fails takes a Newton step next.
  The switch is made when the test is sure to pass: after a Newton step every σ ≥ 1
  (½(x + 1/x) ≥ 1), so every σ² − 1 ≥ 0 and ‖XXᵀ − I‖_F ≤ Σ(σ² − 1) = ‖X‖_F² − N, a by-product
  of the step. A small relative step is no such test: it is an RMS over the σ, and one lagging σ
  (the smallest, in practice) hides in it while ‖XXᵀ − I‖ is still > 1. On CUDA the tail runs in
  fastortho's Triton kernels: A in the symmetric kernel, (−½A)X + 1.5X in the apply kernel, both
  with 3xTF32 (fp32-accurate) dots.
* Stop: per matrix, when the relative step ‖X_{k+1} − X_k‖_F/‖X_{k+1}‖_F ≤ tol (default √u:
  quadratic convergence lands the step just taken at ~u). Converged matrices leave the batch:
  later steps gather the matrices still running (``index_select``) and scatter them back, so a
  batch costs what its matrices cost alone and returns the same result as each matrix alone.
* One host synchronization per iteration: the per-matrix numbers the bookkeeping needs (steps,
  ‖X‖_F² − N, LU status, switch tests) come back in one device-to-host copy; the bookkeeping is
  vectorized on the host (numpy), the index lists go back non-blocking.
* Rank (the canonical factor U_rV_rᵀ: σ ≤ rtol·σ_max map to 0). Column-pivoted QR is not in torch;
  the numerical rank is decided in two tests and, where needed, one rank-revealing SVD:
  1. From the first inverse (Newton needs it anyway): σ_min ≥ 1/‖R⁻¹‖_F and σ_max ≤ ‖R‖_F, so
     2·rtol·‖R‖_F‖R⁻¹‖_F < 1 certifies that every σ is above the cut (no further check). A
     non-finite inverse (exact zeros: rank-deficient or zero matrices) or ‖R‖_F‖R⁻¹‖_F·u ≥ 1
     (the inverse is noise) sends the matrix straight to the SVD below.
  2. The others run Newton; the converged U gives R = U·H with H = sym(UᵀR), eig(H) = σ(R) (to
     second order in U's error: a skew error E in U moves H by the commutator [H, E], whose
     diagonal in H's eigenbasis is 0). σ̂ = 1.02 × the largest Ritz value of 24 Lanczos steps on
     H (a lower estimate of σ_max, within 0.5% on square Gaussians); a Cholesky of σ̂·I − H proves
     σ̂ ≥ σ_max and a Cholesky of H − rtol·σ̂·I proves every σ > rtol·σ̂ ≥ the cut (one batched
     ``cholesky_ex``, 2·N³/3 flops). So the test is tight to ~2%: a full-rank matrix whose σ_min
     is above 1.02·cut never pays for an SVD. If either fails (Newton completed noise directions to
     1, or σ̂ was short), the SVD below decides. (A Frobenius-norm stand-in for σ_max is up to √N
     too loose: square Gaussians, κ ~ N, would fail it and pay Newton and the SVD.)
  3. SVD of the small N×N factor (working precision): R = UΣVᵀ, X = U·diag(σ > rtol·σ_max)·Vᵀ.
  No NaN, no orthogonal completion of noise. Matrices not converged in ``max_iter`` also go to the
  SVD. Default rtol = max(m, n)·u with u the unit roundoff of the data (float64 when the input and
  working dtype are float64; float32 otherwise: bf16/fp16 input is exact in float32): the cut of
  ``numpy.linalg.matrix_rank``. Matrices that took the SVD report 0 iterations.
* ``storage``: a numerical experiment, not a speed path: round X to bfloat16/float16 after every
  step (products accumulate in the working dtype), the storage model of a low-precision iteration;
  with ``storage_tail_only`` only the start and the Newton–Schulz tail steps are rounded.

The result P = Q·X (cast to ``dtype``), transposed back for wide G.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._gpu_step import frobenius_start, fused_update, gram, ns_product

__all__ = ["higham_polar", "higham_default_rtol", "lanczos_max", "SWITCH_GRAM"]

#: Higham–Schreiber's test: a tail step is taken only where ‖XXᵀ − I‖_F ≤ SWITCH_GRAM; a Newton
#: step whose result has ‖X‖_F² − N ≤ SWITCH_GRAM (a bound on ‖XXᵀ − I‖_F there) switches to it.
SWITCH_GRAM = 0.5
#: Scaling stops once the relative step is below this (μ ≈ 1 there).
SCALE_OFF = 1e-2
#: Lanczos steps for the σ_max estimate of the rank test, and the slack put on its Ritz value
#: (the slack is then proven by a Cholesky of σ̂·I − H).
LANCZOS_STEPS = 24
SIGMA_SLACK = 1.02


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


def _mu(nX: Tensor, nXi: Tensor, X: Tensor, Xi: Tensor, scaling: str) -> Tensor:
    """Newton scaling μ per matrix from ‖X‖_F = nX, ‖X⁻¹‖_F = nXi (or the 1,∞-norms of X, Xi)."""
    tiny = torch.finfo(X.dtype).tiny
    if scaling == "norm":
        return (nXi / nX.clamp_min(tiny)).sqrt()
    # 1,∞-norm scaling: ‖·‖₁ = max column sum, ‖·‖_∞ = max row sum.
    a = torch.linalg.matrix_norm(Xi, 1) * torch.linalg.matrix_norm(Xi, float("inf"))
    b = torch.linalg.matrix_norm(X, 1) * torch.linalg.matrix_norm(X, float("inf"))
    return (a / b.clamp_min(tiny)).sqrt().sqrt()


def _newton_step(
    X: Tensor, Xi: Tensor, scale: Tensor | bool, scaling: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """X' = ½(μX + μ⁻¹X⁻ᵀ) for every matrix, μ = 1 where ``scale`` is False; returns
    (X', relative step, ‖X‖_F·‖X⁻¹‖_F, ‖X'‖_F² − N). A non-finite inverse gives a non-finite step:
    the caller sends that matrix to the SVD."""
    nX = torch.linalg.matrix_norm(X)
    nXi = torch.linalg.matrix_norm(Xi)
    if scale is False or scaling == "fro":
        mu = torch.ones_like(nX)
    else:
        mu = _mu(nX, nXi, X, Xi, scaling)
        if scale is not True:
            mu = torch.where(scale, mu, 1.0)
    Xn, step = fused_update(X, Xi.mT, 0.5 * mu, 0.5 / mu, torch.ones_like(nX, dtype=torch.bool))
    excess = torch.linalg.vector_norm(Xn, dim=(-2, -1)).square() - X.shape[-1]
    return Xn, step, nX * nXi, excess


def lanczos_max(H: Tensor, steps: int = LANCZOS_STEPS) -> Tensor:
    """Largest Ritz value of each symmetric H (b, N, N) after min(steps, N) Lanczos steps.

    A Ritz value lies inside [λ_min, λ_max] (up to rounding), so this is a lower estimate of λ_max;
    on square Gaussian spectra (a √-shaped top edge, the slowest case for Krylov methods) 24 steps
    land within 0.5% of it at N = 128..1024 (power iteration: 3–6% low). The start vector is the
    same fixed pseudo-random vector for every matrix: a matrix's estimate does not depend on its
    position in a batch. No reorthogonalization: lost orthogonality only repeats Ritz values.
    """
    b, N, _ = H.shape
    dt, dev = H.dtype, H.device
    tiny = torch.finfo(dt).tiny
    q = torch.randn(N, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = (q / q.norm()).to(dtype=dt).to(dev, non_blocking=True).expand(b, N, 1)
    q_prev = torch.zeros_like(q)
    beta = torch.zeros(b, 1, 1, dtype=dt, device=dev)
    alphas, betas = [], []
    for j in range(min(steps, N)):
        w = torch.baddbmm(q_prev, H, q, beta=-1.0) if j else H @ q  # Hq_j − β_{j−1}·q_{j−1}
        a = q.mT @ w
        w = w - a * q
        beta = torch.linalg.vector_norm(w, dim=(-2, -1), keepdim=True)
        alphas.append(a.view(b))
        betas.append(beta.view(b))
        q_prev = beta * q  # β_j·q_j, subtracted in the next step
        q = w / beta.clamp_min(tiny)
    T = torch.diag_embed(torch.stack(alphas, -1))
    if len(betas) > 1:
        off = torch.stack(betas[:-1], -1)
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    return torch.linalg.eigvalsh(T)[..., -1]


_NEWTON, _TAIL, _DONE, _SVD = 0, 1, 2, 3


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

    def index(idx: np.ndarray) -> Tensor | None:
        # None = the whole batch (no gather/scatter copies). Host-to-device, non-blocking: the
        # iteration's one synchronization stays the device-to-host copy of its report.
        return None if len(idx) == B else torch.from_numpy(idx).to(dev, non_blocking=True)

    def take(X: Tensor, ix: Tensor | None) -> Tensor:
        return X if ix is None else X.index_select(0, ix)

    def put(X: Tensor, ix: Tensor | None, Xs: Tensor) -> Tensor:
        return Xs if ix is None else X.index_copy_(0, ix, Xs)

    eye = torch.eye(N, dtype=dtype, device=dev)
    if M > N:
        Q, R = torch.linalg.qr(T)  # T = Q·R: Newton on the square R
        Xi = torch.linalg.solve_triangular(R, eye.expand(B, N, N), upper=True)
        info = torch.zeros(B, dtype=torch.int32, device=dev)
    else:
        Q, R = None, T
        Xi, info = torch.linalg.inv_ex(R)

    # Iteration 1, every matrix: Newton from the first inverse, and the rank's first test.
    X = store(R)
    Xn, step, cond, excess = _newton_step(X, Xi, True, scaling)
    X = Xn if storage_tail_only else store(Xn)
    # The one host synchronization of each iteration: every per-matrix number the host decides on.
    step_h, cond_h, info_h, excess_h = torch.stack([step, cond, info.to(dtype), excess]).cpu().numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(cond_h) & np.isfinite(step_h)
        certified = finite & (2 * rtol * cond_h < 1)
        # Straight to the SVD: no inverse (exact zeros), or an inverse that is noise (κ_F·u ≥ 1).
        flagged = (info_h != 0) | ~finite | ((cond_h * u >= 1) & ~certified)
    check = ~flagged & ~certified
    mode = np.where(flagged, _SVD, _NEWTON)
    iters = np.where(flagged, 0, 1)
    scale_on = np.full(B, scaling != "fro")

    def after_newton(sel: np.ndarray, st: np.ndarray, ex: np.ndarray) -> None:
        scale_on[sel] &= ~(st <= SCALE_OFF)
        mode[sel] = np.where(ex <= SWITCH_GRAM, _TAIL, _NEWTON)
        mode[sel[st <= tol]] = _DONE

    live = np.flatnonzero(~flagged)
    after_newton(live, step_h[live], excess_h[live])

    while True:
        # Not converged in max_iter steps: the SVD decides (never a half-converged iterate).
        mode[(iters >= max_iter) & ((mode == _NEWTON) | (mode == _TAIL))] = _SVD
        tail_i, newt_i = np.flatnonzero(mode == _TAIL), np.flatnonzero(mode == _NEWTON)
        if len(tail_i) + len(newt_i) == 0:
            break
        report = []
        if len(tail_i):
            ix = index(tail_i)
            Xs = take(X, ix)
            A = gram(Xs)  # XXᵀ
            ok = torch.linalg.matrix_norm(A - eye) <= SWITCH_GRAM  # Higham–Schreiber's test
            Z = ns_product(A, Xs)  # 1.5X − 0.5·A·X
            one = torch.ones_like(A[:, 0, 0])
            Xt, st = fused_update(Xs, Z, 0 * one, one, ok)
            Xt = torch.where(ok[:, None, None], store(Xt), Xt) if storage is not None else Xt
            X = put(X, ix, Xt)
            report += [st, ok.to(dtype)]
        if len(newt_i):
            ix = index(newt_i)
            Xs = take(X, ix)
            Xi, info = torch.linalg.inv_ex(Xs)
            on = scale_on[newt_i]
            sc = bool(on[0]) if on.all() or not on.any() else torch.from_numpy(on).to(dev, non_blocking=True)
            Xw, sw, _, ex = _newton_step(Xs, Xi, sc, scaling)
            X = put(X, ix, Xw if storage_tail_only else store(Xw))
            report += [sw, info.to(dtype), ex]
        h = torch.cat(report).cpu().numpy()
        nt = len(tail_i)
        if nt:
            st, ok_h = h[:nt], h[nt:2 * nt] != 0
            moved = tail_i[ok_h]
            iters[moved] += 1
            mode[tail_i[~ok_h]] = _NEWTON  # failed the switch test: Newton again
            mode[moved[st[ok_h] <= tol]] = _DONE
        if len(newt_i):
            sw, bad, ex = h[2 * nt:].reshape(3, -1)
            bad = (bad != 0) | ~np.isfinite(sw)
            mode[newt_i[bad]] = _SVD
            good = newt_i[~bad]
            iters[good] += 1
            after_newton(good, sw[~bad], ex[~bad])

    # Rank, second test, on the converged U = X: R = U·H with H = UᵀR symmetric, eig(H) = σ(R)
    # (to second order in U's error). σ̂ = 1.02 × the largest Lanczos Ritz value of H; Cholesky of
    # σ̂·I − H proves σ̂ ≥ σ_max, Cholesky of H − rtol·σ̂·I proves σ_min > rtol·σ̂ ≥ rtol·σ_max.
    chk = np.flatnonzero(check & (mode == _DONE))
    if len(chk):
        ix = index(chk)
        Rc = take(R, ix)
        H = take(X, ix).mT @ Rc
        H = 0.5 * (H + H.mT)
        s_up = (SIGMA_SLACK * lanczos_max(H))[:, None, None]
        _, info = torch.linalg.cholesky_ex(torch.cat([s_up * eye - H, H - (rtol * s_up) * eye]))
        fail = (info.view(2, -1) != 0).any(0).cpu().numpy()
        mode[chk[fail]] = _SVD
    svd_i = np.flatnonzero(mode == _SVD)
    if len(svd_i):
        # Rank-revealing step on the small factor: R = UΣVᵀ, X = U·diag(σ > rtol·σ_max)·Vᵀ.
        ix = index(svd_i)
        U, S, Vh = torch.linalg.svd(take(R, ix), full_matrices=False)
        keep = (S > rtol * S[..., :1]) & (S > 0)
        X = put(X, ix, (U * keep.to(dtype)[:, None, :]) @ Vh)
        iters[svd_i] = 0
    if Q is not None:
        X = Q @ X
    P = X.mT if wide else X
    return P, torch.from_numpy(iters.astype(np.int64)).to(dev, non_blocking=True)
