"""timm's optimizer factory with :class:`fastortho.Muon`.

::

    import timm, timm.optim
    import fastortho.integrations.timm as fo_timm

    fo_timm.register()                   # adds "fastorthomuon" to timm's registry (idempotent)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    opt = timm.optim.create_optimizer_v2(model, "fastorthomuon", lr=0.02,
                                         param_group_fn=fo_timm.param_groups)  # route by module

The name has no underscore: timm reads ``"a_b"`` as optimizer ``b`` wrapped by ``a`` (``"lookahead_adamw"``),
so ``"fastortho_muon"`` would resolve to timm's own ``"muon"``. ``"lookahead_fastorthomuon"`` works.

Routing. With ``param_group_fn=param_groups`` every parameter is routed by its module
(:func:`fastortho.muon_param_groups`: embeddings, position tables, class tokens and the classifier head
to AdamW). Without it, timm's own groups are used: a group with timm's ``use_fallback=True`` (from
``fallback_list`` / ``fallback_no_weight_decay``) or ``use_muon=False`` goes to AdamW, ``use_muon=True``
to Muon, and any other group is split by shape (≥ 2-D to Muon, the rest to AdamW), which is what timm's
own Muon does: the classifier head then needs ``fallback_list=["head*"]``.

timm's conventions carry over: ``create_optimizer_v2`` passes ``momentum=0.9`` unless told otherwise
(pass ``momentum=0.95`` for Muon's usual value) and ``weight_decay=0.0`` by default; ``betas`` becomes
the AdamW ``adamw_betas``; ``foreach`` is ignored. ``layer_decay`` is refused: timm stores it as a float
``lr_scale`` group key, which :class:`fastortho.Muon` uses for its update-scale rule.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from fastortho.optim import Muon

__all__ = ["register", "param_groups", "timm_muon", "NAME"]

NAME = "fastorthomuon"


def param_groups(model: nn.Module, **routing: Any) -> list[dict[str, Any]]:
    """timm ``param_group_fn``: the model's trainable parameters routed by module
    (:func:`fastortho.muon_param_groups` options as keywords)."""
    from fastortho.integrations import trainable_param_groups

    return trainable_param_groups(model, **routing)


def timm_muon(params: Iterable[Any], lr: float = 0.02, *, betas: tuple[float, float] | None = None,
              foreach: bool | None = None, **kwargs: Any) -> Muon:
    """:class:`fastortho.Muon` from timm's parameter groups (the callable registered with timm)."""
    del foreach  # timm's multi-tensor switch; fastortho always batches
    if betas is not None:
        kwargs["adamw_betas"] = tuple(betas)
    items = list(params)
    if items and isinstance(items[0], Tensor):
        items = [dict(params=items)]
    groups = []
    for g in items:
        g = dict(g)
        fallback, use_muon = g.pop("use_fallback", None), g.pop("use_muon", None)
        if isinstance(g.get("lr_scale"), (int, float)) and not isinstance(g.get("lr_scale"), bool):
            raise ValueError("fastorthomuon does not support timm's layer_decay: it sets a float group['lr_scale'], "
                             "which fastortho.Muon reads as its update-scale rule ('original', 'rms_match', ...). "
                             "Give each layer its own 'lr' in a param_group_fn instead.")
        if "algorithm" not in g:
            if fallback or use_muon is False:
                g["algorithm"] = "adamw"
            elif use_muon:
                g["algorithm"] = "muon"
        groups.append(g)
    return Muon(groups, lr=lr, **kwargs)


def register(name: str = NAME) -> None:
    """Add ``name`` (default ``"fastorthomuon"``) to timm's default optimizer registry; calling it again is a
    no-op. Raises ValueError for a name with ``_`` (timm would parse it as a wrapper prefix)."""
    if "_" in name:
        raise ValueError(f"timm splits optimizer names at '_' (a 'lookahead_' style prefix): {name!r} would resolve "
                         f"to {name.split('_')[-1]!r}; use a name without underscores")
    from timm.optim import _optim_factory as f

    reg = f.default_registry
    if name.lower() in reg.list_optimizers():
        info = reg.get_optimizer_info(name)
        if info.opt_class is timm_muon:
            return
        raise ValueError(f"timm already has an optimizer named {name!r} ({info.opt_class}); pick another name")
    reg.register(f.OptimInfo(name=name, opt_class=timm_muon, description="fastortho.Muon (Newton-Schulz "
                             "orthogonalized momentum) with an AdamW fallback", has_eps=True, has_momentum=True,
                             has_betas=True))
