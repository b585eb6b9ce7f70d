"""Triton kernels of fastortho, installed as ``fastortho.kernels``.

This package never imports ``fastortho`` (imports point one way: fastortho -> kernels).
Importing it must work without Triton: each kernel module guards its own ``import triton``
and ``HAS_TRITON`` tells the caller whether the kernels can run.
"""
from __future__ import annotations

import importlib.util
import os

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
