"""Accuracy of every Newton–Schulz schedule × 3..8 steps, and CPU time per call against peers.

Prints the schedule tables of bench/RESULTS.md (it writes no file). Matrices (float64, fixed seeds):
1024×1024 and 1024×4096 Gaussian, 1024×4096 with σ log-spaced over [1e-4, 1]. For each: σ band
and ‖X − UVᵀ‖_F/‖UVᵀ‖_F against the float64 SVD, in fp32 (torch backend) and in the bf16 storage
model (``fastortho.bench.ns_bf16_model``: bf16 operands, fp32 accumulation and epilogue, one
rounding per product; a real CPU bf16 matmul runs ~175× slower and agrees with it,
tests/test_bench.py).

Timing (same run): ``fastortho.newton_schulz`` (torch backend, fp32, "keller" × 5) against a plain
PyTorch loop with the same coefficients (Keller-style: ``A = X@X.T; B = b*A + c*A@A; X = a*X + B@X``)
and ``torch.optim.Muon``'s internal NS (``torch.optim._muon._zeropower_via_newtonschulz``), which
forces bf16: on CPU it runs only at the small size. The accuracy tables carry no time column (one
call per row would be noise); speed is the timing table's job, a median over at least 5 calls.

The "aol" schedule (Turbo-Muon: AOL row rescaling instead of a norm, then 4 steps) is in the fp32
tables; its bf16 rows are the separate AOL table (the generic bf16 model divides by ‖G‖_F, which is not
the AOL iteration), which compares 4 AOL steps with 5 Polar Express steps at equal storage model,
with the matmul flops of each (AOL adds no matmul: step 1 reuses GGᵀ).

    python bench/bench_schedules.py            # ≈ 15 min on 2 CPU cores, progress on stderr
    python bench/bench_schedules.py --tiny     # seconds
    python bench/bench_schedules.py --aol-only # only the AOL table (≈ 2 min)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_string, timeit  # noqa: E402

import fastortho  # noqa: E402
from fastortho.bench import format_rows, gaussian, log_spaced, ns_bf16_model, schedule_rows  # noqa: E402
from fastortho.coefficients import KELLER as KJ  # noqa: E402
from fastortho.coefficients import SCHEDULES, get_schedule  # noqa: E402
from fastortho.flops import ns_flops  # noqa: E402
from fastortho.reference import polar_error, polar_svd, singular_band  # noqa: E402

NORM_SCALED = tuple(n for n, s in SCHEDULES.items() if s.precondition is None)


def aol_bf16_model(G: torch.Tensor, steps: int) -> torch.Tensor:
    """AOL-preconditioned Newton–Schulz in the bf16 storage model (``fastortho.bench.ns_bf16_model``)."""
    return ns_bf16_model(G, get_schedule("aol", steps)[0], 1.0, "aol")


def aol_rows(mats: dict[str, torch.Tensor]) -> list[dict]:
    """AOL-4 (and AOL-5) against Polar Express 5 on each matrix, fp32 torch backend and bf16 model."""
    rows = []
    pe, pe_safety = get_schedule("polar_express", 5)
    for label, G in mats.items():
        ref = polar_svd(G)
        G32 = G.float()
        m, n = G.shape
        for dtype in ("fp32", "bf16-model"):
            for name, k in (("aol", 4), ("polar_express", 5), ("aol", 5)):
                if dtype == "fp32":
                    X = fastortho.newton_schulz(G32, k, name, dtype=torch.float32)
                elif name == "aol":
                    X = aol_bf16_model(G32, k)
                else:
                    X = ns_bf16_model(G32, pe, pe_safety)
                lo, hi = singular_band(X)
                rows.append(dict(matrix=label, dtype=dtype, schedule=name, steps=k,
                                 error=polar_error(X, G, reference=ref).item(), lo=lo.item(), hi=hi.item(),
                                 gflop=ns_flops(m, n, k) / 1e9))
        print(f"  aol {label}: done", file=sys.stderr, flush=True)
    return rows


def print_aol_table(mats: dict[str, torch.Tensor]) -> None:
    print("\n### AOL-4 vs Polar Express 5 (error vs the float64 SVD polar factor)\n")
    print("| matrix | dtype | schedule | steps | error | σ_min | σ_max | matmul GFLOP |")
    print("|---|---|---|---|---|---|---|---|")
    for r in aol_rows(mats):
        print(f"| {r['matrix']} | {r['dtype']} | {r['schedule']} | {r['steps']} | {r['error']:.3e} | {r['lo']:.3f} "
              f"| {r['hi']:.3f} | {r['gflop']:.2f} |")


def plain_loop(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's loop, fp32, as users write it (separate ops, each rounds)."""
    a, b, c = KJ
    X = G.float()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if G.size(-2) > G.size(-1) else X


