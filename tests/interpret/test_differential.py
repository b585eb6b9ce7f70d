"""Cross-backend differential tests: the Triton kernels (under the interpreter) against the torch
backend and both against an independent float64 oracle (``_oracle.exact_ns``: the iteration's exact
result from an SVD), plus the shared extreme-scale contract (``_scales``) on the Triton backend.

Hypothesis draws shapes, batches, layouts (contiguous, transposed view, strided slice), scales
1e-30..1e30, input and storage dtypes, schedules, step counts, ``normalize`` and Gram-space, with a
fixed derandomized stream and few examples (interpreter time); the torch-vs-oracle sweep over
1..300 per side lives in ``tests/test_newton_schulz.py``. Tolerances are in units of the storage
dtype's eps, from sweeps of random cases (numbers next to each bound).
"""
from __future__ import annotations

import _scales
import pytest
import torch
from _oracle import draw_input, exact_ns, rel_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastortho import newton_schulz
from fastortho.coefficients import SCHEDULES
from fastortho.ops.newton_schulz import newton_schulz_triton


def _triton_run(G, co, safety, normalize, eps, cdt):
    return newton_schulz_triton(G, co, safety=safety, normalize=normalize, eps=eps, compute_dtype=cdt,
                                out_dtype=torch.float32)


_check_scale_triton = _scales.make_check(_triton_run)


@pytest.mark.parametrize("dt,cdt,normalize,label", _scales.params())
def test_extreme_scales_every_dtype_triton(dt, cdt, normalize, label):
    """Same contract as the torch backend: ×2^k bit-identical, ×1e±20/1e±30 within input rounding.
    Before the scaled norm pass: ×1e20 moved fro by 0.48 and gave NaN for spectral, ×1e-30 NaN."""
    _check_scale_triton(dt, cdt, normalize, label)


# Relative Frobenius distance in units of the storage dtype's eps. Measured over 40 random cases
# (≤ 40 per side, batch ≤ 2, every layout/schedule/normalize, steps ∈ {2, 3, native}, scales
# 1e±30): fp32 storage: Triton vs torch ≤ 42, torch vs oracle ≤ 46, Triton vs oracle ≤ 42
# (Gram-space; standard ≤ 28); bf16 storage (Gram-space: fp16): ≤ 4.2, 3.6, 4.2.
TOL_EPS = {torch.float32: 128.0, torch.bfloat16: 12.0}


@settings(max_examples=6, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    m=st.integers(1, 40), n=st.integers(1, 40), batch=st.integers(1, 2),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    log_scale=st.floats(-30, 30),
    in_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    cdt=st.sampled_from([torch.float32, torch.bfloat16]),
    name=st.sampled_from(sorted(n for n, s in SCHEDULES.items() if s.precondition is None)),
    steps=st.sampled_from([None, 1, 2, 3]),
    normalize=st.sampled_from(["fro", "gram"]),
    gram=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_agrees_with_torch_backend_and_exact_oracle(m, n, batch, layout, log_scale, in_dtype, cdt, name,
                                                           steps, normalize, gram, seed):
    if in_dtype == torch.float16:
        log_scale = max(-3.0, min(3.0, log_scale / 10))   # float16 holds ≈ 6e-5..65504 only
    G = draw_input(m, n, batch, layout, log_scale, in_dtype, seed)
    kw = dict(normalize=normalize, eps=1e-38, dtype=cdt, out_dtype=torch.float32)
    X = newton_schulz(G, steps, name, backend="torch", **kw)
    Y = newton_schulz(G, steps, name, backend="triton", gram=gram, **kw)
    ref = exact_ns(G, name, steps, normalize, eps=1e-38)
    tol = TOL_EPS[cdt] * torch.finfo(cdt).eps
    d_xy, d_x, d_y = rel_to(Y, X), rel_to(X, ref), rel_to(Y, ref)
    assert d_xy <= tol and d_x <= tol and d_y <= tol, f"triton-torch {d_xy:.2e}, torch {d_x:.2e}, triton {d_y:.2e}"
