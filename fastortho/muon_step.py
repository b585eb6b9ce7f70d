"""The fused Muon step ops now live in the op layer :mod:`fastortho.ops`; this name stays for its importers."""
from fastortho.ops.muon_step import muon_apply_, muon_momentum_

__all__ = ["muon_momentum_", "muon_apply_"]