def torch_muon_ns(G: torch.Tensor) -> torch.Tensor:
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(G, KJ, 5, 1e-7)


def timing_rows(shapes, torch_muon_max_elems: int) -> list[dict]:
    rows = []
    start = time.perf_counter()
    for m, n in shapes:
        G = gaussian(m, n).float()
        cands = {
            "fastortho.newton_schulz (torch, fp32)": lambda: fastortho.newton_schulz(G, 5, "keller", dtype=torch.float32),
            "plain PyTorch loop (fp32)": lambda: plain_loop(G),
        }
        if m * n <= torch_muon_max_elems:
            cands["torch.optim.Muon NS (bf16, forced)"] = lambda: torch_muon_ns(G)
        for name, fn in cands.items():
            t = timeit(fn, "cpu", warmup=1, reps=7, min_time_s=1.0, max_time_s=60)
            flops = ns_flops(m, n, 5)
            rows.append(dict(shape=f"{m}x{n}", impl=name, p50_ms=t.p50, p20_ms=t.p20, p80_ms=t.p80,
                             gflops=flops / (t.p50 * 1e-3) / 1e9, n=t.n))
            print(f"  timing {m}x{n} {name}: {t.n} calls ({time.perf_counter() - start:.0f} s elapsed)",
                  file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="64-row matrices instead of 1024-row ones (seconds)")
    p.add_argument("--aol-only", action="store_true", help="only the AOL vs Polar Express table")
    p.add_argument("--markdown", action="store_true",
                   help="accepted for compatibility: the tables are always Markdown")
    args = p.parse_args(argv)
    if args.tiny:
        mats = {"64x64 Gaussian": gaussian(64, 64), "64x256 Gaussian": gaussian(64, 256),
                "64x256 log-spaced 1..1e-4": log_spaced(64, 256)}
        aol_mats = dict(mats, **{"64x256 log-spaced 1..1e-2": log_spaced(64, 256, smallest=1e-2)})
        shapes, tm_max = [(64, 256)], 64 * 256
    else:
        mats = {"1024x1024 Gaussian": gaussian(1024, 1024), "1024x4096 Gaussian": gaussian(1024, 4096),
                "1024x4096 log-spaced 1..1e-4": log_spaced(1024, 4096)}
        aol_mats = dict(mats, **{"1024x4096 log-spaced 1..1e-2": log_spaced(1024, 4096, smallest=1e-2),
                                 "4096x1024 Gaussian": gaussian(4096, 1024)})
        shapes, tm_max = [(256, 1024), (1024, 1024), (1024, 4096)], 256 * 1024
    print(f"# {device_string('cpu')}", flush=True)
    if args.aol_only:
        print_aol_table(aol_mats)
        return
    for label, G in mats.items():
        for dtype in ("fp32", "bf16-model"):
            print(f"\n### {label}, {dtype}\n")
            names = tuple(SCHEDULES) if dtype == "fp32" else NORM_SCALED  # AOL's bf16 rows: the AOL table
            print(format_rows(schedule_rows(G, dtype=dtype, reps=0, progress=True, schedules=names)), flush=True)
    print_aol_table(aol_mats)
    print("\n### CPU time per call, 5 steps of (3.4445, -4.7750, 2.0315)\n")
    rows = timing_rows(shapes, tm_max)
    print("| shape | implementation | p50 ms | p20 ms | p80 ms | calls | GFLOP/s (naive 4m²n+2m³ per step) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['impl']} | {r['p50_ms']:.1f} | {r['p20_ms']:.1f} | {r['p80_ms']:.1f} | {r['n']} "
              f"| {r['gflops']:.1f} |")
    print("\np20/p50/p80: percentiles of the wall time per call over `calls` timed calls after one warm-up; "
          "GFLOP/s counts the naive flops at p50 for every row, so Gram space shows as a higher rate.")


if __name__ == "__main__":
    main()
