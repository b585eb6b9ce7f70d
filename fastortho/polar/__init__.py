"""The public :func:`polar`: the polar decomposition G = P·H by QDWH, Higham's Newton, or the SVD.

It maps G = U S Vᵀ of shape (..., m, n) to its polar factor P = U Vᵀ, batched over the leading dims,
and never modifies G. Methods: :mod:`fastortho.polar.qdwh`, :mod:`fastortho.polar.higham`,
:func:`fastortho.reference.polar_svd`, and :func:`fastortho.newton_schulz`; the products every
iteration step needs (Triton on CUDA, torch elsewhere) are in :mod:`fastortho.polar._gpu_step`.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from .._input import check_input, normalize_vector, require_finite
from ..newton_schulz import newton_schulz
from ..reference import default_rtol, polar_svd
from .higham import higham_polar
from .qdwh import qdwh_polar

__all__ = ["polar"]

#: old spellings of scaling= still accepted, with a DeprecationWarning (docs/decisions.md, table of renames)
_SCALING_ALIASES = {"fro": "none"}
#: scaling= as higham_polar spells it ("fro": the start X₀ = G/‖G‖_F is the only scaling)
_HIGHAM_SCALING = {"norm": "norm", "none": "fro"}


def _polar_meta(G: Tensor, method: str, dtype: torch.dtype | None, hermitian: bool, iterations: bool):
    """Shape inference on the meta device: results with the shapes and dtypes ``polar`` returns."""
    if method == "svd":
        wdtype = torch.float64
    else:
        wdtype = dtype or (torch.float64 if G.dtype == torch.float64 else torch.float32)
        if wdtype not in (torch.float32, torch.float64):
            raise TypeError(f"polar(method={method!r}): working dtype must be float32 or float64, "
                            f"got {wdtype}")
    out = [torch.empty(G.shape, dtype=wdtype, device="meta")]
    if hermitian:
        n = 1 if G.ndim == 1 else G.shape[-1]
        out.append(torch.empty((*G.shape[:-2], n, n), dtype=wdtype, device="meta"))
    if iterations:
        out.append(torch.empty(G.shape[:-2] if G.ndim >= 2 else (), dtype=torch.int64, device="meta"))
    return out[0] if len(out) == 1 else tuple(out)


def polar(
    G: Tensor,
    method: Literal["qdwh", "higham", "newton_schulz", "svd"] = "qdwh",
    *,
    tol: float | None = None,
    max_iter: int = 20,
    scaling: Literal["norm", "none"] = "norm",
    dtype: torch.dtype | None = None,
    rtol: float | None = None,
    return_hermitian: bool = False,
    return_iterations: bool = False,
    **ns_kwargs,
):
    r"""Polar decomposition G = P·H: P has orthonormal rows/columns, H = PᵀG is symmetric PSD.

    Methods:
        ``"qdwh"`` (default): QR-based dynamically weighted Halley (``fastortho.polar.qdwh``; the
            method of ``jax.scipy.linalg.polar``) on the short side after a QR of G: two QR steps,
            then Cholesky steps, then one Newton–Schulz polish. Error ≈ u·κ (κ = σ_max/σ_min of the
            kept part): float32 keeps σ/σ_max down to ~3e-6 (64×128), where "higham" keeps ~2e-3.
            At most 4 steps in float32, 6 in float64, whatever κ.
        ``"higham"``: Higham & Schreiber, "Fast polar decomposition of an arbitrary matrix" (1990):
            a QR of G, then the scaled Newton iteration X ← ½(μX + μ⁻¹X⁻ᵀ) on the triangular factor
            and an inverse-free Newton–Schulz tail. ``scaling="norm"`` (default) takes Higham's
            Frobenius-norm μ (Higham 1986, "Computing the polar decomposition—with applications");
            ``scaling="none"`` takes μ = 1, the unscaled iteration (the old name ``"fro"`` is a
            deprecated alias). Rank rule and accuracy: ``fastortho.polar.higham``.
        ``"svd"``: exact SVD in float64 (``fastortho.reference.polar_svd``), with the rank cut of
            G's own precision (below).
        ``"newton_schulz"``: delegates to :func:`newton_schulz` with ``ns_kwargs``.

    Iterative methods work in float32 by default (float64 if G is float64; bf16/fp16 inputs are
    upcast; ``dtype`` picks float32 or float64), are batched over the leading dims (each matrix
    stops on its own when the relative step ‖X_{k+1} − X_k‖_F/‖X_{k+1}‖_F ≤ ``tol``, and the batch
    returns the same result as each matrix alone), and run at most ``max_iter`` steps. On CUDA the
    Gram products use fastortho's symmetric Triton kernel and the step update a fused Triton kernel.

    Rank-deficient G: the canonical polar factor U_r V_rᵀ (small singular values map to 0, as in
    Newton–Schulz). ``rtol`` sets the cut: "svd" drops σ ≤ rtol·σ_max; "qdwh" drops
    σ ≲ rtol·‖G‖_F/√m. The default follows the precision of the data, not of the computation:
    ``fastortho.reference.default_rtol(m, n, dtype)`` = min(max(m, n)·ε, √ε) with ε of the less
    precise of G's dtype and the working dtype (a rank-r float32 or bfloat16 G carries rounding-noise
    singular values of order ε·σ_max, which a float64 cut would map to 1). "higham" has its own
    rule (see ``fastortho.polar.higham``).
    NaN/Inf input raises ``ValueError``; a non-finite result raises ``FloatingPointError`` (this
    path is for accuracy, not hot loops: it synchronizes with the device). A meta-device G returns
    meta tensors of the result's shapes and dtypes (shape inference; no values are computed).

    Returns:
        P in the working dtype (float64 for "svd"; G's dtype for "newton_schulz"); with
        ``return_hermitian`` also H = PᵀG (..., n, n; 1×1 for a vector); with ``return_iterations``
        also the iteration count per matrix (``G.shape[:-2]``, int64; "qdwh" and "higham").
    """
    check_input(G, "polar")
    if method not in ("qdwh", "higham", "newton_schulz", "svd"):
        raise ValueError(f"method must be 'qdwh', 'higham', 'newton_schulz' or 'svd', got {method!r}")
    if return_iterations and method not in ("qdwh", "higham"):
        raise ValueError("return_iterations is only defined for method='qdwh' or 'higham'")
    if ns_kwargs and method != "newton_schulz":
        names = ", ".join(repr(k) for k in ns_kwargs)
        raise TypeError(f"polar(method={method!r}) got unexpected keyword argument(s) {names}: the Newton–Schulz "
                        "options (steps, coefficients, normalize, ...) apply to method='newton_schulz' only")
    if scaling in _SCALING_ALIASES:
        new = _SCALING_ALIASES[scaling]
        warnings.warn(f'polar: scaling="{scaling}" is deprecated: it is the unscaled Newton iteration (X₀ = G/‖G‖_F, '
                      f'no per-step scaling); use scaling="{new}" (same result)', DeprecationWarning, stacklevel=2)
        scaling = new
    if scaling not in ("norm", "none"):
        raise ValueError(f"scaling must be 'norm' (Higham's norm scaling) or 'none', got {scaling!r}")
    if method == "qdwh" and scaling != "norm":
        raise ValueError("scaling applies to method='higham' only (QDWH's weights are its scaling)")
    if rtol is not None and not (0.0 <= rtol < 1.0):
        raise ValueError(f"rtol must be in [0, 1) (the relative rank cut), got {rtol}")
    if G.is_meta and method != "newton_schulz":
        return _polar_meta(G, method, dtype, return_hermitian, return_iterations)
    if method != "newton_schulz":
        require_finite(G, "polar")
    iters = None
    if method == "svd":
        P = polar_svd(G, rtol)
    elif method == "newton_schulz":
        P = newton_schulz(G, **ns_kwargs)
    elif G.ndim == 1:
        P = normalize_vector(G, torch.float64 if G.dtype == torch.float64 else torch.float32)
        iters = torch.zeros((), dtype=torch.int64, device=G.device)
    else:
        wdtype = dtype or (torch.float64 if G.dtype == torch.float64 else torch.float32)
        if wdtype not in (torch.float32, torch.float64):
            raise TypeError(f"polar(method={method!r}): working dtype must be float32 or float64, got {wdtype}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        lead, (m, n) = G.shape[:-2], G.shape[-2:]
        if G.numel() == 0:
            P = torch.empty(G.shape, dtype=wdtype, device=G.device)
            iters = torch.zeros(lead, dtype=torch.int64, device=G.device)
        else:
            G3 = G.reshape(-1, m, n)
            if method == "qdwh":
                # The cut follows the coarser of the data's and the working precision.
                coarse = max(G.dtype, wdtype, key=lambda d: torch.finfo(d).eps)
                q_rtol = default_rtol(m, n, coarse) if rtol is None else rtol
                P3, it = qdwh_polar(G3, tol=tol, max_iter=max_iter, dtype=wdtype, rtol=q_rtol)
            else:
                P3, it = higham_polar(G3, tol=tol, max_iter=max_iter, scaling=_HIGHAM_SCALING[scaling], dtype=wdtype,
                                      rtol=rtol)
            if not bool(torch.isfinite(P3).all()):
                raise FloatingPointError(f"polar(method={method!r}): the iteration produced NaN/Inf")
            P, iters = P3.reshape(G.shape), it.reshape(lead)
    out = [P]
    if return_hermitian:
        Gp = G.to(P.dtype)
        # A vector is an (n, 1) column here: H = Pᵀg = ‖g‖ as a 1×1 matrix.
        H = (P @ Gp).reshape(1, 1) if G.ndim == 1 else P.mT @ Gp
        out.append(0.5 * (H + H.mT))
    if return_iterations:
        out.append(iters)
    return out[0] if len(out) == 1 else tuple(out)
