"""Triton kernels of fastortho, installed as ``fastortho.kernels``.

* ``newton_schulz.py``: the symmetric-product and apply kernels of Newton–Schulz (cp.async, every arch);
  ``newton_schulz_tma.py``: their persistent TMA variants for sm_90/sm_100 (``newton_schulz_tma_launch.py``);
  ``newton_schulz_norm.py``: the norm pass and the scale from a given sum of squares;
  ``newton_schulz_small.py``: the whole iteration in one program per small matrix;
  ``newton_schulz_aol.py``: the AOL row scaling;
* ``newton_schulz_launch.py``: the launchers (shape checks, tile configs, grids), also used by
  the polar iterations; ``newton_schulz_iteration.py``: the standard and Gram-space iterations;
* ``polar.py``: the polar iterations' fused update kernel and its launcher;
* ``_config.py``: the tile table; ``aot/``: ahead-of-time compilation and SASS checks;
* ``launch_stubs.py``: launches counted with the kernels stubbed (tests, host-cost benchmark).

This package never imports the rest of ``fastortho`` (imports point one way: fastortho -> kernels;
``aot/``, a tool that traces ``newton_schulz``'s launches, is the exception). Kernel modules
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
