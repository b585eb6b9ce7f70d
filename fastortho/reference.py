"""The float64 oracle of every accuracy test: the SVD polar factor and error metrics.

For G = U S Vᵀ (thin SVD, shape (..., m, n)) the polar factor is U Vᵀ: the nearest matrix with
orthonormal rows (m ≤ n) or columns (m ≥ n) in every unitarily invariant norm. For a
rank-deficient G we use the *canonical* polar factor U_r V_rᵀ over the r singular values above
``rtol · σ_max``: zero singular values map to zero, the same semantics as Newton–Schulz's msign
(every odd polynomial fixes 0).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["polar_svd", "polar_error", "singular_band", "default_rtol"]


def default_rtol(m: int, n: int, dtype: torch.dtype = torch.float64) -> float:
    """max(m, n)·u for the dtype: the rank tolerance of ``numpy.linalg.matrix_rank``."""
    return max(m, n, 1) * torch.finfo(dtype).eps


def polar_svd(G: Tensor, rtol: float | None = None) -> Tensor:
    """Canonical polar factor U_r V_rᵀ of G (..., m, n), computed in float64 through the SVD.

    Singular values ≤ ``rtol·σ_max`` (default ``max(m, n)·2⁻⁵²``) count as zero, so a zero matrix
    maps to zeros. Returns float64 on G's device with G's shape; 1-D input g gives g/‖g‖.
    """
    if G.ndim == 1:
        g = G.to(torch.float64)
        nrm = torch.linalg.vector_norm(g)
        return torch.where(nrm > 0, g / nrm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(g))
    if G.ndim < 2:
        raise ValueError(f"polar_svd needs a tensor with at least 1 dimension, got shape {tuple(G.shape)}")
    m, n = G.shape[-2:]
    G64 = G.detach().to(torch.float64)
    if G64.numel() == 0:
        return G64.clone()
    U, S, Vh = torch.linalg.svd(G64, full_matrices=False)
    tol = (default_rtol(m, n) if rtol is None else rtol) * S[..., :1]
    keep = (S > tol).to(torch.float64)
    return (U * keep.unsqueeze(-2)) @ Vh


def polar_error(X: Tensor, G: Tensor, reference: Tensor | None = None) -> Tensor:
    """Relative Frobenius error ‖X − U Vᵀ‖_F / ‖U Vᵀ‖_F per matrix (float64, shape G.shape[:-2]).

    ``reference`` may pass a precomputed :func:`polar_svd` of G. Where the reference is zero
    (zero matrix) the error is the absolute ‖X‖_F.
    """
    ref = polar_svd(G) if reference is None else reference.to(torch.float64)
    diff = X.detach().to(device=ref.device, dtype=torch.float64) - ref
    dims = (-1,) if G.ndim == 1 else (-2, -1)
    num = torch.linalg.vector_norm(diff, dim=dims)
    den = torch.linalg.vector_norm(ref, dim=dims)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def singular_band(X: Tensor) -> tuple[Tensor, Tensor]:
    """(σ_min, σ_max) of each matrix of X (..., m, n), in float64: how far X is from orthogonal."""
    if X.ndim < 2 or X.shape[-1] == 0 or X.shape[-2] == 0:
        raise ValueError(f"singular_band needs non-empty (..., m, n) matrices, got shape {tuple(X.shape)}")
    S = torch.linalg.svdvals(X.detach().to(torch.float64))
    return S[..., -1], S[..., 0]
