"""Schedules: published numbers reproduced from their definitions, and the resolution rules."""
import math

import numpy as np
import pytest
import torch

import fastortho
from fastortho.reference import polar_error, polar_svd
from helpers import PE5_PUBLISHED, PE_PAPER_RAW

from fastortho import coefficients
from fastortho.coefficients import (
    SCHEDULES,
    Schedule,
    composed_band,
    get_schedule,
    optimal_quintic,
    polar_express_schedule,
)

# The paper's raw table, rows 1-7 (row 8 is printed rounded to 15/8, -10/8, 3/8).
PE_PAPER_RAW_7 = PE_PAPER_RAW[:7]


def _max_rel(xs, ys):
    pairs = (xy for tx, ty in zip(xs, ys, strict=True) for xy in zip(tx, ty, strict=True))
    return max(abs(x - y) / abs(y) for x, y in pairs)


def test_generator_reproduces_published_pe5():
    sched = polar_express_schedule(5, 1e-3, safety=1.02, cushion=0.02)
    assert sched.safety == 1.02
    assert _max_rel(sched.coefficients, PE5_PUBLISHED) < 1e-6  # measured 2.6e-15


def test_generator_reproduces_paper_raw_table():
    sched = polar_express_schedule(7, 1e-3, safety=1.0, cushion=0.02407327424182761)
    assert _max_rel(sched.coefficients, PE_PAPER_RAW_7) < 1e-6  # measured 3.2e-11


def test_paper_schedule_applies_safety_to_rows_1_to_7():
    rows = SCHEDULES["polar_express_paper"].coefficients
    assert len(rows) == 8 and SCHEDULES["polar_express_paper"].safety == 1.01
    for (a, b, c), (ra, rb, rc) in zip(rows[:7], PE_PAPER_RAW_7):
        assert (a, b, c) == pytest.approx((ra / 1.01, rb / 1.01**3, rc / 1.01**5), rel=1e-14)
    assert rows[7] == (1.875, -1.25, 0.375)


def test_optimal_quintic_equioscillates():
    a, b, c = optimal_quintic(0.1, 1.0)
    p = lambda x: a * x + b * x**3 + c * x**5  # noqa: E731
    e_lo, e_hi = 1 - p(0.1), 1 - p(1.0)
    assert e_lo == pytest.approx(-e_hi, rel=1e-9) and e_lo > 0
    # converged limit: the Taylor fixed point
    assert optimal_quintic(1.0, 1.0) == (15 / 8, -10 / 8, 3 / 8)


# One unit in the last place of 1.0 (float64): the converged band is 1 to within a few of these on
# any IEEE-754 machine. LAPACK's 4x4 solve (the Remez step) differs in its last bits between CPU
# kernels (AMD here, AVX-512 Intel elsewhere), so no assertion below compares its output exactly.
ULP1 = 2.0**-52
FIXED_POINT = (15 / 8, -10 / 8, 3 / 8)


@pytest.mark.parametrize("steps", [3, 5, 8, 12])
@pytest.mark.parametrize("lower", [1e-4, 1e-3, 1e-2])
def test_generator_any_lower_and_steps_contracts_the_interval(steps, lower):
    sched = polar_express_schedule(steps, lower, safety=1.0, cushion=0.02)
    assert len(sched.coefficients) == steps
    lo, hi = composed_band(sched.coefficients, 1.0, lower=lower)
    # In exact arithmetic every greedy step maps [l, u] onto [l', 2 - l'] with l < l' <= 1, and the
    # image of the lower end is l': the band over [lower, 1] is [l_k, h] with h - 1 <= 1 - l_k.
    # In floating point, evaluating the polynomials rounds each point by a few ulps of 1, and the
    # Remez solve stops with its equioscillation exact to ~1e-15, which later steps amplify:
    # measured max (h - 1)/(1 - l_k) - 1 = 1.3e-8 (from 1e-4, 7 steps). Bounds: 8 ulps of 1
    # absolute, 1e-6 relative.
    tol = 8 * ULP1
    assert 1 - lo < 1 - lower  # contracted
    assert lo <= 1 + tol and hi - 1 <= (1 - lo) * (1 + 1e-6) + tol
    if lower >= 1e-3 and steps >= 8:
        # converged: 1 - l_k < 1e-9 after 7 steps from 1e-3, after 5 from 1e-2, and the next step
        # lands on 1 within rounding (measured: exactly 1.0 on this machine).
        assert max(1 - lo, hi - 1) <= tol
    if lower >= 1e-3 and steps >= 12:
        # from the 9th step on the interval is the point {1}: the rows are the fixed point itself,
        # computed without a linear solve, so bit-identical on every CPU
        assert all(row == FIXED_POINT for row in sched.coefficients[8:])


