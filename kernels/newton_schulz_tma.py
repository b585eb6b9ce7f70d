"""The symmetric product of ``kernels/newton_schulz.py`` for Hopper and later (sm_90, sm_100):
operand tiles loaded by TMA through tensor descriptors, one persistent program per SM slot.

    C[b] = α·σ_b²·P[b]·S[b]ᵀ + β·Y[b]   on the upper-triangle tiles, mirrored on store,

the same contract, triangle map and epilogue as ``_sym_mm_kernel``; only the way operand tiles
reach shared memory and the way tiles are assigned to programs differ:

* **TMA loads.** Each operand is described by a 3-D (batch, row, col) tensor descriptor built in
  the kernel (``tl.make_tensor_descriptor``); the copy engine moves a whole BM×BK box per load,
  zero-filling rows and columns past the matrix edge (the role of the masks of the cp.async
  kernel), and the compiler feeds the boxes from shared memory to asynchronous wgmma. No address
  arithmetic per thread: fewer registers than the cp.async pipeline. A *tall* operand (the logical
  k×L operand is the transpose of a row-major L×k matrix: row stride 1) is described in its memory
  order, loaded as BK×BM boxes and transposed in shared memory (``P_T`` / ``S_T``), so XᵀX needs no
  transposed copy either.
* **Persistent schedule.** ``N_PROG`` programs (the launcher: SMs × CTAs per SM) walk the tile
  ids t = pid, pid + N_PROG, … of all matrices (batch-major, upper triangle column by
  column): descriptors are built once per program and no CTA is launched per tile. The tile loop
  is not flattened into the k-loop (``tl.range(..., flatten=True)``): flattening would overlap a
  tile's first loads with the previous epilogue, but puts that epilogue's wait for every wgmma
  group inside the pipelined loop (measured in ``bench/RESULTS.md``).

Exact symmetry and batch invariance hold for the same reasons as in the cp.async kernel: a tile's
value depends only on (matrix, tile) — never on which program computes it or on the batch — and
each element is written from one tile (off-diagonal tiles store the tile and its transpose; a
diagonal tile stores one tile whose lower triangle is the transpose of its upper one).

Descriptor requirements (the launcher checks them and otherwise uses ``_sym_mm_kernel``): base
addresses 16-byte aligned, the contiguous axis of stride 1, every other stride a multiple of
16 bytes; operands already in the storage dtype (no rounding in registers, which would make the
wgmma wait for every k-step).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .newton_schulz import _round, _triangle_tile

__all__ = ["_sym_mm_tma_kernel"]


@triton.jit
def _operand_desc(X, n_batch, rows, cols, s_b, s_r, s_c, TRANS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Descriptor of a logical (batch, rows, cols) operand: row-major boxes [1, BM, BK] when the
    column stride is 1, else (TRANS: the row stride is 1) boxes [1, BK, BM] of the transpose."""
    if TRANS:
        return tl.make_tensor_descriptor(X, shape=[n_batch, cols, rows], strides=[s_b, s_c, 1],
                                         block_shape=[1, BLOCK_K, BLOCK_M])
    else:
        return tl.make_tensor_descriptor(X, shape=[n_batch, rows, cols], strides=[s_b, s_r, 1],
                                         block_shape=[1, BLOCK_M, BLOCK_K])


@triton.jit
def _load_kmajor(desc, b, r0, k0, TRANS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The BK×BM tile (k0.., r0..) of the logical operand's transpose."""
    if TRANS:
        return desc.load([b, k0, r0]).reshape(BLOCK_K, BLOCK_M)
    else:
        return tl.trans(desc.load([b, r0, k0]).reshape(BLOCK_M, BLOCK_K))


@triton.jit
def _sym_mm_tma_kernel(
    # pointers: P, S operands (logical k×L), Y addend and C output (k×k), per-matrix scale
    P, S, Y, C, SCALE,
    # sizes: batch, k (output side), L (reduction length), triangle tiles per matrix, programs
    N_BATCH, K_OUT, L, N_TRI, N_PROG,
    # strides (batch, row, col)
    sp_b, sp_r, sp_c,
    ss_b, ss_r, ss_c,
    sy_b, sy_r, sy_c,
    sc_b, sc_r, sc_c,
    # epilogue coefficients: C = alpha·SCALE[b]²·P·Sᵀ + beta·Y
    alpha, beta,
    HAS_SCALE: tl.constexpr,
    HAS_Y: tl.constexpr,
    P_T: tl.constexpr,          # P read through its transpose (row stride 1: a tall input's Gᵀ view)
    S_T: tl.constexpr,
    DOT_DTYPE: tl.constexpr,    # tl.dot operand dtype (fp32 under the interpreter)
    INPUT_PRECISION: tl.constexpr,
    OUT_ROUND: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[b] = α·σ_b²·P[b]·S[b]ᵀ + β·Y[b] on the upper-triangle tiles of every matrix, mirrored
    (σ_b = SCALE[b] with HAS_SCALE, else 1); fp32 accumulation, one rounding."""
    p_desc = _operand_desc(P, N_BATCH, K_OUT, L, sp_b, sp_r, sp_c, P_T, BLOCK_M, BLOCK_K)
    s_desc = _operand_desc(S, N_BATCH, K_OUT, L, ss_b, ss_r, ss_c, S_T, BLOCK_M, BLOCK_K)
    total = N_BATCH * N_TRI
    for t in tl.range(tl.program_id(0), total, N_PROG):
        b = t // N_TRI
        ti, tj = _triangle_tile(t % N_TRI)
        r0 = ti * BLOCK_M
        c0 = tj * BLOCK_M
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, L, BLOCK_K):
            p = tl.trans(_load_kmajor(p_desc, b, r0, k0, P_T, BLOCK_M, BLOCK_K))
            q = _load_kmajor(s_desc, b, c0, k0, S_T, BLOCK_M, BLOCK_K)
            acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

        b64 = b.to(tl.int64)
        if HAS_SCALE:
            s = tl.load(SCALE + b64)
            out = acc * (alpha * s) * s     # two products: σ² alone may leave fp32's range
        else:
            out = acc * alpha
        rows = r0.to(tl.int64) + tl.arange(0, BLOCK_M)
        cols = c0.to(tl.int64) + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < K_OUT) & (cols[None, :] < K_OUT)
        if HAS_Y:
            y = tl.load(Y + b64 * sy_b + rows[:, None] * sy_r + cols[None, :] * sy_c, mask=mask, other=0.0)
            out += beta * y.to(tl.float32)
        out = _round(out, OUT_ROUND, SOFT_BF16)
        # Masked by the bounds only (uniform along the contiguous axis: 128-bit stores).
        c_base = C + b64 * sc_b
        if ti != tj:
            tl.store(c_base + cols[:, None] * sc_r + rows[None, :] * sc_c, tl.trans(out), mask=tl.trans(mask))
        else:
            out = tl.where(rows[:, None] <= cols[None, :], out, tl.trans(out))
        tl.store(c_base + rows[:, None] * sc_r + cols[None, :] * sc_c, out, mask=mask)
