"""The public :func:`newton_schulz`: argument checks, the normalization contract, the backend choice.

It maps G = U S Vᵀ of shape (..., m, n) to an approximation of its polar factor U Vᵀ, batched over the
leading dims, and never modifies G. Backends: :mod:`fastortho.ns_torch` (batched matmuls, any device)
and the Triton op :func:`fastortho.ops.newton_schulz_triton` (fused kernels).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._input import FLOATS, check_input, normalize_vector, require_finite
from .coefficients import Schedule, get_schedule, schedule_precondition
from .ns_torch import newton_schulz_torch
from .ops import newton_schulz_triton, triton_available

__all__ = ["newton_schulz", "NORMALIZE", "canonical_normalize"]

#: normalize= values: ‖G‖_F, or the Gram bound ‖GGᵀ‖_F^{1/2} ≥ σ_max
NORMALIZE = ("fro", "gram")
#: old spellings still accepted, with a DeprecationWarning (docs/decisions.md, table of renames)
_NORMALIZE_ALIASES = {"spectral": "gram"}


def canonical_normalize(normalize: str, *, stacklevel: int = 2) -> str:
    """``normalize`` checked and in its current spelling (``"spectral"`` warns and becomes ``"gram"``)."""
    if normalize in _NORMALIZE_ALIASES:
        new = _NORMALIZE_ALIASES[normalize]
        warnings.warn(f'normalize="{normalize}" is deprecated: the scale is ‖GGᵀ‖_F^(1/2), an upper bound on '
                      f'the spectral norm σ_max, not σ_max itself; use normalize="{new}" (same result)',
                      DeprecationWarning, stacklevel=stacklevel + 1)
        return new
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be 'fro' or 'gram', got {normalize!r}")
    return normalize


def _check_sumsq(sumsq: Tensor, G: Tensor) -> None:
    """``sumsq`` must be one float64/float32 number per matrix of G, on G's device."""
    if not isinstance(sumsq, Tensor):
        raise TypeError(f"newton_schulz: sumsq must be a Tensor or None, got {type(sumsq).__name__}")
    if G.ndim < 2:
        raise ValueError("newton_schulz: sumsq (‖G‖_F² per matrix) needs G of shape (..., m, n); a 1-D G is "
                         "normalized exactly without it: drop sumsq")
    if tuple(sumsq.shape) != tuple(G.shape[:-2]):
        raise ValueError(f"newton_schulz: sumsq must have shape G.shape[:-2] = {tuple(G.shape[:-2])} (one ‖G‖_F² "
                         f"per matrix), got {tuple(sumsq.shape)}")
    if sumsq.dtype not in (torch.float64, torch.float32):
        raise TypeError(f"newton_schulz: sumsq must be float64 (or float32), got {sumsq.dtype}")
    if sumsq.device != G.device:
        raise ValueError(f"newton_schulz: sumsq is on {sumsq.device} but G on {G.device}; move it with "
                         f"sumsq.to({str(G.device)!r}) (a host copy would cost a sync every call)")


