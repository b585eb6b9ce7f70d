"""Public entry points: ``newton_schulz`` (fast, approximate) and ``polar`` (accurate).

Both map G = U S Vᵀ of shape (..., m, n) to (an approximation of) its polar factor U Vᵀ,
batched over the leading dims, and never modify G.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .coefficients import Schedule, get_schedule
from .ns_torch import newton_schulz_torch
from .ops import newton_schulz_triton, triton_available
from .polar_higham import higham_polar
from .polar_qdwh import qdwh_polar
from .reference import default_rtol, polar_svd

__all__ = ["newton_schulz", "polar"]

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_input(G: Tensor, fn: str) -> None:
    if not isinstance(G, Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(G).__name__}")
    if G.is_sparse or G.layout != torch.strided:
        raise TypeError(f"{fn}: sparse tensors are not supported (layout {G.layout}); call .to_dense()")
    if G.is_complex():
        raise TypeError(f"{fn}: complex tensors are not supported (got {G.dtype})")
    if G.dtype not in _FLOATS:
        raise TypeError(f"{fn}: expected a floating-point tensor ({', '.join(map(str, _FLOATS))}), got {G.dtype}")
    if G.ndim == 0:
        raise ValueError(f"{fn}: expected a vector or a (..., m, n) matrix, got a 0-dim tensor")


def _check_finite(G: Tensor, fn: str) -> None:
    if G.is_meta:  # shapes only: there are no values to check
        return
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"{fn}: input contains NaN or Inf")


def _normalize_vector(g: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Rank-1 case (seed 000, Claims 3 and 13): the polar factor of a vector g is g/‖g‖; 0 ↦ 0."""
    w = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
    nrm = torch.linalg.vector_norm(w)
    return (w / nrm.clamp_min(torch.finfo(w.dtype).tiny)).to(out_dtype)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def newton_schulz(
    G: Tensor,
    steps: int | None = None,
    coefficients: str | Schedule | Sequence[Sequence[float]] = "polar_express",
    *,
    normalize: Literal["fro", "spectral"] = "fro",
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    backend: Literal["auto", "torch", "triton"] = "auto",
    check_finite: bool = False,
    fp32_first_gram: bool = False,
    gram: bool | None = None,
) -> Tensor:
    r"""Approximate polar factor U Vᵀ of G = U S Vᵀ by quintic Newton–Schulz.

    With X₀ = G / max(safety·ν(G), eps) and, for each step's (a, b, c),

    .. math:: A = XX^\top,\quad X \leftarrow aX + (bA + cA^2)X,

    every singular value goes through p(σ) = aσ + bσ³ + cσ⁵ while U, V stay fixed. Work happens on
    the short side (Xᵀ for tall G, a view, no copy), so an (m, n) step costs 4·m²n + 2m³ flops with
    m ≤ n (less in the Triton kernels, which exploit the symmetry of A).

    Args:
        G: (..., m, n) float tensor; leading dims are a batch. A 1-D g returns g/‖g‖ exactly (the
            rank-1 polar factor, seed 000 Claim 3). Empty dims give an empty result.
        steps: number of steps; None uses the schedule's native length (5 for "keller"/"cubic"/
            "polar_express"/"you", 8 for "polar_express_paper"); more steps never hurt: Polar
            Express is regenerated for that count, other lists continue with a convergent tail
            (``Schedule.rows``).
        coefficients: a name in ``fastortho.SCHEDULES`` ("keller", "you", "polar_express",
            "polar_express_paper", "cubic"), a :class:`Schedule` (e.g. from
            ``polar_express_schedule``), or a sequence of (a, b, c) triples (safety 1).
        normalize: ν(G) = ‖G‖_F (``"fro"``) or ‖GGᵀ‖_F^{1/2} (``"spectral"``, a tighter bound on
            σ_max, free because the first step needs GGᵀ anyway; seed 002 argues for operator-norm
            scaling). The schedule's safety factor multiplies ν. Both backends compute it the same
            way, on the device without a host sync: with p = 2^-E, E the binary exponent of
            max|G| (so max|G·p| ∈ [1, 2); an exact scaling), ν is taken of G·p in fp32 (fp64 for
            fp64 input) and X₀ = (G·p) / max(safety·ν(G·p), eps·p); "spectral" forms the Gram
            matrix of G·p. So no square overflows or underflows for any finite G, and ν(G) itself,
            which may overflow, is never formed: G·2^k gives the result of G bit for bit for any
            power of two 2^k that keeps G·2^k normal, while safety·ν > eps (tested at 2^±100 ≈
            1e±30). Limit: the Triton kernels apply s = p/max(…) as one fp32 number, subnormal
            (fewer bits) once safety·ν(G) > 2^126 ≈ 8.5e37.
        eps: floor of the denominator: a matrix with safety·ν < eps is scaled by 1/eps (so a zero
            matrix gives zeros, not NaN), as in torch.optim.Muon's ``max(‖G‖, eps)``.
        dtype: compute (storage) dtype of the iteration; None is bfloat16 on CUDA and float32
            elsewhere (a bf16 matmul on CPU is ~175× slower than fp32). float16/32/64 allowed.
        out_dtype: dtype of the result; None keeps G's dtype.
        backend: "torch" (batched matmuls, any device), "triton" (fused kernels: CUDA, or CPU
            under ``TRITON_INTERPRET=1``), "auto" (triton on CUDA when available, else torch).
        check_finite: raise ``ValueError`` on NaN/Inf input (costs a host sync). Otherwise NaN/Inf
            propagate to the result of that matrix only, and the call never synchronizes.
        fp32_first_gram: (triton) read the fp32 input for the first Gram product, removing the
            bf16 input-rounding floor.
        gram: force (True) or forbid (False) Gram-space iteration: the same polynomial run on the
            m×m Gram matrix (Q ← ZQ, R ← ZRZ with Z = aI + bR + cR², X touched once at the end),
            1.5–1.8× fewer flops when n ≳ 2m. None chooses by shape (torch backend: when it saves
            ≥ 10% of the flops, in fp32/fp64 only; triton: its own rule, in fp16 with restarts).

    Returns:
        Tensor of G's shape and ``out_dtype``. G is never modified.
    """
    _check_input(G, "newton_schulz")
    out_dtype = G.dtype if out_dtype is None else out_dtype
    if check_finite:
        _check_finite(G, "newton_schulz")
    if G.ndim == 1:
        return _normalize_vector(G, out_dtype)
    if normalize not in ("fro", "spectral"):
        raise ValueError(f"normalize must be 'fro' or 'spectral', got {normalize!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    coeffs, safety = get_schedule(coefficients, steps)
    if dtype is None:
        dtype = torch.bfloat16 if G.device.type == "cuda" else torch.float32
    if dtype not in _FLOATS:
        raise TypeError(f"newton_schulz: dtype must be one of {_FLOATS}, got {dtype}")
    if G.numel() == 0:
        return torch.empty(G.shape, dtype=out_dtype, device=G.device)
    lead, (m, n) = G.shape[:-2], G.shape[-2:]
    G3 = G.reshape(-1, m, n)  # a view whenever the leading dims allow it
    be = _resolve_backend(backend, G.device)
    if be == "triton":
        X = newton_schulz_triton(
            G3, coeffs, safety=safety, normalize=normalize, eps=eps, compute_dtype=dtype,
            out_dtype=out_dtype, fp32_first_gram=fp32_first_gram, gram=gram,
        )
    else:
        X = newton_schulz_torch(
            G3, coeffs, safety=safety, normalize=normalize, eps=eps, compute_dtype=dtype,
            out_dtype=out_dtype, gram=gram,
        )
    return X.reshape(*lead, m, n)


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
    scaling: Literal["norm", "fro"] = "norm",
    dtype: torch.dtype | None = None,
    rtol: float | None = None,
    return_hermitian: bool = False,
    return_iterations: bool = False,
    **ns_kwargs,
):
    r"""Polar decomposition G = P·H: P has orthonormal rows/columns, H = PᵀG is symmetric PSD.

    Methods:
        ``"qdwh"`` (default): QR-based dynamically weighted Halley (``fastortho.polar_qdwh``; the
            method of ``jax.scipy.linalg.polar``) on the short side after a QR of G: two QR steps,
            then Cholesky steps, then one Newton–Schulz polish. Error ≈ u·κ (κ = σ_max/σ_min of the
            kept part): float32 keeps σ/σ_max down to ~3e-6 (64×128), where "higham" keeps ~2e-3.
            At most 4 steps in float32, 6 in float64, whatever κ.
        ``"higham"``: scaled Newton iteration Φ(X) = ½(μX + μ⁻¹(XXᵀ)⁻¹X) on the short side with
            Cholesky solves of the Gram matrix (seed 000 Claim 11 with Higham's norm scaling;
            ``scaling="fro"`` is the seed's unscaled form). The Gram matrix squares κ: float32
            resolves σ/σ_max ≳ 2e-3 only; directions below are dropped.
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
    rule (see ``fastortho.polar_higham``).
    NaN/Inf input raises ``ValueError``; a non-finite result raises ``FloatingPointError`` (this
    path is for accuracy, not hot loops: it synchronizes with the device). A meta-device G returns
    meta tensors of the result's shapes and dtypes (shape inference; no values are computed).

    Returns:
        P in the working dtype (float64 for "svd"; G's dtype for "newton_schulz"); with
        ``return_hermitian`` also H = PᵀG (..., n, n; 1×1 for a vector); with ``return_iterations``
        also the iteration count per matrix (``G.shape[:-2]``, int64; "qdwh" and "higham").
    """
    _check_input(G, "polar")
    if method not in ("qdwh", "higham", "newton_schulz", "svd"):
        raise ValueError(f"method must be 'qdwh', 'higham', 'newton_schulz' or 'svd', got {method!r}")
    if return_iterations and method not in ("qdwh", "higham"):
        raise ValueError("return_iterations is only defined for method='qdwh' or 'higham'")
    if scaling not in ("norm", "fro"):
        raise ValueError(f"scaling must be 'norm' or 'fro', got {scaling!r}")
    if method == "qdwh" and scaling != "norm":
        raise ValueError("scaling applies to method='higham' only (QDWH's weights are its scaling)")
    if rtol is not None and not (0.0 <= rtol < 1.0):
        raise ValueError(f"rtol must be in [0, 1) (the relative rank cut), got {rtol}")
    if G.is_meta and method != "newton_schulz":
        return _polar_meta(G, method, dtype, return_hermitian, return_iterations)
    if method != "newton_schulz":
        _check_finite(G, "polar")
    iters = None
    if method == "svd":
        P = polar_svd(G, rtol)
    elif method == "newton_schulz":
        P = newton_schulz(G, **ns_kwargs)
    elif G.ndim == 1:
        P = _normalize_vector(G, torch.float64 if G.dtype == torch.float64 else torch.float32)
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
                P3, it = higham_polar(G3, tol=tol, max_iter=max_iter, scaling=scaling, dtype=wdtype, rtol=rtol)
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
