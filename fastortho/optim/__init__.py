"""Optimizers: :class:`Muon` (with an auxiliary AdamW) and its stateless functional core."""
from __future__ import annotations

from . import functional
from .adamw import adamw_step_
from .muon import Muon

__all__ = ["Muon", "adamw_step_", "functional"]
