"""Which compiled and JIT backends this process can use: ``fastortho._C`` and Triton.

The package must import without a compiler, without CUDA, without the extension (pure-Python wheel,
``FASTORTHO_BUILD_EXT=0``) and without Triton. Everything that can use a backend asks this module:

* ``HAS_C``: ``fastortho._C`` loaded and registered its ops in ``torch.ops.fastortho``.
* ``HAS_C_CUDA``: the loaded ``_C`` was built with CUDA kernels (every op has a CUDA kernel).
* ``C_DEVICE_TYPES``: device types ("cpu", "cuda") for which every op has a kernel.
* ``IMPORT_ERROR``: why ``HAS_C`` is False (``None`` otherwise), so ``backend="c"`` can say why.
* :func:`triton_available`: the Triton kernels can be imported (the one place the fastortho side asks;
  ``fastortho.kernels.HAS_TRITON`` is the kernels' own answer, since kernels never import fastortho).

An extension that is present but fails to load (built against another torch, e.g.
``libc10_cuda.so: cannot open shared object file``) is reported once with a ``RuntimeWarning`` naming
the reason and the rebuild command; an extension that was simply not built is silent.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

__all__ = ["HAS_C", "HAS_C_CUDA", "C_DEVICE_TYPES", "IMPORT_ERROR", "OPS", "REBUILD", "has_kernel", "require_c",
           "triton_available"]

EXTENSION = "fastortho._C"
#: Every op the extension defines, by overload; tests assert each has a kernel for each built backend.
OPS = ("fastortho::muon_momentum_", "fastortho::muon_apply_", "fastortho::muon_apply_.tensor")
REBUILD = "pip install --no-build-isolation -e ."


def load_extension(import_module: Callable[[str], ModuleType] = importlib.import_module
                   ) -> tuple[ModuleType | None, BaseException | None]:
    """Import ``fastortho._C`` (which registers the ops with the dispatcher); return ``(module, None)``
    or ``(None, error)``. A missing extension is expected (not built); any other failure warns."""
    try:
        # import_module, not `from fastortho import _C`: while fastortho/__init__ runs, the latter
        # reports a missing extension as a "circular import" instead of "No module named 'fastortho._C'"
        return import_module(EXTENSION), None
    except Exception as exc:  # ImportError, or an OSError from a libtorch ABI mismatch
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == EXTENSION):
            warnings.warn(
                f"fastortho._C is present but failed to load ({type(exc).__name__}: {exc}); the fused "
                f"Muon step ops fall back to torch._foreach ops. Rebuild it against this torch "
                f"({torch.__version__}) with `{REBUILD}`.",
                RuntimeWarning, stacklevel=2,
            )
        return None, exc


_C, IMPORT_ERROR = load_extension()
HAS_C: bool = _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if ``op`` (e.g. ``"fastortho::muon_apply_.tensor"``) exists and has a kernel for ``dispatch_key``
    (an extension built from older sources may lack an op: it then serves no device)."""
    if not HAS_C:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key))
    except RuntimeError:  # "operator ... does not exist"
        return False


HAS_C_CUDA: bool = HAS_C and all(has_kernel(op, "CUDA") for op in OPS)

#: Computed once here: the dispatcher query is not traceable by torch.compile, a frozenset lookup is.
C_DEVICE_TYPES: frozenset[str] = frozenset(
    dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if HAS_C and all(has_kernel(op, key) for op in OPS)
)


def require_c(device_type: str) -> None:
    """Raise a RuntimeError that explains why ``_C`` cannot serve ``device_type``."""
    if not HAS_C:
        raise RuntimeError(
            "backend='c' was requested but fastortho._C is not loaded "
            f"({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}). Rebuild with "
            f"`{REBUILD}` (FASTORTHO_BUILD_EXT=1 makes a failed build an error)."
        )
    if device_type not in C_DEVICE_TYPES:
        raise RuntimeError(
            f"backend='c' was requested for a {device_type!r} tensor but fastortho._C has no {device_type} "
            "kernels (CUDA kernels need a CUDA build of torch and nvcc at build time; FASTORTHO_CUDA=1 "
            "makes their absence a build error)."
        )


@functools.cache
def triton_available() -> bool:
    """True when the Triton Newton–Schulz kernels can be imported (Triton installed)."""
    try:
        from fastortho.kernels import HAS_TRITON
    except ImportError:
        return False
    return HAS_TRITON
