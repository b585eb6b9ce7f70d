"""Optimizers: :class:`Muon` (with an auxiliary AdamW), its stateless functional core, and the
routing of a model's parameters into Muon and AdamW groups."""
from __future__ import annotations

from . import functional
from .adamw import adamw_step_
from .muon import Muon
from .param_groups import describe_param_groups, muon_param_groups

__all__ = ["Muon", "muon_param_groups", "describe_param_groups", "adamw_step_", "functional"]
