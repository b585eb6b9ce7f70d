"""Newton–Schulz coefficient schedules, each paired with the normalization it was derived for.

One quintic Newton–Schulz step on X (m ≤ n) with coefficients (a, b, c) is

    A = X Xᵀ,   X ← a·X + (b·A + c·A²)·X,

which maps every singular value σ of X through the odd polynomial p(σ) = aσ + bσ³ + cσ⁵
and leaves the singular vectors alone. Composing k such steps drives every σ in (0, 1] towards 1,
so X_k ≈ U Vᵀ, the polar factor of G = U S Vᵀ, provided the input was scaled so that σ_max ≤ 1.
The scaling is X₀ = G / (safety · ν(G)) with ν(G) ≥ σ_max(G) (see ``fastortho.newton_schulz``).

A schedule is meaningless without its safety factor: the Polar Express lists were *derived* for an
input divided by 1.02·‖G‖_F (or 1.01·‖G‖_F), and peers that pair a list with another factor run a
different iteration than the one that was optimized. Every :class:`Schedule` therefore carries its
``safety`` and :func:`fastortho.newton_schulz` applies it.

Where each list comes from (values checked in ``tests/test_coefficients.py``):

* ``"keller"``: (3.4445, −4.7750, 2.0315) every step. Keller Jordan's Muon (KellerJordan/Muon,
  torch.optim.Muon's default). Chosen to maximize the slope at 0; it does not converge: singular
  values end in roughly [0.7, 1.2]. Safety 1.
* ``"you"``: You Jiacheng's 5-step list (tweet 1905861218138804534), the default of dion's
  non-Polar-Express path and NVIDIA Emerging-Optimizers' "quintic". Safety 1.
* ``"polar_express"``: the 5-step Polar Express list used by modded-nanogpt, dion, nanochat:
  ``polar_express_schedule(5, lower=1e-3, safety=1.02, cushion=0.02)``, input scaled by 1.02·‖G‖_F.
* ``"polar_express_paper"``: the 8-step list of Amsel, Persson, Musco, Gower, "The Polar Express"
  (arXiv 2505.16932, reference code NoahAmsel/PolarExpress): the raw minimax composition with
  ℓ₀ = 1e-3 and cushion 0.02407…, rows 1–7 divided by the safety factor 1.01 (a/f, b/f³, c/f⁵),
  the last row the fixed point (15/8, −10/8, 3/8); input scaled by 1.01·‖G‖_F.
* ``"cubic"``: p(σ) = 1.5σ − 0.5σ³ every step, the classical Newton–Schulz iteration;
  convergent for σ ∈ (0, √3), hence slow from small σ. Safety 1.
* ``"aol"``: the 4-step schedule of Boissin, Massena, Mamalet, Serrurier, "Turbo-Muon: Accelerating
  Orthogonality-Based Optimization with Pre-Conditioning" (arXiv 2512.04632) as its reference
  implementation (thib-s/flash-newton-schulz) runs it: the last four rows of ``"you"``, applied to an
  input *preconditioned* by AOL (almost-orthogonal Lipschitz) row scaling instead of divided by a norm: with A = GGᵀ and d_i = (Σ_j |A_ij|)^{-1/2},
  X₀ = diag(d)·G, whose σ_max ≤ 1: σ_max(X₀)² = ‖DAD‖₂ and, by the Schur test with weights 1/d,
  ‖DAD‖₂ ≤ max_i Σ_j d_i|A_ij|d_j·(d_i/d_j) = max_i d_i² Σ_j |A_ij| = 1 (Prach & Lampert, "Almost-Orthogonal
  Layers for Efficient General-Purpose Lipschitz Networks"). The schedule says so with
  ``precondition="aol"``; run after a norm scaling instead it is a different iteration. Safety 1.

``keller`` and ``cubic`` list their constant triple 5 times (the step count of Keller Jordan's Muon).

More steps than the list has (:meth:`Schedule.rows`) never hurt, and they converge:

* A Polar Express schedule made by :func:`polar_express_schedule` (``"polar_express"``) is
  regenerated for the asked step count: the greedy composition from the same ℓ₀, safety and cushion.
* Every other schedule continues with its *tail*: the last row again when that row is itself a
  convergent Newton–Schulz polynomial (p(1) = 1 and p′(1) = 0: ``"cubic"``; the paper list, whose
  last row is the fixed point, as the reference code does), and otherwise the quintic fixed point
  p(σ) = (15σ − 10σ³ + 3σ⁵)/8 (``"keller"``, ``"you"``). That quintic has p′(σ) = (15/8)(1 − σ²)² ≥ 0
  and 1 − p(σ) = (1 − σ)³(3σ² + 9σ + 8)/8, so every σ ∈ (0, √(7/3)) moves monotonically towards 1,
  cubically near it: each extra step brings every singular value closer to 1. Repeating a row that
  was not built to converge does not: Keller's triple keeps σ oscillating in roughly [0.7, 1.2].

A single flat triple ``(a, b, c)`` (torch.optim.Muon's ``ns_coefficients``) is that triple on every
step, whatever the count, exactly as torch.optim.Muon runs it.
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Triple = tuple[float, float, float]

__all__ = [
    "FIXED_POINT",
    "KELLER",
    "PRECONDITIONERS",
    "Schedule",
    "SCHEDULES",
    "get_schedule",
    "schedule_precondition",
    "optimal_quintic",
    "polar_express_schedule",
    "composed_band",
    "is_convergent_row",
]


#: Schedule.precondition values: None (norm scaling) or "aol" (AOL row rescaling)
PRECONDITIONERS: tuple[str | None, ...] = (None, "aol")

FIXED_POINT: Triple = (15 / 8, -10 / 8, 3 / 8)
"""p(σ) = (15σ − 10σ³ + 3σ⁵)/8: p(1) = 1, p′(1) = p″(1) = 0, the tail of non-convergent schedules."""


def is_convergent_row(row: Sequence[float], tol: float = 1e-12) -> bool:
    """Whether p(σ) = aσ + bσ³ + cσ⁵ fixes 1 with zero slope (a + b + c = 1, a + 3b + 5c = 0).

    Then repeating p converges to 1 at least quadratically near σ = 1 (the classical Newton–Schulz
    polynomials: the cubic (3/2, −1/2, 0) and the quintic :data:`FIXED_POINT`).
    """
    a, b, c = (float(v) for v in row)
    return abs(a + b + c - 1) <= tol and abs(a + 3 * b + 5 * c) <= tol


def _as_steps(steps: object, minimum: int) -> int:
    """``steps`` as an int ≥ ``minimum`` (any integer type, e.g. numpy's; not bool or float)."""
    try:
        if isinstance(steps, bool):
            raise TypeError
        k = operator.index(steps)
    except TypeError:
        raise ValueError(f"steps must be an int >= {minimum}, got {steps!r}") from None
    if k < minimum:
        raise ValueError(f"steps must be an int >= {minimum}, got {steps!r}")
    return k


@dataclass(frozen=True)
class Schedule:
    """A Newton–Schulz coefficient schedule.

    Attributes:
        name: a short label (``"custom"`` for user sequences).
        coefficients: per-step (a, b, c) of p(σ) = aσ + bσ³ + cσ⁵; their number is the schedule's
            native step count. :meth:`rows` says what more steps run.
        safety: the input is divided by ``safety · ν(G)``; the value the list was derived with.
        source: where the numbers come from.
        generator: ``(lower, cushion)`` when the rows are
            ``polar_express_schedule(len(coefficients), lower, safety=safety, cushion=cushion)``;
            more steps then regenerate the schedule for that count. None for fixed lists.
        precondition: how X₀ is formed from G. None: X₀ = G / (safety·ν(G)), ν the ``normalize``
            bound. ``"aol"``: X₀ = diag(d)·G with d_i = (Σ_j |(GGᵀ)_ij|)^{-1/2} (AOL rescaling, σ_max(X₀)
            ≤ 1, the ``normalize`` argument is then not used), the Gram matrix reused by step 1.
    """

    name: str
    coefficients: tuple[Triple, ...]
    safety: float = 1.0
    source: str = ""
    generator: tuple[float, float] | None = None
    precondition: str | None = None

    def __post_init__(self) -> None:
        if len(self.coefficients) == 0:
            raise ValueError("a schedule needs at least one (a, b, c) triple")
        for t in self.coefficients:
            if len(t) != 3 or not all(math.isfinite(float(v)) for v in t):
                raise ValueError(f"each step must be a finite (a, b, c) triple, got {t!r}")
        if not (math.isfinite(self.safety) and self.safety > 0):
            raise ValueError(f"safety must be a positive finite number, got {self.safety}")
        if self.generator is not None and len(self.generator) != 2:
            raise ValueError(f"generator must be (lower, cushion) or None, got {self.generator!r}")
        if self.precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {self.precondition!r}")

    @property
    def steps(self) -> int:
        """The schedule's native number of steps."""
        return len(self.coefficients)

    @property
    def tail(self) -> Triple:
        """The row that fixed lists repeat past their end: their last row when it is convergent
        (:func:`is_convergent_row`), else the quintic :data:`FIXED_POINT`."""
        last = self.coefficients[-1]
        return last if is_convergent_row(last) else FIXED_POINT

    def rows(self, steps: int | None = None) -> tuple[Triple, ...]:
        """The per-step table for ``steps`` steps (the native length when None).

        Fewer steps than the list: its first ``steps`` rows. More: a generated schedule
        (``generator`` set) is regenerated for ``steps`` with the same ℓ₀, safety and cushion (its
        guaranteed band [ℓ_k, 2 − ℓ_k] narrows with every step); a fixed list continues with
        :attr:`tail` (never its last row when that row does not converge: Keller's triple repeated
        keeps σ oscillating in [0.7, 1.2], You's last row stalls at ~1e-2 error). With the quintic
        fixed point or the cubic as tail, each extra step moves every normalized σ ∈ (0, √(7/3))
        strictly closer to 1; any other convergent last row converges at least quadratically near 1.
        """
        if steps is None:
            return self.coefficients
        steps = _as_steps(steps, 0)
        if steps <= len(self.coefficients):
            return self.coefficients[:steps]
        if self.generator is not None:
            lower, cushion = self.generator
            return _polar_express_rows(steps, lower, self.safety, cushion)
        return self.coefficients + (self.tail,) * (steps - len(self.coefficients))


def optimal_quintic(lower: float, upper: float) -> Triple:
    """Minimax odd quintic p(x) = ax + bx³ + cx⁵ approximating 1 on [lower, upper] (Remez).

    The error 1 − p equioscillates at lower, q, r, upper; each Remez round solves the 4×4 linear
    system for (a, b, c, E) and moves q, r to the interior extrema of p (roots of p′ = a + 3bx² + 5cx⁴).
    As lower → upper the solution tends to the Taylor fixed point (15/8, −10/8, 3/8)/upper^{1,3,5},
    which is returned directly when the interval is numerically a point.
    """
    if not 0 < lower <= upper:
        raise ValueError(f"need 0 < lower <= upper, got lower={lower}, upper={upper}")
    if lower / upper >= 1 - 5e-6:
        return (15 / 8) / upper, (-10 / 8) / upper**3, (3 / 8) / upper**5
    q, r = (3 * lower + upper) / 4, (lower + 3 * upper) / 4
    err, prev = math.inf, None
    for _ in range(100):
        if prev is not None and abs(prev - err) <= 1e-15:
            break
        prev = err
        lhs = np.array(
            [[x, x**3, x**5, s] for x, s in ((lower, 1.0), (q, -1.0), (r, 1.0), (upper, -1.0))]
        )
        a, b, c, err = np.linalg.solve(lhs, np.ones(4))
        disc = max(9 * b * b - 20 * a * c, 0.0)
        roots = (-3 * b + np.array([-1.0, 1.0]) * math.sqrt(disc)) / (10 * c)
        q, r = np.sqrt(np.maximum(roots, 0.0))
    else:
        raise RuntimeError(f"Remez did not converge on [{lower}, {upper}]")
    return float(a), float(b), float(c)


# 1 − ℓ below this is "ℓ = 1" for the greedy recursion: a few float64 ulps (2.2e-16 each), the
# rounding of one polynomial evaluation near 1. Past it the minimax quintic is the fixed point.
_CONVERGED = 16 * 2.0**-52


def polar_express_schedule(
    steps: int, lower: float = 1e-3, *, safety: float = 1.02, cushion: float = 0.02
) -> Schedule:
    """Generate a Polar Express schedule (Amsel et al. 2025, Algorithm 1) for any ℓ and step count.

    Greedy composition: with u₀ = 1, at each step take the minimax quintic on
    [max(ℓ, cushion·u), u] (cushioning keeps the polynomial monotone when ℓ is tiny), rescale it so
    p(ℓ) and p(u) sit symmetrically about 1 (1 − p(ℓ) = p(u) − 1), divide it by the safety factor on
    every step but the last (p(x) → p(x / safety), i.e. a/f, b/f³, c/f⁵, so that round-off cannot push
    σ past the interval), then update ℓ ← p(ℓ), u ← 2 − ℓ.

    Converged interval: in exact arithmetic ℓ < 1 on every step; in float64 the update can round ℓ to
    1 or a few ulps above it (and u below it) once 1 − ℓ reaches rounding level, which happens within
    8 steps from ℓ₀ ≥ 1e-3 without safety, with the exact bits depending on the CPU's LAPACK kernels.
    So ℓ is clamped: once 1 − ℓ ≤ 16 ulps, ℓ = u = 1, and every further row is the quintic fixed
    point (15/8, −10/8, 3/8) (divided by the safety factor except on the last step), which maps
    σ = 1 to itself with zero slope. The generator's control flow never depends on last-ulp results.

    ``polar_express_schedule(5, 1e-3, safety=1.02, cushion=0.02)`` reproduces the list used by
    modded-nanogpt and dion to ~1e-15, and the returned schedule scales its input by ``safety``.
    """
    steps = _as_steps(steps, 1)
    if not 0 < lower <= 1:
        raise ValueError(f"lower must be in (0, 1], got {lower}")
    if safety < 1 or not 0 <= cushion < 1:
        raise ValueError(f"need safety >= 1 and 0 <= cushion < 1, got {safety}, {cushion}")
    rows = _polar_express_rows(steps, float(lower), float(safety), float(cushion))
    src = f"polar_express_schedule({steps}, lower={lower}, safety={safety}, cushion={cushion})"
    return Schedule("polar_express", rows, safety=safety, source=src, generator=(lower, cushion))


@functools.lru_cache(maxsize=64)
def _polar_express_rows(steps: int, lower: float, safety: float, cushion: float) -> tuple[Triple, ...]:
    """The rows of :func:`polar_express_schedule` (arguments already validated); cached, since
    :meth:`Schedule.rows` regenerates them on every call with more steps than the list."""
    lo, up = lower, 1.0
    out: list[Triple] = []
    for i in range(steps):
        a, b, c = optimal_quintic(max(lo, cushion * up), up)
        p_lo, p_up = a * lo + b * lo**3 + c * lo**5, a * up + b * up**3 + c * up**5
        s = 2.0 / (p_lo + p_up)
        a, b, c = a * s, b * s, c * s
        if i < steps - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        out.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        if 1.0 - lo <= _CONVERGED:
            lo = 1.0  # converged (see the docstring): also keeps lo <= up for the next solve
        up = 2.0 - lo
    return tuple(out)


#: Keller Jordan's Muon triple (KellerJordan/Muon, torch.optim.Muon): the one place it is written.
KELLER: Triple = (3.4445, -4.7750, 2.0315)

_YOU: tuple[Triple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# The published raw table (NoahAmsel/PolarExpress), i.e. the composition with ℓ₀ = 1e-3 and
# cushion 0.02407327424182761 and no safety; row 8 is printed rounded to its fixed point.
_PE_PAPER_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


# Turbo-Muon (arXiv 2512.04632): the 4 steps its reference implementation (thib-s/flash-newton-schulz,
# ``NS_ours``) runs after AOL preconditioning, the last four rows of You's list. None fixes 1 with zero
# slope, so more steps continue with the quintic fixed point. Not the 4-row list some peers ship as "aol"
# (first row (4.0098, -7.0585, 2.4635)): its composition maps σ ∈ (0.88, 1] to ≈ -1, i.e. it flips the
# sign of every direction AOL scales to near 1 (a rank-1 G reaches σ = 1 exactly).
_AOL: tuple[Triple, ...] = _YOU[1:]


def _with_safety(rows: Sequence[Triple], f: float) -> tuple[Triple, ...]:
    """Rows 1..k−1 divided by f (a/f, b/f³, c/f⁵), the last row exempt (the paper's convention)."""
    return tuple((a / f, b / f**3, c / f**5) for a, b, c in rows[:-1]) + (tuple(rows[-1]),)


SCHEDULES: dict[str, Schedule] = {
    "keller": Schedule(
        "keller", (KELLER,) * 5, 1.0, "Keller Jordan, Muon (KellerJordan/Muon); torch.optim.Muon default"
    ),
    "you": Schedule("you", _YOU, 1.0, "You Jiacheng 5-step (dion, Emerging-Optimizers 'quintic')"),
    "polar_express": polar_express_schedule(5, 1e-3, safety=1.02, cushion=0.02),
    "polar_express_paper": Schedule(
        "polar_express_paper",
        _with_safety(_PE_PAPER_RAW, 1.01),
        1.01,
        "Amsel et al. arXiv 2505.16932, 8 steps, rows 1-7 / 1.01, input / (1.01 ||G||_F)",
    ),
    "cubic": Schedule("cubic", ((1.5, -0.5, 0.0),) * 5, 1.0, "classical cubic Newton-Schulz"),
    "aol": Schedule(
        "aol", _AOL, 1.0, "Boissin et al., Turbo-Muon, arXiv 2512.04632: 4 steps after AOL preconditioning",
        precondition="aol",
    ),
}


def schedule_precondition(coefficients: str | Schedule | Sequence[Sequence[float]]) -> str | None:
    """The :attr:`Schedule.precondition` of a schedule spec (None for unknown names and plain triples:
    :func:`get_schedule` reports those)."""
    if isinstance(coefficients, Schedule):
        return coefficients.precondition
    if isinstance(coefficients, str) and coefficients in SCHEDULES:
        return SCHEDULES[coefficients].precondition
    return None


def get_schedule(
    coefficients: str | Schedule | Sequence[Sequence[float]], steps: int | None = None
) -> tuple[tuple[Triple, ...], float]:
    """Resolve a schedule spec to (per-step triples, safety).

    ``coefficients`` is a name in :data:`SCHEDULES`, a :class:`Schedule`, or a sequence of (a, b, c)
    triples (a fixed list, safety 1). ``steps=None`` gives the native length; fewer steps truncate;
    more follow :meth:`Schedule.rows`: ``"polar_express"`` (and any generated schedule) is regenerated
    for that count, every other list continues with its convergent tail (its last row if that row
    fixes 1 with zero slope, as for ``"cubic"`` and ``"polar_express_paper"``, else the quintic
    (15/8, −10/8, 3/8), as for ``"keller"`` and ``"you"``), so more steps never increase any
    singular value's distance to 1.

    A single flat triple ``(a, b, c)`` is torch.optim.Muon's ``ns_coefficients``: that triple on every
    one of ``steps`` steps (5 by default), as torch runs it, with no tail.
    """
    if isinstance(coefficients, str):
        try:
            sched = SCHEDULES[coefficients]
        except KeyError:
            raise ValueError(
                f"unknown schedule {coefficients!r}; choose one of {sorted(SCHEDULES)} "
                "or pass a sequence of (a, b, c) triples"
            ) from None
    elif isinstance(coefficients, Schedule):
        sched = coefficients
    else:
        rows = list(coefficients)
        if len(rows) == 3 and all(isinstance(v, (int, float)) for v in rows):
            steps = 5 if steps is None else _as_steps(steps, 0)
            rows = [rows] * max(steps, 1)
        try:
            triples = tuple((float(a), float(b), float(c)) for a, b, c in rows)
        except (TypeError, ValueError):
            raise ValueError(f"coefficients must be (a, b, c) triples, got {coefficients!r}") from None
        sched = Schedule("custom", triples, 1.0, "user")
    return sched.rows(steps), sched.safety


def composed_band(
    coefficients: Sequence[Triple], safety: float = 1.0, lower: float = 0.0, upper: float = 1.0,
    points: int = 200_001,
) -> tuple[float, float]:
    """[min, max] of the composed polynomial p_k∘…∘p_1(x / safety) for x in [lower, upper], float64.

    In exact arithmetic this is the band of the singular values of ``newton_schulz(G)`` for any G
    whose normalized singular values σ/ν(G) lie in [lower, upper] (upper = 1 always holds for the
    Frobenius and Gram bounds). Evaluated on a dense grid (log-spaced near 0, where the early
    polynomials are steep).
    """
    if not 0 <= lower <= upper:
        raise ValueError(f"need 0 <= lower <= upper, got {lower}, {upper}")
    lin = np.linspace(lower, upper, points // 2)
    log = np.geomspace(max(lower, 1e-12), upper, points // 2) if upper > 0 else lin
    x = np.concatenate([lin, log]) / safety
    for a, b, c in coefficients:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return float(x.min()), float(x.max())
