"""Where the per-head maxima come from: the chunked max-logit computation and the SDPA observer that
forwards every ``scaled_dot_product_attention`` call of a declared module to :meth:`QKClip.observe`."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from .clip import QKClip

#: Elements of one chunk of logits in :func:`observe_max_logits` (fp32: 16 MiB).
_CHUNK_ELEMS = 1 << 22


def observe_max_logits(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: Tensor | None = None,
    layout: str = "bhsd",
    chunk_elems: int = _CHUNK_ELEMS,
) -> Tensor:
    r"""Per query head, the largest logit :math:`\text{scale}\cdot q_i\cdot k_j` over batch and allowed positions.

    Args:
        q: queries, ``(B, H, L, D)`` (``layout="bhsd"``, what ``scaled_dot_product_attention`` takes) or
            ``(B, L, H, D)`` (``layout="bshd"``, FlashAttention's). Leading batch dims may be absent
            (``(H, L, D)``).
        k: keys, same layout, with ``H_kv`` heads dividing ``H``; query head ``h`` uses key head
            ``h // (H / H_kv)`` (``enable_gqa`` / ``repeat_interleave``).
        scale: logit scale; None = :math:`1/\sqrt{D}` (SDPA's default).
        is_causal: only :math:`j \le i` counts (top-left aligned, as SDPA).
        attn_mask: boolean (True = attend) or additive float mask broadcastable to ``(B, H, L, S)``;
            for a float mask the positions at :math:`-\infty` are excluded and the bias itself is *not*
            added (QK-clip bounds the :math:`q\cdot k` part, the only part it can rescale).
        chunk_elems: logits held at once; query rows are processed in chunks of
            ``max(1, chunk_elems // (B·H·S))``.

    Returns:
        ``(H,)`` float32 maxima (``-inf`` for a head with no allowed position). Computed in fp32 (fp64 for
        fp64 input) without a host sync.
    """
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' (B, H, L, D) or 'bshd' (B, L, H, D), got {layout!r}")
    if q.ndim < 3 or k.ndim != q.ndim:
        raise ValueError(f"q and k must both be (B, H, L, D) or (H, L, D) tensors, got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if layout == "bshd":
        q, k = q.transpose(-3, -2), k.transpose(-3, -2)
    if q.ndim == 3:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        if attn_mask is not None and attn_mask.ndim == 3:
            attn_mask = attn_mask.unsqueeze(0)
    q, k = q.flatten(0, -4), k.flatten(0, -4)  # (B, H, L, D)
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hk == 0 or H % Hk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} (as (B, H, L, D)) need the same batch and "
                         f"head dim, and a number of key heads dividing the query heads")
    G = H // Hk
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qg = q.reshape(B, Hk, G, L, D)
    kt = k.to(work).unsqueeze(2).transpose(-1, -2)  # (B, Hk, 1, D, S)
    mask = None
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
        mask = m.expand(B, H, L, S)  # a view: each chunk below copies only its own rows
    c = max(1, chunk_elems // max(1, B * H * S))
    out = torch.full((Hk, G), float("-inf"), dtype=work, device=q.device)
    for i0 in range(0, L, c):
        i1 = min(L, i0 + c)
        s = torch.matmul(qg[..., i0:i1, :].to(work), kt) * sc  # (B, Hk, G, c, S)
        if is_causal:
            rows = torch.arange(i0, i1, device=q.device).unsqueeze(1)
            s = s.masked_fill(torch.arange(S, device=q.device) > rows, float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask[..., i0:i1, :].reshape(B, Hk, G, i1 - i0, S), float("-inf"))
        out = torch.maximum(out, s.amax(dim=(0, 3, 4)) if s.numel() else out)
    return out.reshape(H).float() if work == torch.float32 else out.reshape(H)


class SDPAObserver(TorchFunctionMode):
    """Forwards every ``scaled_dot_product_attention`` call made while active to :meth:`QKClip.observe`."""

    def __init__(self, clip: QKClip, module: nn.Module) -> None:
        super().__init__()
        self.clip, self.module = clip, module

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            a = dict(zip(names, args), **kwargs)
            self.clip.observe(self.module, a["query"], a["key"], scale=a.get("scale"),
                              is_causal=bool(a.get("is_causal", False)), attn_mask=a.get("attn_mask"))
        return func(*args, **kwargs)
