"""Declarations of attention layouts: which output rows of which projection each head's clip factor
applies to (separate q/k projections, a fused qkv projection, grouped-query attention, multi-head
latent attention)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

@dataclass
class Segment:
    """Output rows of one projection that a clip factor applies to: ``rows[i]`` gets ``kind``'s factor
    of head ``heads[i]`` (``"q"``: f_q, ``"k"``: f_k of a key head, ``"qr"``: f_q·f_k, a rotary query
    part whose key is shared and not scaled)."""

    weight: Tensor
    bias: Tensor | None
    axis: int  # output axis of ``weight``
    rows: Tensor
    heads: Tensor
    kind: str


@dataclass
class Spec:
    name: str
    module: nn.Module
    n_heads: int
    n_kv_heads: int
    segments: list[Segment]
    max_logit: Tensor
    observed: int = 0
    handles: list[Any] = field(default_factory=list)


def resolve_proj(module: nn.Module, path: str, arg: str, weight_layout: str | None) -> tuple[Tensor, Tensor | None, int]:
    """(weight, bias, output axis) of ``module``'s projection named ``path`` (a submodule or a parameter)."""
    try:
        target: Any = module.get_submodule(path)
    except AttributeError:
        try:
            target = module.get_parameter(path)
        except AttributeError:
            raise ValueError(f"{arg}={path!r}: {type(module).__name__} has no submodule or parameter of that name "
                             f"(names as in module.named_modules() / named_parameters())") from None
    if isinstance(target, nn.Module):
        w = getattr(target, "weight", None)
        if not isinstance(w, Tensor) or w.ndim != 2:
            raise ValueError(f"{arg}={path!r}: expected a module with a 2-D weight (nn.Linear-like), got "
                             f"{type(target).__name__}")
        b = getattr(target, "bias", None)
        # transformers' Conv1D (GPT-2) stores the weight as (in, out)
        layout = weight_layout or ("in_out" if type(target).__name__ == "Conv1D" else "out_in")
    else:
        w, b, layout = target, None, weight_layout or "out_in"
        if w.ndim != 2:
            raise ValueError(f"{arg}={path!r}: expected a 2-D weight parameter, got shape {tuple(w.shape)}")
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"weight_layout must be 'out_in' (nn.Linear) or 'in_out' (Conv1D), got {layout!r}")
    return w, (b if isinstance(b, Tensor) else None), (0 if layout == "out_in" else 1)


def head_segment(w: Tensor, b: Tensor | None, axis: int, start: int, heads: int, d: int, kind: str) -> Segment:
    """``heads`` consecutive blocks of ``d`` rows from row ``start``: block ``h`` gets head ``h``'s factor."""
    rows = torch.arange(start, start + heads * d, device=w.device)
    return Segment(w, b, axis, rows, torch.arange(heads, device=w.device).repeat_interleave(d), kind)


def attention_segments(module: nn.Module, *, q: str | None, k: str | None, qkv: str | None,
                       split_sizes: Sequence[int] | None, n_heads: int, n_kv: int, head_dim: int | None,
                       weight_layout: str | None) -> list[Segment]:
    """The query and key row segments of a standard (MHA/GQA/MQA) attention module: separate ``q``/``k``
    projections, or one fused ``qkv`` projection ``[q (n_heads·d); k (n_kv·d); v ...]``."""
    if qkv is not None:
        w, b, axis = resolve_proj(module, qkv, "qkv", weight_layout)
        n_out = w.shape[axis]
        d = head_dim if head_dim is not None else (
            split_sizes[0] // n_heads if split_sizes else None)
        if d is None:
            raise ValueError("qkv= needs head_dim= or split_sizes= to locate the q and k rows")
        sizes = tuple(split_sizes) if split_sizes else (n_heads * d, n_kv * d)
        if sum(sizes) > n_out or (split_sizes and sum(sizes) != n_out):
            raise ValueError(f"split_sizes {sizes} must sum to the {n_out} output rows of {qkv!r}")
        if sizes[0] != n_heads * d or sizes[1] != n_kv * d:
            raise ValueError(f"split_sizes {sizes}: q and k parts must be n_heads·head_dim = {n_heads * d} and "
                             f"n_kv_heads·head_dim = {n_kv * d} rows")
        segs = [head_segment(w, b, axis, 0, n_heads, d, "q"), head_segment(w, b, axis, sizes[0], n_kv, d, "k")]
    else:
        wq, bq, aq = resolve_proj(module, q, "q", weight_layout)  # type: ignore[arg-type]
        wk, bk, ak = resolve_proj(module, k, "k", weight_layout)  # type: ignore[arg-type]
        d = head_dim if head_dim is not None else wq.shape[aq] // n_heads
        if wq.shape[aq] != n_heads * d or wk.shape[ak] != n_kv * d:
            raise ValueError(f"q has {wq.shape[aq]} output rows and k {wk.shape[ak]}: expected n_heads·head_dim = "
                             f"{n_heads * d} and n_kv_heads·head_dim = {n_kv * d}")
        segs = [head_segment(wq, bq, aq, 0, n_heads, d, "q"), head_segment(wk, bk, ak, 0, n_kv, d, "k")]
    return segs


def mla_segments(module: nn.Module, *, q: str, kv: str, n_heads: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, weight_layout: str | None) -> list[Segment]:
    """The segments of a multi-head latent attention module (DeepSeek-V3 layout): q_nope and k_nope rows
    (factor √γ), q_rope rows (factor γ); the value rows and the shared rotary key are not touched."""
    wq, bq, aq = resolve_proj(module, q, "q", weight_layout)
    wkv, bkv, akv = resolve_proj(module, kv, "kv", weight_layout)
    dq, dkv = qk_nope_head_dim + qk_rope_head_dim, qk_nope_head_dim + v_head_dim
    if wq.shape[aq] != n_heads * dq or wkv.shape[akv] != n_heads * dkv:
        raise ValueError(f"q has {wq.shape[aq]} output rows and kv {wkv.shape[akv]}: expected n_heads·(nope+rope) = "
                         f"{n_heads * dq} and n_heads·(nope+v) = {n_heads * dkv}")
    dev = wq.device

    def seg(w: Tensor, b: Tensor | None, axis: int, block: int, lo: int, hi: int, kind: str) -> Segment:
        h = torch.arange(n_heads, device=dev).repeat_interleave(hi - lo)
        rows = (torch.arange(n_heads, device=dev) * block).repeat_interleave(hi - lo) + \
            torch.arange(lo, hi, device=dev).repeat(n_heads)
        return Segment(w, b, axis, rows, h, kind)

    segs = [seg(wq, bq, aq, dq, 0, qk_nope_head_dim, "q"), seg(wq, bq, aq, dq, qk_nope_head_dim, dq, "qr"),
            seg(wkv, bkv, akv, dkv, 0, qk_nope_head_dim, "k")]
    return segs
