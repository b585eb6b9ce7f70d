r"""QK-clip: bound every attention head's largest pre-softmax logit by rescaling its W_q and W_k rows.

The rule of MuonClip ("Kimi K2: Open Agentic Intelligence", Algorithm 1). For attention head
:math:`h` let

.. math::
   S^h_{\max} = \max_{\text{batch}}\ \max_{i,j}\ \text{scale}\cdot q^h_i\cdot k^h_j

be the largest logit the head produced in the step (over the allowed positions: a causal or boolean
mask removes the masked ones), and :math:`\gamma_h = \min(1, \tau/S^h_{\max})`. After the optimizer
update, every head with :math:`S^h_{\max} > \tau` has its query rows and its key rows multiplied by
:math:`\sqrt{\gamma_h}`. Since :math:`q^h_i\cdot k^h_j` is bilinear in the two row blocks (biases
scaled with their rows), every logit of that head is multiplied by exactly :math:`\gamma_h`, so the
logit that was :math:`S^h_{\max}` becomes :math:`\tau`. Heads at or below :math:`\tau` are multiplied
by exactly 1 (left bit-identical). Nothing changes in the forward or backward pass.

**Grouped-query attention.** A key head shared by the query heads of its group :math:`g` is scaled by
:math:`f_k = \sqrt{\gamma_g}` with :math:`\gamma_g = \min_{h\in g}\gamma_h` (the largest logit of the
group). Each query head gets :math:`f_q^h = \min(1, \gamma_h / f_k)`, so head :math:`h`'s logits are
multiplied by :math:`f_q^h f_k = \max(\gamma_h, \ldots)\le 1`: exactly :math:`\gamma_h` when
:math:`\gamma_h \le \sqrt{\gamma_g}` (the worst head of the group always), and :math:`\sqrt{\gamma_g}`
for a head that needed less; no row is ever scaled up and every head ends at or below :math:`\tau`.
With one query head per key head this is the :math:`\sqrt{\gamma_h}` rule above.

**Multi-head latent attention** (:meth:`QKClip.mla`, DeepSeek-V3 layout). Each head's query is
:math:`[q^C; q^R]` (content and rotary parts, rows of the query up-projection) and its key is
:math:`[k^C; k^R]`, where :math:`k^C` comes from the head's rows of the key/value up-projection and the
rotary key :math:`k^R` is *shared by all heads*. As in Kimi K2, :math:`q^C` and :math:`k^C` rows are
multiplied by :math:`\sqrt{\gamma_h}`, the rotary query rows :math:`q^R` by :math:`\gamma_h`, and the
shared :math:`k^R` projection and the value rows are not touched, so clipping one head never changes
another head's logits.

**Where the maxima come from.** (a) :meth:`QKClip.observe` called inside the attention with ``q`` and
``k`` (chunked over query positions: memory :math:`O(B\cdot H\cdot c\cdot T)` for a chunk of :math:`c`
rows); (b) forward hooks installed by :meth:`QKClip.attention` (``hooks=True``) that intercept every
``torch.nn.functional.scaled_dot_product_attention`` call inside the module's forward and pass its
``q``, ``k``, ``scale``, ``is_causal``, ``attn_mask`` and ``enable_gqa`` to :meth:`observe`; (c)
:meth:`QKClip.update_max_logits` with per-head maxima the user already has (e.g. returned by an
attention kernel). All three keep a running maximum on the device without a host sync.

**Timing.** :meth:`QKClip.apply` uses the maxima observed since the last call, i.e. the logits of this
step's forward pass (at the weights before the update), exactly as Kimi K2 does: the bound then holds
for the next step up to the growth a single update causes. ``apply(recompute=fn)`` instead runs ``fn``
(a forward pass, under ``no_grad``) after the update and clips with the logits of the updated weights,
which bounds them by :math:`\tau` exactly on that batch, at the cost of one forward.

**Sharded weights.** Every factor belongs to one output row, so the rescale is local to each shard of
a ``DTensor`` weight: for ``Shard(d)`` on the output axis (FSDP2's ``Shard(0)``, tensor parallel's
column-wise ``Shard(0)``) each rank multiplies its own rows by the matching slice of the factor vector;
for ``Shard`` on the input axis (row-wise TP) and ``Replicate`` every rank multiplies its whole local
block; a ``Partial`` weight's partial sums are scaled alike (the rescale is linear). No communication is
needed except one ``all_reduce(MAX)`` of all per-head maxima per :meth:`apply` when
``torch.distributed`` is initialized (data-parallel ranks see different batches and must clip
identically; tensor-parallel ranks that observe only their own heads leave the others at
:math:`-\infty`). Every rank of ``process_group`` must declare the same attention modules in the same
order (pipeline stages that own different layers pass their stage's group, or ``process_group=False``
and reduce the maxima themselves).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["QKClip", "observe_max_logits", "clip_factors"]

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


def clip_factors(max_logits: Tensor, tau: float, n_kv_heads: int | None = None) -> tuple[Tensor, Tensor]:
    r"""The QK-clip factors :math:`(f_q, f_k)` for per-query-head maxima ``max_logits`` (``(H,)``).

    :math:`\gamma_h = \tau/S_h` where :math:`S_h > \tau`, else 1 (NaN or :math:`-\infty` maxima: 1);
    :math:`f_k[g] = \sqrt{\min_{h\in g}\gamma_h}` per key head, :math:`f_q[h] = \min(1, \gamma_h/f_k[g(h)])`.
    Head :math:`h`'s logits are multiplied by :math:`f_q[h]\,f_k[g(h)]`.
    """
    H = max_logits.numel()
    Hk = H if n_kv_heads is None else int(n_kv_heads)
    s = max_logits.reshape(H)
    gamma = torch.where(s > tau, tau / s, torch.ones_like(s))
    fk = gamma.reshape(Hk, H // Hk).amin(dim=1).sqrt()
    fq = torch.clamp(gamma / fk.repeat_interleave(H // Hk), max=1.0)
    return fq, fk


@dataclass
class _Segment:
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
class _Spec:
    name: str
    module: nn.Module
    n_heads: int
    n_kv_heads: int
    segments: list[_Segment]
    max_logit: Tensor
    observed: int = 0
    handles: list[Any] = field(default_factory=list)


class _SDPAObserver(TorchFunctionMode):
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


def _resolve_proj(module: nn.Module, path: str, arg: str, weight_layout: str | None) -> tuple[Tensor, Tensor | None, int]:
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


def _local_factor(p: Tensor, factor: Tensor, axis: int) -> Tensor:
    """``factor`` (one entry per index of ``p``'s ``axis``) shaped to broadcast against ``p``'s local data."""
    shape = [1] * p.ndim
    shape[axis] = -1
    f = factor.reshape(shape)
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if not isinstance(p, DTensor):
        return f.to(device=p.device, dtype=p.dtype)
    # the same split along the output axis as p (every rank holds the full factor: no communication),
    # replicated over the mesh dims that shard p elsewhere or hold partial sums
    placements = [pl if pl.is_shard() and pl.dim % p.ndim == axis else Replicate() for pl in p.placements]
    f = f.to(device=p.to_local().device, dtype=p.dtype)
    return distribute_tensor(f, p.device_mesh, placements, src_data_rank=None).to_local()


def _mul_local_(p: Tensor, factor: Tensor, axis: int) -> None:
    from torch.distributed.tensor import DTensor

    local = p.to_local() if isinstance(p, DTensor) else p
    local.mul_(_local_factor(p, factor, axis))


class QKClip:
    r"""Per-head QK-clip (MuonClip) for the attention modules it is told about; see the module docstring.

    Example::

        clip = QKClip(model, tau=100.0)
        for blk in model.blocks:                      # modules that call F.scaled_dot_product_attention
            clip.attention(blk.attn, q="q_proj", k="k_proj", n_heads=8, n_kv_heads=2)
        ...
        loss.backward(); opt.step(); clip.apply()     # Muon(..., qk_clip=clip) calls apply() in step()
        clip.report()                                 # per-layer max logit, heads clipped

    Args:
        model: the model (used only to name modules in telemetry), or None, or a list of dicts each
            passed as keyword arguments to :meth:`attention` (``module`` included).
        tau: the logit threshold :math:`\tau` (Kimi K2: 100).
        process_group: group over which :meth:`apply` takes the max of the observed logits: None = the
            default group when ``torch.distributed`` is initialized; False = never reduce.
    """

    def __init__(self, model: nn.Module | Iterable[Mapping[str, Any]] | None = None, tau: float = 100.0,
                 *, process_group: Any = None) -> None:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        self.tau = float(tau)
        self.process_group = process_group
        self._specs: list[_Spec] = []
        self._by_module: dict[int, _Spec] = {}
        self._names: dict[int, str] = {}
        self._last: dict[str, dict[str, Tensor]] = {}
        self._warned: set[str] = set()
        if isinstance(model, nn.Module):
            self._names = {id(m): n for n, m in model.named_modules()}
        elif model is not None:
            for kw in model:
                self.attention(**dict(kw))

    # ------------------------------------------------------------------------------------------
    # declaring attention modules
    # ------------------------------------------------------------------------------------------
    def attention(
        self,
        module: nn.Module,
        *,
        q: str | None = None,
        k: str | None = None,
        qkv: str | None = None,
        split_sizes: Sequence[int] | None = None,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        weight_layout: str | None = None,
        hooks: bool = True,
        name: str | None = None,
    ) -> QKClip:
        """Declare an attention module whose query/key rows are clipped.

        Args:
            module: the attention module (the key of its statistics).
            q, k: names (inside ``module``) of the query and key projections: submodules with a 2-D
                ``weight`` (and optional ``bias``, scaled with its rows) or 2-D parameters.
            qkv, split_sizes: a fused projection instead, whose output rows are
                ``[q (n_heads·head_dim); k (n_kv_heads·head_dim); v ...]``; ``split_sizes`` gives the
                row counts of the parts (the first two are used; default: q and k sizes from the head counts).
            n_heads: query heads; n_kv_heads: key heads (default ``n_heads``; GQA/MQA: fewer, dividing it).
            head_dim: rows per head (default: query rows / ``n_heads``).
            weight_layout: ``"out_in"`` (nn.Linear) or ``"in_out"``; default detects transformers' Conv1D.
            hooks: observe every ``F.scaled_dot_product_attention`` call in ``module``'s forward.
                Set False when you call :meth:`observe` or :meth:`update_max_logits` yourself.
            name: telemetry name (default: the module's name in ``model``).
        """
        n_kv = n_heads if n_kv_heads is None else int(n_kv_heads)
        if n_heads < 1 or n_kv < 1 or n_heads % n_kv:
            raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv})")
        if (qkv is None) == (q is None or k is None) or (qkv is not None and (q or k)):
            raise ValueError("pass either q= and k= (separate projections) or qkv= (one fused projection)")
        if qkv is not None:
            w, b, axis = _resolve_proj(module, qkv, "qkv", weight_layout)
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
            segs = [self._segment(w, b, axis, 0, n_heads, d, "q"), self._segment(w, b, axis, sizes[0], n_kv, d, "k")]
        else:
            wq, bq, aq = _resolve_proj(module, q, "q", weight_layout)  # type: ignore[arg-type]
            wk, bk, ak = _resolve_proj(module, k, "k", weight_layout)  # type: ignore[arg-type]
            d = head_dim if head_dim is not None else wq.shape[aq] // n_heads
            if wq.shape[aq] != n_heads * d or wk.shape[ak] != n_kv * d:
                raise ValueError(f"q has {wq.shape[aq]} output rows and k {wk.shape[ak]}: expected n_heads·head_dim = "
                                 f"{n_heads * d} and n_kv_heads·head_dim = {n_kv * d}")
            segs = [self._segment(wq, bq, aq, 0, n_heads, d, "q"), self._segment(wk, bk, ak, 0, n_kv, d, "k")]
        return self._add(module, name, n_heads, n_kv, segs, hooks)

    def mla(
        self,
        module: nn.Module,
        *,
        q: str,
        kv: str,
        n_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        weight_layout: str | None = None,
        hooks: bool = True,
        name: str | None = None,
    ) -> QKClip:
        """Declare a multi-head latent attention module (DeepSeek-V3 layout).

        ``q``: the query (up-)projection, per head ``[q_nope (qk_nope_head_dim); q_rope (qk_rope_head_dim)]``
        rows; ``kv``: the key/value up-projection, per head ``[k_nope (qk_nope_head_dim); v (v_head_dim)]``
        rows. Touched: q_nope and k_nope rows (×√γ), q_rope rows (×γ). Not touched: the value rows and the
        shared rotary key projection (the rope part of the compressed kv projection).
        """
        wq, bq, aq = _resolve_proj(module, q, "q", weight_layout)
        wkv, bkv, akv = _resolve_proj(module, kv, "kv", weight_layout)
        dq, dkv = qk_nope_head_dim + qk_rope_head_dim, qk_nope_head_dim + v_head_dim
        if wq.shape[aq] != n_heads * dq or wkv.shape[akv] != n_heads * dkv:
            raise ValueError(f"q has {wq.shape[aq]} output rows and kv {wkv.shape[akv]}: expected n_heads·(nope+rope) = "
                             f"{n_heads * dq} and n_heads·(nope+v) = {n_heads * dkv}")
        dev = wq.device

        def seg(w: Tensor, b: Tensor | None, axis: int, block: int, lo: int, hi: int, kind: str) -> _Segment:
            h = torch.arange(n_heads, device=dev).repeat_interleave(hi - lo)
            rows = (torch.arange(n_heads, device=dev) * block).repeat_interleave(hi - lo) + \
                torch.arange(lo, hi, device=dev).repeat(n_heads)
            return _Segment(w, b, axis, rows, h, kind)

        segs = [seg(wq, bq, aq, dq, 0, qk_nope_head_dim, "q"), seg(wq, bq, aq, dq, qk_nope_head_dim, dq, "qr"),
                seg(wkv, bkv, akv, dkv, 0, qk_nope_head_dim, "k")]
        return self._add(module, name, n_heads, n_heads, segs, hooks)

    @staticmethod
    def _segment(w: Tensor, b: Tensor | None, axis: int, start: int, heads: int, d: int, kind: str) -> _Segment:
        rows = torch.arange(start, start + heads * d, device=w.device)
        return _Segment(w, b, axis, rows, torch.arange(heads, device=w.device).repeat_interleave(d), kind)

    def _add(self, module: nn.Module, name: str | None, n_heads: int, n_kv: int, segs: list[_Segment],
             hooks: bool) -> QKClip:
        if id(module) in self._by_module:
            raise ValueError(f"{type(module).__name__} {name or self._names.get(id(module), '')!r} is already declared")
        nm = name or self._names.get(id(module)) or f"attention.{len(self._specs)}"
        w0 = segs[0].weight
        # fp64 weights keep fp64 maxima, so the rescale is exact to fp64 rounding
        dt = torch.float64 if w0.dtype == torch.float64 else torch.float32
        spec = _Spec(nm, module, n_heads, n_kv, segs,
                     torch.full((n_heads,), float("-inf"), dtype=dt, device=w0.device))
        if hooks:
            def pre(mod: nn.Module, args: Any) -> None:
                mode = _SDPAObserver(self, mod)
                mode.__enter__()
                spec.handles.append(mode)

            def post(mod: nn.Module, args: Any, out: Any) -> None:
                modes = [h for h in spec.handles if isinstance(h, _SDPAObserver)]
                if modes:
                    spec.handles.remove(modes[-1])
                    modes[-1].__exit__(None, None, None)

            spec.handles += [module.register_forward_pre_hook(pre),
                             module.register_forward_hook(post, always_call=True)]
        self._specs.append(spec)
        self._by_module[id(module)] = spec
        return self

    def remove_hooks(self) -> None:
        """Remove the forward hooks installed by :meth:`attention` / :meth:`mla`."""
        for spec in self._specs:
            for h in spec.handles:
                if not isinstance(h, _SDPAObserver):
                    h.remove()
            spec.handles.clear()

    def _spec(self, module: nn.Module) -> _Spec:
        spec = self._by_module.get(id(module))
        if spec is None:
            raise KeyError(f"{type(module).__name__} was not declared: call clip.attention(module, ...) first")
        return spec

    # ------------------------------------------------------------------------------------------
    # statistics
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, module: nn.Module, q: Tensor, k: Tensor, *, scale: float | None = None,
                is_causal: bool = False, attn_mask: Tensor | None = None, layout: str = "bhsd") -> None:
        """Record the per-head max logit of ``q`` and ``k`` for ``module`` (see :func:`observe_max_logits`).

        Call it inside the attention's forward with the tensors that enter the softmax product (after
        rotary embeddings and any q/k norm), e.g. ``clip.observe(self, q, k, is_causal=True)``.
        """
        spec = self._spec(module)
        if q.shape[-3 if layout == "bhsd" else -2] != spec.n_heads:
            raise ValueError(f"{spec.name}: q has {q.shape[-3 if layout == 'bhsd' else -2]} heads (layout "
                             f"{layout!r}), declared n_heads={spec.n_heads}")
        m = observe_max_logits(q.detach(), k.detach(), scale=scale, is_causal=is_causal, attn_mask=attn_mask,
                               layout=layout)
        self.update_max_logits(module, m)

    @torch.no_grad()
    def update_max_logits(self, module: nn.Module, max_logits: Tensor) -> None:
        """Fold per-query-head maxima ``(n_heads,)`` (or any shape ending in n_heads, e.g. ``(B, n_heads)``,
        reduced by max) into ``module``'s running maximum."""
        spec = self._spec(module)
        t = torch.as_tensor(max_logits).detach()
        if t.shape[-1:] != (spec.n_heads,):
            raise ValueError(f"{spec.name}: max_logits of shape {tuple(t.shape)} must end in n_heads={spec.n_heads}")
        t = t.reshape(-1, spec.n_heads).amax(0).to(spec.max_logit)
        torch.maximum(spec.max_logit, t, out=spec.max_logit)
        spec.observed += 1

    def reset(self) -> None:
        """Forget the maxima observed since the last :meth:`apply`."""
        for spec in self._specs:
            spec.max_logit.fill_(float("-inf"))
            spec.observed = 0

    def max_logits(self) -> dict[str, Tensor]:
        """The running per-head maxima, by module name (device tensors, no sync)."""
        return {s.name: s.max_logit.clone() for s in self._specs}

    # ------------------------------------------------------------------------------------------
    # the rescale
    # ------------------------------------------------------------------------------------------
    def _reduce(self) -> None:
        import torch.distributed as dist

        if self.process_group is False or not (dist.is_available() and dist.is_initialized()) or not self._specs:
            return
        flat = torch.cat([s.max_logit for s in self._specs])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
        for s, part in zip(self._specs, flat.split([s.n_heads for s in self._specs])):
            s.max_logit.copy_(part)

    @torch.no_grad()
    def apply(self, recompute: Callable[[], Any] | None = None, passes: int = 1) -> dict[str, dict[str, Tensor]]:
        r"""Rescale the q/k rows of every head whose observed max logit exceeds :math:`\tau`; reset the maxima.

        Args:
            recompute: if given, the maxima observed so far are discarded and ``recompute()`` (a forward
                pass on the current batch, run under ``no_grad``) measures them again at the current
                weights first; the clip then bounds the first declared layer's logits on that batch by
                :math:`\tau` exactly.
            passes: with ``recompute``, how many measure-and-clip rounds to run. Clipping a layer changes
                the inputs of the layers after it, so ``passes`` = the number of attention layers bounds
                every layer's logits on that batch by :math:`\tau` exactly (each round fixes at least the
                first layer still above it); fewer rounds leave later layers within the drift one clip
                causes downstream.

        Returns (and keeps for :meth:`report`): per module name, ``max_logit`` (``(n_heads,)``, the maxima
        of the first round) and ``clipped`` (heads above :math:`\tau` in it), as device tensors (no host
        sync).
        """
        if passes < 1 or (passes > 1 and recompute is None):
            raise ValueError(f"passes must be >= 1, and > 1 only with recompute= (got passes={passes})")
        first: dict[str, dict[str, Tensor]] | None = None
        for _ in range(passes):
            if recompute is not None:
                self.reset()
                recompute()
            last = self._clip_once()
            first = last if first is None else first
        self._last = first if first is not None else {}
        return self._last

    def _clip_once(self) -> dict[str, dict[str, Tensor]]:
        self._reduce()
        factors: dict[int, tuple[Tensor, int, Tensor | None, Tensor]] = {}
        last: dict[str, dict[str, Tensor]] = {}
        for spec in self._specs:
            if spec.observed == 0 and spec.name not in self._warned:
                self._warned.add(spec.name)
                warnings.warn(f"QKClip: no attention logits were observed for {spec.name!r} since the last apply(); "
                              "its heads are not clipped. Its forward must call F.scaled_dot_product_attention "
                              "(hooks=True), or call clip.observe / clip.update_max_logits yourself.",
                              UserWarning, stacklevel=3)
            s = spec.max_logit.clone()
            fq, fk = clip_factors(s, self.tau, spec.n_kv_heads)
            g = torch.arange(spec.n_heads, device=fq.device) // (spec.n_heads // spec.n_kv_heads)
            vec = {"q": fq, "k": fk, "qr": fq * fk[g]}
            for seg in spec.segments:
                key = id(seg.weight)
                if key not in factors:
                    n = seg.weight.shape[seg.axis]
                    factors[key] = (seg.weight, seg.axis, seg.bias, torch.ones(n, dtype=fq.dtype, device=fq.device))
                f = factors[key][3]
                f.index_copy_(0, seg.rows.to(f.device), vec[seg.kind][seg.heads.to(f.device)])
            last[spec.name] = dict(max_logit=s, clipped=(s > self.tau).sum())
        for w, axis, b, f in factors.values():
            _mul_local_(w, f, axis)
            if b is not None:
                _mul_local_(b, f, 0)
        self.reset()
        return last

    def report(self) -> dict[str, dict[str, Any]]:
        """Telemetry of the last :meth:`apply` as Python numbers: per module ``max_logit`` (over heads),
        ``max_logit_per_head`` and ``clipped`` (heads above tau), plus ``"total"`` with the overall max and
        count. Reading it syncs with the device."""
        out: dict[str, dict[str, Any]] = {}
        for name, r in self._last.items():
            per_head = r["max_logit"].tolist()
            out[name] = dict(max_logit=max(per_head), max_logit_per_head=per_head, clipped=int(r["clipped"]))
        if out:
            out["total"] = dict(max_logit=max(v["max_logit"] for v in out.values()),
                                clipped=sum(v["clipped"] for v in out.values()))
        return out
