"""Guarded load of the compiled extension ``fastortho._C``.

The package must import without a compiler, without CUDA and without the extension (pure-Python
wheel, ``FASTORTHO_BUILD_EXT=0``). Everything that can use ``_C`` asks this module first:

* ``HAS_C``: ``fastortho._C`` loaded and registered its ops in ``torch.ops.fastortho``.
* ``HAS_C_CUDA``: the loaded ``_C`` was built with CUDA kernels (a CUDA kernel is registered).
* ``IMPORT_ERROR``: the exception raised by the import when ``HAS_C`` is False (``None`` otherwise),
  so that ``backend="c"`` can say *why* the extension is missing instead of just "not available".
"""
from __future__ import annotations

import importlib

import torch

__all__ = ["HAS_C", "HAS_C_CUDA", "C_DEVICE_TYPES", "IMPORT_ERROR", "OPS", "has_kernel", "require_c"]

#: Every op the extension defines; tests assert each has a kernel for each built backend.
OPS = ("fastortho::muon_momentum_", "fastortho::muon_apply_")

IMPORT_ERROR: BaseException | None = None
try:
    # import_module, not `from fastortho import _C`: while fastortho/__init__ runs, the latter reports a
    # missing extension as a "circular import" instead of "No module named 'fastortho._C'"
    _C = importlib.import_module("fastortho._C")  # registers the ops with the dispatcher

    HAS_C = True
except Exception as exc:  # ImportError, or an OSError from a libtorch ABI mismatch
    _C = None
    HAS_C = False
    IMPORT_ERROR = exc


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if ``op`` (e.g. ``"fastortho::muon_apply_"``) has a kernel for ``dispatch_key``."""
    if not HAS_C:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key))


HAS_C_CUDA = HAS_C and all(has_kernel(op, "CUDA") for op in OPS)

#: Device types ("cpu", "cuda") for which every op has a kernel. Computed once here: the dispatcher
#: query is not traceable by torch.compile, a frozenset lookup is.
C_DEVICE_TYPES: frozenset[str] = frozenset(
    dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if HAS_C and all(has_kernel(op, key) for op in OPS)
)


def require_c(device_type: str) -> None:
    """Raise a RuntimeError that explains why ``_C`` cannot serve ``device_type``."""
    if not HAS_C:
        raise RuntimeError(
            "backend='c' was requested but fastortho._C is not loaded "
            f"({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}). Rebuild with "
            "`pip install --no-build-isolation -e .` (FASTORTHO_BUILD_EXT=1 makes a failed build an error)."
        )
    if device_type not in C_DEVICE_TYPES:
        raise RuntimeError(
            f"backend='c' was requested for a {device_type!r} tensor but fastortho._C has no {device_type} "
            "kernels (CUDA kernels need a CUDA build of torch and nvcc at build time; FASTORTHO_CUDA=1 "
            "makes their absence a build error)."
        )
