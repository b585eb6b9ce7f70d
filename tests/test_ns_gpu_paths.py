"""The Triton paths added beside the multi-kernel iteration, on a CUDA device; every test skips cleanly
without one (``bench/gpu_acceptance.py`` runs them with ``pytest -m gpu``).

* the single-program small-matrix kernel (``kernels/newton_schulz_small.py``) against the multi-kernel
  path and a float64 iteration;
* the persistent TMA apply kernel (sm_90/sm_100) against the cp.async apply: the same tiles and
  k-order, so the same bits;
* ``sumsq=`` (Muon's momentum sum handed over) against the norm pass;
* the pipelined norm pass against a float64 norm.

Each of these is also checked on the CPU (Triton interpreter, AOT-compiled SASS); what only a GPU can
show is that the compiled code computes the same thing.
"""
from __future__ import annotations

import pytest
import torch

from fastortho.kernels import HAS_TRITON, interpreter_enabled

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_TRITON, reason="needs triton"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(interpreter_enabled(), reason="TRITON_INTERPRET=1 runs kernels on the CPU"),
]


def _ns(G, *, cdt=torch.bfloat16, steps=5, **kw):
    from fastortho.coefficients import get_schedule
    from fastortho.ops.newton_schulz import newton_schulz_triton

    co, safety = get_schedule("polar_express", steps)
    kw.setdefault("normalize", "fro")
    return newton_schulz_triton(G, co, safety=safety, eps=1e-7, compute_dtype=cdt, out_dtype=cdt, **kw)


def _ref(G, *, steps=5):
    """The same iteration in float64 (no storage rounding): what both Triton paths approximate."""
    from fastortho.coefficients import get_schedule

    co, safety = get_schedule("polar_express", steps)
    X = G.double()
    X = X / (safety * torch.linalg.matrix_norm(X, keepdim=True))
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    for a, b, c in co:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def _rel(X, R):
    return (torch.linalg.matrix_norm(X.double() - R) / torch.linalg.matrix_norm(R)).max().item()


@pytest.mark.parametrize("shape", [(64, 128, 128), (8, 256, 96), (5, 40, 1000)])
def test_small_kernel_matches_multi_kernel_path(monkeypatch, shape):
    """Same rounding points, different reduction trees: the one-program kernel's error against the
    float64 iteration is within 2× the multi-kernel path's own (bf16 storage), and it is one launch."""
    import fastortho.kernels.newton_schulz_small as small

    g = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(shape, device="cuda", generator=g)
    assert small.small_eligible(min(shape[1:]), max(shape[1:]), "fro", 5, torch.bfloat16)
    fused = _ns(G)
    monkeypatch.setattr(small, "ENABLED", False)
    multi = _ns(G)
    R = _ref(G)
    e_fused, e_multi = _rel(fused, R), _rel(multi, R)
    assert e_fused <= 2 * e_multi, (e_fused, e_multi)
    # batch invariance: a matrix alone gives the bits it gets inside the batch
    monkeypatch.setattr(small, "ENABLED", True)
    assert torch.equal(_ns(G[1:2]), fused[1:2])


@pytest.mark.parametrize("shape", [(2, 512, 1536), (1, 1536, 512), (3, 384, 384)])
def test_tma_apply_is_bit_identical_to_cp_async_apply(monkeypatch, shape):
    import fastortho.kernels.newton_schulz_tma_launch as tl_launch

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA kernels run on sm_90 and newer")
    g = torch.Generator(device="cuda").manual_seed(1)
    G = torch.randn(shape, device="cuda", generator=g)
    monkeypatch.setattr(tl_launch, "APPLY_TMA", "on")
    on = _ns(G, gram=False)
    monkeypatch.setattr(tl_launch, "APPLY_TMA", "off")
    off = _ns(G, gram=False)
    assert torch.equal(on, off)


@pytest.mark.parametrize("shape", [(3, 300, 520), (2, 64, 128)])
def test_sumsq_matches_norm_pass(shape):
    """A float64 Σg² handed over moves s by at most one fp32 ulp, so outputs agree to 2 bf16 ulps (the
    bound the interpreter test measured: one entry at 1 ulp)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    G = torch.randn(shape, device="cuda", generator=g)
    plain = _ns(G).float()
    given = _ns(G, sumsq=G.double().square().sum((-2, -1))).float()
    ulp = torch.finfo(torch.bfloat16).eps * plain.abs().clamp_min(2.0 ** -20)
    assert ((given - plain).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("shape", [(1, 4096, 4096), (24, 768, 3072), (2, 5000, 300)])
def test_pipelined_norm_pass_matches_float64(shape):
    from fastortho.kernels.newton_schulz_launch import inv_norm_scale

    g = torch.Generator(device="cuda").manual_seed(3)
    G = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    ns = inv_norm_scale(G, safety=1.0, eps=1e-7)
    exact = 1.0 / torch.linalg.matrix_norm(G.double())
    # fp32 partial sums of ≤ 2^24 squares: a few ulps of the sum (measured ≤ 2 ulps under the interpreter)
    assert ((ns.s.double() - exact).abs() <= 8 * torch.finfo(torch.float32).eps * exact).all()
    # batch invariance: the split depends on the shape only
    assert torch.equal(ns.s[:1], inv_norm_scale(G[:1], safety=1.0, eps=1e-7).s)
