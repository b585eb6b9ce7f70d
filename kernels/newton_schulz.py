"""Triton kernels for one quintic Newton–Schulz step in bf16 storage with fp32 accumulation.

For X of logical shape k×L (k ≤ L, the short side first) one step with coefficients (a, b, c) is

    A = X Xᵀ,   B = b·A + c·A²,   X ← a·X + B·X.

Two kernels cover it (and the Gram-space iteration of ``kernels/newton_schulz_launch.py``):

* ``_sym_mm_kernel``: C = α·(P·Sᵀ) + β·Y for k×k outputs that are symmetric in exact arithmetic
  (P = S = X gives A; P = S = Y = A gives B; in Gram space P·S are commuting polynomials in R).
  Only tiles on or above the diagonal are computed; each is stored twice (mirrored), so the
  output is exactly symmetric and costs (T+1)/(2T) of a full product for T tiles per side.
* ``_apply_kernel``: X' = Q·X + a·X with the a·X term added to the fp32 accumulator.

Both epilogues form the linear combination in fp32 and round once to the storage dtype, where
eager PyTorch rounds b·A, c·A², their sum, a·X, B·X and the final sum separately: six roundings
per step become two, which keeps bf16 NS several times closer to the exact iteration
(measurements in ``bench/RESULTS.md``).

Tall inputs need no transposed copy: every operand is addressed through (batch, row, col) strides,
so the XᵀX variant is the same kernel called with the strides of Gᵀ. Triton specializes strides
equal to 1, so both orientations compile to contiguous loads along the memory-contiguous axis.

The first step never scales operand tiles: X₀ = s·G is represented as t·X' with X' = round_c(p·G)
written once by ``_scale_cast_kernel`` (p the power of two of the normalization in
``kernels/newton_schulz_norm.py``, so X' is G itself, exponent-shifted, whenever G is already in
the storage dtype) and t = s/p applied in the
epilogues: α·t² for the first Gram product, t·(Q·X' + a·X') for the first apply and the restart
apply. Every matmul launch therefore reads plain storage-dtype operands, which the sm_90 pipeline
feeds to asynchronous wgmma straight from shared memory; an operand multiplied in registers must
be written back to shared memory first, and wgmma then waits for every k-step. The shift by p
keeps the products in range: raw G ≈ 1e±30 would overflow or underflow the fp32 accumulator.
With ``fp32_first_gram`` X' is kept in fp32 (no input rounding for the first step).

Batching: programs are numbered batch-major over a 1-D grid (no 65 535 limit on the batch), with
int64 offsets, so a matrix is computed by the same programs, tiles and reduction order whatever
the batch: outputs are bit-identical alone or inside any batch.

Dot operands are cast to ``DOT_DTYPE``: the storage dtype on a GPU, float32 under the Triton
interpreter, whose ``tl.dot`` on bf16 multiplies raw bits (triton issue #11584). The loaded
values are already rounded to storage precision, so the interpreter sees the same rounding model.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_round", "_sym_mm_kernel", "_apply_kernel", "_scale_cast_kernel"]


@triton.jit
def _triangle_tile(t):
    """Map t ∈ [0, T(T+1)/2) to the upper-triangle tile (i, j), i ≤ j, column by column:
    j = ⌊(√(8t+1) − 1)/2⌋, i = t − j(j+1)/2. The float estimate is corrected by ±1."""
    j = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
    i = t - j * (j + 1) // 2
    return i, j


@triton.jit
def _round(x, DT: tl.constexpr, SOFT_BF16: tl.constexpr):
    """x rounded to DT, round-to-nearest-even.

    SOFT_BF16 (interpreter only): Triton's interpreter converts fp32 → bf16 by truncating the
    mantissa (``cast_impl`` passes no rounding mode), a biased rounding 2× coarser than the
    GPU's RTNE, which would make the interpreter's bf16 NS much less accurate than the GPU's.
    So round the fp32 bits to the nearest even bf16 first, making the cast exact:
    bits + 0x7FFF + lsb, low half cleared (NaN and Inf keep their class)."""
    if SOFT_BF16:
        if DT == tl.bfloat16:
            b = x.to(tl.float32).to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def _grouped_tile(t, TILES_M, TILES_N, GROUP_M: tl.constexpr):
    """(tile row, tile column) of the t-th output tile when tiles are taken GROUP_M tile-rows at a
    time, so consecutive programs share X column panels in L2 (Triton tutorial 03)."""
    width = GROUP_M * TILES_N
    first_m = (t // width) * GROUP_M
    gsize = tl.minimum(TILES_M - first_m, GROUP_M)
    return first_m + (t % width) % gsize, (t % width) // gsize


@triton.jit
def _sym_epilogue(acc, b, ti, tj, rows, cols, K_OUT, Y, C, SCALE,
                  sy_b, sy_r, sy_c, sc_b, sc_r, sc_c, alpha, beta,
                  HAS_SCALE: tl.constexpr, HAS_Y: tl.constexpr, OUT_ROUND: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Tile (ti, tj) of C[b] (b int64; rows, cols its int64 indices) = α·σ_b²·acc + β·Y[b], formed in
    fp32 and rounded once, stored with its mirror (σ_b = SCALE[b] with HAS_SCALE, else 1).

    Off-diagonal tiles store the tile and its transpose; a diagonal tile stores one tile whose lower
    triangle is the transpose of its upper one, so C is exactly symmetric (Gram-space NS forms Q·Zᵀ
    and Z·RZᵀ, equal to the products it needs only for exactly symmetric factors; a rounding
    asymmetry would compound from step to step). Every store is masked by the bounds only, uniform
    along the contiguous axis, so the compiler emits 128-bit stores."""
    if HAS_SCALE:
        s = tl.load(SCALE + b)
        out = acc * (alpha * s) * s     # two products: σ² alone may leave fp32's range
    else:
        out = acc * alpha
    mask = (rows[:, None] < K_OUT) & (cols[None, :] < K_OUT)
    if HAS_Y:
        y = tl.load(Y + b * sy_b + rows[:, None] * sy_r + cols[None, :] * sy_c, mask=mask, other=0.0)
        out += beta * y.to(tl.float32)
    out = _round(out, OUT_ROUND, SOFT_BF16)
    c_base = C + b * sc_b
    if ti != tj:
        tl.store(c_base + cols[:, None] * sc_r + rows[None, :] * sc_c, tl.trans(out), mask=tl.trans(mask))
    else:
        out = tl.where(rows[:, None] <= cols[None, :], out, tl.trans(out))
    tl.store(c_base + rows[:, None] * sc_r + cols[None, :] * sc_c, out, mask=mask)


