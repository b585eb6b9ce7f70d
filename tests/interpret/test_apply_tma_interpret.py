"""The persistent TMA apply kernel (``_apply_tma_kernel`` in ``kernels/newton_schulz_tma.py``) under the
Triton interpreter.

``newton_schulz_tma_launch.APPLY_TMA = "on"`` routes every ``apply_q`` whose tensors a descriptor can
describe to it (on a GPU: sm_90 / sm_100 only). Oracle: ``_apply_kernel`` on the same inputs with the
same tiles and reduction order, so the two must agree bit for bit; plus a float64 product for the
size of the error. Launches of both kernels are counted in every test, so a silent fallback to the
cp.async kernel cannot make a TMA test vacuous.
"""
from __future__ import annotations

import pytest
import torch
from _common import assert_batch_invariant, gen as _gen, ns_triton, rel

from fastortho.kernels import newton_schulz_launch as ns_launch
from fastortho.kernels import newton_schulz_tma_launch as tma_launch

BF = torch.bfloat16


@pytest.fixture
def launches(monkeypatch):
    """Launch counts of the two apply kernels; APPLY_TMA = "on" unless a test sets it."""
    counts = {"tma": 0, "cp_async": 0}

    def counting(mod, name, key):
        fn = getattr(mod, name)

        class _C:
            def __getitem__(self, grid):
                counts[key] += 1
                return fn[grid]

        monkeypatch.setattr(mod, name, _C())

    counting(tma_launch, "_apply_tma_kernel", "tma")
    counting(ns_launch, "_apply_kernel", "cp_async")
    monkeypatch.setattr(tma_launch, "APPLY_TMA", "on")
    return counts


def _both(monkeypatch, launches, fn):
    """fn() through the TMA kernel, then through the cp.async kernel (each launched at least once)."""
    on = fn()
    assert launches["tma"] >= 1 and launches["cp_async"] == 0, launches
    monkeypatch.setattr(tma_launch, "APPLY_TMA", "off")
    off = fn()
    assert launches["cp_async"] >= 1
    return on, off


def _tall(X):
    """X's values stored as the transpose of a row-major matrix (row stride 1)."""
    return X.mT.contiguous().mT


def _sym(B, k, seed):
    A = _gen((B, k, k), seed=seed)
    return (A + A.mT) / (2 * k) ** 0.5


# (B, k, L) at the interpreter's 16×32×16 tiles: 48×80 = 3×3 tiles (a partial GROUP_M = 2 group),
# 40×56 partial tiles on both sides (rows and columns past the edge zero-filled by TMA loads and
# clipped by the TMA store), 8×16 a single partial tile per matrix (fewer tiles than programs).
SHAPES = [(3, 48, 80), (2, 40, 56), (2, 8, 16)]


