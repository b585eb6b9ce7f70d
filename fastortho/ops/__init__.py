"""The op layer: every ``torch.ops.fastortho`` op and its typed Python wrapper, in one place.

=====================================  =================================================  ==========================
op (``torch.ops.fastortho.*``)         wrapper                                            implementation
=====================================  =================================================  ==========================
``muon_momentum_``                     :func:`muon_momentum_` (``_foreach`` fallback)     ``csrc/`` (CPU, CUDA)
``muon_apply_`` / ``muon_apply_.tensor``  :func:`muon_apply_` (``_foreach`` fallback)     ``csrc/`` (CPU, CUDA)
``newton_schulz_triton``               :func:`newton_schulz_triton`                       ``kernels/`` (Triton)
=====================================  =================================================  ==========================

:mod:`fastortho.ops._load` loads ``fastortho._C`` once and answers which backends exist
(``HAS_C``, ``HAS_C_CUDA``, :func:`has_kernel`, :func:`require_c`, :func:`triton_available`).
Schemas of the compiled ops: ``csrc/fastortho.cpp``; the Triton op is a ``torch.library.custom_op``
in :mod:`fastortho.ops.newton_schulz`.
"""
from __future__ import annotations

from ._load import C_DEVICE_TYPES, HAS_C, HAS_C_CUDA, IMPORT_ERROR, OPS, has_kernel, require_c, triton_available
from .muon_step import muon_apply_, muon_momentum_
from .newton_schulz import newton_schulz_triton, use_gram

__all__ = [
    "muon_momentum_", "muon_apply_", "newton_schulz_triton", "use_gram",
    "HAS_C", "HAS_C_CUDA", "C_DEVICE_TYPES", "IMPORT_ERROR", "OPS", "has_kernel", "require_c", "triton_available",
]
