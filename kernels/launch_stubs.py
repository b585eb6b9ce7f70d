"""Kernel launches counted with every Triton kernel of the launchers replaced by a stub (nothing runs).

How launches per call are pinned by tests and how ``bench/bench_ns_host.py`` measures the host
(Python) cost of a call without a GPU: inside :func:`counting_stubs`, ``kernel[grid](...)`` in the
launcher modules only adds one to ``count[kernel name]``; on exit every kernel is put back.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence

#: modules whose ``kernel[grid](...)`` calls launch the Newton–Schulz kernels
LAUNCHER_MODULES = ("newton_schulz_launch", "newton_schulz_small", "newton_schulz_tma_launch", "newton_schulz_aol")


class _Stub:
    """Stands in for a kernel: ``stub[grid](*args, **kwargs)`` counts one launch of ``name``."""

    def __init__(self, name: str, count: dict[str, int]):
        self.name, self.count = name, count

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.count[self.name] = self.count.get(self.name, 0) + 1


def _is_kernel(obj) -> bool:
    """A ``@triton.jit`` function, compiled or (``TRITON_INTERPRET=1``) interpreted."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (JITFunction, InterpretedFunction))


@contextlib.contextmanager
def counting_stubs(count: dict[str, int] | None = None,
                   modules: Sequence[str] = LAUNCHER_MODULES) -> Iterator[dict[str, int]]:
    """Replace every Triton kernel named in ``modules`` (of this package) by a counting stub; yields
    ``count`` (kernel name -> launches), restores the kernels on exit."""
    count = {} if count is None else count
    saved = []
    try:
        for m in modules:
            mod = importlib.import_module(f"{__package__}.{m}")
            for name, obj in list(vars(mod).items()):
                if _is_kernel(obj):
                    saved.append((mod, name, obj))
                    setattr(mod, name, _Stub(name, count))
        yield count
    finally:
        for mod, name, obj in reversed(saved):
            setattr(mod, name, obj)
