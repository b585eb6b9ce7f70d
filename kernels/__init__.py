"""Triton kernels of fastortho, installed as ``fastortho.kernels``.

* ``newton_schulz.py``: the Triton kernels of Newton–Schulz (symmetric product, apply, norm pass);
* ``newton_schulz_launch.py``: their launchers (shape checks, tile configs, grids), also used by
  the polar iterations; ``newton_schulz_iteration.py``: the standard and Gram-space iterations;
* ``polar.py``: the polar iterations' fused update kernel and its launcher;
* ``_config.py``: the tile table; ``aot.py``: ahead-of-time compilation and SASS checks.

This package never imports the rest of ``fastortho`` (imports point one way: fastortho -> kernels;
``aot.py``, a tool that traces ``newton_schulz``'s launches, is the exception). Kernel modules
import Triton at module level: callers import them lazily, after checking ``HAS_TRITON``, so
``import fastortho`` works without Triton.
"""
from __future__ import annotations

import importlib.util
import os

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
