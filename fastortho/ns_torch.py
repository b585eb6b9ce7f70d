"""Torch backend of Newton–Schulz: plain batched matmuls, any device, any float dtype.

This is the CPU backend and the readable statement of what the Triton kernels compute.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .flops import ns_flops, ns_gram_flops

Triple = tuple[float, float, float]


def pow2_prescale(G: Tensor) -> Tensor:
    """p = 2^-E per matrix of G (B, m, n), E the binary exponent of max|G| (max|G·p| in [1, 2)),
    clamped so that p and 1/p are normal numbers of G's dtype. Multiplying by p is exact, so the
    torch and Triton backends see the same G·p; NaN/Inf give the largest clamp (they propagate)."""
    return _pow2_below(G.abs().amax(dim=(-2, -1), keepdim=True), G.dtype)


def _pow2_below(a: Tensor, dtype: torch.dtype) -> Tensor:
    """2^-E (in a's dtype) with E the binary exponent of a ≥ 0 (a·2^-E in [1, 2)), clamped so that 2^±E
    are normal in ``dtype``; NaN/Inf give the largest clamp."""
    _, e = torch.frexp(a)                         # a = f·2^e, f in [0.5, 1)
    lo, hi = (-1022, 1022) if dtype == torch.float64 else (-126, 126)
    e = torch.where(torch.isfinite(a), e - 1, hi).clamp(lo, hi)
    return torch.ldexp(torch.ones_like(a), -e)


def _given_norm(sumsq: Tensor, dtype: torch.dtype, *, safety: float, eps: float) -> tuple[Tensor, Tensor]:
    """(p, d) of :func:`scale_input` from given sums of squares (B,) = ‖G_b‖_F², without reading G:
    p = 2^-E, E the exponent of ν = √sumsq (so max|G·p| ≤ ν·p < 2), and d = max(safety·ν, eps)·p
    formed in float64 and rounded once to ``dtype``; NaN/Inf sumsq give d = NaN (a NaN matrix, as
    a NaN/Inf G gives through the norm)."""
    q = sumsq.to(torch.float64).reshape(-1, 1, 1)
    nu = q.sqrt()
    p = _pow2_below(nu, dtype)
    d = safety * nu
    d = torch.where(d < eps, eps, d) * p + (q - q)  # NaN survives the max; q - q: NaN for Inf/NaN q
    return p.to(dtype), d.to(dtype)


def scale_input(
    G: Tensor, *, safety: float, normalize: str, eps: float, sumsq: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """X₀ = G / max(safety·ν(G), eps) in float32 (float64 if G is), G of shape (B, m, n) with m ≤ n.

    ν = ‖G‖_F for ``"fro"``; ν = ‖GGᵀ‖_F^{1/2} ≥ σ_max (tighter than ‖G‖_F by up to rank^{1/4}) for ``"gram"``,
    which needs the Gram matrix GGᵀ: it is returned scaled (= X₀X₀ᵀ) so the first step reuses it.
    ``"aol"`` (the schedules with ``precondition="aol"``) replaces the division by a norm with the
    row scaling of :func:`aol_precondition` (``safety`` unused), its Gram matrix returned likewise.
    The normalization contract shared with the Triton backend: norms are taken of G·p, p the power
    of two with max|G·p| in [1, 2) (:func:`pow2_prescale`, exact), so squares neither overflow
    (|G| ~ 1e20 in fp32) nor underflow (|G| ~ 1e-25); with d = safety·ν(G·p),
    X₀ = (G·p) / max(d, eps·p), and ν(G) = ν(G·p)/p is never formed. A zero matrix gives zeros.
    ``sumsq`` ((B,) ‖G_b‖_F², ``"fro"`` only) replaces the norm: p and the denominator come from it
    (:func:`_given_norm`), and G is read once, to scale it.
    """
    wdtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    Gw = G.to(wdtype)
    if sumsq is not None:
        if normalize != "fro":
            raise ValueError(f"sumsq is ‖G‖_F², the scale of normalize='fro' only, got normalize={normalize!r}")
        p, d = _given_norm(sumsq, wdtype, safety=safety, eps=eps)
        return (Gw * p) / d, None
    p = pow2_prescale(Gw)
    Gn = Gw * p  # exact
    if normalize == "aol":
        return aol_precondition(Gn, p, eps=eps)
    A = None
    if normalize == "fro":
        nu_n = torch.linalg.vector_norm(Gn, dim=(-2, -1), keepdim=True)
    else:
        A = Gn @ Gn.mT
        nu_n = torch.linalg.vector_norm(A, dim=(-2, -1), keepdim=True).sqrt()
    d = safety * nu_n
    lim = eps * p  # eps·p overflowing (tiny G) or underflowing (huge G) still decides correctly
    d = torch.where(d < lim, lim, d)  # written so that NaN survives
    X = Gn / d
    if A is not None:
        A = A / (d * d)
    return X, A


def aol_precondition(Gn: Tensor, p: Tensor, *, eps: float) -> tuple[Tensor, Tensor]:
    """AOL rescaling of Gn = G·p (B, m, n), m ≤ n, p the exact power-of-two prescale of
    :func:`pow2_prescale`: X₀ = D·Gn and X₀X₀ᵀ = D·A·D, with A = Gn Gnᵀ and D = diag(1/s),
    s_i = max(√(Σ_j |A_ij|), eps·p).

    σ_max(X₀) ≤ 1 (Schur test on DAD with weights s: max_i Σ_j |A_ij| / s_i² ≤ 1; Prach & Lampert,
    "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks"), and rows of very
    different norms come out nearly equal, which starts the small singular values higher than a norm
    scaling does when the rows differ (Boissin et al., "Turbo-Muon", arXiv 2512.04632). The Gram matrix
    is the one the first Newton–Schulz step needs anyway, so the rescale costs O(m² + mn) elementwise
    work and no matmul. The floor is the norm path's: a row whose √(Σ_j |(GGᵀ)_ij|) < eps in G's units
    is divided by eps (flooring only lowers 1/s_i, so the bound holds; a zero matrix gives zeros);
    eps·p is kept ≥ the dtype's smallest normal so a zero row never meets 0·∞. The result does not
    depend on p (up to the floor): G·2^k gives the bits of G. NaN/Inf propagate within their matrix.
    """
    A = Gn @ Gn.mT
    s = A.abs().sum(dim=-1, keepdim=True).sqrt()   # (B, m, 1)
    lim = (eps * p).clamp_min(torch.finfo(Gn.dtype).tiny)
    s = torch.where(s < lim, lim, s)                # written so that NaN survives
    d = 1.0 / s
    return Gn * d, A * d * d.mT


GRAM_MIN_SHORT = 256  # as in the Triton backend: below it, per-op overhead outweighs the flops saved


def use_gram_torch(m: int, n: int, steps: int, dtype: torch.dtype) -> bool:
    """Automatic choice for the torch backend: Gram-space when it saves ≥ 10% of the matmul flops
    and the short side is ≥ 256.

    Only in fp32/fp64: in bf16 the Gram iterate loses too much (σ_max reaches ~1.6, Dao AI Lab);
    the Triton backend runs its Gram variant in fp16 with restarts instead. Without restarts the
    Gram iterate is also more sensitive to input perturbations (a 1e-7 gradient difference moved a
    small TP test's weights 25× more), another reason to keep small matrices on the standard path.
    """
    if dtype not in (torch.float32, torch.float64) or steps == 0 or min(m, n) < GRAM_MIN_SHORT:
        return False
    return ns_gram_flops(m, n, steps) < 0.9 * ns_flops(m, n, steps)


def _gram_space(X: Tensor, A0: Tensor | None, coefficients: Sequence[Triple]) -> Tensor:
    """The same iteration on the m×m Gram matrix (X: (B, m, n), m ≤ n, in the compute dtype).

    Every X_k is Q_k X₀ with Q_k a polynomial in R₀ = X₀X₀ᵀ, so with Z = aI + bR + cR²:
    Q ← ZQ and R ← ZRZ (= X_{k+1}X_{k+1}ᵀ, since Z and R commute), and X is touched once at the end.
    No restarts in fp32/fp64: on 768×3072 inputs the result differs from standard NS by less than
    standard NS differs from its float64 run, in error vs the SVD by < 0.05% (tests/test_newton_schulz.py).
    """
    R = X @ X.mT if A0 is None else A0.to(X.dtype)
    Q = None
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        Z = b * R if c == 0 else torch.baddbmm(R, R, R, beta=b, alpha=c)
        Z.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = Z if Q is None else Z @ Q
        if i < last:
            R = Z @ (R @ Z)
    return X if Q is None else Q @ X


def _standard(X: Tensor, A0: Tensor | None, coefficients: Sequence[Triple]) -> Tensor:
    """The iteration as written: A = XXᵀ (A₀ reused when given), B = bA + cA², X ← aX + BX."""
    for i, (a, b, c) in enumerate(coefficients):
        A = A0.to(X.dtype) if (i == 0 and A0 is not None) else X @ X.mT
        # c == 0 (cubic) skips the A² product: a third fewer matmul flops.
        B = b * A if c == 0 else torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


def newton_schulz_torch(
    G: Tensor,
    coefficients: Sequence[Triple],
    *,
    safety: float,
    normalize: str,
    eps: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    gram: bool | None = None,
    sumsq: Tensor | None = None,
) -> Tensor:
    """Quintic Newton–Schulz on G of shape (B, m, n); returns (B, m, n) in ``out_dtype``.

    On the short side (Xᵀ for tall G, a view): X₀ from :func:`scale_input`, then per (a, b, c)
    A = XXᵀ, B = bA + cA², X ← aX + BX, with every product and sum in ``compute_dtype``
    (the eager-PyTorch rounding model: each op rounds once). NaN/Inf propagate.
    ``gram`` (None: :func:`use_gram_torch`) runs the same polynomial in Gram space instead.
    ``sumsq``: (B,) ‖G_b‖_F² that replaces the norm (:func:`scale_input`).
    """
    if G.device.type == "cpu" and G.shape[0] > 1:
        # On CPU a batched GEMM runs 10-15% slower than the same GEMMs one matrix at a time
        # (measured: 12 x 768x3072, 1.87 s batched vs 1.64 s looped), so loop. A bonus: each matrix gets
        # exactly the bits it gets alone, whatever it is batched with.
        out = torch.empty(G.shape, dtype=out_dtype)
        for i in range(G.shape[0]):
            out[i] = newton_schulz_torch(
                G[i : i + 1], coefficients, safety=safety, normalize=normalize, eps=eps,
                compute_dtype=compute_dtype, out_dtype=out_dtype, gram=gram,
                sumsq=None if sumsq is None else sumsq[i : i + 1],
            )[0]
        return out
    tall = G.shape[-2] > G.shape[-1]
    Gs = G.mT if tall else G
    X, A0 = scale_input(Gs, safety=safety, normalize=normalize, eps=eps, sumsq=sumsq)
    X = X.to(compute_dtype)
    if gram is None:
        gram = use_gram_torch(Gs.shape[-2], Gs.shape[-1], len(coefficients), compute_dtype)
    X = (_gram_space if gram else _standard)(X, A0, coefficients)
    return (X.mT if tall else X).to(out_dtype)
