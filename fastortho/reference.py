"""The float64 oracle of every accuracy test: the SVD polar factor and error metrics.

For G = U S Vᵀ (thin SVD, shape (..., m, n)) the polar factor is U Vᵀ: the nearest matrix with
orthonormal rows (m ≤ n) or columns (m ≥ n) in every unitarily invariant norm. For a
rank-deficient G we use the *canonical* polar factor U_r V_rᵀ over the r singular values above
``rtol · σ_max``: zero singular values map to zero, the same semantics as Newton–Schulz's msign
(every odd polynomial fixes 0).

The default ``rtol`` follows the precision G is *stored* in, not the float64 of the computation:
a rank-r matrix rounded to float32 or bfloat16 has r true singular values and min(m, n) − r
rounding-noise ones of order u·σ_max (u = unit roundoff of G's dtype); a float64 cut would give
the noise full weight (a rank-1 float32 64×32 matrix would map to a factor of norm √32, not 1).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["polar_svd", "polar_error", "singular_band", "default_rtol"]


def default_rtol(m: int, n: int, dtype: torch.dtype = torch.float64) -> float:
    """Relative rank cut for an m×n matrix stored in ``dtype``: min(max(m, n)·ε, √ε), ε = eps(dtype).

    max(m, n)·ε is the numerical-rank tolerance of ``numpy.linalg.matrix_rank`` (σ ≤ rtol·σ_max
    counts as zero). It bounds the rounding noise of a low-rank matrix held in that precision:
    measured on rank-r 64×32 products, the first noise σ sits at 2e-8 (float32), 1e-4 (float16)
    and 9e-4 (bfloat16) relative to σ_max, i.e. ≈ 0.1–0.2·ε. For 8-bit-mantissa formats
    max(m, n)·ε reaches 1 at n = 128 (bfloat16) and would zero every direction, so the cut is capped
    at √ε, the resolution of a Gram matrix formed in the same precision (0.088 for bfloat16,
    0.031 for float16; float32 reaches the cap only for max(m, n) > 2896, float64 never).
    Non-floating dtypes use float64's ε.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return min(max(m, n, 1) * eps, eps ** 0.5)


def polar_svd(G: Tensor, rtol: float | None = None) -> Tensor:
    """Canonical polar factor U_r V_rᵀ of G (..., m, n), computed in float64 through the SVD.

    Singular values ≤ ``rtol·σ_max`` count as zero, so a zero matrix maps to zeros. The default
    ``rtol`` is :func:`default_rtol` for G's dtype (float32 64×32: 7.6e-6; float64: 1.4e-14): the
    cut follows the precision G is stored in. Pass a float64 G (or an explicit ``rtol``) to keep
    directions below that precision. Returns float64 on G's device with G's shape; 1-D input g
    gives g/‖g‖.
    """
    if rtol is not None and not (0.0 <= rtol < 1.0):
        raise ValueError(f"rtol must be in [0, 1) (σ ≤ rtol·σ_max counts as zero), got {rtol}")
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
    tol = (default_rtol(m, n, G.dtype) if rtol is None else rtol) * S[..., :1]
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
