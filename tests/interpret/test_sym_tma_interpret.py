"""The TMA symmetric kernel (``kernels/newton_schulz_tma.py``) under the Triton interpreter.

``newton_schulz_launch.SYM_TMA = "on"`` routes every ``sym_mm`` whose operands a tensor descriptor
can describe to it (on a GPU that happens on sm_90 / sm_100 only). Oracles: the cp.async kernel
(``_sym_mm_kernel``) on the same inputs, whose products use the same tiles and reduction order, so
the two must agree bit for bit; the float64 loop for whole Newton–Schulz calls, with the bounds of
``test_ns_interpret.py``. Every test counts the launches of both kernels, so a silent fallback to
the cp.async kernel cannot make a TMA test vacuous.
"""
from __future__ import annotations

import pytest
import torch
from _common import assert_batch_invariant, gen as _gen, ns_triton, plain_loop, rel

from fastortho.coefficients import get_schedule
from fastortho.kernels import newton_schulz_launch as ns_launch
from fastortho.ns_torch import newton_schulz_torch


class _Counting:
    def __init__(self, fn, counts, name):
        self.fn, self.counts, self.name = fn, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.fn[grid]


@pytest.fixture
def launches(monkeypatch):
    """Launch counts of the two symmetric kernels; SYM_TMA = "on" unless a test sets it."""
    counts = {"tma": 0, "cp_async": 0}
    monkeypatch.setattr(ns_launch, "_sym_mm_tma_kernel", _Counting(ns_launch._sym_mm_tma_kernel, counts, "tma"))
    monkeypatch.setattr(ns_launch, "_sym_mm_kernel", _Counting(ns_launch._sym_mm_kernel, counts, "cp_async"))
    monkeypatch.setattr(ns_launch, "SYM_TMA", "on")
    return counts


def _tall(X):
    """X's values in the tall layout: the transpose of a row-major matrix (row stride 1)."""
    return X.mT.contiguous().mT


def _both(monkeypatch, launches, fn):
    """fn() through the TMA kernel and through the cp.async kernel (each launched, once at least)."""
    on = fn()
    assert launches["tma"] >= 1 and launches["cp_async"] == 0, launches
    monkeypatch.setattr(ns_launch, "SYM_TMA", "off")
    off = fn()
    assert launches["cp_async"] >= 1
    return on, off


# (B, k, L): whole 16-tiles; k = 40 = 2·16 + 8 (a partial diagonal tile: rows past k zero-filled by
# TMA) and L = 56 (a partial last k-step), both multiples of 8 so that the tall layout's row stride
# is 16-byte aligned too; one tile per matrix (fewer tiles than persistent programs).
SHAPES = [(3, 48, 80), (2, 40, 56), (2, 8, 16)]


