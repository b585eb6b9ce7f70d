"""The Newton–Schulz flop model, written once: every benchmark, the torch backend's Gram-space rule
and the distributed optimizer's load balance count with it.

A quintic step on the short side of an m×n matrix (s = min(m, n), l = max(m, n)) is three matmuls:
A = XXᵀ (2s²l), A² (2s³), BX (2s²l), so ``steps`` steps cost steps·(4s²l + 2s³): the plain-matmul
count (the Triton kernels execute less, exploiting A's symmetry: ``fastortho.kernels`` counts that).
"""
from __future__ import annotations

__all__ = ["ns_flops", "ns_gram_flops"]


def ns_flops(m: int, n: int, steps: int, *, batch: int = 1) -> int:
    """Matmul flops of ``steps`` standard quintic steps on ``batch`` m×n matrices: per matrix and step
    4s²l + 2s³ with s = min(m, n), l = max(m, n)."""
    s, l = min(m, n), max(m, n)
    return batch * steps * (4 * s * s * l + 2 * s**3)


def ns_gram_flops(m: int, n: int, steps: int, *, batch: int = 1) -> int:
    """Matmul flops of the same steps run in Gram space (Q ← ZQ, R ← ZRZ on the s×s Gram matrix):
    R₀ = X₀X₀ᵀ and the final QX₀ (2s²l each), and per step R² (2s³), Q ← ZQ (2s³, not on the first
    step), R ← Z(RZ) (4s³, not on the last step)."""
    s, l = min(m, n), max(m, n)
    tail = max(steps - 1, 0)
    return batch * (4 * s * s * l + (2 * steps + 2 * tail + 4 * tail) * s**3)
