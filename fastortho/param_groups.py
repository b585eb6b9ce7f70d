"""Deprecated location of :mod:`fastortho.optim.param_groups` (import from there, or use
``fastortho.muon_param_groups`` / ``fastortho.describe_param_groups``)."""
from __future__ import annotations

import warnings

from fastortho.optim.param_groups import HEAD_NAMES, ParamRoute, describe_param_groups, muon_param_groups

__all__ = ["muon_param_groups", "describe_param_groups", "ParamRoute", "HEAD_NAMES"]

warnings.warn(
    "fastortho.param_groups moved to fastortho.optim.param_groups; import muon_param_groups and "
    "describe_param_groups from fastortho (or fastortho.optim) instead",
    DeprecationWarning,
    stacklevel=2,
)
