"""Line 3 of a standard step (X ← a·X + B·X) by cuBLAS (``torch.baddbmm``) beside the apply kernel.

The cuBLAS choice runs under the interpreter on CPU tensors and must meet the bounds against the
float64 iteration that the Triton-only path meets in ``test_ns_interpret.py`` (the "triton" choice
is the default, so those tests are its half of the comparison): a speed knob, never an accuracy one. Selection: ``FASTORTHO_NS_LINE3`` (force) or the (arch, shape) table
``kernels/_config.LINE3`` (arch 0 off CUDA).
"""
from __future__ import annotations

import pytest
import torch
from _common import ns_triton, plain_loop, rel

import fastortho.kernels.newton_schulz_iteration as it
from fastortho.kernels import _config
from fastortho.kernels.newton_schulz_launch import apply_blas, apply_q, line3_backend
from fastortho.ns_torch import newton_schulz_torch
from fastortho.coefficients import get_schedule

HOSTILE = [(3, 48, 80), (2, 80, 48), (1, 33, 33), (2, 1, 40), (1, 17, 5)]


def _gen(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def blas_calls(monkeypatch):
    """Counts apply_blas calls made by the standard iteration."""
    calls = []

    def spy(*a, **k):
        calls.append(a[1].shape)
        return apply_blas(*a, **k)

    monkeypatch.setattr(it, "apply_blas", spy)
    return calls


@pytest.mark.parametrize("shape", HOSTILE, ids=lambda s: "x".join(map(str, s)))
def test_fp32_cublas_line3_matches_float64_iteration(monkeypatch, blas_calls, shape):
    """Measured (3×48×80): cublas 2.2e-6, triton 1.9e-6 (the torch fp32 base ≈ 1.5e-6)."""
    line3 = "cublas"
    monkeypatch.setenv("FASTORTHO_NS_LINE3", line3)
    G = _gen(shape)
    ref = plain_loop(G)
    co, safety = get_schedule("polar_express")
    base = max(rel(newton_schulz_torch(G, co, safety=safety, normalize="fro", eps=1e-7, compute_dtype=torch.float32,
                                       out_dtype=torch.float32), ref).max().item(),
               rel(plain_loop(G, dtype=torch.float32), ref).max().item())
    if min(shape[1:]) == 1:
        base = max(base, 2e-5)   # the k = 1 noise scale measured in test_ns_interpret.py
    Y = ns_triton(G, gram=False)
    err = rel(Y, ref).max().item()
    # the Triton-only bound of test_fp32_matches_float64_iteration (measured err/base ≤ 1.3 there)
    assert err <= 2.0 * base, f"line3={line3}: {err:.2e} vs torch fp32 {base:.2e}"
    # every step after the first goes to cuBLAS when forced (the first carries the scale t)
    assert len(blas_calls) == len(co) - 1


def test_bf16_cublas_line3_beats_eager(monkeypatch, blas_calls):
    """Same bound as test_bf16_fused_closer_to_exact_iteration_than_eager: fused ≤ 0.6 × eager.
    Measured (3×48×80): cublas 1.53e-2, triton 1.53e-2, eager bf16 loop 4.09e-2."""
    line3 = "cublas"
    monkeypatch.setenv("FASTORTHO_NS_LINE3", line3)
    G = _gen((3, 48, 80))
    ref = plain_loop(G)
    eager = rel(plain_loop(G, dtype=torch.bfloat16), ref).max().item()
    fused = rel(ns_triton(G, cdt=torch.bfloat16, gram=False), ref).max().item()
    assert fused <= 0.6 * eager, f"line3={line3}: fused {fused:.2e} vs eager {eager:.2e}"
    assert len(blas_calls) == 4


def test_apply_blas_rounds_once_like_the_kernel():
    """One bf16 apply by both: same result up to fp32 accumulation order. Measured: 0 of 11 520
    elements differ between them, 1 of 11 520 differs from the once-rounded float64 result (each);
    allowed: one bf16 ulp of the element, on at most 1% of them."""
    g = torch.Generator().manual_seed(3)
    X = (torch.randn(3, 48, 80, generator=g) / 8).bfloat16()
    Q = (torch.randn(3, 48, 48, generator=g) / 8).bfloat16()
    Q = ((Q.float() + Q.float().mT) / 2).bfloat16()
    a = 3.4445
    k_out, b_out = torch.empty_like(X), torch.empty_like(X)
    apply_q(Q, X, k_out, a=a)
    apply_blas(Q, X, b_out, a=a)
    exact = Q.double() @ X.double() + a * X.double()
    ulp = exact.abs().to(torch.bfloat16).double() * 2.0 ** -7
    d = (k_out.double() - b_out.double()).abs()
    assert bool((d <= ulp + 1e-30).all())
    assert (d > 0).double().mean().item() <= 0.01
    # and both are the once-rounded exact result except where fp32 accumulation order flips a tie
    for y in (k_out, b_out):
        assert (y != exact.to(torch.bfloat16)).double().mean().item() <= 0.01


def test_line3_choice_by_table_and_force(monkeypatch, blas_calls):
    """Unset/"auto": the (arch, shape) table; a row for arch 0 (CPU) takes cuBLAS for that bucket only."""
    monkeypatch.delenv("FASTORTHO_NS_LINE3", raising=False)
    t = torch.empty(0)
    assert line3_backend(48, 80, t) == "triton"             # empty table: the kernel
    monkeypatch.setitem(_config.LINE3, _config.line3_key(0, 48, 80), "cublas")
    assert _config.line3_key(0, 48, 80) == (0, 64, 128)
    assert line3_backend(48, 80, t) == "cublas"
    assert line3_backend(48, 200, t) == "triton"            # another L bucket
    assert line3_backend(48, 80, t, force="triton") == "triton"
    ns_triton(_gen((2, 48, 80)), steps=3, gram=False)
    assert len(blas_calls) == 2
    monkeypatch.setenv("FASTORTHO_NS_LINE3", "triton")
    assert line3_backend(48, 80, t) == "triton"
    monkeypatch.setenv("FASTORTHO_NS_LINE3", "cuBLAS")
    with pytest.raises(ValueError, match="FASTORTHO_NS_LINE3 must be 'auto', 'triton' or 'cublas'"):
        line3_backend(48, 80, t)
