"""The AOL row scaling of the first Newton–Schulz step, as two Triton kernels.

AOL preconditioning (Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose
Lipschitz Networks"; Boissin et al., "Turbo-Muon") from the fp32 Gram matrix A' = X'X'ᵀ of
X' = round(p·G), p the exact power-of-two prescale of the norm pass:

    d_i = 1 / max(√(Σ_j |A'_ij|), eps·p)                       (``_aol_row_scale_kernel``)
    A₀_ij = round((A'_ij·d_i)·d_j),   X₀_ij = round(((p·G_ij)·d_i))   (``_aol_apply_kernel``)

with eps·p kept ≥ the smallest normal fp32 (a zero row never meets 0·∞), every product in fp32 and
one rounding to storage at the end: the rounding points of the torch backend's
``aol_precondition``. σ_max(X₀) ≤ 1 by the Schur test; A₀ = X₀X₀ᵀ up to rounding is what the first
step needs, so no matmul is added.

Reads and writes: the row sums read A' once (k² fp32); the apply reads A' once more and G once,
and writes A₀ and X₀ once each, in one launch whose programs own either an A tile or an X tile of
one row block. The square root and the reciprocal are the correctly rounded ones (``sqrt_rn``,
``div_rn``), as torch's, not the approximate GPU instructions.

Non-finite values: the comparisons are written so that NaN survives (``s < lim`` is false for NaN),
so a NaN or Inf entry of G makes its row and column of A' non-finite and every row sum of its matrix
Inf or NaN: a NaN gives a NaN matrix, an Inf gives d_i ∈ {0, NaN} and NaN entries in A₀ and X₀ that the
first step spreads over the matrix. Other matrices of the batch are untouched.

Batch invariance: programs are numbered batch-major, a row sum is accumulated in a fixed order
(BLOCK_C-wide column chunks, then one tree sum) that depends on k only, and the apply is
elementwise, so a matrix gets the same bits alone or anywhere in any batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_enabled
from .newton_schulz import _round
from .newton_schulz_launch import tl_dtype

__all__ = ["aol_row_scale", "aol_apply", "aol_rescale"]

#: 2^-126, the smallest normal fp32: the least value of the floor eps·p (``torch.finfo(float32).tiny``)
_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _aol_row_scale_kernel(A, P, D, K, TILES_R,
                          sa_b, sa_r, sa_c,
                          eps,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """D[b, i] = 1 / max(√(Σ_j |A[b, i, j]|), max(eps·P[b], 2^-126)) for BLOCK_R rows i per program.

    A: (B, K, K) fp32 (the Gram matrix of X' = round(p·G), symmetric, so its rows are read
    contiguously); D: (B, K) fp32, contiguous. Each program keeps a BLOCK_R×BLOCK_C fp32
    accumulator over the column chunks and reduces it once at the end."""
    pid = tl.program_id(0)
    b = (pid // TILES_R).to(tl.int64)
    rows = ((pid % TILES_R) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < K
    base = A + b * sa_b + rows[:, None] * sa_r
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, K, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        a = tl.load(base + cols[None, :] * sa_c, mask=rmask[:, None] & (cols[None, :] < K), other=0.0)
        acc += tl.abs(a)
    s = tl.sqrt_rn(tl.sum(acc, axis=1))
    lim = eps * tl.load(P + b)
    lim = tl.where(lim < _TINY, _TINY, lim)   # clamp_min that keeps NaN
    d = tl.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), tl.where(s < lim, lim, s))   # NaN s stays NaN
    tl.store(D + b * K + rows, d, mask=rmask)


@triton.jit
def _aol_apply_kernel(RAW, D, G, P, A_OUT, X_OUT, K, L, TILES_R, TILES_A, TILES_X,
                      sr_b, sr_r, sr_c,
                      sg_b, sg_r, sg_c,
                      sa_b, sa_r, sa_c,
                      sx_b, sx_r, sx_c,
                      A_ROUND: tl.constexpr, X_ROUND: tl.constexpr, SOFT_BF16: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One BLOCK_R×BLOCK_C tile of A₀ = round((RAW·d_i)·d_j) or of X₀ = round((G·p)·d_i).

    A row block has TILES_A tiles of A₀ (K columns) followed by TILES_X tiles of X₀ (L columns);
    programs run batch-major over (row block, tile). RAW: (B, K, K) fp32; D: (B, K) fp32; G: (B, K, L)
    any float dtype and strides; P: (B,) fp32; products in fp32, one rounding to each output's dtype."""
    pid = tl.program_id(0)
    per_row = TILES_A + TILES_X
    per_b = TILES_R * per_row
    b = (pid // per_b).to(tl.int64)
    t = pid % per_b
    ct = t % per_row
    rows = ((t // per_row) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < K
    d_i = tl.load(D + b * K + rows, mask=rmask, other=0.0)
    if ct < TILES_A:
        cols = (ct * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        d_j = tl.load(D + b * K + cols, mask=cmask, other=0.0)
        a = tl.load(RAW + b * sr_b + rows[:, None] * sr_r + cols[None, :] * sr_c, mask=mask, other=0.0)
        y = (a * d_i[:, None]) * d_j[None, :]
        tl.store(A_OUT + b * sa_b + rows[:, None] * sa_r + cols[None, :] * sa_c, _round(y, A_ROUND, SOFT_BF16),
                 mask=mask)
    else:
        cols = ((ct - TILES_A) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = rmask[:, None] & (cols[None, :] < L)
        g = tl.load(G + b * sg_b + rows[:, None] * sg_r + cols[None, :] * sg_c, mask=mask, other=0.0)
        y = (g.to(tl.float32) * tl.load(P + b)) * d_i[:, None]
        tl.store(X_OUT + b * sx_b + rows[:, None] * sx_r + cols[None, :] * sx_c, _round(y, X_ROUND, SOFT_BF16),
                 mask=mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_scale_tile() -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the row sums: GPU 8×512 (32 fp32 per thread of 4 warps, 128-bit loads,
    k/8 programs per matrix); interpreter 16×32 (each program is numpy work). Constants, so the
    summation order depends on k only."""
    return (16, 32) if interpreter_enabled() else (8, 512)


def _apply_tile() -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the apply: GPU 32×128 (the cast pass's tile: 128-bit accesses along
    the contiguous axis); interpreter 16×32."""
    return (16, 32) if interpreter_enabled() else (32, 128)


def _check_p(p: torch.Tensor, B: int, who: str) -> None:
    if p.shape != (B,) or p.dtype != torch.float32:
        raise ValueError(f"{who}: p must be a (B,) float32 tensor (the norm pass's power of two), "
                         f"got {tuple(p.shape)} {p.dtype}")


def aol_row_scale(raw: torch.Tensor, p: torch.Tensor, *, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """d (B, k) fp32: d_i = 1 / max(√(Σ_j |raw_ij|), max(eps·p, 2^-126)), per matrix.

    raw: (B, k, k) fp32, the Gram matrix of X' = round(p·G) (any strides; rows are summed, which
    equals column sums for a symmetric raw); p: (B,) fp32; eps > 0 (rounded to fp32, as torch does
    with a Python scalar times an fp32 tensor). NaN/Inf in raw give NaN/0 in d, never a finite
    value from a non-finite sum."""
    if raw.dim() != 3 or raw.shape[1] != raw.shape[2] or raw.dtype != torch.float32:
        raise ValueError(f"aol_row_scale: raw must be a (B, k, k) float32 tensor, got {tuple(raw.shape)} {raw.dtype}")
    B, k, _ = raw.shape
    _check_p(p, B, "aol_row_scale")
    if out is None:
        out = torch.empty(B, k, device=raw.device, dtype=torch.float32)
    elif out.shape != (B, k) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("aol_row_scale: out must be a contiguous (B, k) float32 tensor")
    br, bc = _row_scale_tile()
    tr = _cdiv(k, br)
    if B * k > 0:
        _aol_row_scale_kernel[(B * tr,)](raw, p, out, k, tr, *raw.stride(), float(eps), BLOCK_R=br, BLOCK_C=bc)
    return out


def aol_apply(raw: torch.Tensor, d: torch.Tensor, G: torch.Tensor, p: torch.Tensor, A_out: torch.Tensor,
              X_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_out = round((raw·d_i)·d_j) and X_out = round((G·p)·d_i) in one launch; returns (A_out, X_out).

    raw: (B, k, k) fp32; d: (B, k) fp32 contiguous (``aol_row_scale``); G: (B, k, L) any float dtype
    and strides; p: (B,) fp32; A_out (B, k, k) and X_out (B, k, L) in bfloat16, float16 or float32,
    any strides. X_out must not overlap G or raw (it may be the X' buffer raw was computed from)."""
    if raw.dim() != 3 or raw.shape[1] != raw.shape[2] or raw.dtype != torch.float32:
        raise ValueError(f"aol_apply: raw must be a (B, k, k) float32 tensor, got {tuple(raw.shape)} {raw.dtype}")
    B, k, _ = raw.shape
    if G.dim() != 3 or G.shape[:2] != (B, k):
        raise ValueError(f"aol_apply: G must be (B, k, L) with raw's B and k, got {tuple(G.shape)}")
    L = G.shape[2]
    if d.shape != (B, k) or d.dtype != torch.float32 or not d.is_contiguous():
        raise ValueError("aol_apply: d must be a contiguous (B, k) float32 tensor (aol_row_scale)")
    _check_p(p, B, "aol_apply")
    if A_out.shape != (B, k, k) or X_out.shape != (B, k, L):
        raise ValueError(f"aol_apply: A_out must be (B, k, k) and X_out (B, k, L), got {tuple(A_out.shape)}, "
                         f"{tuple(X_out.shape)}")
    br, bc = _apply_tile()
    tr, ta, tx = _cdiv(k, br), _cdiv(k, bc), _cdiv(L, bc)
    if B * k > 0:
        _aol_apply_kernel[(B * tr * (ta + tx),)](
            raw, d, G, p, A_out, X_out, k, L, tr, ta, tx,
            *raw.stride(), *G.stride(), *A_out.stride(), *X_out.stride(),
            A_ROUND=tl_dtype(A_out.dtype), X_ROUND=tl_dtype(X_out.dtype), SOFT_BF16=interpreter_enabled(),
            BLOCK_R=br, BLOCK_C=bc)
    return A_out, X_out


def aol_rescale(raw: torch.Tensor, G: torch.Tensor, p: torch.Tensor, A_out: torch.Tensor, X_out: torch.Tensor, *,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole row scaling in two launches: d = ``aol_row_scale(raw, p)``, then ``aol_apply``.
    Returns (A₀, X₀) = (A_out, X_out)."""
    return aol_apply(raw, aol_row_scale(raw, p, eps=eps), G, p, A_out, X_out)