@triton.jit
def _sym_mm_kernel(
    # pointers: P, S operands (logical k×L), Y addend and C output (k×k), per-matrix scale
    P, S, Y, C, SCALE,
    # sizes: k (output side), L (reduction length), number of triangle tiles per matrix
    K_OUT, L, N_TRI,
    # strides (batch, row, col)
    sp_b, sp_r, sp_c,
    ss_b, ss_r, ss_c,
    sy_b, sy_r, sy_c,
    sc_b, sc_r, sc_c,
    # epilogue coefficients: C = alpha·SCALE[b]²·P·Sᵀ + beta·Y
    alpha, beta,
    # meta-parameters
    HAS_SCALE: tl.constexpr,    # per-matrix epilogue factor SCALE[b]² (first Gram product)
    HAS_Y: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,  # precision operands are rounded to (a no-op when loaded in it)
    DOT_DTYPE: tl.constexpr,    # tl.dot operand dtype (fp32 under the interpreter)
    INPUT_PRECISION: tl.constexpr,
    OUT_ROUND: tl.constexpr,    # dtype the result is rounded to before the store
    SOFT_BF16: tl.constexpr,    # exact RTNE bf16 rounding under the interpreter (see _round)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[b] = α·σ_b²·P[b]·S[b]ᵀ + β·Y[b] on the upper-triangle tiles, mirrored on store
    (σ_b = SCALE[b] with HAS_SCALE, else 1).

    Valid when the exact result is symmetric (P = S, or P, S commuting symmetric matrices and
    Y symmetric). Accumulation in fp32; α·σ²·acc + β·Y formed in fp32 and rounded once."""
    pid = tl.program_id(0)
    pid_b = (pid // N_TRI).to(tl.int64)
    ti, tj = _triangle_tile(pid % N_TRI)
    rows = ti.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tj.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    # int64: k·stride reaches 2^31 once a stride exceeds 2^31 / BLOCK_K (16.7 M at BLOCK_K = 128)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    step_k = tl.full((), BLOCK_K, tl.int64)
    row_ok = rows < K_OUT
    col_ok = cols < K_OUT

    p_ptrs = P + pid_b * sp_b + rows[:, None] * sp_r + ks[None, :] * sp_c
    s_ptrs = S + pid_b * ss_b + cols[None, :] * ss_r + ks[:, None] * ss_c   # Sᵀ tile: BK×BM
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, L, BLOCK_K):
        k_ok = (k0 + ks) < L
        p = tl.load(p_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(s_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        p = _round(p, ROUND_DTYPE, SOFT_BF16).to(DOT_DTYPE)
        q = _round(q, ROUND_DTYPE, SOFT_BF16).to(DOT_DTYPE)
        acc = tl.dot(p, q, acc, input_precision=INPUT_PRECISION)
        p_ptrs += step_k * sp_c
        s_ptrs += step_k * ss_c

    _sym_epilogue(acc, pid_b, ti, tj, rows, cols, K_OUT, Y, C, SCALE, sy_b, sy_r, sy_c, sc_b, sc_r, sc_c,
                  alpha, beta, HAS_SCALE, HAS_Y, OUT_ROUND, SOFT_BF16)


@triton.jit
def _apply_kernel(
    # pointers: Q (k×k), X (k×L), output O (k×L), per-matrix epilogue factor
    Q, X, O, SCALE,
    # sizes
    K_IN, L, TILES_M, TILES_N,
    # strides (batch, row, col)
    sq_b, sq_r, sq_c,
    sx_b, sx_r, sx_c,
    so_b, so_r, so_c,
    a,
    HAS_AX: tl.constexpr,
    HAS_SCALE: tl.constexpr,    # O = SCALE[b]·(Q·X + a·X) (first and restart applies)
    ROUND_DTYPE: tl.constexpr,  # precision X is rounded to (a no-op when loaded in it)
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    OUT_ROUND: tl.constexpr,    # storage rounding before the (possibly wider) output store
    SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """O[b] = σ_b·(Q[b]·X[b] + a·X[b]) (σ_b = SCALE[b] with HAS_SCALE, else 1), fp32
    accumulation, a·X added and σ applied in fp32, one rounding; tiles in ``_grouped_tile`` order."""
    pid = tl.program_id(0)
    per_b = TILES_M * TILES_N
    pid_b = (pid // per_b).to(tl.int64)
    tm, tn = _grouped_tile(pid % per_b, TILES_M, TILES_N, GROUP_M)

    rows = tm.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tn.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # int64: k·stride reaches 2^31 once a stride exceeds 2^31 / BLOCK_K (16.7 M at BLOCK_K = 128)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    step_k = tl.full((), BLOCK_K, tl.int64)
    row_ok = rows < K_IN
    col_ok = cols < L
    q_ptrs = Q + pid_b * sq_b + rows[:, None] * sq_r + ks[None, :] * sq_c
    x_ptrs = X + pid_b * sx_b + ks[:, None] * sx_r + cols[None, :] * sx_c
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_IN, BLOCK_K):
        k_ok = (k0 + ks) < K_IN
        q = tl.load(q_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(q.to(DOT_DTYPE), _round(x, ROUND_DTYPE, SOFT_BF16).to(DOT_DTYPE), acc,
                     input_precision=INPUT_PRECISION)
        q_ptrs += step_k * sq_c
        x_ptrs += step_k * sx_r

    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_AX:
        x = tl.load(X + pid_b * sx_b + rows[:, None] * sx_r + cols[None, :] * sx_c, mask=mask, other=0.0)
        acc += a * _round(x, ROUND_DTYPE, SOFT_BF16).to(tl.float32)
    if HAS_SCALE:
        acc = acc * tl.load(SCALE + pid_b)
    out = _round(acc, OUT_ROUND, SOFT_BF16)
    tl.store(O + pid_b * so_b + rows[:, None] * so_r + cols[None, :] * so_c, out, mask=mask)


@triton.jit
def _scale_cast_kernel(X, OUT, SCALE, R, N, TILES_C,
                       sx_b, sx_r, sx_c,
                       so_b, so_r, so_c,
                       OUT_ROUND: tl.constexpr, SOFT_BF16: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[b] = round(SCALE[b]·X[b]) on one BLOCK_R×BLOCK_C tile per program, product in fp32.

    With SCALE = p (a power of two) this writes the first step's operand X' = round_c(p·G): one
    read of G in any dtype and strides, one write in the storage dtype, so every matmul after it
    loads plain storage-dtype tiles. Elementwise, so batch-invariant by construction."""
    pid = tl.program_id(0)
    per_b = ((R + BLOCK_R - 1) // BLOCK_R) * TILES_C
    pid_b = (pid // per_b).to(tl.int64)
    t = pid % per_b
    rows = ((t // TILES_C) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = ((t % TILES_C) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    x = tl.load(X + pid_b * sx_b + rows[:, None] * sx_r + cols[None, :] * sx_c, mask=mask, other=0.0)
    y = _round(x.to(tl.float32) * tl.load(SCALE + pid_b), OUT_ROUND, SOFT_BF16)
    tl.store(OUT + pid_b * so_b + rows[:, None] * so_r + cols[None, :] * so_c, y, mask=mask)
