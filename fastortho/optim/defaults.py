r"""Muon's defaults and its non-finite policy, each stated once.

:class:`fastortho.Muon`'s signature, its ``defaults`` dict, the keys ``__setstate__`` fills into old
checkpoints and :func:`fastortho.optim.functional.muon` all read :data:`MUON_DEFAULTS` and
:data:`ADAMW_DEFAULTS`; the momentum and apply phases (single-process and distributed) all enforce
the non-finite policy through :func:`enforce_nonfinite`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fastortho.coefficients import KELLER

__all__ = [
    "KELLER",
    "TORCH_NS_STEPS",
    "MUON_DEFAULTS",
    "ADAMW_DEFAULTS",
    "NONFINITE_POLICIES",
    "ORTHOGONALIZERS",
    "enforce_nonfinite",
]

# KELLER (re-exported): Keller Jordan's Newton–Schulz triple (a, b, c), torch.optim.Muon's ``ns_coefficients``.
#: torch.optim.Muon's step count for ``ns_coefficients``.
TORCH_NS_STEPS = 5

#: Keys every Muon group carries, with their defaults: torch.optim.Muon's keys first, with torch's
#: values (so a fastortho state dict loads into torch.optim.Muon and steps there). ``ns_steps=None``
#: resolves to :data:`TORCH_NS_STEPS`, or to the native length of ``coefficients`` when given.
MUON_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=KELLER, eps=1e-7,
    ns_steps=None, adjust_lr_fn=None,
    coefficients=None, normalize="fro", lr_scale=None, momentum_convention="ema",
    momentum_placement="before_ortho", orthogonalizer="newton_schulz", ns_dtype=None, backend="auto",
    flatten=None, split_sizes=None, nonfinite="skip", algorithm="muon",
    variant="muon", beta2=0.95, capturable=False, fan_in_first=False,
)

#: The auxiliary AdamW's group keys and defaults (torch.optim.AdamW's betas and eps; no decay, since
#: biases, gains and embeddings are usually not decayed). ``lr=None`` means the Muon ``lr``.
ADAMW_DEFAULTS: dict[str, Any] = dict(
    lr=None, weight_decay=0.0, betas=(0.9, 0.999), adamw_eps=1e-8, bias_correction=True, zero_init=True,
)

#: ``nonfinite=``: zero the update and reset the momentum (``"skip"``), raise ``FloatingPointError``
#: (``"raise"``), or do no check (``"ignore"``, torch.optim.Muon's behaviour).
NONFINITE_POLICIES = ("skip", "raise", "ignore")

#: ``orthogonalizer=`` names: each runs that method of :func:`fastortho.polar` (``"newton_schulz"``:
#: :func:`fastortho.newton_schulz` with the group's schedule). ``"polar"`` is a deprecated alias of
#: ``"higham"``, the method it has always run.
ORTHOGONALIZERS = ("newton_schulz", "qdwh", "higham", "svd")
ORTHOGONALIZER_ALIASES = {"polar": "higham"}


def enforce_nonfinite(
    finite: Tensor, zero: Sequence[Sequence[Tensor]], *, policy: str, names: Sequence[str], what: str
) -> None:
    """Apply the non-finite ``policy`` to per-entry flags ``finite`` (a boolean vector).

    ``"skip"`` fills every tensor of ``zero[i]`` with 0 where ``finite[i]`` is False (on the device,
    no host sync); ``"raise"`` raises ``FloatingPointError`` naming the non-finite entries (the one
    host sync of the step); ``"ignore"`` does nothing.
    """
    if policy == "raise":
        if not bool(finite.all()):
            bad = [names[i] for i in (~finite).nonzero().flatten().tolist()]
            raise FloatingPointError(f"Muon: non-finite {what} {bad}")
    elif policy == "skip":
        for i, tensors in enumerate(zero):
            bad = ~finite[i]
            for t in tensors:
                t.masked_fill_(bad, 0.0)


def check_dtype(name: str, dtype: Any, allowed: Sequence[torch.dtype]) -> None:
    """``dtype`` must be None or one of ``allowed``; the message names the argument and the choices."""
    if dtype is not None and dtype not in allowed:
        raise TypeError(f"{name} must be None or one of {[str(d) for d in allowed]}, got {dtype!r}")