def test_generator_survives_a_converged_interval_crossed_by_rounding(monkeypatch):
    """On an AVX-512 Intel CPU the greedy update gave lower = 1 + 1ulp > upper = 1 - 1ulp at the
    converged end (8 steps from 1e-3), and the next Remez call raised. Reproduced here on any CPU by
    a solver that returns, once the interval is a few ulps wide, a quintic with p'(1) < 0 by 1e-6:
    then p(l) > p(u) and the symmetric update puts l' above 1, as those last-ulp differences did."""
    real = coefficients.optimal_quintic
    calls: list[tuple[float, float]] = []

    def solver(lower: float, upper: float):
        calls.append((lower, upper))
        a, b, c = real(lower, upper)
        return (a - 1e-6, b, c) if 0 < upper - lower < 1e-6 else (a, b, c)

    monkeypatch.setattr(coefficients, "optimal_quintic", solver)
    cached = getattr(coefficients, "_polar_express_rows", None)
    if cached is not None:  # the generator memoizes its rows: bypass, so no perturbed row is kept
        monkeypatch.setattr(coefficients, "_polar_express_rows", cached.__wrapped__)
    sched = coefficients.polar_express_schedule(10, 1e-3, safety=1.0, cushion=0.02)
    assert any(0 < up - lo < 1e-6 for lo, up in calls)  # the perturbation did happen
    assert all(lo <= up for lo, up in calls)
    assert all(math.isfinite(v) for row in sched.coefficients for v in row)
    # once l is clamped at 1 the remaining rows are the fixed point itself, bit for bit (no solve)
    assert sched.coefficients[-1] == FIXED_POINT


def test_named_schedules_and_steps():
    coeffs, safety = get_schedule("keller")
    assert coeffs == ((3.4445, -4.7750, 2.0315),) * 5 and safety == 1.0
    assert len(get_schedule("polar_express")[0]) == 5 and get_schedule("polar_express")[1] == 1.02
    assert len(get_schedule("polar_express_paper")[0]) == 8
    assert get_schedule("keller", 3)[0] == ((3.4445, -4.7750, 2.0315),) * 3
    assert get_schedule("cubic", 3)[0] == ((1.5, -0.5, 0.0),) * 3
    assert get_schedule("polar_express", 2)[0] == SCHEDULES["polar_express"].coefficients[:2]


def test_custom_sequences():
    assert get_schedule([(2.0, -1.5, 0.5)]) == (((2.0, -1.5, 0.5),), 1.0)
    # torch.optim.Muon style: one flat triple means "this triple every step" (5 by default)
    assert get_schedule((3.4445, -4.7750, 2.0315))[0] == ((3.4445, -4.7750, 2.0315),) * 5
    sched = Schedule("mine", ((1.5, -0.5, 0.0),), safety=1.05)
    assert get_schedule(sched, 2) == (((1.5, -0.5, 0.0),) * 2, 1.05)


@pytest.mark.parametrize(
    "bad", ["nope", [(1.0, 2.0)], [("a", 1, 2)], []], ids=["name", "pair", "str", "empty"]
)
def test_bad_schedules_raise(bad):
    with pytest.raises(ValueError):
        get_schedule(bad)


def test_bad_schedule_fields():
    with pytest.raises(ValueError):
        Schedule("x", ((1.0, math.nan, 0.0),))
    with pytest.raises(ValueError):
        Schedule("x", ((1.0, 0.0, 0.0),), safety=0.0)
    with pytest.raises(ValueError):
        polar_express_schedule(0)


# ---- steps past a schedule's length ----

