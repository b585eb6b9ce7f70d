"""``coefficients="aol"`` on the Triton backend (under the interpreter) against the torch backend.

The Triton path forms the first Gram product with the symmetric kernel, applies the AOL row scaling
with torch ops and runs the remaining work through the same kernels as the norm-scaled schedules,
standard and Gram-space; the torch backend's ``aol_precondition`` is the reference. Tolerances are
the differential tests' (``test_differential.TOL_EPS``, in units of the storage dtype's eps); the
measured distances are next to them.
"""
from __future__ import annotations

import pytest
import torch
from _oracle import rel_to

from fastortho import newton_schulz

# Measured (relative Frobenius distance / storage eps) over the cases below: fp32 ≤ 3.8 standard,
# ≤ 24.3 Gram-space; bf16 (Gram-space: fp16) ≤ 1.4. Bounds: test_differential.TOL_EPS.
TOL_EPS = {torch.float32: 128.0, torch.bfloat16: 12.0}


def _input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(*shape, generator=g)
    # rows of very different norms: what AOL's row scaling equalizes
    return G * torch.logspace(-2, 1, shape[-2])[:, None]


@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 28)], ids=["wide", "tall", "batched"])
def test_triton_aol_matches_torch(shape, gram, cdt):
    G = _input(shape, seed=sum(shape))
    kw = dict(coefficients="aol", dtype=cdt, out_dtype=torch.float32)
    X = newton_schulz(G, backend="torch", **kw)
    Y = newton_schulz(G, backend="triton", gram=gram, **kw)
    d = rel_to(Y, X)
    print(f"aol {shape} gram={gram} {cdt}: {d / torch.finfo(cdt).eps:.2f} eps")
    assert d <= TOL_EPS[cdt] * torch.finfo(cdt).eps, f"triton-torch {d:.2e}"


@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16])
def test_triton_aol_zero_and_nonfinite_stay_in_their_matrix(cdt):
    G = _input((4, 12, 20), seed=3)
    G[1] = 0.0
    G[2, 3, 5] = float("nan")
    G[3, 0, 0] = float("inf")
    kw = dict(coefficients="aol", dtype=cdt, out_dtype=torch.float32)
    X = newton_schulz(G, backend="torch", **kw)
    Y = newton_schulz(G, backend="triton", **kw)
    assert torch.equal(Y[1], torch.zeros_like(Y[1])) and torch.equal(X[1], Y[1])
    assert torch.isnan(Y[2]).all() and torch.isnan(X[2]).all()
    assert torch.isnan(Y[3]).all() and torch.isnan(X[3]).all()
    assert rel_to(Y[0], X[0]) <= TOL_EPS[cdt] * torch.finfo(cdt).eps


def test_triton_aol_scale_invariant_and_zero_steps():
    """G·2^k gives the bits of G (the prescale is exact); 0 steps return X₀ = D·G itself."""
    G = _input((16, 24), seed=5)
    kw = dict(coefficients="aol", dtype=torch.float32, backend="triton")
    assert torch.equal(newton_schulz(G * 2.0**40, **kw), newton_schulz(G, **kw))
    X0 = newton_schulz(G, 0, **kw)
    ref = newton_schulz(G, 0, coefficients="aol", dtype=torch.float32, backend="torch")
    assert rel_to(X0, ref) <= 4 * torch.finfo(torch.float32).eps
    assert torch.linalg.matrix_norm(X0, ord=2) <= 1.0 + 1e-6
