"""Backend choice for the two products every polar iteration step needs (shared by Newton and QDWH).

* ``gram(X, c)``: I·[c ≠ 0 identity term] + c·XXᵀ for X (B, k, L): on CUDA in float32 through the
  symmetric Triton kernel (one triangle of tiles, mirrored), otherwise ``torch.baddbmm``.
* ``ns_product(A, X)``: 1.5·X − 0.5·A·X (A = XXᵀ), the Newton–Schulz step X ← ½(3I − XXᵀ)X: on
  CUDA in float32 through the Triton apply kernel, otherwise ``torch.baddbmm``.
* ``fused_update(X, Z, α, β, active)``: X' = where(active, αX + βZ, X) and the relative step
  ‖X' − X‖_F/‖X'‖_F per matrix: one Triton pass on CUDA (``fastortho.kernels.polar``), eager torch
  elsewhere. Both backends compute the same formula; only the summation order differs.

The Triton path is taken for CUDA tensors when Triton is importable, and also for CPU tensors
when ``TRITON_INTERPRET=1`` (that is how the kernels are tested without a GPU). float64 always
uses torch for the Gram product (the Triton matmul kernels are bf16/fp16/fp32).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import triton_available


def use_triton(X: Tensor) -> bool:
    """True when the Triton kernels should run on X's device."""
    if not triton_available():
        return False
    from ..kernels import interpreter_enabled

    return X.is_cuda or (X.device.type == "cpu" and interpreter_enabled())


def gram(X: Tensor, c: float = 1.0, identity: bool = False) -> Tensor:
    """c·X·Xᵀ (+ I if ``identity``) for X (B, k, L), exactly symmetric on the Triton path."""
    B, k, _ = X.shape
    eye = torch.eye(k, dtype=X.dtype, device=X.device).expand(B, k, k)
    if X.dtype == torch.float32 and use_triton(X):
        from ..kernels.newton_schulz_launch import sym_mm

        out = torch.empty(B, k, k, dtype=X.dtype, device=X.device)
        # first_fp32: 3xTF32 dots on the GPU (≈ fp32 accuracy at tensor-core speed) whatever
        # torch.backends.cuda.matmul.allow_tf32 says: plain TF32 (10-bit mantissa) would cap the
        # polar factor's accuracy at ~1e-3 for users who enabled it for training.
        return sym_mm(X, X, out, Y=eye.contiguous() if identity else None, alpha=c,
                      beta=1.0 if identity else 0.0, round_dtype=torch.float32, first_fp32=True)
    if identity:
        return torch.baddbmm(eye, X, X.mT, alpha=c)
    return c * (X @ X.mT) if c != 1.0 else X @ X.mT


def ns_product(A: Tensor, X: Tensor) -> Tensor:
    """1.5·X − 0.5·A·X for A (B, k, k), X (B, k, L): one Newton–Schulz step when A = XXᵀ."""
    if X.dtype == torch.float32 and use_triton(X):
        from ..kernels.newton_schulz_launch import apply_q

        out = torch.empty(X.shape, dtype=X.dtype, device=X.device)
        # 3xTF32 dots (first_fp32) for the same reason as in ``gram``: fp32 accuracy whatever
        # allow_tf32 says.
        return apply_q((-0.5 * A).contiguous(), X, out, a=1.5, round_dtype=torch.float32, first_fp32=True)
    return torch.baddbmm(X, A, X, beta=1.5, alpha=-0.5)


def fused_update(X: Tensor, Z: Tensor, alpha: Tensor, beta: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """(where(active, αX + βZ, X), ‖X' − X‖_F/‖X'‖_F) with α, β (B,) and active (B,) bool."""
    if use_triton(X):
        from ..kernels.polar import polar_update

        return polar_update(X, Z, alpha, beta, active)
    tiny = torch.finfo(X.dtype).tiny
    Xn = torch.addcmul(alpha[:, None, None] * X, beta[:, None, None], Z)  # αX + βZ, two passes
    # The select is a third pass; on the CPU asking whether it is needed costs no device sync.
    if not (X.device.type == "cpu" and bool(active.all())):
        Xn = torch.where(active[:, None, None], Xn, X)
    step = torch.linalg.vector_norm(Xn - X, dim=(-2, -1)) / torch.linalg.vector_norm(Xn, dim=(-2, -1)).clamp_min(tiny)
    return Xn, step


def frobenius_start(X: Tensor) -> Tensor:
    """X/‖X‖_F per matrix (zeros stay zeros), overflow-safe: divide by max|x| before the norm,
    so inputs near the dtype's max (‖X‖_F² would overflow) or its min (would underflow) work."""
    tiny = torch.finfo(X.dtype).tiny
    amax = X.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    Xs = X / amax
    return Xs / torch.linalg.vector_norm(Xs, dim=(-2, -1), keepdim=True).clamp_min(tiny)
