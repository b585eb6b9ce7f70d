"""The polar iterations' Triton path (``fastortho.kernels.polar`` + the symmetric Gram kernel), no GPU needed.

* Interpreter: the ``test_interp_*`` tests run only in a child pytest process started with
  ``TRITON_INTERPRET=1`` (the interpreter must be on before the kernels are decorated); the parent
  test ``test_interpreter_subprocess`` starts it. There the CPU tensors take the Triton path of
  ``fastortho.polar._gpu_step`` (the same code that runs on CUDA), so ``polar()`` is checked end to
  end through the kernels.
* AOT: ``_polar_update_kernel`` compiled for sm_80 and sm_90 (fp32 and fp64 storage): no spills,
  registers and shared memory within the limits, vectorized global loads on unit-stride operands.
* GPU: skipped without CUDA; compares the CUDA path with the CPU path.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastortho.kernels import HAS_TRITON, interpreter_enabled

HERE = Path(__file__).resolve().parent
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
in_interpreter = pytest.mark.skipif(not (HAS_TRITON and interpreter_enabled()),
                                    reason="runs in the TRITON_INTERPRET=1 child process")


@needs_triton
@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp_", str(Path(__file__))]
    r = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout[-10000:])
    assert r.returncode == 0, f"interpreter tests failed (rc={r.returncode}):\n{r.stdout[-10000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout.split("passed")[-1]


# ---------------------------------------------------------------- interpreter (child process)

@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_interp_fused_update_matches_torch(dtype):
    from fastortho.kernels.polar import polar_update

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 37, 45, generator=g, dtype=dtype)
    Z = torch.randn(3, 45, 37, generator=g, dtype=dtype).mT  # non-contiguous operand
    X[2] = 0
    Z[2] = 0
    alpha = torch.tensor([0.5, 2.0, 1.0], dtype=dtype)
    beta = torch.tensor([0.25, -1.0, 3.0], dtype=dtype)
    active = torch.tensor([True, False, True])
    out, step = polar_update(X, Z, alpha, beta, active)
    ref = torch.where(active[:, None, None], alpha[:, None, None] * X + beta[:, None, None] * Z, X)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same two roundings per element
    ref_step = (ref - X).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-300)
    ref_step[2] = 0.0  # 0/0 (zero matrix) is 0 by contract
    torch.testing.assert_close(step, ref_step, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    assert step[1] == 0 and step[2] == 0
    # In place (out = X) gives the same bits.
    X2 = X.clone()
    polar_update(X2, Z, alpha, beta, active, out=X2)
    assert torch.equal(X2, out)


@in_interpreter
@pytest.mark.parametrize("method", ["qdwh", "higham"])
def test_interp_polar_through_the_kernels(method):
    import fastortho
    from fastortho.polar._gpu_step import use_triton
    from fastortho.reference import polar_error

    from helpers import log_spectrum, low_rank, with_spectrum

    G = with_spectrum((2, 24, 40), log_spectrum(24, 1e2)).float()
    assert use_triton(G)
    P, it = fastortho.polar(G, method=method, return_iterations=True)
    # Same bounds as the torch path in test_polar.py (fp32, κ = 1e2: measured 1e-6 .. 3e-6 here).
    assert polar_error(P, G).max().item() < 1e-5 and (it <= 8).all()
    # Rank 5 of 24: the canonical factor; batch = each matrix alone (tile grid depends on the shape only).
    R = low_rank((2, 24, 40), rank=5)  # float64 oracle: the float32 copy is full rank in float64
    PR = fastortho.polar(R.float(), method=method)
    assert polar_error(PR, R).max().item() < 4e-4  # torch path: 1.9e-4 (higham) / 1.4e-6 (qdwh)
    P0 = fastortho.polar(G[:1], method=method)
    assert torch.equal(P0[0], P[0])


@in_interpreter
def test_interp_gram_is_symmetric_and_matches_torch():
    from fastortho.polar._gpu_step import gram

    X = torch.randn(2, 19, 33, generator=torch.Generator().manual_seed(1))
    Y = gram(X, 3.0, identity=True)
    assert torch.equal(Y, Y.mT)
    torch.testing.assert_close(Y, torch.eye(19) + 3.0 * X @ X.mT, rtol=2e-6, atol=2e-5)


# ---------------------------------------------------------------- AOT compile (no GPU)

def _compile(arch: int, dtype: str):
    import triton
    from triton.backends.compiler import GPUTarget

    from fastortho.kernels.polar import _polar_update_kernel as fn

    ptr = f"*{dtype}"
    sig = {n: ptr for n in ("X", "Z", "OUT", "ALPHA", "BETA")}
    sig.update(ACTIVE="*i8", PART=ptr)
    sig.update({n: "i32" for n in ("R", "C", "TR", "TC", "sx_b", "sx_r", "sz_b", "sz_r", "so_b", "so_r")})
    const = {"sx_c": 1, "sz_c": 1, "so_c": 1, "BLOCK_R": 32, "BLOCK_C": 128}
    sig.update({n: "constexpr" for n in const})
    sig = {n: sig[n] for n in fn.arg_names}
    div = ["X", "Z", "OUT", "C", "sx_b", "sx_r", "sz_b", "sz_r", "so_b", "so_r"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = triton.compiler.ASTSource(fn, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


@needs_triton
@pytest.mark.skipif(interpreter_enabled(), reason="AOT compile is for the parent process")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_update_kernel_compiles_for(arch, dtype):
    from fastortho.kernels._config import SMEM_LIMIT
    from fastortho.kernels.aot import ptxas_usage

    k = _compile(arch, dtype)
    ptx = k.asm["ptx"]
    assert f".target sm_{arch}" in ptx
    # Unit-stride, 16-aligned rows: Triton emits 128-bit vector loads (4 fp32 / 2 fp64 per load).
    assert "ld.global.v4" in ptx or "ld.global.v2" in ptx
    assert int(k.metadata.shared) <= SMEM_LIMIT[arch]
    regs, st, ld = ptxas_usage(ptx, arch)
    assert 0 < regs <= 255 and st == 0 and ld == 0, (regs, st, ld)


# ---------------------------------------------------------------- GPU (skipped without CUDA)

@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("method", ["qdwh", "higham"])
def test_gpu_matches_cpu(method):
    import fastortho
    from fastortho.reference import polar_error

    from helpers import log_spectrum, with_spectrum

    G = with_spectrum((4, 64, 128), log_spectrum(64, 1e2)).float()
    Pc, itc = fastortho.polar(G, method=method, return_iterations=True)
    Pg, itg = fastortho.polar(G.cuda(), method=method, return_iterations=True)
    # Both converge to fp32 accuracy (CPU: ≤ 3e-6); the GPU's Gram products may use other summation orders.
    assert polar_error(Pg.cpu(), G).max().item() < 1e-5
    assert (itg.cpu() - itc).abs().max().item() <= 1
