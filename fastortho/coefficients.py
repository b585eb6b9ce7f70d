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
  the last row the fixed point (15/8, −10/8, 3/8); input scaled by 1.01·‖G‖_F. Longer schedules
  repeat the last row, as the reference code does.
* ``"cubic"``: p(σ) = 1.5σ − 0.5σ³ every step, the classical Newton–Schulz iteration (seed 004);
  convergent for σ ∈ (0, √3), hence slow from small σ. Safety 1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Triple = tuple[float, float, float]

__all__ = [
    "Schedule",
    "SCHEDULES",
    "get_schedule",
    "optimal_quintic",
    "polar_express_schedule",
    "composed_band",
]


@dataclass(frozen=True)
class Schedule:
    """A Newton–Schulz coefficient schedule.

    Attributes:
        name: a short label (``"custom"`` for user sequences).
        coefficients: per-step (a, b, c) of p(σ) = aσ + bσ³ + cσ⁵; ``steps`` beyond the list repeat
            its last row (the convergent fixed point for Polar Express, the constant triple for Keller).
        safety: the input is divided by ``safety · ν(G)``; the value the list was derived with.
        source: where the numbers come from.
    """

    name: str
    coefficients: tuple[Triple, ...]
    safety: float = 1.0
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.coefficients) == 0:
            raise ValueError("a schedule needs at least one (a, b, c) triple")
        for t in self.coefficients:
            if len(t) != 3 or not all(math.isfinite(float(v)) for v in t):
                raise ValueError(f"each step must be a finite (a, b, c) triple, got {t!r}")
        if not (math.isfinite(self.safety) and self.safety > 0):
            raise ValueError(f"safety must be a positive finite number, got {self.safety}")

    @property
    def steps(self) -> int:
        """The schedule's native number of steps."""
        return len(self.coefficients)

    def take(self, steps: int | None = None) -> tuple[Triple, ...]:
        """The first ``steps`` triples (the native length when None); the last row repeats beyond it."""
        if steps is None:
            return self.coefficients
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        tail = (self.coefficients[-1],) * max(0, steps - len(self.coefficients))
        return (self.coefficients + tail)[:steps]


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


def polar_express_schedule(
    steps: int, lower: float = 1e-3, *, safety: float = 1.02, cushion: float = 0.02
) -> Schedule:
    """Generate a Polar Express schedule (Amsel et al. 2025, Algorithm 1) for any ℓ and step count.

    Greedy composition: with u₀ = 1, at each step take the minimax quintic on
    [max(ℓ, cushion·u), u] (cushioning keeps the polynomial monotone when ℓ is tiny), rescale it so
    p(ℓ) and p(u) sit symmetrically about 1 (1 − p(ℓ) = p(u) − 1), divide it by the safety factor on
    every step but the last (p(x) → p(x / safety), i.e. a/f, b/f³, c/f⁵, so that round-off cannot push
    σ past the interval), then update ℓ ← p(ℓ), u ← 2 − ℓ.

    ``polar_express_schedule(5, 1e-3, safety=1.02, cushion=0.02)`` reproduces the list used by
    modded-nanogpt and dion to ~1e-15, and the returned schedule scales its input by ``safety``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < lower <= 1:
        raise ValueError(f"lower must be in (0, 1], got {lower}")
    if safety < 1 or not 0 <= cushion < 1:
        raise ValueError(f"need safety >= 1 and 0 <= cushion < 1, got {safety}, {cushion}")
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
        up = 2.0 - lo
    src = f"polar_express_schedule({steps}, lower={lower}, safety={safety}, cushion={cushion})"
    return Schedule("polar_express", tuple(out), safety=safety, source=src)


_KELLER: Triple = (3.4445, -4.7750, 2.0315)

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


def _with_safety(rows: Sequence[Triple], f: float) -> tuple[Triple, ...]:
    """Rows 1..k−1 divided by f (a/f, b/f³, c/f⁵), the last row exempt (the paper's convention)."""
    return tuple((a / f, b / f**3, c / f**5) for a, b, c in rows[:-1]) + (tuple(rows[-1]),)


SCHEDULES: dict[str, Schedule] = {
    "keller": Schedule("keller", (_KELLER,), 1.0, "KellerJordan/Muon; torch.optim.Muon default"),
    "you": Schedule("you", _YOU, 1.0, "You Jiacheng 5-step (dion, Emerging-Optimizers 'quintic')"),
    "polar_express": polar_express_schedule(5, 1e-3, safety=1.02, cushion=0.02),
    "polar_express_paper": Schedule(
        "polar_express_paper",
        _with_safety(_PE_PAPER_RAW, 1.01),
        1.01,
        "Amsel et al. arXiv 2505.16932, 8 steps, rows 1-7 / 1.01, input / (1.01 ||G||_F)",
    ),
    "cubic": Schedule("cubic", ((1.5, -0.5, 0.0),), 1.0, "classical cubic Newton-Schulz (seed 004)"),
}

# Native lengths: constant-triple schedules default to 5 steps (Keller's Muon and seed 004).
_DEFAULT_STEPS = {"keller": 5, "cubic": 5}


def get_schedule(
    coefficients: str | Schedule | Sequence[Sequence[float]], steps: int | None = None
) -> tuple[tuple[Triple, ...], float]:
    """Resolve a schedule spec to (per-step triples, safety).

    ``coefficients`` is a name in :data:`SCHEDULES`, a :class:`Schedule`, or a sequence of (a, b, c)
    triples (safety 1; a single triple may be given as a flat 3-sequence, as in torch.optim.Muon's
    ``ns_coefficients``). ``steps=None`` gives the native length; longer repeats the last row.
    """
    if isinstance(coefficients, str):
        try:
            sched = SCHEDULES[coefficients]
        except KeyError:
            raise ValueError(
                f"unknown schedule {coefficients!r}; choose one of {sorted(SCHEDULES)} "
                "or pass a sequence of (a, b, c) triples"
            ) from None
        if steps is None:
            steps = _DEFAULT_STEPS.get(coefficients)
    elif isinstance(coefficients, Schedule):
        sched = coefficients
    else:
        rows = list(coefficients)
        if len(rows) == 3 and all(isinstance(v, (int, float)) for v in rows):
            rows = [rows]
            steps = 5 if steps is None else steps
        try:
            triples = tuple((float(a), float(b), float(c)) for a, b, c in rows)
        except (TypeError, ValueError):
            raise ValueError(f"coefficients must be (a, b, c) triples, got {coefficients!r}") from None
        sched = Schedule("custom", triples, 1.0, "user")
    return sched.take(steps), sched.safety


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
