"""Adapters that plug :class:`fastortho.Muon` into the training frameworks people already use.

Each submodule imports its framework only when called; none of them is a dependency of fastortho.

* :mod:`fastortho.integrations.transformers`: ``Trainer(..., optimizer_cls_and_kwargs=muon(model, ...))``.
* :mod:`fastortho.integrations.timm`: ``register()`` adds ``"fastorthomuon"`` to timm's optimizer registry,
  so ``timm.optim.create_optimizer_v2(model, "fastorthomuon", ...)`` builds a ``fastortho.Muon``.
* :mod:`fastortho.integrations.lightning`: ``configure_optimizers(self, ...)`` for a ``LightningModule``.

Hugging Face accelerate needs no adapter: build the optimizer from the model's parameters first, then
``model, opt = accelerator.prepare(model, opt)``; ``AcceleratedOptimizer`` forwards ``step()``,
``zero_grad()`` and ``state_dict()`` to ``fastortho.Muon`` and skips ``step()`` while gradients are
being accumulated (``accelerator.accumulate``), as for any torch optimizer.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from fastortho.optim import muon_param_groups

__all__ = ["trainable_param_groups"]

_ROUTING = ("heads", "force_adamw", "force_muon", "split_qkv")


def trainable_param_groups(model: nn.Module, **routing: Any) -> list[dict[str, Any]]:
    """:func:`fastortho.muon_param_groups` without frozen parameters (``requires_grad=False``: e.g. the base
    weights of a LoRA model), so no optimizer state is allocated for them. Empty groups are dropped."""
    groups = []
    for g in muon_param_groups(model, **routing):
        ps = [p for p in g["params"] if p.requires_grad]
        if ps:
            groups.append(dict(g, params=ps))
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return groups