def test_past_the_length_fixed_lists_continue_with_a_convergent_tail():
    you = SCHEDULES["you"].coefficients
    # You's and Keller's last rows do not fix 1 (p(1) != 1): the quintic fixed point follows
    assert get_schedule("you", 7)[0] == you + (FIXED_POINT,) * 2
    assert get_schedule("keller", 7)[0] == ((3.4445, -4.7750, 2.0315),) * 5 + (FIXED_POINT,) * 2
    # convergent last rows repeat: the cubic, the paper list's fixed point (its reference code)
    assert get_schedule("cubic", 7)[0] == ((1.5, -0.5, 0.0),) * 7
    paper = SCHEDULES["polar_express_paper"].coefficients
    assert get_schedule("polar_express_paper", 10) == (paper + (FIXED_POINT,) * 2, 1.01)
    # custom lists follow the same rule
    assert get_schedule([(4.0, -6.0, 2.5)], 3)[0] == ((4.0, -6.0, 2.5), FIXED_POINT, FIXED_POINT)
    assert get_schedule([(2.0, -1.5, 0.5)], 3)[0] == ((2.0, -1.5, 0.5),) * 3
    # torch.optim.Muon's flat ns_coefficients triple: that triple on every step, as torch runs it
    assert get_schedule((3.4445, -4.7750, 2.0315), 8)[0] == ((3.4445, -4.7750, 2.0315),) * 8
    assert coefficients.is_convergent_row(FIXED_POINT) and coefficients.is_convergent_row((1.5, -0.5, 0))
    assert not coefficients.is_convergent_row((3.4445, -4.7750, 2.0315))


@pytest.mark.parametrize("steps", [6, 8])
def test_past_the_length_polar_express_is_regenerated_for_that_count(steps):
    coeffs, safety = get_schedule("polar_express", steps)
    expect = polar_express_schedule(steps, 1e-3, safety=1.02, cushion=0.02)
    assert safety == 1.02 and coeffs == expect.coefficients
    # a user-generated schedule carries its parameters too
    mine = polar_express_schedule(4, 1e-2, safety=1.01, cushion=0.05)
    assert mine.rows(steps) == polar_express_schedule(steps, 1e-2, safety=1.01, cushion=0.05).coefficients
    assert mine.rows(3) == mine.coefficients[:3]


def test_steps_must_be_a_nonnegative_int():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            SCHEDULES["you"].rows(bad)
        with pytest.raises(ValueError, match="steps"):
            get_schedule((3.4445, -4.7750, 2.0315), bad)
    with pytest.raises(ValueError, match="steps"):
        polar_express_schedule(0)
    assert get_schedule("you", 0)[0] == ()
    assert get_schedule("you", np.int64(7)) == get_schedule("you", 7)  # any integer type


# Error vs the float64 SVD polar factor, 128x512 float64 Gaussian (sigma/sigma_max in [1/3, 1]),
# torch backend in float64, before the tail rule (last row repeated), steps 5, 6, 7, 8:
#   keller 2.19e-1 1.82e-1 2.37e-1 1.92e-1 (oscillates)   you 1.77e-2 1.47e-2 1.00e-2 1.14e-2
#   polar_express 8.91e-2 6.86e-2 4.99e-2 4.71e-2          (paper list and cubic were monotone)
# The float64 rounding floor of the iteration on this matrix is ~7e-15 (paper list, 8+ steps).
FLOOR64 = 1e-13


@pytest.fixture(scope="module")
def gaussian_and_polar():
    G = torch.randn(128, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return G, polar_svd(G)


@pytest.mark.parametrize("name", sorted(n for n, s in SCHEDULES.items() if s.precondition is None))
def test_more_steps_never_hurt_and_converge(name, gaussian_and_polar):
    G, ref = gaussian_and_polar

    def err(k: int) -> float:
        X = fastortho.newton_schulz(G, k, name, backend="torch", dtype=torch.float64)
        return polar_error(X, G, reference=ref).item()

    errs = [err(k) for k in (5, 6, 7, 8)]
    for k, (before, after) in enumerate(zip(errs, errs[1:]), start=5):
        assert after <= max(before, FLOOR64), f"{name}: {k + 1} steps {after:.3e} > {k} steps {before:.3e}"
    # and they converge: every schedule reaches the float64 floor (cubic, slow from
    # sigma/||G||_F ~ 0.04, needs the most steps: measured 2.4e-4 at 10, ~1e-14 at 14 steps)
    assert err(16) < FLOOR64, name
