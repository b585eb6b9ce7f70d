"""Hugging Face ``transformers.Trainer`` with :class:`fastortho.Muon`.

::

    from fastortho.integrations.transformers import muon

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=muon(model, lr=0.02, adamw_lr=3e-4))

The Trainer's ``learning_rate`` and ``weight_decay`` arguments do not reach the optimizer on this path
(the Trainer builds it from ``optimizer_cls_and_kwargs``); its learning-rate scheduler still multiplies
both the Muon and the AdamW learning rates (warmup, decay).

How the Trainer consumes the pair (checked against transformers 5.x and 4.39+): an optimizer class is
called as ``cls(param_groups, **kwargs)``, where a ``params`` entry in ``kwargs`` replaces the Trainer's
own weight-decay groups; since transformers 5, a first element that is *not* an optimizer class is a
factory, called as ``factory()(model, **kwargs)`` with the model the Trainer trains. :func:`muon`
returns the factory form when the installed transformers supports it (the groups are then routed from
the model the Trainer actually holds, after any wrapping or sharding), and otherwise
``(fastortho.Muon, {"params": groups, ...})`` with groups routed from ``model`` now.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from fastortho.integrations import _ROUTING, trainable_param_groups
from fastortho.optim import Muon

__all__ = ["muon", "MuonFactory", "trainable_param_groups"]

class MuonFactory:
    """The optimizer factory of transformers 5's Trainer: ``MuonFactory()(model, **kwargs)`` routes the
    model's trainable parameters with :func:`trainable_param_groups` (routing keys ``heads``,
    ``force_adamw``, ``force_muon``, ``split_qkv`` taken from ``kwargs``) and returns
    ``fastortho.Muon(groups, **rest)``."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> Muon:
        routing = {k: kwargs.pop(k) for k in _ROUTING if k in kwargs}
        return Muon(trainable_param_groups(model, **routing), **kwargs)


def _trainer_takes_factories() -> bool:
    try:
        from transformers import trainer_optimizer
    except ImportError:
        return False
    return hasattr(trainer_optimizer, "is_optimizer_factory")


def muon(
    model: nn.Module | None = None,
    *,
    lr: float = 0.02,
    adamw_lr: float | None = 3e-4,
    heads: str | Iterable[Any] = "auto",
    force_adamw: Iterable[Any] = (),
    force_muon: Iterable[Any] = (),
    split_qkv: bool = True,
    factory: bool | None = None,
    **muon_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """``optimizer_cls_and_kwargs`` for ``transformers.Trainer``: :class:`fastortho.Muon` with parameters
    routed by module (:func:`fastortho.muon_param_groups`; frozen parameters left out).

    Args:
        model: the model given to the Trainer. Needed unless the factory form is used (then the Trainer
            passes its model), but passing it routes once now, so a routing warning or error shows early.
        lr: Muon learning rate; adamw_lr: AdamW learning rate (None: ``lr``).
        heads, force_adamw, force_muon, split_qkv: routing options of :func:`fastortho.muon_param_groups`.
        factory: True: transformers 5's factory form; False: ``(fastortho.Muon, {"params": groups, ...})``;
            None (default): the factory form when the installed transformers supports it.
        **muon_kwargs: any other :class:`fastortho.Muon` argument (``weight_decay``, ``momentum``,
            ``coefficients``, ``lr_scale``, ...).

    Returns:
        ``(optimizer_cls_or_factory, kwargs)``.
    """
    routing = dict(heads=heads, force_adamw=force_adamw, force_muon=force_muon, split_qkv=split_qkv)
    kwargs = dict(lr=lr, adamw_lr=adamw_lr, **muon_kwargs)
    use_factory = _trainer_takes_factories() if factory is None else bool(factory)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"muon(model): expected the nn.Module given to the Trainer, got {type(model).__name__}")
    if use_factory:
        if model is not None:
            trainable_param_groups(model, **routing)  # fail (or warn) now, not inside trainer.train()
        return MuonFactory, dict(kwargs, **routing)
    if model is None:
        raise ValueError("muon(model=None) needs a transformers version whose Trainer accepts optimizer factories "
                         "(5.x); pass the model: muon(model, lr=..., adamw_lr=...)")
    return Muon, dict(kwargs, params=trainable_param_groups(model, **routing))
