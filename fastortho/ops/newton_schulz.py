"""Triton backend of :func:`fastortho.newton_schulz`: the op ``fastortho::newton_schulz_triton``.

Fused bf16 kernels, standard or Gram-space.

For G (B, m, n) the iteration runs on the short side: X is the logical wide view of G (k = min(m, n)
rows; ``G.mT`` for tall inputs, a stride swap, never a copy). Per matrix

    X₀ = G / max(safety·ν, eps),   ν = ‖G‖_F ("fro") or ‖GGᵀ‖_F^{1/2} ≥ σ_max ("gram"),
    for (a, b, c) in coefficients:  A = XXᵀ,  B = b·A + c·A²,  X ← a·X + B·X,

with X, A, B stored in ``compute_dtype`` and every matmul accumulated in fp32; each linear
combination is formed in fp32 and rounded once (kernels in ``fastortho.kernels.newton_schulz``).
The Gram-space variant (``gram=True``; automatic for long/short ≥ 1.5 and k ≥ 256) iterates on
the k×k Gram matrix with restarts and touches X only at restarts and at the end
(``fastortho.kernels.newton_schulz_iteration``); with bf16 requested it stores in fp16, which it needs.

No host synchronization: norms and scales stay on the device; a zero matrix gives zeros (ν is
clamped by eps), NaN/Inf in G give NaN in that matrix's output. Each matrix is computed by the
same programs whatever the batch, so outputs are bit-identical alone or batched.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from fastortho.kernels import interpreter_enabled

from ._load import triton_available

__all__ = ["newton_schulz_triton", "use_gram"]

#: normalize= as the kernels spell it (they predate the name "gram" for the Gram bound)
_KERNEL_NORMALIZE = {"fro": "fro", "gram": "spectral"}

GRAM_MIN_ASPECT = 1.5   # Gram-space needs 6k²L + 14k³ vs 15k²L + 5k³ (5 steps): wins for L > k
GRAM_MIN_SHORT = 256    # below this the extra k×k launches cost more than the FLOPs saved


def use_gram(m: int, n: int) -> bool:
    """Automatic choice: Gram-space NS when long/short ≥ 1.5 and the short side ≥ 256."""
    k, L = min(m, n), max(m, n)
    return k >= GRAM_MIN_SHORT and L >= GRAM_MIN_ASPECT * k


def _impl(G: Tensor, coefficients: Sequence[tuple[float, float, float]], *, safety: float, normalize: str,
          eps: float, compute_dtype: torch.dtype, out_dtype: torch.dtype, fp32_first_gram: bool,
          gram: bool | None) -> Tensor:
    from fastortho.kernels.newton_schulz_iteration import ns_gram, ns_standard

    B, m, n = G.shape
    out = torch.empty(B, m, n, device=G.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    tall = m > n
    Gv = G.mT if tall else G
    if gram is None:
        gram = use_gram(m, n)
    if gram and compute_dtype == torch.bfloat16:
        compute_dtype = torch.float16
    # The last step writes the result rounded to compute_dtype; write straight into `out` when the dtypes
    # agree, else into a compute_dtype buffer converted once (the rounding torch.to would do).
    res = out if out_dtype == compute_dtype else torch.empty(B, m, n, device=G.device, dtype=compute_dtype)
    resv = res.mT if tall else res
    run = ns_gram if gram else ns_standard
    # Triton launches on the current device; custom_op adds no device guard, so a tensor on
    # cuda:1 while cuda:0 is current needs one (it then runs on cuda:1's current stream).
    guard = torch.cuda.device(G.device) if G.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        run(Gv, resv, list(coefficients), normalize=_KERNEL_NORMALIZE[normalize], safety=safety, eps=eps,
            cdt=compute_dtype, fp32_first=fp32_first_gram)
    if res is not out:
        out.copy_(res)
    return out


if triton_available():
    @torch.library.custom_op("fastortho::newton_schulz_triton", mutates_args=())
    def _ns_op(G: Tensor, a: list[float], b: list[float], c: list[float], safety: float, normalize: str,
               eps: float, compute_dtype: torch.dtype, out_dtype: torch.dtype, fp32_first_gram: bool,
               gram: bool | None) -> Tensor:
        """gram: None chooses by shape (:func:`use_gram`), True Gram-space, False standard."""
        return _impl(G, list(zip(a, b, c)), safety=safety, normalize=normalize, eps=eps,
                     compute_dtype=compute_dtype, out_dtype=out_dtype, fp32_first_gram=fp32_first_gram, gram=gram)

    @_ns_op.register_fake
    def _ns_fake(G, a, b, c, safety, normalize, eps, compute_dtype, out_dtype, fp32_first_gram, gram):
        return G.new_empty(G.shape, dtype=out_dtype)


def newton_schulz_triton(G: Tensor, coefficients: Sequence[tuple[float, float, float]], *, safety: float,
                         normalize: Literal["fro", "gram"], eps: float, compute_dtype: torch.dtype,
                         out_dtype: torch.dtype, fp32_first_gram: bool = False,
                         gram: bool | None = None) -> Tensor:
    """Newton–Schulz on a batch G (B, m, n) with the fused Triton kernels (module docstring).

    Args:
        G: (B, m, n), any float dtype and strides; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        coefficients: per-step (a, b, c) of p(σ) = aσ + bσ³ + cσ⁵.
        safety, eps: X₀ = G / max(safety·ν, eps).
        normalize: "fro" (ν = ‖G‖_F) or "gram" (ν = ‖GGᵀ‖_F^{1/2}, free from the first Gram).
        compute_dtype: storage of X and the k×k matrices (bfloat16, float16 or float32).
        out_dtype: dtype of the result (the compute_dtype result is converted once).
        fp32_first_gram: form the first Gram product from G in fp32 (no bf16 input-rounding floor).
        gram: True/False force Gram-space/standard NS; None chooses by shape (:func:`use_gram`).

    Returns:
        (B, m, n) tensor in ``out_dtype``; G is not modified.
    """
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install triton)")
    if G.dim() != 3:
        raise ValueError(f"newton_schulz_triton expects a 3-D (B, m, n) tensor, got shape {tuple(G.shape)}")
    if G.device.type not in ("cuda", "meta") and not interpreter_enabled():
        raise RuntimeError(f"backend='triton' needs a CUDA tensor (got {G.device}); CPU tensors run only "
                           "under the Triton interpreter (TRITON_INTERPRET=1 set before import)")
    if not G.is_floating_point():
        raise TypeError(f"newton_schulz_triton expects a floating-point tensor, got {G.dtype}")
    if normalize not in ("fro", "gram"):
        raise ValueError(f"normalize must be 'fro' or 'gram', got {normalize!r}")
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype}")
    if G.dtype == torch.float64:     # kernels read at most fp32; the scale is applied in fp32
        G = G.float()
    co = [tuple(float(v) for v in t) for t in coefficients]
    return torch.ops.fastortho.newton_schulz_triton(
        G, [t[0] for t in co], [t[1] for t in co], [t[2] for t in co], float(safety), normalize,
        float(eps), compute_dtype, out_dtype, bool(fp32_first_gram), None if gram is None else bool(gram))
