"""Schedules: published numbers reproduced from their definitions, and the resolution rules."""
import math

import pytest

from fastortho.coefficients import (
    SCHEDULES,
    Schedule,
    composed_band,
    get_schedule,
    optimal_quintic,
    polar_express_schedule,
)

# modded-nanogpt / dion "Polar Express, 5 steps, safety 1.02" (published list).
PE5_PUBLISHED = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# The paper's raw table, rows 1-7 (row 8 is printed rounded to 15/8, -10/8, 3/8).
PE_PAPER_RAW_7 = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
]


def _max_rel(xs, ys):
    return max(abs(x - y) / abs(y) for tx, ty in zip(xs, ys, strict=True) for x, y in zip(tx, ty, strict=True))


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


@pytest.mark.parametrize("steps", [3, 5, 8])
@pytest.mark.parametrize("lower", [1e-4, 1e-3, 1e-2])
def test_generator_any_lower_and_steps_contracts_the_interval(steps, lower):
    sched = polar_express_schedule(steps, lower, safety=1.0, cushion=0.02)
    lo, hi = composed_band(sched.coefficients, 1.0, lower=lower)
    # each greedy step is symmetric about 1, so the band shrinks around 1
    assert 0 < 1 - lo < 1 - lower and hi - 1 < 1


def test_named_schedules_and_steps():
    coeffs, safety = get_schedule("keller")
    assert coeffs == ((3.4445, -4.7750, 2.0315),) * 5 and safety == 1.0
    assert len(get_schedule("polar_express")[0]) == 5 and get_schedule("polar_express")[1] == 1.02
    assert len(get_schedule("polar_express_paper")[0]) == 8
    assert get_schedule("you", 7)[0][5:] == (SCHEDULES["you"].coefficients[-1],) * 2
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
