"""``python -m fastortho.bench``: every schedule × 3..8 steps: σ band, error vs the float64 SVD, time.

The quick job on CPU (the README's first command). ``bench/bench_schedules.py`` runs the same
measurement at the sizes recorded in ``bench/RESULTS.md``.

Columns: σ_min/σ_max of the output (1 is orthogonal), ‖X − UVᵀ‖_F/‖UVᵀ‖_F against the float64
SVD polar factor, and the median wall time of ``--reps`` calls (``--reps 0`` drops the time column). ``--dtype bf16-model`` evaluates the bf16
storage model with fp32 matmuls (every product and its fused combination computed in fp32 from
bf16 operands and rounded once to bf16, as cuBLAS/Triton epilogues do): a CPU bf16 matmul is
~175× slower than fp32 here, and this model matches it (``tests/test_bench.py`` checks).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .coefficients import SCHEDULES, get_schedule, schedule_precondition
from .ns_torch import scale_input
from .newton_schulz import newton_schulz
from .reference import polar_error, polar_svd, singular_band

__all__ = ["gaussian", "log_spaced", "ns_bf16_model", "schedule_rows", "format_rows", "main"]


def gaussian(m: int, n: int, seed: int = 0) -> Tensor:
    """Standard Gaussian m×n matrix, float64."""
    return torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def log_spaced(m: int, n: int, smallest: float = 1e-4, seed: int = 0) -> Tensor:
    """m×n float64 matrix with Haar singular vectors and σ log-spaced over [smallest, 1]."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k, dtype=torch.float64)
    return (U * s) @ V.mT


def _bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def ns_bf16_model(G: Tensor, coefficients: Sequence[tuple[float, float, float]], safety: float,
                  normalize: str = "fro") -> Tensor:
    """Newton–Schulz in the bf16 storage model, computed with fp32 matmuls (see module docstring).
    ``normalize="aol"`` for the schedules that replace the norm by AOL row scaling: its Gram matrix
    D·GGᵀ·D comes from the fp32 rescale and is rounded once, as X₀ is, and step 1 reuses it."""
    tall = G.shape[-2] > G.shape[-1]
    X, A = scale_input((G.mT if tall else G)[None].float(), safety=safety, normalize=normalize, eps=1e-7)
    X = _bf16(X)
    for i, (a, b, c) in enumerate(coefficients):
        A = _bf16(A) if i == 0 and A is not None else _bf16(X @ X.mT)
        B = _bf16(b * A + c * (A @ A))
        X = _bf16(a * X + B @ X)
    X = X[0]
    return X.mT if tall else X


def _median_ms(fn: Callable[[], object], reps: int, min_time_s: float = 0.1) -> float:
    """Median wall time of at least ``reps`` calls (more, until ``min_time_s`` has passed), after one
    warm-up call: a single call on a shared CPU varies by several times, the median of many does not."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def schedule_rows(
    G: Tensor, *, dtype: str = "fp32", steps: Sequence[int] = range(3, 9), reps: int = 5,
    schedules: Sequence[str] = tuple(SCHEDULES), progress: bool = False,
) -> list[dict]:
    """One row per (schedule, steps) for the float64 matrix G: band, error vs SVD, and the median ms per
    call over ``reps`` calls (``reps=0``: no timing, ``ms`` is None). ``progress`` prints one line per
    schedule with the elapsed time to stderr."""
    ref = polar_svd(G)
    G32 = G.to(torch.float32)
    rows = []
    start = time.perf_counter()
    for name in schedules:
        for k in steps:
            if dtype == "fp32":
                fn = lambda: newton_schulz(G32, k, name, dtype=torch.float32)  # noqa: E731
            elif dtype == "bf16-model":
                coeffs, safety = get_schedule(name, k)
                norm = schedule_precondition(name) or "fro"
                fn = lambda: ns_bf16_model(G32, coeffs, safety, norm)  # noqa: E731
            else:
                raise ValueError(f"dtype must be 'fp32' or 'bf16-model', got {dtype!r}")
            X = fn()
            lo, hi = singular_band(X)
            rows.append(dict(
                schedule=name, steps=k, dtype=dtype, sigma_min=lo.item(), sigma_max=hi.item(),
                error=polar_error(X, G, reference=ref).item(), ms=_median_ms(fn, reps) if reps > 0 else None,
            ))
        if progress:
            print(f"  {name} {dtype}: done ({time.perf_counter() - start:.1f} s elapsed)", file=sys.stderr,
                  flush=True)
    return rows


LEGEND = ("σ_min, σ_max: smallest and largest singular value of the output (1 = orthogonal); error: "
          "‖X − UVᵀ‖_F / ‖UVᵀ‖_F against the float64 SVD polar factor")


def format_rows(rows: list[dict], reps: int | None = None) -> str:
    """Markdown table of :func:`schedule_rows` output, with a one-line legend under it."""
    timed = any(r["ms"] is not None for r in rows)
    head = "| schedule | steps | dtype | σ_min | σ_max | error vs SVD |" + (" ms/call |" if timed else "")
    out = [head, "|---" * (7 if timed else 6) + "|"]
    for r in rows:
        out.append(
            f"| {r['schedule']} | {r['steps']} | {r['dtype']} | {r['sigma_min']:.3f} | {r['sigma_max']:.3f} "
            f"| {r['error']:.2e} |" + (f" {r['ms']:.2f} |" if timed else "")
        )
    legend = LEGEND
    if timed:
        legend += f"; ms/call: median wall time of {reps if reps else 'several'} or more calls, after one warm-up"
    return "\n".join(out) + "\n\n" + legend + "."


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastortho.bench", description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=256, help="rows of the test matrix (default 256)")
    p.add_argument("--n", type=int, default=1024, help="columns of the test matrix (default 1024)")
    p.add_argument("--matrix", choices=["gaussian", "log-spaced"], default="gaussian",
                   help="standard Gaussian entries, or Haar singular vectors with σ log-spaced over [1e-4, 1]")
    p.add_argument("--dtype", choices=["fp32", "bf16-model"], default="fp32",
                   help="fp32 (fastortho.newton_schulz) or the bf16 storage model computed with fp32 matmuls")
    p.add_argument("--reps", type=int, default=5,
                   help="timed calls per row (at least; more until 0.1 s); the median is reported (default 5; 0: no time column)")
    args = p.parse_args(argv)
    G = gaussian(args.m, args.n) if args.matrix == "gaussian" else log_spaced(args.m, args.n)
    print(f"# Newton–Schulz schedules on a {args.m}x{args.n} {args.matrix} matrix, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    print(format_rows(schedule_rows(G, dtype=args.dtype, reps=args.reps, progress=True), args.reps))


if __name__ == "__main__":
    main()
