"""Tests of the Triton kernels under the CPU interpreter.

They need ``TRITON_INTERPRET=1`` before Triton decorates the kernels, i.e. before anything
imports ``fastortho.kernels``; ``tests/test_kernels_interpret.py`` runs this folder in a
subprocess with that variable set. In any other process (a plain ``pytest tests``) the folder
is not collected, so other test files keep importing fastortho normally.
"""
import os

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    collect_ignore_glob = ["test_*.py"]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _multi_kernel_path(request, monkeypatch):
    """Small inputs (k ≤ 128, L ≤ 1024) take the single-program kernel (``kernels/newton_schulz_small.py``)
    by default; these tests check the multi-kernel path and its pieces at such sizes, so it is switched
    off here, except in ``test_small_interpret.py``, which compares the two."""
    if not request.module.__name__.endswith("test_small_interpret"):
        import fastortho.kernels.newton_schulz_small as small

        monkeypatch.setattr(small, "ENABLED", False)
