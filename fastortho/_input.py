"""Input checks shared by the public functions :func:`fastortho.newton_schulz` and :func:`fastortho.polar`,
and the rank-1 case both return exactly."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FLOATS", "check_input", "require_finite", "normalize_vector"]

FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_input(G: Tensor, fn: str) -> None:
    if not isinstance(G, Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(G).__name__}")
    if G.is_sparse or G.layout != torch.strided:
        raise TypeError(f"{fn}: sparse tensors are not supported (layout {G.layout}); call .to_dense()")
    if G.is_complex():
        raise TypeError(f"{fn}: complex tensors are not supported (got {G.dtype})")
    if G.dtype not in FLOATS:
        raise TypeError(f"{fn}: expected a floating-point tensor ({', '.join(map(str, FLOATS))}), got {G.dtype}")
    if G.ndim == 0:
        raise ValueError(f"{fn}: expected a vector or a (..., m, n) matrix, got a 0-dim tensor")


def require_finite(G: Tensor, fn: str) -> None:
    if G.is_meta:  # shapes only: there are no values to check
        return
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"{fn}: input contains NaN or Inf")


def normalize_vector(g: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Rank-1 case: the polar factor of a vector g (an n×1 matrix g = (g/‖g‖)·‖g‖·1) is g/‖g‖; 0 ↦ 0."""
    w = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
    nrm = torch.linalg.vector_norm(w)
    return (w / nrm.clamp_min(torch.finfo(w.dtype).tiny)).to(out_dtype)