@pytest.mark.parametrize("layout", ["wide", "tall-x", "tall-x-out"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_apply_matches_cp_async_kernel(monkeypatch, launches, shape, layout):
    """O = Q·X + a·X in bf16: bit-identical to ``_apply_kernel``, one rounding of the fp32 result."""
    nb, k, L = shape
    Q = _sym(nb, k, 1).to(BF)
    X = _gen(shape, seed=2).to(BF)
    Xl = _tall(X) if layout != "wide" else X

    def run():
        out = _tall(torch.empty(nb, k, L, dtype=BF)) if layout == "tall-x-out" else torch.empty(nb, k, L, dtype=BF)
        return ns_launch.apply_q(Q, Xl, out, a=1.5)

    on, off = _both(monkeypatch, launches, run)
    assert torch.equal(on, off)
    ref = Q.double() @ X.double() + 1.5 * X.double()
    assert rel(on, ref).max() < 4e-3     # one bf16 rounding: ≤ 2⁻⁸ relative per element


def test_epilogue_variants_match_cp_async_kernel(monkeypatch, launches):
    """No a·X term; the per-matrix scale t (first and restart applies) with an fp32 output rounded to
    bf16 first; a transposed Q; fp32 operands and output (the interpreter's fp32 NS)."""
    Q = _sym(3, 48, 3).to(BF)
    X = _gen((3, 48, 80), seed=4).to(BF)
    t = torch.tensor([0.5, 3.0, 1e-3])
    Qf, Xf = _sym(3, 48, 5), _gen((3, 48, 80), seed=6)

    def run():
        plain = ns_launch.apply_q(Q, X, torch.empty_like(X))
        scaled = ns_launch.apply_q(Q, X, torch.empty(3, 48, 80), a=-0.75, scale=t, round_dtype=BF)
        q_t = ns_launch.apply_q(_tall(Q), X, torch.empty_like(X), a=2.0)
        f32 = ns_launch.apply_q(Qf, Xf, torch.empty_like(Xf), a=1.25, scale=t)
        return plain, scaled, q_t, f32

    on, off = _both(monkeypatch, launches, run)
    assert launches["tma"] == 4
    for x, y in zip(on, off):
        assert torch.equal(x, y)
    exact = t[:, None, None].double() * (Q.double() @ X.double() - 0.75 * X.double())
    assert on[1].dtype == torch.float32 and torch.equal(on[1], on[1].to(BF).float())    # rounded to bf16
    assert rel(on[1], exact).max() < 4e-3
    assert rel(on[3], t[:, None, None].double() * (Qf.double() @ Xf.double() + 1.25 * Xf.double())).max() < 1e-6


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 80, 48)], ids=["wide", "tall"])
def test_newton_schulz_through_tma_apply(monkeypatch, launches, shape):
    """Whole bf16 standard NS calls (first step with the scale t, steady state; tall inputs read
    through Gᵀ strides): identical with and without the TMA apply kernel."""
    G = _gen(shape, seed=7)
    on, off = _both(monkeypatch, launches, lambda: ns_triton(G, steps=2, cdt=BF))
    assert torch.equal(on, off)


@pytest.mark.parametrize("shape,gram", [((3, 32, 56), False), ((3, 56, 32), True)], ids=["wide-standard", "tall-gram"])
def test_batch_invariance_through_tma_apply(launches, shape, gram):
    """Persistent programs walk several tiles, and which program computes a tile depends on the
    batch; the bits must not."""
    assert_batch_invariant(shape, gram)
    assert launches["tma"] > 0 and launches["cp_async"] == 0, launches


def test_layouts_a_descriptor_cannot_describe_fall_back(launches):
    """No 16-byte stride (bf16 L = 50), no unit stride, a misaligned start, X not in the operand
    dtype: the cp.async kernel runs, with the result of APPLY_TMA = "off"."""
    base = _gen((2, 40, 112)).to(BF)
    Q = _sym(2, 40, 8).to(BF)
    cases = {
        "row stride 100 B": base[:, :, :50].contiguous(),
        "no unit stride": base[:, :, ::2],
        "start 2 B past alignment": base[:, :, 1:57],
    }
    for name, X in cases.items():
        assert tma_launch.apply_tma_layout(Q, X, torch.empty(X.shape, dtype=BF), BF) is None, name
    assert tma_launch.apply_tma_layout(Q, base.float(), torch.empty_like(base), BF) is None
    assert tma_launch.apply_tma_layout(Q, base, torch.empty_like(base), BF) == (False, False, False)
    assert tma_launch.apply_tma_layout(Q, _tall(base), _tall(base), BF) == (False, True, True)
    X = cases["row stride 100 B"]
    O = ns_launch.apply_q(Q, X, torch.empty(X.shape, dtype=BF), a=1.0)
    assert launches == {"tma": 0, "cp_async": 1}
    assert rel(O, Q.double() @ X.double() + X.double()).max() < 4e-3


def test_apply_tma_setting_is_checked(monkeypatch):
    monkeypatch.setattr(tma_launch, "APPLY_TMA", "yes")
    X = torch.zeros(1, 8, 16, dtype=BF)
    with pytest.raises(ValueError, match="APPLY_TMA"):
        ns_launch.apply_q(torch.zeros(1, 8, 8, dtype=BF), X, torch.empty_like(X))
