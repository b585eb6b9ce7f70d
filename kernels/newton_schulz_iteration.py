"""The Newton–Schulz iterations built from the launchers: standard (X-space) and Gram-space.

Standard, per step (a, b, c) on X (k×L, k ≤ L):
    A = X Xᵀ (sym_mm),  B = b·A + c·A² (sym_mm, β-term in the epilogue),  X ← B·X + a·X (apply_q).
Matmul FLOPs per step with symmetric tiles: ≈ k²L + k³ + 2k²L (naive 4k²L + 2k³).

Gram-space (Zhang, Amsel, Chen, Dao 2026, "Gram Newton–Schulz"): with R = XXᵀ, one step maps
X ↦ (aI + bR + cR²)·X, so the whole iteration is X_k = Q·X₀ with Q a polynomial in R₀, and every
product involves only k×k symmetric matrices that commute:
    Z = b·R + c·R²,   Q ← Q·Z + a·Q  (Q = Z + aI at a (re)start),
    RZ = R·Z + a·R,   R ← Z·RZ + a·RZ    (= p(R)·R·p(R), the Gram matrix of the next X).
The long side L is touched only by R₀ = X₀X₀ᵀ, at restarts (X ← Q·X, R ← XXᵀ) and by the final
Q·X: 6k²L + ~14k³ FLOPs for 5 steps with one restart instead of 15k²L + 5k³, a win for L ≳ 1.5k.
Errors in R compound through the polynomial (R's eigenvalues are σ², so relative errors double
each step); restarts recompute R from X, and storage must be fp16 (10-bit mantissa): in bf16
(7-bit mantissa) σ_max overshoots far above 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .newton_schulz_launch import (apply_blas, apply_q, inv_norm_scale, line3_backend, scale_cast, sumsq_norm_scale,
                                   sym_mm)

Triple = tuple[float, float, float]


def default_restarts(steps: int) -> tuple[int, ...]:
    """Restart Gram-space before steps 3, 6, 9, …: segments of three steps.

    Gram Newton–Schulz restarts before step 2 of 5; restarting before step 3 recomputes R after
    the three large-coefficient steps that amplify its rounding error, for the same 3k²L, and
    keeps σ_max and the error at standard bf16 NS's level (``tests/interpret``,
    ``test_gram_space_targets``; numbers in ``bench/RESULTS.md``)."""
    return tuple(range(3, steps, 3))


class FirstStep(NamedTuple):
    """The normalized input X₀ = s·G, kept as t·X' (module docstring of ``kernels/newton_schulz.py``).

    A: X₀X₀ᵀ rounded to the storage dtype; X: X' = round(p·G), (B, k, L), contiguous, in the storage
    dtype (float32 with ``fp32_first``); t: (B,) fp32, the epilogue factor of the first apply;
    s: (B,) fp32, the full scale (used when there are no steps); None when X is X₀ itself ("aol")."""
    A: torch.Tensor
    X: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor | None


def first_step(Gv: torch.Tensor, *, normalize: str, safety: float, eps: float, cdt: torch.dtype,
               fp32_first: bool, sumsq: torch.Tensor | None = None) -> FirstStep:
    """Normalize G and form the first Gram product; s = 1/max(safety·ν, eps) per matrix.

    Norms are taken of G·p, p the power of two with max|G·p| in [1, 2) (exact scaling), so no
    square overflows or underflows whatever G's scale (``inv_norm_scale``). One pass writes
    X' = round(p·G) (``scale_cast``); every matmul reads X' as loaded, and t = s/p goes to the
    epilogues.
    "fro": ν = ‖G‖_F from the norm pass; A₀ = round(t²·X'X'ᵀ).
    "gram": ν = ‖GGᵀ‖_F^{1/2} (≥ σ_max): the Gram product X'X'ᵀ in an fp32 buffer (entries < 4·L: no
    overflow), its norm, and A₀ = round(t²·X'X'ᵀ).
    "aol": the AOL row scaling instead of a norm (:func:`aol_first_step`).
    ``fp32_first``: X' is kept in fp32 and the Gram product uses 3xTF32 dots (no input rounding).
    ``sumsq`` ((B,) ‖G_b‖_F², "fro" only): (s, p, t) from it (``sumsq_norm_scale``), no norm pass."""
    B, k, L = Gv.shape
    if normalize not in ("fro", "gram", "aol"):
        raise ValueError(f"normalize must be 'fro', 'gram' or 'aol', got {normalize!r}")
    if sumsq is not None and normalize != "fro":
        raise ValueError(f"sumsq is ‖G‖_F², the scale of normalize='fro' only, got normalize={normalize!r}")
    xdt = torch.float32 if fp32_first else cdt
    ns = (inv_norm_scale(Gv, safety=safety, eps=eps, root=2) if sumsq is None
          else sumsq_norm_scale(sumsq, safety=safety, eps=eps))
    X = scale_cast(Gv, ns.p, torch.empty(B, k, L, device=Gv.device, dtype=xdt))
    if normalize == "aol":
        return aol_first_step(Gv, X, ns.p, eps=eps, cdt=cdt, fp32_first=fp32_first)
    if normalize == "fro":
        A = sym_mm(X, X, torch.empty(B, k, k, device=Gv.device, dtype=cdt), scale=ns.t, round_dtype=xdt,
                   first_fp32=fp32_first)
        return FirstStep(A, X, ns.t, ns.s)
    raw = sym_mm(X, X, torch.empty(B, k, k, device=Gv.device, dtype=torch.float32), round_dtype=xdt,
                 first_fp32=fp32_first)
    sp = inv_norm_scale(raw, safety=safety, eps=eps, root=4, pre=ns.p)
    return FirstStep((raw * (sp.t * sp.t)[:, None, None]).to(cdt), X, sp.t, sp.s)


def aol_first_step(Gv: torch.Tensor, Xp: torch.Tensor, p: torch.Tensor, *, eps: float, cdt: torch.dtype,
                   fp32_first: bool) -> FirstStep:
    """AOL preconditioning (Prach & Lampert, "Almost-Orthogonal Layers"; Boissin et al., "Turbo-Muon")
    from X' = round(p·G): A' = X'X'ᵀ in an fp32 buffer (the symmetric kernel), then, per matrix,
    d_i = 1/max(√(Σ_j |A'_ij|), eps·p), X₀ = round(d ⊙ (p·G)) (rows scaled, from G in fp32: one
    rounding, as the torch backend's ``aol_precondition``) and A₀ = round(d_i·A'_ij·d_j) = X₀X₀ᵀ up to
    rounding, which the first step reuses. σ_max(X₀) ≤ 1 by the Schur test. The row scaling is two
    launches (``kernels/newton_schulz_aol.py``): the row sums and d, then A₀ and X₀ in one elementwise
    pass (A' read twice, G once, A₀ and X₀ written once; X₀ goes into X''s buffer, which is dead once
    A' is formed); no matmul, no host sync. NaN/Inf propagate within their matrix (a non-finite entry
    makes every row sum of A' non-finite). The epilogue factor t is 1."""
    from .newton_schulz_aol import aol_rescale

    B, k, L = Gv.shape
    raw = sym_mm(Xp, Xp, torch.empty(B, k, k, device=Gv.device, dtype=torch.float32), round_dtype=Xp.dtype,
                 first_fp32=fp32_first)
    A, X = aol_rescale(raw, Gv, p, torch.empty(B, k, k, device=Gv.device, dtype=cdt), Xp, eps=eps)
    return FirstStep(A, X, torch.ones(B, device=Gv.device, dtype=torch.float32), None)


def _first_x(on: bool) -> dict:
    """apply_q options for an fp32 X' (``fp32_first``): the input-rounding error E of X₀ = G + E
    would otherwise survive as q(A)·E, amplified by 1/σ_min, however exact the Gram product was."""
    return {"x_round_dtype": torch.float32, "first_fp32": True} if on else {}


def _poly(R: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """b·R + c·R² (fp32 epilogue, one rounding); c = 0 needs no product."""
    if c == 0.0:
        return (R.float() * b).to(R.dtype)
    return sym_mm(R, R, torch.empty_like(R), Y=R, alpha=c, beta=b)


def _no_steps(Gv: torch.Tensor, out: torch.Tensor, s: torch.Tensor | None, X: torch.Tensor,
              cdt: torch.dtype) -> torch.Tensor:
    """X₀ itself: s·G rounded once, or (s None, "aol") the row-scaled X already formed."""
    out.copy_((Gv.float() * s[:, None, None]).to(cdt) if s is not None else X.to(cdt))
    return out


def ns_standard(Gv: torch.Tensor, out: torch.Tensor, coefficients: Sequence[Triple], *, normalize: str,
                safety: float, eps: float, cdt: torch.dtype, fp32_first: bool,
                line3: str | None = None, sumsq: torch.Tensor | None = None) -> torch.Tensor:
    """Standard quintic NS on the logical wide view Gv (B, k, L); writes out (same logical view).

    ``line3``: "triton", "cublas" or "auto" (None: the ``FASTORTHO_NS_LINE3`` environment variable,
    else "auto", the (arch, shape) table of ``line3_backend``) for X ← a·X + B·X in steps after
    the first; the first step's apply carries the per-matrix scale t (and the fp32 X' of
    ``fp32_first``) in its epilogue, which ``torch.baddbmm`` cannot, so it is always the kernel.
    ``sumsq``: the given ‖G_b‖_F² that replaces the norm pass (:func:`first_step`)."""
    A, X, t, s = first_step(Gv, normalize=normalize, safety=safety, eps=eps, cdt=cdt, fp32_first=fp32_first,
                            sumsq=sumsq)
    steps = len(coefficients)
    if steps == 0:
        return _no_steps(Gv, out, s, X, cdt)
    blas = steps > 1 and line3_backend(Gv.shape[1], Gv.shape[2], Gv, line3) == "cublas"
    # Ping-pong buffers; X' serves as the second one once step 0 has read it.
    bufs = [torch.empty(Gv.shape, device=Gv.device, dtype=cdt) for _ in range(min(1, steps - 1))]
    if steps > 2:
        bufs.append(X if X.dtype == cdt else torch.empty(Gv.shape, device=Gv.device, dtype=cdt))
    Xscale = t
    for i, (a, b, c) in enumerate(coefficients):
        if i > 0:
            A = sym_mm(X, X, A)
        Bm = _poly(A, b, c)
        dst = out if i == steps - 1 else bufs[i % 2]
        if blas and i > 0:
            apply_blas(Bm, X, dst, a=a)
        else:
            apply_q(Bm, X, dst, a=a, scale=Xscale, round_dtype=cdt, **_first_x(i == 0 and fp32_first))
        X, Xscale = dst, None
    return out


def ns_gram(Gv: torch.Tensor, out: torch.Tensor, coefficients: Sequence[Triple], *, normalize: str,
            safety: float, eps: float, cdt: torch.dtype, fp32_first: bool,
            restarts: Sequence[int] | None = None, sumsq: torch.Tensor | None = None) -> torch.Tensor:
    """Gram-space NS (module docstring) on the logical wide view Gv (B, k, L) in storage ``cdt``
    (``sumsq``: as in :func:`ns_standard`)."""
    steps = len(coefficients)
    restarts = set(default_restarts(steps) if restarts is None else restarts) - {0}
    R, X, Xscale, s = first_step(Gv, normalize=normalize, safety=safety, eps=eps, cdt=cdt, fp32_first=fp32_first,
                                 sumsq=sumsq)
    if steps == 0:
        return _no_steps(Gv, out, s, X, cdt)
    Q = None
    for i, (a, b, c) in enumerate(coefficients):
        if i in restarts:
            Xn = torch.empty(Gv.shape, device=Gv.device, dtype=cdt)
            apply_q(Q, X, Xn, scale=Xscale, round_dtype=cdt, **_first_x(Xscale is not None and fp32_first))
            X, Xscale, Q = Xn, None, None
            R = sym_mm(X, X, R)
        Z = _poly(R, b, c)
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = sym_mm(Q, Z, torch.empty_like(Q), Y=Q, alpha=1.0, beta=a)
        if i < steps - 1 and (i + 1) not in restarts:
            RZ = sym_mm(R, Z, torch.empty_like(R), Y=R, alpha=1.0, beta=a)
            R = sym_mm(Z, RZ, torch.empty_like(R), Y=RZ, alpha=1.0, beta=a)
    apply_q(Q, X, out, scale=Xscale, round_dtype=cdt, **_first_x(Xscale is not None and fp32_first))
    return out


def matmul_flops(k: int, L: int, steps: int, *, gram: bool, tile: int | None = None,
                 restarts: Sequence[int] | None = None) -> float:
    """Matmul FLOPs the kernels perform for one call on a k×L input (k ≤ L), c ≠ 0 assumed.

    Symmetric products cost the fraction f of a full product that their computed tiles cover:
    tile=None counts the exact upper triangle (k+1)/(2k) (the element count of a symmetric product);
    an integer tile size counts whole triangle tiles, (T+1)/(2T) with T = ⌈k/tile⌉ (what the
    kernels actually execute)."""
    if tile is None:
        f = (k + 1) / (2 * k)
    else:
        T = -(-k // tile)
        f = (T + 1) / (2 * T)
    sym_rect, sym_sq, rect = f * 2 * k * k * L, f * 2 * k ** 3, 2 * k * k * L
    if not gram:
        return steps * (sym_rect + sym_sq + rect)
    restarts = set(default_restarts(steps) if restarts is None else restarts) - {0}
    tot, q_started = sym_rect, False
    for i in range(steps):
        if i in restarts:
            tot += rect + sym_rect
            q_started = False
        tot += sym_sq                       # Z
        if q_started:
            tot += sym_sq                   # Q·Z
        q_started = True
        if i < steps - 1 and (i + 1) not in restarts:
            tot += 2 * sym_sq               # R·Z, Z·RZ
    return tot + rect                       # final Q·X
