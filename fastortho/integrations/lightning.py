"""PyTorch Lightning with :class:`fastortho.Muon`.

::

    import lightning as L
    from fastortho.integrations.lightning import configure_optimizers

    class Model(L.LightningModule):
        ...
        def configure_optimizers(self):
            return configure_optimizers(self, lr=0.02, adamw_lr=3e-4,
                                        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000))

Lightning calls ``optimizer.step(closure)``; :class:`fastortho.Muon` runs the closure (forward and
backward) first, as every torch optimizer does. Nothing here imports Lightning.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fastortho.optim import Muon

__all__ = ["configure_optimizers"]


def configure_optimizers(module: nn.Module, *, lr: float = 0.02, adamw_lr: float | None = 3e-4,
                         scheduler: Callable[[Muon], Any] | None = None, interval: str = "step",
                         **muon_kwargs: Any) -> Muon | dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns: a :class:`fastortho.Muon` over ``module``'s
    trainable parameters routed by module (:func:`fastortho.muon_param_groups`; routing options ``heads``,
    ``force_adamw``, ``force_muon``, ``split_qkv`` accepted here), or, with ``scheduler`` (a function of the
    optimizer), ``{"optimizer": opt, "lr_scheduler": {"scheduler": ..., "interval": interval}}``."""
    from fastortho.integrations import _ROUTING, trainable_param_groups

    routing = {k: muon_kwargs.pop(k) for k in _ROUTING if k in muon_kwargs}
    opt = Muon(trainable_param_groups(module, **routing), lr=lr, adamw_lr=adamw_lr, **muon_kwargs)
    if scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": interval}}