@pytest.mark.parametrize("layout", ["wide", "tall", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_product_matches_cp_async_kernel(monkeypatch, launches, shape, layout):
    """C = X·Xᵀ in bf16: bit-identical to the cp.async kernel, exactly symmetric, one rounding."""
    nb, k, _ = shape
    X = _gen(shape).to(torch.bfloat16)
    P = _tall(X) if layout == "tall" else X
    S = _tall(X) if layout in ("tall", "mixed") else X
    on, off = _both(monkeypatch, launches, lambda: ns_launch.sym_mm(P, S, torch.empty(nb, k, k, dtype=torch.bfloat16)))
    assert torch.equal(on, off)
    assert torch.equal(on, on.mT)
    assert rel(on, X.float() @ X.float().mT).max() < 4e-3     # one bf16 rounding: ≤ 2⁻⁸ relative


def test_epilogue_terms_match_cp_async_kernel(monkeypatch, launches):
    """β·Y, the per-matrix scale σ² and an fp32 output from bf16 operands (the spectral first step)."""
    X = _gen((3, 48, 80), seed=1).to(torch.bfloat16)
    A = ns_launch.sym_mm(X, X, torch.empty(3, 48, 48, dtype=torch.bfloat16))
    sigma = torch.tensor([0.5, 3.0, 1e-3])

    A2 = (A.float() @ A.float()).to(torch.bfloat16)

    def run():
        B = ns_launch.sym_mm(A, A, torch.empty_like(A), Y=A, alpha=0.5, beta=-2.0)
        F = ns_launch.sym_mm(X, X, torch.empty(3, 48, 48), scale=sigma, round_dtype=torch.bfloat16)
        # P ≠ S commuting in exact arithmetic only (Gram-space products): the diagonal tiles'
        # rounded products are not symmetric, so only the mirrored store makes C exactly symmetric
        C = ns_launch.sym_mm(A, A2, torch.empty_like(A), Y=A, alpha=1.0, beta=0.25)
        return B, F, C

    (B1, F1, C1), (B0, F0, C0) = _both(monkeypatch, launches, run)
    assert torch.equal(B1, B0) and torch.equal(F1, F0) and torch.equal(C1, C0)
    assert torch.equal(B1, B1.mT) and torch.equal(F1, F1.mT) and torch.equal(C1, C1.mT)
    assert rel(B1, -2.0 * A.float() + 0.5 * A.float() @ A.float()).max() < 4e-3
    ref = sigma[:, None, None] ** 2 * (X.float() @ X.float().mT)
    assert rel(F1, ref).max() < 1e-6                           # fp32 output: accumulation order only


@pytest.mark.parametrize("shape,gram", [((3, 48, 80), False), ((2, 80, 48), True)], ids=["wide-standard", "tall-gram"])
def test_newton_schulz_fp32_through_tma(monkeypatch, launches, shape, gram):
    """Whole fp32 NS calls: identical to the cp.async path, and within the bound of
    ``test_fp32_matches_float64_iteration`` (err ≤ 2× / 4× the torch fp32 backend's) of float64."""
    G = _gen(shape)
    on, off = _both(monkeypatch, launches, lambda: ns_triton(G, gram=gram))
    assert torch.equal(on, off)
    ref = plain_loop(G)
    co, safety = get_schedule("polar_express")
    base = rel(newton_schulz_torch(G, co, safety=safety, normalize="fro", eps=1e-7, compute_dtype=torch.float32,
                                   out_dtype=torch.float32), ref).max().item()
    assert rel(on, ref).max().item() <= (2.0 if not gram else 4.0) * max(base, rel(plain_loop(G, dtype=torch.float32),
                                                                                    ref).max().item())


@pytest.mark.parametrize("shape,gram", [((3, 32, 56), True), ((3, 56, 32), False)], ids=["wide-gram", "tall-standard"])
def test_batch_invariance_through_tma(launches, shape, gram):
    """As ``test_batch_invariance``, with the persistent TMA kernel: each program walks several
    tiles, and which program computes a tile depends on the batch; the bits must not."""
    assert_batch_invariant(shape, gram)
    assert launches["tma"] > 0 and launches["cp_async"] == 0, launches


def test_layouts_a_descriptor_cannot_describe_fall_back(launches):
    """No 16-byte stride (bf16 L = 50), no unit stride, a misaligned start, operands not in the
    rounding dtype, L = 0: the cp.async kernel runs instead, with the same result as SYM_TMA = "off"."""
    bf = torch.bfloat16
    base = _gen((2, 40, 112)).to(bf)
    cases = {
        "row stride 100 B": base[:, :, :50].contiguous(),
        "no unit stride": base[:, :, ::2],
        "start 2 B past alignment": base[:, :, 1:57],
    }
    for name, X in cases.items():
        assert ns_launch._sym_tma_layout(X, X, bf) is None, name
    assert ns_launch._sym_tma_layout(base.float(), base.float(), bf) is None       # would need rounding
    assert ns_launch._sym_tma_layout(base, base, bf) == (False, False)
    assert ns_launch._sym_tma_layout(base, _tall(base), bf) == (False, True)
    X = cases["row stride 100 B"]
    C = ns_launch.sym_mm(X, X, torch.empty(2, 40, 40, dtype=bf))
    assert launches == {"tma": 0, "cp_async": 1}
    assert torch.equal(C, C.mT) and rel(C, X.float() @ X.float().mT).max() < 4e-3
    Z = torch.empty(1, 8, 16, dtype=bf)[:, :, :0]     # L = 0 (aligned strides): no TMA box, C = 0
    assert torch.equal(ns_launch.sym_mm(Z, Z, torch.empty(1, 8, 8, dtype=bf)), torch.zeros(1, 8, 8, dtype=bf))
    assert launches == {"tma": 0, "cp_async": 2}


def test_sym_tma_setting_is_checked(monkeypatch):
    monkeypatch.setattr(ns_launch, "SYM_TMA", "yes")
    X = torch.zeros(1, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="SYM_TMA"):
        ns_launch.sym_mm(X, X, torch.empty(1, 8, 8, dtype=torch.bfloat16))
