"""``QKClip``: declare attention modules, fold in their observed max logits, rescale their q/k rows
(the math is in :mod:`fastortho.optim.qk_clip`)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layouts import Segment, Spec, attention_segments, mla_segments
from .observe import SDPAObserver, observe_max_logits
from .rescale import clip_factors, mul_local_

class QKClip:
    r"""Per-head QK-clip (MuonClip) for the attention modules it is told about; see :mod:`fastortho.optim.qk_clip` for the math.

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
        self._specs: list[Spec] = []
        self._by_module: dict[int, Spec] = {}
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
        segs = attention_segments(module, q=q, k=k, qkv=qkv, split_sizes=split_sizes, n_heads=n_heads,
                                  n_kv=n_kv, head_dim=head_dim, weight_layout=weight_layout)
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
        segs = mla_segments(module, q=q, kv=kv, n_heads=n_heads, qk_nope_head_dim=qk_nope_head_dim,
                            qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, weight_layout=weight_layout)
        return self._add(module, name, n_heads, n_heads, segs, hooks)

    def _add(self, module: nn.Module, name: str | None, n_heads: int, n_kv: int, segs: list[Segment],
             hooks: bool) -> QKClip:
        if id(module) in self._by_module:
            raise ValueError(f"{type(module).__name__} {name or self._names.get(id(module), '')!r} is already declared")
        nm = name or self._names.get(id(module)) or f"attention.{len(self._specs)}"
        w0 = segs[0].weight
        # fp64 weights keep fp64 maxima, so the rescale is exact to fp64 rounding
        dt = torch.float64 if w0.dtype == torch.float64 else torch.float32
        spec = Spec(nm, module, n_heads, n_kv, segs,
                     torch.full((n_heads,), float("-inf"), dtype=dt, device=w0.device))
        if hooks:
            def pre(mod: nn.Module, args: Any) -> None:
                mode = SDPAObserver(self, mod)
                mode.__enter__()
                spec.handles.append(mode)

            def post(mod: nn.Module, args: Any, out: Any) -> None:
                modes = [h for h in spec.handles if isinstance(h, SDPAObserver)]
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
                if not isinstance(h, SDPAObserver):
                    h.remove()
            spec.handles.clear()

    def _spec(self, module: nn.Module) -> Spec:
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
            mul_local_(w, f, axis)
            if b is not None:
                mul_local_(b, f, 0)
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
