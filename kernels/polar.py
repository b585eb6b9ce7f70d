"""Fused epilogue of one polar iteration step (Higham's scaled Newton and QDWH), in Triton.

Both iterations end a step with a per-matrix linear combination of the iterate X and a solve
result Z, followed by a per-matrix convergence test:

    X'[b] = α_b·X[b] + β_b·Z[b]     if active[b], else X[b]        (frozen once converged)
    d_b = Σ (X'[b] − X[b])²,   s_b = Σ X'[b]²                    (the relative step is √(d_b/s_b))

Newton: α = μ/2, β = 1/(2μ) with Z = (XXᵀ)⁻¹X. QDWH (Cholesky form): α = b/c, β = a − b/c with
Z = X(I + cXᵀX)⁻¹. Eager PyTorch reads X and Z three times and writes four temporaries for this;
the kernel reads each once and writes X' once.

Sums are deterministic: each program owns one tile of one matrix and writes its partial sums to
its own slot; the launcher adds the slots with ``torch.sum`` in a fixed order. The tile grid
depends on the shape only, so a matrix gets the same bits alone or inside any batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

__all__ = ["polar_update"]


@triton.jit
def _polar_update_kernel(
    # pointers: iterate X, solve result Z, output X' (may alias X), per-matrix α, β, active, partials
    X, Z, OUT, ALPHA, BETA, ACTIVE, PART,
    # sizes: rows, cols, tiles per matrix along rows / cols
    R, C, TR, TC,
    # strides (batch, row, col)
    sx_b, sx_r, sx_c,
    sz_b, sz_r, sz_c,
    so_b, so_r, so_c,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """OUT = active ? α·X + β·Z : X on one tile; PART[pid] = (Σ(OUT − X)², Σ OUT²) in fp32."""
    pid = tl.program_id(0)
    per = TR * TC
    b = (pid // per).to(tl.int64)
    t = pid % per
    rows = (t // TC) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (t % TC) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    r64 = rows.to(tl.int64)[:, None]
    c64 = cols.to(tl.int64)[None, :]
    x = tl.load(X + b * sx_b + r64 * sx_r + c64 * sx_c, mask=mask, other=0.0)
    z = tl.load(Z + b * sz_b + r64 * sz_r + c64 * sz_c, mask=mask, other=0.0)
    alpha = tl.load(ALPHA + b)
    beta = tl.load(BETA + b)
    on = tl.load(ACTIVE + b) != 0
    y = tl.where(on, alpha * x + beta * z, x)
    tl.store(OUT + b * so_b + r64 * so_r + c64 * so_c, y, mask=mask)
    d = tl.where(mask, y - x, 0.0)
    y0 = tl.where(mask, y, 0.0)
    tl.store(PART + 2 * pid, tl.sum(tl.sum(d * d, axis=1), axis=0))
    tl.store(PART + 2 * pid + 1, tl.sum(tl.sum(y0 * y0, axis=1), axis=0))


def _tile_shape() -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the update kernel. GPU: 32×128, 128-bit loads along contiguous rows
    and enough programs for small matrices; interpreter: 16×32 (each program is numpy work). It
    depends on nothing else, so a matrix gets the same tiles, and sums, in any batch."""
    if interpreter_enabled():
        return 16, 32
    return 32, 128


def polar_update(
    X: torch.Tensor, Z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, active: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X', rel_step): X' = where(active, α·X + β·Z, X) per matrix, rel_step = ‖X' − X‖_F/‖X'‖_F.

    X, Z, out: (B, R, C) float32 or float64, any strides (``out`` may be X: each element is read
    before it is written by the same program). alpha, beta: (B,) in X's dtype; active: (B,) bool.
    rel_step: (B,) float64/float32 (X's dtype); 0/0 (a zero matrix) gives 0, never NaN.
    """
    if X.dim() != 3 or Z.shape != X.shape:
        raise ValueError(f"polar_update: X and Z must be the same 3-D shape, got {tuple(X.shape)}, {tuple(Z.shape)}")
    if X.dtype not in (torch.float32, torch.float64) or Z.dtype != X.dtype:
        raise TypeError(f"polar_update: X and Z must both be float32 or float64, got {X.dtype}, {Z.dtype}")
    B, R, C = X.shape
    if alpha.shape != (B,) or beta.shape != (B,) or active.shape != (B,) or active.dtype != torch.bool:
        raise ValueError("polar_update: alpha, beta must be (B,) and active a (B,) bool tensor")
    out = torch.empty_like(X) if out is None else out
    if out.shape != X.shape or out.dtype != X.dtype:
        raise ValueError("polar_update: out must have X's shape and dtype")
    br, bc = _tile_shape()
    tr, tc = triton.cdiv(R, br), triton.cdiv(C, bc)
    part = torch.zeros(B, tr * tc, 2, device=X.device, dtype=X.dtype)
    if B * R * C > 0:
        _polar_update_kernel[(B * tr * tc,)](
            X, Z, out, alpha.to(X.dtype).contiguous(), beta.to(X.dtype).contiguous(),
            active.to(torch.int8).contiguous(), part, R, C, tr, tc,
            *X.stride(), *Z.stride(), *out.stride(), BLOCK_R=br, BLOCK_C=bc)
    sums = part.sum(dim=1)
    step = (sums[:, 0] / sums[:, 1].clamp_min(torch.finfo(X.dtype).tiny)).sqrt()
    return out, step
