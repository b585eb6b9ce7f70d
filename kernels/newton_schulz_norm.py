"""Triton kernels of the Newton–Schulz normalization: s = 1 / max(safety·ν(G), eps) per matrix.

The scale is split as s = p·t: p = 2^-E, an exact power of two that shifts G into range (the first
step's operand X' = round(p·G) is G itself, exponent-shifted, whenever G is in the storage dtype),
and t = s/p, applied in the matmul epilogues (``kernels/newton_schulz.py``).

Two ways to get (s, p, t):

* the norm pass, one read of G: ``_sumsq_partial_kernel`` (scaled partial sums of squares, a fixed
  number of programs per matrix) then ``_scale_kernel`` (their combination, one program per matrix);
  E is the binary exponent of max|G|, so max|G·p| ∈ [1, 2);
* ``_sumsq_scale_kernel``, from a sum of squares the caller already has (the Muon momentum kernel
  computes Σu² in float64 while it writes u; the formula is ``_sumsq_scale``, which the single-program
  small-matrix kernel of ``kernels/newton_schulz_small.py`` calls too): no read of G at all; E is
  the binary exponent of ν = √sumsq, so max|G·p| ≤ ν·p < 2 (the same range bound; small entries sit
  lower, which the power-of-two shift keeps exact while p·G stays normal).

Both give the same s up to its last-bit rounding: the norm pass rounds ν, safety·ν and 1/d in fp32,
the sumsq kernel forms 1/max(safety·√sumsq, eps) in float64 and rounds once.

The norm pass reads each element once and is meant to run at memory bandwidth: the grid has
``norm_split(R, N)`` programs per matrix (up to 512, a few per SM for a large matrix; a function of
the shape only, so a matrix is reduced in the same order alone or in any batch), each walking its
tiles in a pipelined loop of 16-byte vector loads along the contiguous axis.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_pow2", "_exponent", "_sumsq_partial_kernel", "_scale_kernel", "_sumsq_scale", "_sumsq_scale_kernel"]


@triton.jit
def _pow2(e):
    """2^e as fp32 for an integer tensor e in [-126, 127], built from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(x):
    """Clamped binary exponent of |x|: E with |x|·2^-E in [1, 2) for normal |x| ≤ 2^126, clamped
    to [-126, 126] (zero and subnormals give -126, so |x|·2^126 ≤ 1; |x| ≥ 2^127, Inf and NaN
    give 126, so a finite |x|·2^-126 < 4). Both 2^-E and 2^E are then normal fp32 numbers."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    return tl.minimum(tl.maximum(e, -126), 126)


@triton.jit
def _add_scaled_squares(acc, e_run, x):
    """One tile of the scaled sum of squares: with |x| the tile (fp32) and E = max(e_run, clamped
    exponent of max|x|), returns (acc·2^-2(E − e_run) + (|x|·2^-E)², E). The old sum is rescaled by
    an exact power of two (E − e_run capped at 63: older terms below 2^-126 of the new maximum are
    negligible), so every square is of a number below 4 in magnitude: no overflow or underflow."""
    e_new = tl.maximum(e_run, _exponent(tl.max(tl.max(x, axis=1), axis=0)))
    r = _pow2(-tl.minimum(e_new - e_run, 63))
    y = x * _pow2(-e_new)
    return acc * r * r + y * y, e_new


@triton.jit
def _rest_scale(nu, p, safety, eps):
    """t = 1 / max(safety·ν, eps·p), with ν = ν(G·p): the epilogue factor once G is shifted by p.
    Written so that NaN survives (NaN < eps·p is false); Inf gives t = 0."""
    d = safety * nu
    lim = eps * p
    d = tl.where(d < lim, lim, d)
    return 1.0 / d


@triton.jit
def _sumsq_partial_kernel(
    X, PART, EXPO,
    R, N, SPLIT, TILES_C, N_TILES,
    sx_b, sx_r, sx_c,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Scaled partial sums of squares in one pass (no overflow or underflow for finite input):
    EXPO[b, p] = E, the clamped exponent of max|x| over this program's tiles (``_exponent``), and
    PART[b, p] = Σ (x·2^-E)² over tiles p, p+SPLIT, p+2·SPLIT, … of X[b] (N_TILES BLOCK_R×BLOCK_C
    tiles numbered row-major, TILES_C per tile row), fp32.

    Every scaled x has |x·2^-E| < 4, so squares neither overflow (|x| ~ 1e20) nor underflow
    (|x| ~ 1e-25). E is a running maximum: when a tile raises it, the accumulator is rescaled by
    the exact power of two 2^-2ΔE (ΔE capped at 63; older terms below 2^-126 of the new maximum
    are negligible). Consecutive programs read adjacent tiles, so the grid streams through memory;
    the loop is software-pipelined (NUM_STAGES loads in flight). A fixed split and traversal order
    per matrix keep the result batch-invariant."""
    pid = tl.program_id(0)
    pid_b = (pid // SPLIT).to(tl.int64)
    part = pid % SPLIT
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    e_run = tl.full((), -126, tl.int32)
    base = X + pid_b * sx_b
    for t in tl.range(part, N_TILES, SPLIT, num_stages=NUM_STAGES):
        rows = ((t // TILES_C) * BLOCK_R + rr).to(tl.int64)
        cols = ((t % TILES_C) * BLOCK_C + cc).to(tl.int64)
        m = (rows[:, None] < R) & (cols[None, :] < N)
        x = tl.load(base + rows[:, None] * sx_r + cols[None, :] * sx_c, mask=m, other=0.0)
        acc, e_run = _add_scaled_squares(acc, e_run, tl.abs(x.to(tl.float32)))
    tl.store(PART + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
    tl.store(EXPO + pid, e_run)


@triton.jit
def _scale_kernel(PART, EXPO, PRE, SCALE, POW2, REST, SPLIT, safety, eps,
                  ROOT: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per-matrix scale of the normalization, from the partials of ``_sumsq_partial_kernel``.

    With E = max_p EXPO[b, p] and S = Σ_p PART[b, p]·2^(2(EXPO[b, p] − E)) = Σ (x·2^-E)²:

    * ROOT = 2 (X = G): p = 2^-E and ν(G·p) = √S;
    * ROOT = 4 (X = (G·p)(G·p)ᵀ, p = PRE[b] the power of two of the ROOT = 2 pass):
      ν(G·p) = ‖(G·p)(G·p)ᵀ‖_F^{1/2} = (√S·2^E)^{1/2};

    then REST[b] = t = 1 / max(safety·ν(G·p), eps·p), POW2[b] = p and SCALE[b] = s = p·t =
    1 / max(safety·ν(G), eps), never forming ν(G) itself (which may overflow). The kernels use
    s = t·p split in two: p (exact, a power of two) shifts G into range, t is applied in the
    epilogues. NaN survives the max (the comparison is written so NaN < eps·p is false), Inf
    gives t = s = 0 and then 0·Inf = NaN downstream; a zero matrix gives s = 1/eps and stays zero."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    ok = offs < SPLIT
    ex = tl.load(EXPO + b * SPLIT + offs, mask=ok, other=-126)
    e = tl.max(ex, axis=0)
    f = _pow2(tl.maximum(ex - e, -63))
    v = tl.load(PART + b * SPLIT + offs, mask=ok, other=0.0) * f * f
    total = tl.sum(v, axis=0)
    if ROOT == 2:
        p = _pow2(-e)
        nu = tl.sqrt(total)
    else:
        p = tl.load(PRE + b)
        nu = tl.sqrt(tl.sqrt(total) * _pow2(e))
    t = _rest_scale(nu, p, safety, eps)
    tl.store(SCALE + b, p * t)
    tl.store(POW2 + b, p)
    tl.store(REST + b, t)


@triton.jit
def _sumsq_scale(q, safety, eps):
    """(s, p, t) from a given sum of squares q = ‖G‖_F² (any float dtype; a scalar or a block):

    in float64, ν = √q, d = max(safety·ν, eps), s = 1/d; E = the binary exponent of ν clamped to
    [-126, 126], p = 2^-E, t = s·2^E (exact in float64); s and t are each rounded once to fp32 (t is
    normal even when s is subnormal, i.e. when safety·ν > 2^126). ``safety`` and ``eps`` are taken
    as fp32 numbers (what a kernel argument holds on a GPU; the interpreter passes Python floats, so
    they are rounded here explicitly), then widened exactly. A NaN or Inf q gives NaN s and t
    (q − q is 0 for finite q and NaN otherwise), so the whole matrix comes out NaN, as a NaN/Inf G
    does through the norm pass; q = 0 gives s = 1/eps (a zero matrix stays zero). Shared by
    ``_sumsq_scale_kernel`` and the single-program small-matrix kernel, so both get the same bits."""
    q = q.to(tl.float64)
    sf = tl.full((), safety, tl.float32).to(tl.float64)
    ef = tl.full((), eps, tl.float32).to(tl.float64)
    nu = tl.sqrt(q)
    d = nu * sf
    d = tl.where(d < ef, ef, d)                         # written so that NaN survives
    s = 1.0 / d + (q - q)
    e = ((nu.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
    e = tl.minimum(tl.maximum(e, -126), 126).to(tl.int32)
    t = s * _pow2(e).to(tl.float64)
    return s.to(tl.float32), _pow2(-e), t.to(tl.float32)


@triton.jit
def _sumsq_scale_kernel(SUMSQ, SCALE, POW2, REST, B, safety, eps, BLOCK: tl.constexpr):
    """(s, p, t) of BLOCK matrices from their given sums of squares q = ‖G_b‖_F² (fp64 or fp32):
    ``_sumsq_scale`` on each."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < B
    s, p, t = _sumsq_scale(tl.load(SUMSQ + offs, mask=ok, other=0.0), safety, eps)
    tl.store(SCALE + offs, s, mask=ok)
    tl.store(POW2 + offs, p, mask=ok)
    tl.store(REST + offs, t, mask=ok)