def _resolve_backend(backend: str, device: torch.device, precondition: str | None = None) -> str:
    """The backend a call runs on; every schedule, AOL-preconditioned (``precondition``) or not, runs
    on both, so "auto" is Triton on CUDA when it is installed and torch otherwise."""
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
    normalize: Literal["fro", "gram"] = "fro",
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    backend: Literal["auto", "torch", "triton"] = "auto",
    check_finite: bool = False,
    fp32_first_gram: bool = False,
    gram: bool | None = None,
    sumsq: Tensor | None = None,
) -> Tensor:
    r"""Approximate polar factor U Vᵀ of G = U S Vᵀ by quintic Newton–Schulz.

    With X₀ = G / max(safety·ν(G), eps) and, for each step's (a, b, c),

    .. math:: A = XX^\top,\quad X \leftarrow aX + (bA + cA^2)X,

    every singular value goes through p(σ) = aσ + bσ³ + cσ⁵ while U, V stay fixed. Work happens on
    the short side (Xᵀ for tall G, a view, no copy), so an (m, n) step costs 4·m²n + 2m³ flops with
    m ≤ n (less in the Triton kernels, which exploit the symmetry of A).

    Args:
        G: (..., m, n) float tensor; leading dims are a batch. A 1-D g returns g/‖g‖ exactly (the
            rank-1 polar factor). Empty dims give an empty result.
        steps: number of steps; None uses the schedule's native length (5 for "keller"/"cubic"/
            "polar_express"/"you", 8 for "polar_express_paper", 4 for "aol"); more steps never hurt: Polar
            Express is regenerated for that count, other lists continue with a convergent tail
            (``Schedule.rows``).
        coefficients: a name in ``fastortho.SCHEDULES`` ("keller", "you", "polar_express",
            "polar_express_paper", "cubic", "aol"), a :class:`Schedule` (e.g. from
            ``polar_express_schedule``), or a sequence of (a, b, c) triples (safety 1).
            ``"aol"`` is Turbo-Muon's 4-step list (Boissin et al., arXiv 2512.04632), run after AOL
            preconditioning instead of a norm scaling: with A = GGᵀ, X₀ = diag(d)·G with
            d_i = (Σ_j |A_ij|)^{-1/2} (σ_max(X₀) ≤ 1), and step 1 reuses D·A·D, so 4 steps cost 4
            steps of matmuls plus O(m² + mn) elementwise work; ``normalize`` is then not used. Both
            backends run it (Triton: the first Gram product from the symmetric kernel, the row
            scaling in torch ops, then the kernels' steps; standard and Gram-space).
        normalize: ν(G) = ‖G‖_F (``"fro"``) or ‖GGᵀ‖_F^{1/2} = (Σσ⁴)^{1/4} (``"gram"``; the old
            name ``"spectral"`` is a deprecated alias): both bound σ_max from above, the Gram bound
            tighter (by up to rank^{1/4}), and free because the first step needs GGᵀ anyway. A
            tighter bound starts the small singular values higher, so the same steps bring them
            closer to 1. The schedule's safety factor multiplies ν. Both backends compute it the same
            way, on the device without a host sync: with p = 2^-E, E the binary exponent of
            max|G| (so max|G·p| ∈ [1, 2); an exact scaling), ν is taken of G·p in fp32 (fp64 for
            fp64 input) and X₀ = (G·p) / max(safety·ν(G·p), eps·p); "gram" forms the Gram
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
        fp32_first_gram: (triton only; other backends raise) read the fp32 input for the first
            Gram product, removing the bf16 input-rounding floor.
        gram: force (True) or forbid (False) Gram-space iteration: the same polynomial run on the
            m×m Gram matrix (Q ← ZQ, R ← ZRZ with Z = aI + bR + cR², X touched once at the end),
            1.5–1.8× fewer flops when n ≳ 2m. None chooses by shape (torch backend: when it saves
            ≥ 10% of the flops, in fp32/fp64 only; triton: its own rule, in fp16 with restarts).
        sumsq: ‖G_b‖_F² per matrix, already computed (e.g. the float64 Σu² that
            :func:`fastortho.ops.muon_momentum_` returns): shape ``G.shape[:-2]``, float64 (or
            float32), on G's device; ``normalize="fro"`` only. The norm is then not recomputed (the
            Triton backend skips its pass over G): s = 1/max(safety·√sumsq, eps) is formed in float64
            and rounded once to fp32, and p is the power of two below √sumsq (max|G·p| < 2, still
            an exact shift). The result equals the call without ``sumsq`` up to the last-bit
            rounding of s (the norm pass rounds ν, safety·ν and 1/d in fp32): with sumsq exact in
            float64 the two s differ by at most 1 ulp, and the outputs by the bf16 rounding flips
            such a change causes (``tests/test_ns_sumsq.py``). A NaN or Inf sumsq gives a NaN
            matrix, as a NaN/Inf G does; a sumsq that is not ‖G‖_F² scales G wrongly (nothing
            checks it: checking would cost the pass it saves).

    Returns:
        Tensor of G's shape and ``out_dtype``. G is never modified.
    """
    check_input(G, "newton_schulz")
    out_dtype = G.dtype if out_dtype is None else out_dtype
    if check_finite:
        require_finite(G, "newton_schulz")
    if sumsq is not None:
        _check_sumsq(sumsq, G)
    if G.ndim == 1:
        return normalize_vector(G, out_dtype)
    normalize = canonical_normalize(normalize, stacklevel=2)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    coeffs, safety = get_schedule(coefficients, steps)
    precondition = schedule_precondition(coefficients)
    if sumsq is not None and (normalize != "fro" or precondition is not None):
        raise ValueError("sumsq (‖G‖_F²) sets the scale of normalize='fro' only; this call normalizes by "
                         f"{precondition or normalize!r}: drop sumsq, or use normalize='fro' with a schedule "
                         "that is not AOL-preconditioned")
    if dtype is None:
        dtype = torch.bfloat16 if G.device.type == "cuda" else torch.float32
    if dtype not in FLOATS:
        raise TypeError(f"newton_schulz: dtype must be one of {FLOATS}, got {dtype}")
    if G.numel() == 0:
        return torch.empty(G.shape, dtype=out_dtype, device=G.device)
    lead, (m, n) = G.shape[:-2], G.shape[-2:]
    G3 = G.reshape(-1, m, n)  # a view whenever the leading dims allow it
    be = _resolve_backend(backend, G.device, precondition)
    if fp32_first_gram and be != "triton":
        raise ValueError("fp32_first_gram=True needs backend='triton' (CUDA, or CPU under TRITON_INTERPRET=1); "
                         f"this call runs the {be!r} backend, whose first Gram product reads X₀ rounded to "
                         "dtype: pass dtype=torch.float32 for an fp32 iteration, or drop fp32_first_gram")
    q = None if sumsq is None else sumsq.reshape(-1)
    if be == "triton":
        X = newton_schulz_triton(
            G3, coeffs, safety=safety, normalize=precondition or normalize, eps=eps, compute_dtype=dtype,
            out_dtype=out_dtype, fp32_first_gram=fp32_first_gram, gram=gram, sumsq=q,
        )
    else:
        X = newton_schulz_torch(
            G3, coeffs, safety=safety, normalize=precondition or normalize, eps=eps, compute_dtype=dtype,
            out_dtype=out_dtype, gram=gram, sumsq=q,
        )
    return X.reshape(*lead, m, n)
