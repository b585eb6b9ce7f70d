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


def _assert_close_to_multi(Y, Z, ref, cdt):
    """Small kernel Y vs multi-kernel path Z (same rounding points, other summation order): fp32 within
    64 eps, bf16 within 2^-8 on at most 5% of entries, and Y about as close to the float64 ``ref``."""
    d = (Y.double() - Z.double()).abs()
    if cdt == F32:
        assert d.max().item() <= 64 * torch.finfo(F32).eps
    else:
        assert d.max().item() <= 2.0 ** -8 and (d > 0).float().mean().item() <= 0.05
    ey, ez = rel(Y, ref).max().item(), rel(Z, ref).max().item()
    assert ey <= 1.25 * ez + 4 * torch.finfo(F32).eps, f"{cdt}: small {ey:.3g} vs multi {ez:.3g}"


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
        _assert_close_to_multi(Y, Z, ref, cdt)


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


# ------------------------------------------------------------------------------------------------
# a given sum of squares (newton_schulz(G, sumsq=…), what Muon passes): the kernel forms the scale
# ------------------------------------------------------------------------------------------------
def _sumsq(G):
    return G.double().square().sum((-2, -1))


def _scale_oracle(q, safety, eps):
    """(s, p, t) of a given sum of squares in torch float64 (IEEE: correctly rounded sqrt, ×, ÷ on every
    CPU), the formula of ``kernels/newton_schulz_norm._sumsq_scale``: s = 1/max(safety·√q, eps) + (q − q),
    E = the clamped binary exponent of √q, p = 2^-E, t = s·2^E, s and t rounded once to fp32."""
    q = q.double()
    nu = q.sqrt()
    d = nu * torch.tensor(safety, dtype=F32).double()
    e32 = torch.tensor(eps, dtype=F32).double()
    d = torch.where(d < e32, e32, d)
    s = 1.0 / d + (q - q)
    e = ((nu.view(torch.int64) >> 52) & 0x7FF) - 1023
    e = e.clamp(-126, 126)
    return s.float(), torch.ldexp(torch.ones_like(q), -e).float(), torch.ldexp(s, e).float()


SUMSQ_CASES = torch.tensor([0.0, 1e-300, 3e-80, 1e-45, 1e-14, 0.37, 1.0, 2.0, 3.999, 4.0, 1e30, 7e76, 1e200,
                            float("inf"), float("nan")], dtype=torch.float64)


@pytest.mark.parametrize("qdt", [torch.float64, torch.float32])
def test_sumsq_scale_bits(qdt):
    """The scale kernel's (s, p, t), through the shared ``_sumsq_scale`` helper, bit for bit against the
    float64 formula, from q = 0 through subnormal s (safety·√q > 2^126) to NaN/Inf."""
    from fastortho.kernels.newton_schulz_launch import sumsq_norm_scale

    q = SUMSQ_CASES.to(qdt)
    got = sumsq_norm_scale(q, safety=1.02, eps=1e-7)
    for g, w, name in zip(got, _scale_oracle(q, 1.02, 1e-7), "spt"):
        assert torch.equal(g.view(torch.int32), w.view(torch.int32)), f"{name}: {g} vs {w}"


@pytest.mark.parametrize("qdt", [torch.float64, torch.float32])
def test_small_kernel_sumsq_scale_bits(monkeypatch, launched, qdt):
    """The small kernel's in-kernel (p, t) from sumsq are the scale kernel's bits: one step (a, b, c) =
    (1, 0, 0) in fp32 storage makes B = 0 and X = round(t·round(p·G)) exactly, so the output shows p and t
    bit for bit (against the float64 formula and the multi-kernel path with the same sums). Matrices at
    2^±40 (q at 2^±80, inside fp32's range too) move p, and a sum 3× the true one moves t off 1/√q·2^E."""
    from fastortho.kernels.newton_schulz_launch import sumsq_norm_scale
    from fastortho.ops.newton_schulz import newton_schulz_triton

    G = gen((4, 12, 40), seed=11)
    G[1] *= 2.0 ** 40
    G[2] *= 2.0 ** -40
    q = (_sumsq(G) * torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64)).to(qdt)
    kw = dict(safety=1.02, normalize="fro", eps=1e-7, compute_dtype=F32, out_dtype=F32, gram=False, sumsq=q)
    launched.clear()
    Y = newton_schulz_triton(G, [(1.0, 0.0, 0.0)], **kw)
    assert launched == ["small"]
    ns = sumsq_norm_scale(q, safety=1.02, eps=1e-7)
    want = (G * ns.p[:, None, None]) * ns.t[:, None, None]
    assert torch.equal(Y, want)
    monkeypatch.setattr(small, "ENABLED", False)
    assert torch.equal(Y, newton_schulz_triton(G, [(1.0, 0.0, 0.0)], **kw))


@pytest.mark.parametrize("shape,cdts", SHAPES[:3], ids=["x".join(map(str, s)) for s, _ in SHAPES[:3]])
def test_sumsq_matches_multi_kernel_path(monkeypatch, launched, shape, cdts):
    """With the same given sums: one launch, and the multi-kernel path's result within the tolerances of
    ``test_matches_multi_kernel_path_and_float64`` (same (s, p, t) bits; summation order only)."""
    G = gen(shape, seed=8)
    q = _sumsq(G)
    ref = plain_loop(G, steps=3)
    for cdt in cdts:
        kw = dict(steps=3, cdt=cdt, gram=False, sumsq=q)
        launched.clear()
        Y = ns_triton(G, **kw)
        assert launched == ["small"]
        Z = _multi(monkeypatch, G, **kw)
        _assert_close_to_multi(Y, Z, ref, cdt)


def test_sumsq_nonfinite_and_zero_like_the_multi_kernel_path(monkeypatch, launched):
    """NaN or Inf sums give an all-NaN matrix (that one only), q = 0 with a zero matrix gives zeros, as on
    the multi-kernel path; a finite sum with a NaN in G gives NaN there too."""
    G = gen((5, 20, 36), seed=6)
    G[3] = 0.0
    G[4, 2, 5] = float("nan")
    q = _sumsq(G)
    q[1], q[2] = float("nan"), float("inf")
    q[4] = 1.0
    kw = dict(steps=2, cdt=BF, sumsq=q)
    launched.clear()
    Y = ns_triton(G, **kw)
    assert launched == ["small"]
    Z = _multi(monkeypatch, G, **kw)
    assert Y.flatten(1).isnan().all(1).tolist() == [False, True, True, False, True]
    assert torch.equal(Y[3], torch.zeros_like(Y[3])) and torch.equal(Z[3], Y[3])
    assert torch.equal(torch.isnan(Y), torch.isnan(Z))
    assert torch.equal(Y[0], ns_triton(G[:1], steps=2, cdt=BF, sumsq=q[:1])[0])


@pytest.mark.parametrize("k", [50, -10])
def test_sumsq_power_of_two_invariance(launched, k):
    """G·2^k with sumsq·4^k gives G's result bit for bit (p absorbs 2^k exactly, t is unchanged)."""
    G = gen((2, 24, 40), seed=2)
    ref = ns_triton(G, cdt=BF, sumsq=_sumsq(G))
    assert torch.equal(ns_triton(G * 2.0 ** k, cdt=BF, sumsq=_sumsq(G) * 4.0 ** k), ref)
    assert set(launched) == {"small"}
