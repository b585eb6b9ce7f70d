"""The symmetric product and the apply of ``kernels/newton_schulz.py`` for Hopper and later (sm_90,
sm_100): operand tiles loaded by TMA through tensor descriptors, one persistent program per SM slot.
``_apply_tma_kernel`` (O = σ·(Q·X + a·X), same contract as ``_apply_kernel``) is documented at its
definition; the rest of this docstring is about the symmetric kernel:

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

from .newton_schulz import _grouped_tile, _round, _sym_epilogue, _triangle_tile

__all__ = ["_sym_mm_tma_kernel", "_apply_tma_kernel"]


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

        rows = r0.to(tl.int64) + tl.arange(0, BLOCK_M)
        cols = c0.to(tl.int64) + tl.arange(0, BLOCK_M)
        _sym_epilogue(acc, b.to(tl.int64), ti, tj, rows, cols, K_OUT, Y, C, SCALE, sy_b, sy_r, sy_c,
                      sc_b, sc_r, sc_c, alpha, beta, HAS_SCALE, HAS_Y, OUT_ROUND, SOFT_BF16)


@triton.jit
def _load_x(desc, b, k0, c0, TRANS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The BK×BN tile (k0.., c0..) of a logical (batch, k, L) operand described by ``_operand_desc``
    with boxes [1, BK, BN] (column stride 1) or, TRANS, [1, BN, BK] of its transpose."""
    if TRANS:
        return tl.trans(desc.load([b, c0, k0]).reshape(BLOCK_N, BLOCK_K))
    else:
        return desc.load([b, k0, c0]).reshape(BLOCK_K, BLOCK_N)


@triton.jit
def _apply_tma_kernel(
    # pointers: Q (k×k), X (k×L), output O (k×L), per-matrix epilogue factor
    Q, X, O, SCALE,
    # sizes: batch, k, L, tiles per side, programs
    N_BATCH, K_IN, L, TILES_M, TILES_N, N_PROG,
    # strides (batch, row, col)
    sq_b, sq_r, sq_c,
    sx_b, sx_r, sx_c,
    so_b, so_r, so_c,
    a,
    HAS_AX: tl.constexpr,
    HAS_SCALE: tl.constexpr,    # O = SCALE[b]·(Q·X + a·X) (first and restart applies)
    Q_T: tl.constexpr,          # Q read through its transpose (row stride 1)
    X_T: tl.constexpr,          # X read through its transpose (a tall input's Gᵀ view)
    O_T: tl.constexpr,          # O written through its transpose
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    OUT_ROUND: tl.constexpr,    # storage rounding before the (possibly wider) output store
    SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """O[b] = σ_b·(Q[b]·X[b] + a·X[b]) (σ_b = SCALE[b] with HAS_SCALE, else 1): the contract of
    ``_apply_kernel`` (fp32 accumulation over k in steps of BLOCK_K, a·X added and σ applied in
    fp32, one rounding to OUT_ROUND), with Q and X tiles loaded by TMA, the output tile stored by TMA
    (the copy engine clips rows and columns past the matrix edge) and ``N_PROG`` persistent programs
    walking the tiles t = pid, pid + N_PROG, … of all matrices (batch-major, GROUP_M tile-rows
    at a time as in ``_apply_kernel``). A tile's value depends only on (matrix, tile), so results are
    bit-identical to ``_apply_kernel`` with the same tiles, alone or in any batch. The a·X term is
    read with ordinary loads in the epilogue (a BM×BN box of X would need its own shared buffer)."""
    q_desc = _operand_desc(Q, N_BATCH, K_IN, K_IN, sq_b, sq_r, sq_c, Q_T, BLOCK_M, BLOCK_K)
    x_desc = _operand_desc(X, N_BATCH, K_IN, L, sx_b, sx_r, sx_c, X_T, BLOCK_K, BLOCK_N)
    if O_T:
        o_desc = tl.make_tensor_descriptor(O, shape=[N_BATCH, L, K_IN], strides=[so_b, so_c, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_M])
    else:
        o_desc = tl.make_tensor_descriptor(O, shape=[N_BATCH, K_IN, L], strides=[so_b, so_r, 1],
                                           block_shape=[1, BLOCK_M, BLOCK_N])
    per_b = TILES_M * TILES_N
    for g in tl.range(tl.program_id(0), N_BATCH * per_b, N_PROG):
        b = g // per_b
        tm, tn = _grouped_tile(g % per_b, TILES_M, TILES_N, GROUP_M)
        r0 = tm * BLOCK_M
        c0 = tn * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_IN, BLOCK_K):
            q = tl.trans(_load_kmajor(q_desc, b, r0, k0, Q_T, BLOCK_M, BLOCK_K))
            x = _load_x(x_desc, b, k0, c0, X_T, BLOCK_K, BLOCK_N)
            acc = tl.dot(q.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

        b64 = b.to(tl.int64)
        if HAS_AX:
            rows = r0.to(tl.int64) + tl.arange(0, BLOCK_M)
            cols = c0.to(tl.int64) + tl.arange(0, BLOCK_N)
            mask = (rows[:, None] < K_IN) & (cols[None, :] < L)
            x = tl.load(X + b64 * sx_b + rows[:, None] * sx_r + cols[None, :] * sx_c, mask=mask, other=0.0)
            acc += a * x.to(tl.float32)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + b64)
        out = _round(acc, OUT_ROUND, SOFT_BF16).to(O.dtype.element_ty)
        if O_T:
            o_desc.store([b, c0, r0], tl.trans(out).reshape(1, BLOCK_N, BLOCK_M))
        else:
            o_desc.store([b, r0, c0], out.reshape(1, BLOCK_M, BLOCK_N))
