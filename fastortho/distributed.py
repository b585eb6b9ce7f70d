"""Deprecated location of :mod:`fastortho.optim.distributed` (distributed Muon); import from there."""
from __future__ import annotations

import warnings

from fastortho.optim.distributed import (
    STRATEGIES, DistributedMuonEngine, lpt_owners, make_engine, ns_flops, shard_extents,
)

__all__ = ["STRATEGIES", "DistributedMuonEngine", "make_engine", "ns_flops", "shard_extents", "lpt_owners"]

warnings.warn("fastortho.distributed moved to fastortho.optim.distributed; import from there",
              DeprecationWarning, stacklevel=2)
