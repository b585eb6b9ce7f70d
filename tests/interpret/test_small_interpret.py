"""The single-program small-matrix kernel (``kernels/newton_schulz_small.py``) under the interpreter:
against the multi-kernel path it replaces, the torch backend and the float64 iteration; batch
invariance, strides, NaN/Inf/zero matrices and extreme scales (the shared contract of ``_scales``)."""
from __future__ import annotations

import pytest
import torch

import _scales
from _common import assert_batch_invariant, gen, ns_triton, plain_loop, rel
from fastortho.coefficients import get_schedule
from fastortho.ns_torch import newton_schulz_torch

import fastortho.kernels.newton_schulz_small as small

BF, F32 = torch.bfloat16, torch.float32
# wide, tall (a transposed view), padded square; k > 64 (the 8-warp, 32-column variant) in 16-bit
# storage only: fp32 storage is eligible up to k = 32
SHAPES = [((2, 24, 40), (F32, BF)), ((2, 40, 24), (F32, BF)), ((1, 30, 30), (F32, BF)), ((1, 70, 70), (BF,))]


@pytest.fixture
def launched(monkeypatch):
    """Names of the NS kernels launched (spied, still run)."""
    import fastortho.kernels.newton_schulz_launch as launch

    names: list[str] = []

    class Spy:
        def __init__(self, fn, name):
            self.fn, self.name = fn, name

        def __getitem__(self, grid):
            def run(*a, **k):
                names.append(self.name)
                return self.fn[grid](*a, **k)
            return run

    monkeypatch.setattr(small, "_ns_small_kernel", Spy(small._ns_small_kernel, "small"))
    monkeypatch.setattr(launch, "_sym_mm_kernel", Spy(launch._sym_mm_kernel, "sym"))
    return names


def _multi(monkeypatch, G, **kw):
    monkeypatch.setattr(small, "ENABLED", False)
    try:
        return ns_triton(G, **kw)
    finally:
        monkeypatch.setattr(small, "ENABLED", True)


@pytest.mark.parametrize("normalize", ["fro", "gram"])
@pytest.mark.parametrize("shape,cdts", SHAPES, ids=["x".join(map(str, s)) for s, _ in SHAPES])
def test_matches_multi_kernel_path_and_float64(monkeypatch, launched, shape, cdts, normalize):
    """Same rounding points as the multi-kernel path: bf16 results equal but for summation order, fp32
    within a few ulps; both as close to the float64 iteration. Measured (3 steps): fp32 max |Δ| ≤ 14 eps
    (1.7e-6), bf16 at most one element in 40 off, by 1 ulp (≤ 2^-9 at |x| < 1)."""
    G = gen(shape, seed=5)
    ref = plain_loop(G, steps=3, normalize=normalize)
    for cdt in cdts:
        kw = dict(steps=3, cdt=cdt, normalize=normalize, gram=False)
        launched.clear()
        Y = ns_triton(G, **kw)
        assert launched == ["small"]
        Z = _multi(monkeypatch, G, **kw)
        assert launched[1:] and "small" not in launched[1:]
        d = (Y.double() - Z.double()).abs()
        if cdt == F32:
            assert d.max().item() <= 64 * torch.finfo(F32).eps
        else:
            assert d.max().item() <= 2.0 ** -8 and (d > 0).float().mean().item() <= 0.05
        ey, ez = rel(Y, ref).max().item(), rel(Z, ref).max().item()
        assert ey <= 1.25 * ez + 4 * torch.finfo(F32).eps, f"{cdt}: small {ey:.3g} vs multi {ez:.3g}"


@pytest.mark.parametrize("cdt", [F32, BF])
def test_matches_torch_backend(cdt):
    """5 Polar Express steps on 2×48×80 against the torch backend in the same storage dtype and the
    float64 iteration. Measured errors (small kernel / torch backend / eager loop in cdt): fp32
    2.02e-6 / 2.57e-6 / 2.58e-6; bf16 1.57e-2 / 1.73e-2 / 4.31e-2. Bounds: within 2× (fp32) or 1.25×
    (bf16) of the torch backend, and in bf16 ≤ 0.6 × the eager loop, as the multi-kernel path's test."""
    G = gen((2, 48, 80), seed=9)
    co, safety = get_schedule("polar_express")
    ref = plain_loop(G)
    Y = ns_triton(G, cdt=cdt, gram=False)
    T = newton_schulz_torch(G, co, safety=safety, normalize="fro", eps=1e-7, compute_dtype=cdt, out_dtype=F32)
    ey, et = rel(Y, ref).max().item(), rel(T, ref).max().item()
    if cdt == F32:
        assert ey <= 2.0 * et, f"small {ey:.3g} vs torch {et:.3g}"
    else:
        eager = rel(plain_loop(G, dtype=BF), ref).max().item()
        assert ey <= 1.25 * et and ey <= 0.6 * eager, f"small {ey:.3g} vs torch {et:.3g}, eager {eager:.3g}"


def test_batch_invariant():
    assert_batch_invariant((3, 24, 40), False)


def test_strided_and_transposed_inputs_read_in_place():
    """Any strides: a strided slice and a transposed view give the contiguous input's result bit for bit."""
    base = gen((2, 50, 70), seed=4)
    for view in (base[:, ::2, 3:43], base.mT[:, 5:45, ::2]):
        assert torch.equal(ns_triton(view, steps=2, cdt=BF), ns_triton(view.contiguous(), steps=2, cdt=BF))


@pytest.mark.parametrize("normalize", ["fro", "gram"])
def test_nan_inf_zero_matrices(monkeypatch, normalize):
    """NaN or Inf anywhere in a matrix gives an all-NaN result for that matrix only, a zero matrix gives
    zeros, as on the multi-kernel path; neighbours in the batch are unaffected."""
    G = gen((4, 20, 36), seed=6)
    G[1, 3, 7] = float("nan")
    G[2, 0, 0] = float("inf")
    G[3] = 0.0
    kw = dict(steps=2, cdt=BF, normalize=normalize)
    Y, Z = ns_triton(G, **kw), _multi(monkeypatch, G, **kw)
    assert torch.isnan(Y[1]).all() and torch.isnan(Y[2]).all() and torch.equal(Y[3], torch.zeros_like(Y[3]))
    assert torch.equal(torch.isnan(Y), torch.isnan(Z))
    assert torch.equal(Y[0], ns_triton(G[:1], **kw)[0])


def _run_small(G, co, safety, normalize, eps, cdt):
    from fastortho.ops.newton_schulz import newton_schulz_triton

    return newton_schulz_triton(G, co, safety=safety, normalize=normalize, eps=eps, compute_dtype=cdt,
                                out_dtype=F32, gram=False)


_check = _scales.make_check(_run_small)


@pytest.mark.parametrize("dt,cdt,normalize,label", _scales.params())
def test_extreme_scales(dt, cdt, normalize, label, launched):
    """2^k·G gives G's result bit for bit; decimal scales move it by the input rounding only."""
    assert small.small_eligible(min(_scales.SHAPE), max(_scales.SHAPE), normalize, _scales.STEPS, cdt)
    _check(dt, cdt, normalize, label)
