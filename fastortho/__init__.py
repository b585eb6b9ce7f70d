"""fastortho: fast, exact matrix orthogonalization for PyTorch.

``newton_schulz(G)`` approximates the polar factor U Vᵀ of G = U S Vᵀ (Muon's update direction);
``polar(G)`` computes it accurately (QDWH, Higham's scaled Newton iteration, or float64 SVD).

Importing this package needs only torch: Triton kernels and the ``fastortho._C`` extension are
optional, and a missing backend raises a clear error only when it is asked for.
"""
from __future__ import annotations

from . import diagnostics, ops, reference
from .coefficients import SCHEDULES, Schedule, get_schedule, polar_express_schedule
from .optim import Muon, describe_param_groups, muon_param_groups
from .ops import HAS_C, HAS_C_CUDA, muon_apply_, muon_momentum_
from .ops import triton_available as ns_triton_available
from .newton_schulz import newton_schulz
from .polar import polar

from ._version import __version__  # the one version source; pyproject.toml reads it too

__all__ = [
    "newton_schulz",
    "polar",
    "Muon",
    "muon_param_groups",
    "describe_param_groups",
    "muon_momentum_",
    "muon_apply_",
    "HAS_C",
    "HAS_C_CUDA",
    "reference",
    "diagnostics",
    "Schedule",
    "SCHEDULES",
    "get_schedule",
    "polar_express_schedule",
    "ns_triton_available",
]

