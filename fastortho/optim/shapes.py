r"""How a parameter is seen as matrices, and the learning-rate scale each matrix gets.

A parameter of shape ``(..., m, n)`` (or a conv kernel ``(out, in, k...)``) is orthogonalized as a
stack of :math:`m \times n` matrices (:func:`matrix_shape`), optionally in row blocks
(:func:`split_blocks`); each block's update is scaled by :math:`s(m, n)` (:func:`lr_scale_factor`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "LR_SCALES", "LR_SCALE_ALIASES", "TORCH_ADJUST_LR_FN", "lr_scale_factor", "resolve_lr_scale", "matrix_shape",
    "split_blocks",
    "resolve_ns_dtype",
]

#: The learning-rate scale rules, :math:`m` = rows = fan_out, :math:`n` = cols = fan_in of the matrix
#: *as orthogonalized* (after conv flattening and row splitting).
LR_SCALES: dict[str, Callable[[int, int], float]] = {
    # Keller Jordan / torch.optim.Muon "original": only tall matrices are scaled up.
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),
    # Moonlight / torch "match_rms_adamw": update RMS ≈ 0.2, AdamW's typical RMS, so AdamW's lr transfers.
    "rms_match": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    # Bernstein, "Deriving Muon": the RMS→RMS operator-norm step, √(fan_out/fan_in), unclamped.
    "spectral": lambda m, n: math.sqrt(m / n),
    "none": lambda m, n: 1.0,
}
#: torch.optim.Muon's ``adjust_lr_fn`` names and the rule each one is.
TORCH_ADJUST_LR_FN: dict[str | None, str] = {
    None: "original",
    "original": "original",
    "match_rms_adamw": "rms_match",
    "spectral_unclamped": "spectral",
    "rms_to_rms": "spectral",  # timm's name (its adjust_lr_fn)
}
#: The names peers give the rules, accepted as ``lr_scale`` values (one table: docs/optimizer-variants.md).
LR_SCALE_ALIASES: dict[str, str] = {
    "match_rms_adamw": "rms_match",  # torch.optim.Muon, timm, Moonlight
    "rms_norm": "rms_match",  # dion
    "spectral_unclamped": "spectral",  # torch.optim.Muon
    "rms_to_rms": "spectral",  # timm
    "spectral_norm": "spectral",  # dion
}


def lr_scale_factor(m: int, n: int, rule: str) -> float:
    r"""The per-matrix learning-rate multiplier :math:`s(m, n)` for an :math:`m \times n` update.

    ===============  ======================================  ===========================================
    rule             :math:`s(m, n)`                         who
    ===============  ======================================  ===========================================
    ``"original"``   :math:`\sqrt{\max(1, m/n)}`             KellerJordan/Muon, torch ``"original"``
    ``"rms_match"``  :math:`0.2\,\sqrt{\max(m, n)}`          Moonlight, torch ``"match_rms_adamw"``,
                                                             dion ``"rms_norm"``
    ``"spectral"``   :math:`\sqrt{m/n}`                      Bernstein, torch
                                                             ``"spectral_unclamped"``, dion
                                                             ``"spectral_norm"``
    ``"none"``       :math:`1`
    ===============  ======================================  ===========================================

    :math:`m` is fan_out (rows) and :math:`n` fan_in (columns) of the matrix that is orthogonalized:
    a conv kernel ``(out, in, kh, kw)`` has :math:`m = out,\ n = in\cdot kh\cdot kw`.
    """
    try:
        return LR_SCALES[rule](m, n)
    except KeyError:
        raise ValueError(f"lr_scale must be one of {sorted(LR_SCALES)}, got {rule!r}") from None


def resolve_lr_scale(lr_scale: str | None, adjust_lr_fn: str | None) -> str:
    """One rule from fastortho's ``lr_scale`` and torch.optim.Muon's ``adjust_lr_fn``; they must agree."""
    if adjust_lr_fn not in TORCH_ADJUST_LR_FN:
        # torch.optim.Muon's message first (its tests match it), then the choices
        raise ValueError(
            f"Adjust learning rate function {adjust_lr_fn} is not supported: adjust_lr_fn must be one of "
            f"{sorted(k for k in TORCH_ADJUST_LR_FN if k)} or None"
        )
    from_torch = TORCH_ADJUST_LR_FN[adjust_lr_fn]
    if lr_scale is None:
        return from_torch
    lr_scale = LR_SCALE_ALIASES.get(lr_scale, lr_scale)
    if lr_scale not in LR_SCALES:
        raise ValueError(f"lr_scale must be one of {sorted(LR_SCALES)}, got {lr_scale!r}")
    if adjust_lr_fn is not None and from_torch != lr_scale:
        raise ValueError(
            f"lr_scale={lr_scale!r} contradicts adjust_lr_fn={adjust_lr_fn!r} (= {from_torch!r}); pass one"
        )
    return lr_scale


def matrix_shape(shape: Sequence[int], flatten: bool | None) -> tuple[int, int, int]:
    r"""``(batch, m, n)``: how a parameter of ``shape`` is seen as a stack of matrices.

    * 2-D: one :math:`m \times n` matrix.
    * ``flatten=True`` (conv kernels ``(out, in, k...)``): one ``(shape[0], prod(shape[1:]))`` matrix.
    * ``flatten=False`` (stacked matrices, e.g. MoE experts ``(E, m, n)``): ``prod(shape[:-2])`` matrices
      of ``shape[-2:]``.
    * ``flatten=None`` (auto): 3-D is stacked, 4-D and more is flattened (a conv2d/3d kernel). A conv1d
      kernel is 3-D, so give its group ``flatten=True`` (``muon_param_groups`` does).
    """
    nd = len(shape)
    if nd < 2:
        raise ValueError(f"Muon needs a parameter with at least 2 dimensions, got shape {tuple(shape)}")
    if nd == 2:
        return 1, int(shape[0]), int(shape[1])
    if flatten is None:
        flatten = nd >= 4
    if flatten:
        return 1, int(shape[0]), int(math.prod(shape[1:]))
    return int(math.prod(shape[:-2])), int(shape[-2]), int(shape[-1])


def resolve_ns_dtype(ns_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means bf16 on CUDA (tensor cores) and fp32 elsewhere (a CPU bf16 matmul is ~100× slower)."""
    if ns_dtype is not None:
        return ns_dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def split_blocks(
    m: int, bsz: int, split_sizes: Sequence[int] | None, shape: Sequence[int]
) -> list[tuple[int, int]]:
    """Row ranges ``[(r0, r1), ...]`` of the blocks orthogonalized separately (one block without a split)."""
    if not split_sizes:
        return [(0, m)]
    if bsz != 1 or sum(split_sizes) != m:
        raise ValueError(f"split_sizes {tuple(split_sizes)} must sum to the {m} rows of a 2-D "
                         f"(or flattened) parameter of shape {tuple(shape)}")
    offs = [0, *itertools.accumulate(int(s) for s in split_sizes)]
    return list(zip(offs[:-1], offs[1:]))
