"""Torch backend of Newton–Schulz: plain batched matmuls, any device, any float dtype.

This is the CPU backend and the readable statement of what the Triton kernels compute.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Triple = tuple[float, float, float]


def scale_input(
    G: Tensor, *, safety: float, normalize: str, eps: float
) -> tuple[Tensor, Tensor | None]:
    """X₀ = G / max(safety·ν(G), eps) in float32 (float64 if G is), G of shape (B, m, n) with m ≤ n.

    ν = ‖G‖_F for ``"fro"``; ν = ‖GGᵀ‖_F^{1/2} ≥ σ_max (tighter by up to √rank) for ``"spectral"``,
    which needs the Gram matrix GGᵀ: it is returned scaled (= X₀X₀ᵀ) so the first step reuses it.
    The division by a clamped norm maps a zero matrix to zeros rather than NaN.
    """
    wdtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    Gw = G.to(wdtype)
    if normalize == "fro":
        nu = torch.linalg.vector_norm(Gw, dim=(-2, -1), keepdim=True)
        return Gw / (safety * nu).clamp_min(eps), None
    A = Gw @ Gw.mT
    nu = torch.linalg.vector_norm(A, dim=(-2, -1), keepdim=True).sqrt()
    d = (safety * nu).clamp_min(eps)
    return Gw / d, A / (d * d)


def newton_schulz_torch(
    G: Tensor,
    coefficients: Sequence[Triple],
    *,
    safety: float,
    normalize: str,
    eps: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> Tensor:
    """Quintic Newton–Schulz on G of shape (B, m, n); returns (B, m, n) in ``out_dtype``.

    On the short side (Xᵀ for tall G, a view): X₀ from :func:`scale_input`, then per (a, b, c)
    A = XXᵀ, B = bA + cA², X ← aX + BX, with every product and sum in ``compute_dtype``
    (the eager-PyTorch rounding model: each op rounds once). NaN/Inf propagate.
    """
    tall = G.shape[-2] > G.shape[-1]
    Gs = G.mT if tall else G
    X, A0 = scale_input(Gs, safety=safety, normalize=normalize, eps=eps)
    X = X.to(compute_dtype)
    for i, (a, b, c) in enumerate(coefficients):
        A = A0.to(compute_dtype) if (i == 0 and A0 is not None) else X @ X.mT
        # c == 0 (cubic) skips the A² product: a third fewer matmul flops.
        B = b * A if c == 0 else torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    X = X.mT if tall else X
    return X.to(out_dtype)
