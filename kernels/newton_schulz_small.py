"""Whole Newton–Schulz iteration of one small matrix per program: one launch per call.

For a batch of small inputs (e.g. 64 × 128×128, attention heads, LoRA factors) the multi-kernel
path makes 18 launches for 5 steps (norm pass 2, cast 1, symmetric products 10, applies 5) whose
work is a few microseconds each: host and launch latency dominate. Here one program takes one
matrix, X (k×L, k ≤ L) kept in its output block and swept in column chunks, the k×k matrices A and
B in registers (padded to a power of two), and runs

    p = 2^-E,  E the clamped exponent of max|G|;  ν from Σ(G·p)² ("fro") or from X'X'ᵀ ("gram");
    t = 1 / max(safety·ν(G·p), eps·p);   X' = round(p·G);
    (given sumsq = ‖G‖_F², "fro": p and t from ``_sumsq_scale``, the scale kernel's bits; no norm pass)
    A = round(t·t·X'X'ᵀ)            ("fro";  "gram": A = round(X'X'ᵀ·(t·t)), X'X'ᵀ kept in fp32)
    per step (a, b, c):  B = round(c·A·A + b·A),   X ← round(σ·(B·X + a·X))  (σ = t at step 0, else 1),
                         A = round(X·Xᵀ)  (before every step but the first),

with the rounding points, fp32 epilogues and normalization formulas of the multi-kernel path
(``kernels/newton_schulz_iteration.ns_standard`` with ``kernels/newton_schulz.py``): A and B keep
their upper triangle mirrored (exactly symmetric), padding is forced to zero after every rounding
(as the other kernels' masked loads do, so NaN/Inf stay within the entries they reach there), and
dot operands are ``DOT_DTYPE`` (the storage dtype on a GPU, fp32 under the interpreter, ``_round``
with SOFT_BF16 for the interpreter's bf16 rounding). Only the reduction trees differ (one program
sums what the norm pass splits into tiles, one ``tl.dot`` per product instead of BLOCK_K chunks), so
results agree with the multi-kernel path to rounding, not bit for bit; a matrix gets the same
program alone or in any batch (batch-invariant). Eligibility depends on the shape and dtypes only.

The coefficients are a flat (3·steps,) fp32 tensor read in the kernel: one compiled kernel serves every
schedule and step count.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from . import interpreter_enabled
from .newton_schulz import _round
from .newton_schulz_norm import _add_scaled_squares, _exponent, _pow2, _rest_scale, _sumsq_scale
from .newton_schulz_launch import dot_setup, tl_dtype

__all__ = ["_ns_small_kernel", "ns_small", "small_eligible", "tiles", "MAX_K", "MAX_K_FP32", "MAX_L"]


@triton.jit
def _sym_upper(A, r, c, ok):
    """A's upper triangle (row ≤ col) mirrored below, zero outside the k×k block ``ok`` (A's dtype)."""
    A = tl.where(r[:, None] <= c[None, :], A, tl.trans(A))
    return tl.where(ok, A, tl.zeros_like(A))


@triton.jit
def _ns_small_kernel(
    G, OUT, COEF, SUMSQ,
    STEPS, K, L,
    sg_b, sg_r, sg_c,
    so_b, so_r, so_c,
    safety, eps,
    GRAM_NORM: tl.constexpr,     # ν = ‖GGᵀ‖_F^{1/2} ("gram") instead of ‖G‖_F ("fro")
    HAS_SUMSQ: tl.constexpr,     # SUMSQ[b] = ‖G_b‖_F² given ("fro"): (p, t) from it, no norm pass
    CDT: tl.constexpr,           # storage dtype of X, A, B and the output
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,       # ≥ k, power of two ≥ 16
    BLOCK_C: tl.constexpr,       # columns of X per chunk, power of two ≥ 16
):
    """OUT[b] = the Newton–Schulz iterate of G[b] (logical k×L views, any strides), stored in CDT.

    X lives in OUT[b] between steps (the program's own k×L block: L1/L2-resident) and is processed
    in column chunks of BLOCK_C: a column chunk of B·X + a·X needs only that chunk of X, so each
    chunk is read, updated and written back in place, and X·Xᵀ accumulates over the chunks. Only
    the k×k matrices A and B stay in registers, so registers do not grow with L."""
    b = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    ck = tl.arange(0, BLOCK_K)
    cc = tl.arange(0, BLOCK_C)
    row_ok = rk < K
    km = row_ok[:, None] & (ck[None, :] < K)
    g_rows = G + b * sg_b + rk[:, None].to(tl.int64) * sg_r
    o_rows = OUT + b * so_b + rk[:, None].to(tl.int64) * so_r

    if HAS_SUMSQ:
        # (p, t) from the given sum, the bits of ``_sumsq_scale_kernel`` (the same helper): no pass over G.
        _, p, t = _sumsq_scale(tl.load(SUMSQ + b), safety, eps)
    else:
        # Norm pass (``_sumsq_partial_kernel`` then ``_scale_kernel``, ROOT = 2): squares of x·2^-E with
        # E the running clamped exponent of max|G|; a rise of E rescales the sum by an exact power of two.
        ssq = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        e = tl.full((), -126, tl.int32)
        for c0 in range(0, L, BLOCK_C):
            cols = (c0 + cc).to(tl.int64)
            m = row_ok[:, None] & (cols[None, :] < L)
            x = tl.abs(tl.load(g_rows + cols[None, :] * sg_c, mask=m, other=0.0).to(tl.float32))
            ssq, e = _add_scaled_squares(ssq, e, x)
        p = _pow2(-e)

    # X' = round(p·G) (``_scale_cast_kernel``) written to OUT; its Gram product accumulated.
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_C):
        cols = (c0 + cc).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < L)
        x = tl.load(g_rows + cols[None, :] * sg_c, mask=m, other=0.0).to(tl.float32)
        xs = _round(x * p, CDT, SOFT_BF16)
        tl.store(o_rows + cols[None, :] * so_c, xs, mask=m)
        xd = xs.to(DOT_DTYPE)
        acc = tl.dot(xd, tl.trans(xd), acc, input_precision=INPUT_PRECISION)
    if GRAM_NORM:
        # ROOT = 4 pass over the fp32 Gram matrix X'X'ᵀ (mirrored, as ``sym_mm`` writes it).
        raw = _sym_upper(acc, rk, ck, km)
        za = tl.abs(raw)
        e2 = tl.maximum(tl.full((), -126, tl.int32), _exponent(tl.max(tl.max(za, axis=1), axis=0)))
        z = za * _pow2(-e2)
        nu = tl.sqrt(tl.sqrt(tl.sum(tl.sum(z * z, axis=1), axis=0)) * _pow2(e2))
    elif not HAS_SUMSQ:
        nu = tl.sqrt(tl.sum(tl.sum(ssq, axis=1), axis=0))
    if not HAS_SUMSQ:
        t = _rest_scale(nu, p, safety, eps)
    if GRAM_NORM:
        A = raw * (t * t)
    else:
        A = acc * t * t
    A = _sym_upper(_round(A, CDT, SOFT_BF16), rk, ck, km)
    tl.debug_barrier()                                      # X' stored by every thread before reloads

    for i in range(STEPS):
        ca = tl.load(COEF + 3 * i)
        cb = tl.load(COEF + 3 * i + 1)
        cc2 = tl.load(COEF + 3 * i + 2)
        Ad = A.to(DOT_DTYPE)
        Bm = tl.dot(Ad, Ad, input_precision=INPUT_PRECISION) * cc2
        Bm += cb * A.to(tl.float32)
        Bd = _sym_upper(_round(Bm, CDT, SOFT_BF16), rk, ck, km).to(DOT_DTYPE)
        sc = tl.where(i == 0, t, 1.0)                       # the first step's scale t, in the epilogue
        acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
        for c0 in range(0, L, BLOCK_C):
            cols = (c0 + cc).to(tl.int64)
            m = row_ok[:, None] & (cols[None, :] < L)
            ptrs = o_rows + cols[None, :] * so_c
            x = tl.load(ptrs, mask=m, other=0.0)
            nx = tl.dot(Bd, x.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
            nx += ca * x.to(tl.float32)
            xn = _round(nx * sc, CDT, SOFT_BF16)
            tl.debug_barrier()                              # every thread has read this chunk
            tl.store(ptrs, xn, mask=m)
            xd = tl.where(m, xn, tl.zeros_like(xn)).to(DOT_DTYPE)
            acc = tl.dot(xd, tl.trans(xd), acc, input_precision=INPUT_PRECISION)
        A = _sym_upper(_round(acc * 1.0, CDT, SOFT_BF16), rk, ck, km)   # A = round(X·Xᵀ) for the next step
        tl.debug_barrier()                                  # this step's X stored before the next reads


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------

#: Eligible inputs: k ≤ MAX_K (A and B, k×k, live in registers), k ≤ MAX_K_FP32 in fp32 storage (fp32
#: dots on 128×128 accumulators spill), L ≤ MAX_L (one program per matrix does all of its matrix's
#: work: past a few k×k×L products per step the multi-kernel path, which spreads a matrix over many
#: programs, is the faster one). Every launched variant is AOT-checked for sm_80/86/89/90/100: no
#: spills, shared memory within the arch's limit (``tests/test_kernels_compile.py``).
MAX_K = 128
MAX_K_FP32 = 32
MAX_L = 1024
NORMALIZE = ("fro", "gram")
#: ``newton_schulz`` takes this kernel for eligible inputs (False: always the multi-kernel path; tests
#: and benchmarks compare the two).
ENABLED = True


def _pow2_at_least(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def small_eligible(k: int, L: int, normalize: str, steps: int, cdt: torch.dtype) -> bool:
    """Whether a k×L (k ≤ L) standard iteration runs as one program per matrix: decided from the
    shape, options and storage dtype only, never from the batch size or the data (batch invariance)."""
    kmax = MAX_K_FP32 if cdt == torch.float32 else MAX_K
    return steps > 0 and normalize in NORMALIZE and 0 < k <= kmax and k <= L <= MAX_L


def tiles(k: int, L: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_C, num_warps): the k×k block, the column chunk of X and the warps. Past
    k = 64 the chunk is 16 columns: with 32 the fp32-input "gram" variant spills on sm_86/89 (56 and
    380 B) and 64×128×128 sits at 255 registers on sm_80 (AOT, Triton 3.8)."""
    bk = _pow2_at_least(k)
    if bk <= 64:
        return bk, min(_pow2_at_least(L), 64), 4
    return bk, 16, 8


_COEF: dict[tuple, torch.Tensor] = {}


def coef_tensor(coefficients, device: torch.device) -> torch.Tensor:
    """The flat (3·steps,) fp32 coefficient tensor (a, b, c per step) on ``device``, cached per schedule (no per-call copy)."""
    key = (tuple(coefficients), device)
    t = _COEF.get(key)
    if t is None:
        t = torch.tensor(coefficients, dtype=torch.float32).reshape(-1).to(device)
        if type(t) is not torch.Tensor:     # a fake tensor (AOT trace): never cached for real calls
            return t
        if len(_COEF) >= 64:
            _COEF.clear()
        _COEF[key] = t
    return t


_LAUNCH: dict[tuple, tuple] = {}


def _launch_setup(k: int, L: int, normalize: str, cdt: torch.dtype, device: torch.device) -> tuple:
    """(BLOCK_K, BLOCK_C, warps, constexpr kwargs) of a launch, cached per (shape, options, dtype, device
    type): the environment reads and dtype maps of ``dot_setup`` run once, not on every call."""
    tf32 = cdt == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    key = (k, L, normalize, cdt, device.type, tf32)
    hit = _LAUNCH.get(key)
    if hit is None:
        bk, bc, warps = tiles(k, L)
        dot_dt, prec = dot_setup(cdt, device)
        hit = (bk, bc, warps, dict(GRAM_NORM=normalize == "gram", CDT=tl_dtype(cdt), DOT_DTYPE=dot_dt,
                                   INPUT_PRECISION=prec, SOFT_BF16=interpreter_enabled(), BLOCK_K=bk, BLOCK_C=bc,
                                   num_warps=warps, num_stages=1))
        _LAUNCH[key] = hit
    return hit


def ns_small(Gv: torch.Tensor, out: torch.Tensor, coefficients, *, normalize: str, safety: float, eps: float,
             cdt: torch.dtype, fp32_first: bool = False, sumsq: torch.Tensor | None = None) -> torch.Tensor:
    """Standard Newton–Schulz of every matrix of the logical wide view Gv (B, k, L), one program each,
    into ``out`` (same logical view, dtype ``cdt``); the signature of ``ns_standard``. Callers check
    :func:`small_eligible` first; ``fp32_first`` is not supported (multi-kernel path). ``sumsq``: (B,)
    contiguous float64/float32 ‖G_b‖_F² ("fro" only); the kernel forms (p, t) from it as
    ``sumsq_norm_scale`` does, bit for bit, and skips its norm pass over G."""
    if fp32_first:
        raise ValueError("ns_small: fp32_first runs on the multi-kernel path (ns_standard)")
    if sumsq is not None and normalize != "fro":
        raise ValueError(f"sumsq is ‖G‖_F², the scale of normalize='fro' only, got normalize={normalize!r}")
    B, k, L = Gv.shape
    if B == 0:
        return out
    *_, meta = _launch_setup(k, L, normalize, cdt, Gv.device)
    co = coefficients if isinstance(coefficients, tuple) else tuple(coefficients)
    coef = coef_tensor(co, Gv.device)
    # without a sum, SUMSQ is never read (HAS_SUMSQ=False compiles the load out): any pointer will do
    _ns_small_kernel[(B,)](Gv, out, coef, coef if sumsq is None else sumsq, len(co), k, L, *Gv.stride(),
                           *out.stride(), float(safety), float(eps), HAS_SUMSQ=sumsq is not None, **meta)
    return out


def run(G: torch.Tensor, coefficients, *, safety: float, normalize: str, eps: float, cdt: torch.dtype,
        out_dtype: torch.dtype, sumsq: torch.Tensor | None = None) -> torch.Tensor:
    """The whole small-matrix call for G (B, m, n) (``fastortho.ops.newton_schulz._impl``): allocate the
    result, launch once on the short-side view, convert to ``out_dtype`` when it differs from ``cdt``;
    ``sumsq`` as in :func:`ns_small`.

    Triton launches on the current device: a tensor on another CUDA device gets a device guard (it then
    runs on that device's current stream); the guard is skipped when the device is already current."""
    B, m, n = G.shape
    out = torch.empty(B, m, n, device=G.device, dtype=out_dtype)
    res = out if out_dtype == cdt else torch.empty(B, m, n, device=G.device, dtype=cdt)
    tall = m > n
    Gv, resv = (G.mT, res.mT) if tall else (G, res)
    if G.device.type == "cuda" and G.device.index != torch.cuda.current_device():
        with torch.cuda.device(G.device):
            ns_small(Gv, resv, coefficients, normalize=normalize, safety=safety, eps=eps, cdt=cdt, sumsq=sumsq)
    else:
        ns_small(Gv, resv, coefficients, normalize=normalize, safety=safety, eps=eps, cdt=cdt, sumsq=sumsq)
    if res is not out:
        out.copy_(res)
    return out
