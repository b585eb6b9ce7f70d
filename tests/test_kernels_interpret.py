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
    from fastortho.ops.newton_schulz import newton_schulz_triton

    if interpreter_enabled():
        pytest.skip("this process runs the interpreter")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        newton_schulz_triton(torch.randn(1, 4, 6), [(1.5, -0.5, 0.0)], safety=1.0, normalize="fro", eps=1e-7,
                             compute_dtype=torch.bfloat16, out_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# CPU-side checks of the launcher's choices for GPUs that are not here
# ---------------------------------------------------------------------------------------------
_SHAPES = [(64, 128), (128, 128), (512, 2048), (768, 3072), (1024, 1024), (2048, 8192), (4096, 4096),
           (4096, 16384), (8192, 8192)]


@pytest.mark.parametrize("load_bytes", [2, 4], ids=["bf16-or-fp16-input", "fp32-input"])
@pytest.mark.parametrize("arch", [80, 86, 87, 89, 90, 100, 120])
def test_every_picked_config_fits_the_arch_shared_memory(arch, load_bytes):
    """The table's choice for every shape fits the arch's per-block limit when counted with the
    dtype actually loaded. fp32 input is read by the first step at 4 bytes an element: counted as
    bf16 (the former rule), the 128×128×64 sym and 128×128×64 apply configs need 128 KiB
    (sm_80 ring) against sm_86/sm_89's 99 KiB."""
    from fastortho.kernels._config import FP32_APPLY, FP32_SYM, SMEM_LIMIT, pick_apply, pick_sym

    limit = SMEM_LIMIT[arch]
    for k, L in _SHAPES:
        for kk, LL in ((k, L), (L, k)):
            kk, LL = min(kk, LL), max(kk, LL)
            for cfg in (pick_sym(kk, LL, load_bytes, arch, False), pick_apply(kk, LL, load_bytes, arch, False)):
                assert cfg.smem_bytes(load_bytes, arch) <= limit, (arch, kk, LL, cfg)
    for cfg in (*FP32_SYM.values(), FP32_APPLY):
        assert cfg.smem_bytes(4, arch) <= limit


def test_device_limit_overrides_the_table():
    from fastortho.kernels._config import SYM_CONFIGS, pick_sym

    big = pick_sym(4096, 4096, 2, 90, False)
    assert big == SYM_CONFIGS[3]
    small = pick_sym(4096, 4096, 2, 90, False, limit=64 * 1024)   # a device reporting 64 KiB
    assert small.smem_bytes(2, 90) <= 64 * 1024 and small != big


def _fake_cuda_launcher(monkeypatch, arch):
    """ns_launch as if on a CUDA device of ``arch`` (table limit), without one."""
    from types import SimpleNamespace

    import torch

    from fastortho.kernels import newton_schulz_launch as ns_launch

    monkeypatch.setattr(ns_launch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(ns_launch, "_arch", lambda t: arch)
    monkeypatch.setattr(ns_launch, "_device_smem", lambda t: None)
    return ns_launch, SimpleNamespace(device=torch.device("cuda", 0))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("arch", [86, 89, 120])
def test_fp32_input_configs_are_counted_at_4_bytes(monkeypatch, arch):
    """The first step loads an fp32 G and rounds it to bf16 in registers: the pipeline holds fp32.
    Counted at the dot dtype's 2 bytes, 4096² picked 128×128×64 (3 stages: 128 KiB on sm_86)."""
    import torch

    ns_launch, t = _fake_cuda_launcher(monkeypatch, arch)

    def launch(cfg):
        raise AssertionError("no timing expected")

    for kind in ("sym", "apply"):
        cfg = ns_launch._choose(kind, 4096, 4096, torch.bfloat16, t, launch, load_bytes=4)
        assert cfg.smem_bytes(4, arch) <= ns_launch._config.SMEM_LIMIT[arch], (kind, cfg)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_launchers_pass_the_loaded_element_size(monkeypatch):
    import torch

    from fastortho.kernels import newton_schulz_launch as ns_launch

    seen = []

    def spy(kind, k, L, dtype, t, launch, precision="ieee", load_bytes=None):
        seen.append((kind, dtype, load_bytes))
        return ns_launch._config.SYM_CONFIGS[0]

    class _Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    monkeypatch.setattr(ns_launch, "_choose", spy)
    monkeypatch.setattr(ns_launch, "_sym_mm_kernel", _Kernel())
    monkeypatch.setattr(ns_launch, "_apply_kernel", _Kernel())
    G = torch.randn(1, 8, 16)                                  # fp32 input
    A = torch.empty(1, 8, 8, dtype=torch.bfloat16)
    s = torch.ones(1)
    ns_launch.sym_mm(G, G, A, scale=s, round_dtype=torch.bfloat16)
    ns_launch.apply_q(A, G, torch.empty(1, 8, 16, dtype=torch.bfloat16), a=1.0, scale=s, round_dtype=torch.bfloat16)
    assert seen == [("sym", torch.bfloat16, 4), ("apply", torch.bfloat16, 4)]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_no_autotune_while_capturing(monkeypatch):
    """Inside CUDA-graph capture the table is used even with FASTORTHO_TRITON_AUTOTUNE=1
    (timing candidates would be captured into the graph)."""
    import torch

    ns_launch, t = _fake_cuda_launcher(monkeypatch, 90)
    monkeypatch.setenv("FASTORTHO_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(ns_launch, "_capturing", lambda: True)

    def launch(cfg):
        raise AssertionError("a candidate was timed during capture")

    cfg = ns_launch._choose("sym", 4096, 4096, torch.bfloat16, t, launch, load_bytes=2)
    assert cfg == ns_launch._config.pick_sym(4096, 4096, 2, 90, False)
