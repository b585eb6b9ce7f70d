"""Extreme-scale cases shared by the torch-backend and Triton-interpreter tests (one contract).

Both backends take norms of G·p, p the power of two with max|G·p| in [1, 2), and never form
ν(G) itself. Hence:

* scaling G by an exact power of two 2^k (k = ±66 ≈ 1e±20, ±100 ≈ 1e±30; ±12 in float16,
  whose range ends at 65504 and 6.1e-5) leaves the result **bit-identical**, with eps small
  enough not to clamp;
* scaling by the decimal 1e±20, 1e±30 rounds every entry once to the input dtype (relative
  2^-24 in float32, 2^-8 in bfloat16), and the result moves by that input perturbation only
  (tolerance in units of the input dtype's eps, measured in ``DECIMAL_TOL``).

float16 cannot hold 1e±20 or 1e±30 (max 65504, smallest subnormal 6e-8): those cases are skipped
by construction, with that reason, rather than silently dropped.
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastortho.coefficients import get_schedule

DECIMAL = (1e-30, 1e-20, 1e20, 1e30)
POW2 = {torch.float32: (-100, -66, 66, 100), torch.bfloat16: (-100, -66, 66, 100), torch.float16: (-12, 12)}
EPS = 1e-38   # below every ν here: the eps clamp never acts, so scale invariance is exact
SHAPE = (20, 12)   # tall: the iteration runs on the transposed view
STEPS = 2


def representable(dtype: torch.dtype, scale: float) -> bool:
    fi = torch.finfo(dtype)
    return 4.5 * scale < fi.max and 0.25 * scale >= fi.tiny


def base_matrix(dtype: torch.dtype, seed: int = 7) -> torch.Tensor:
    """Entries ±(0.25 + |z|), exact in ``dtype``, so that ×2^±12 stays normal in float16."""
    z = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))
    return (torch.sign(z) * (0.25 + z.abs()).clamp_max(4.5)).to(dtype)


def batch(dtype: torch.dtype) -> tuple[torch.Tensor, list[str]]:
    """[G, G·2^k…, round(G·10^d)…] in ``dtype`` (one call computes every scale: the backends
    normalize each matrix of a batch on its own) and the labels of the rows."""
    G = base_matrix(dtype)
    mats, labels = [G], ["1"]
    for k in POW2[dtype]:
        mats.append(torch.ldexp(G, torch.tensor(k)))   # exact
        labels.append(f"2^{k}")
    for s in DECIMAL:
        if representable(dtype, s):
            mats.append((G.double() * s).to(dtype))
            labels.append(f"{s:g}")
    return torch.stack(mats), labels


# (input dtype, compute/storage dtype): float16 storage of a float32 input is where an unscaled
# Gram product of G overflowed (|G| > 256); bfloat16 storage is the CUDA default.
CASES = ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
         (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16))
# Decimal scales: max |ΔX| ≤ DECIMAL_TOL · max(eps_in, eps_compute). Measured (tall 20×12, 2 Polar
# Express steps): torch backend ≤ 10, Triton interpreter ≤ 12 (float32/float32); 0 or ≤ 3.25 in
# the 16-bit cases (the output's own ulp dominates).
DECIMAL_TOL = 32.0


def _name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def params() -> list:
    """pytest params (input dtype, compute dtype, normalize, scale label); float16 × decimal
    scales are listed as skips with their reason."""
    out = []
    for dt, cdt in CASES:
        for normalize in ("fro", "gram"):
            labels = [f"2^{k}" for k in POW2[dt]] + [f"{s:g}" for s in DECIMAL]
            for lab in labels:
                marks = ()
                if "^" not in lab and not representable(dt, float(lab)):
                    marks = pytest.mark.skip(reason=f"{lab} is outside {_name(dt)}'s range (skip by construction)")
                out.append(pytest.param(dt, cdt, normalize, lab, marks=marks,
                                        id=f"{_name(dt)}-{_name(cdt)}-{normalize}-{lab}"))
    return out


def make_check(run):
    """A test body for a backend ``run(G, coefficients, safety, normalize, eps, cdt) -> float32``.
    Results are cached per (dtype, compute dtype, normalize): one call per batch of scales."""
    @functools.lru_cache(maxsize=None)
    def results(dt, cdt, normalize):
        G, labels = batch(dt)
        co, safety = get_schedule("polar_express", STEPS)
        return run(G, co, safety, normalize, EPS, cdt), labels

    def check(dt, cdt, normalize, label):
        Y, labels = results(dt, cdt, normalize)
        i = labels.index(label)
        assert bool(torch.isfinite(Y[0]).all())
        if "^" in label:
            assert torch.equal(Y[i], Y[0]), f"max |ΔX| = {(Y[i] - Y[0]).abs().max().item():.3g}"
        else:
            u = max(torch.finfo(dt).eps, torch.finfo(cdt).eps)
            d = (Y[i] - Y[0]).abs().max().item()
            assert d <= DECIMAL_TOL * u, f"max |ΔX| = {d:.3g} = {d / u:.1f} eps"
    return check
