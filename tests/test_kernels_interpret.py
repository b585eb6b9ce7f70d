"""Runs ``tests/interpret/`` (the Triton kernels on CPU tensors) in a ``TRITON_INTERPRET=1`` subprocess.

The interpreter must be switched on before the kernels are decorated, which a test module in a
shared pytest process cannot guarantee; a subprocess keeps one ``pytest tests`` invocation and
leaves every other test file untouched. The child's report is printed on failure (and with -s).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastortho.kernels import HAS_TRITON

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(marker: str, timeout: int) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, str(HERE / "interpret")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(r.stdout[-20000:])
    if r.returncode == 5:
        pytest.skip(f"no interpreter tests selected by -m {marker!r}")
    assert r.returncode == 0, f"interpreter tests failed (rc={r.returncode}):\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreter_suite():
    _run("not slow", timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreter_suite_slow(request):
    """The issue-sized accuracy check (512×2048, ≈ 1–2 min CPU): only when asked for with -m slow."""
    expr = request.config.option.markexpr or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("run with -m slow")
    _run("slow", timeout=1800)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cpu_tensor_without_interpreter_is_a_clear_error():
    import torch

    from fastortho.kernels import interpreter_enabled
    from fastortho.ns_triton import newton_schulz_triton

    if interpreter_enabled():
        pytest.skip("this process runs the interpreter")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        newton_schulz_triton(torch.randn(1, 4, 6), [(1.5, -0.5, 0.0)], safety=1.0, normalize="fro", eps=1e-7,
                             compute_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
