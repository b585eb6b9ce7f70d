#!/usr/bin/env python
"""Benchmark of Newton–Schulz (5 Polar Express steps, bf16): Triton kernels vs torch backend vs plain loop.

Per shape (B, m, n) and implementation it reports
  * FLOPs: naive 4m²n + 2m³ per step and matrix (m ≤ n; the convention of dion and the anchors
    note) and the matmul FLOPs the Triton kernels actually execute (whole triangle tiles of the
    chosen config, Gram-space where chosen);
  * effective TFLOP/s = naive FLOPs / time (it can exceed the peak when symmetry is exploited) and
    its fraction of the device's dense bf16 peak;
  * p20 / p50 / p80 milliseconds (``bench/common.py``: CUDA events on a GPU).
Implementations: ``triton`` (automatic standard/Gram choice), ``triton-standard`` and
``triton-gram`` where they differ, ``triton-std-cublas3`` (standard, line 3 X ← a·X + B·X by
cuBLAS: its p50 against the kernel's gives the rows of ``kernels/_config.LINE3``, printed at the
end on a GPU), ``triton-graphed`` (small inputs, one CUDA graph per call signature), ``torch`` (fastortho's torch backend, baddbmm), ``loop`` (the
plain PyTorch loop A = X@Xᵀ; B = b*A + c*(A@A); X = a*X + B@X) and, for batches,
``triton-per-matrix`` / ``loop-per-matrix`` (one call per matrix).

Prints the FLOP ratios, a timing table and the speed goals on an H100 SXM; writes a CSV and a PNG
to ``--out DIR`` (default: a new temporary folder; the path is printed).

    python bench/bench_newton_schulz.py                      # GPU, full shape list
    python bench/bench_newton_schulz.py --device cpu --tiny  # seconds: tiny shapes, torch paths
                                                             # (+ triton with TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_string, timeit, tflops, write_csv  # noqa: E402

from fastortho.coefficients import get_schedule  # noqa: E402
from fastortho.flops import ns_flops  # noqa: E402
from fastortho.kernels import HAS_TRITON, interpreter_enabled  # noqa: E402
from fastortho.kernels._config import pick_sym  # noqa: E402
from fastortho.kernels.newton_schulz_iteration import matmul_flops  # noqa: E402
from fastortho.ns_torch import newton_schulz_torch  # noqa: E402

FULL = [(1, 1024, 1024), (1, 2048, 2048), (1, 4096, 4096), (1, 8192, 8192), (1, 4096, 16384),
        (24, 768, 3072), (64, 128, 128)]
TINY = [(1, 64, 64), (1, 32, 128), (3, 24, 96), (4, 16, 16)]

# Dense bf16 tensor-core peaks (TFLOP/s, datasheets; anchors-performance.md §5.1).
PEAKS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
         "A100": 312.0}

# Speed goals on an H100 SXM (ms, 5 steps, bf16) and the compute floors at 989 TFLOP/s.
GOALS = {(1, 4096, 4096): ("triton", 1.9, "floor 1.39 ms symmetric (1.37e12 FLOP), 2.08 ms naive"),
         (1, 4096, 16384): ("triton-gram", 3.6, "floor 2.64 ms Gram-space (2.61e12 FLOP)"),
         ("std", 1, 4096, 16384): ("triton-standard", 5.8, "floor 4.52 ms symmetric (4.47e12 FLOP)")}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAKS.items():
        if key in name:
            return v
    return None


def naive_flops(B: int, m: int, n: int, steps: int) -> float:
    return float(ns_flops(m, n, steps, batch=B))


def plain_loop(G, co, safety):
    """The plain PyTorch loop with the same coefficients (eager bf16: every op rounds)."""
    X = G.mT if G.shape[-2] > G.shape[-1] else G
    X = (X.float() / (safety * torch.linalg.vector_norm(X.float(), dim=(-2, -1), keepdim=True)).clamp_min(1e-7))
    X = X.to(torch.bfloat16)
    for a, b, c in co:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if G.shape[-2] > G.shape[-1] else X


def implementations(G, co, safety, triton_ok):
    from functools import partial

    B, m, n = G.shape
    kw = dict(safety=safety, normalize="fro", eps=1e-7, compute_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    impls = {}
    if triton_ok:
        from fastortho.ops.newton_schulz import newton_schulz_triton, use_gram

        impls["triton"] = partial(newton_schulz_triton, G, co, **kw)
        if max(m, n) >= 1.5 * min(m, n):
            other = "triton-standard" if use_gram(m, n) else "triton-gram"
            impls[other] = partial(newton_schulz_triton, G, co, gram=other == "triton-gram", **kw)
        if B > 1:
            impls["triton-per-matrix"] = lambda: [newton_schulz_triton(G[i:i + 1], co, **kw) for i in range(B)]
        # line 3 (X ← a·X + B·X) by cuBLAS instead of the apply kernel (standard iteration)
        impls["triton-std-cublas3"] = _with_env("FASTORTHO_NS_LINE3", "cublas",
                                                partial(newton_schulz_triton, G, co, gram=False, **kw))
        from fastortho.ops.newton_schulz import GRAPH_MAX_NUMEL
        if G.device.type == "cuda" and G.numel() <= GRAPH_MAX_NUMEL:
            impls["triton-graphed"] = _with_env("FASTORTHO_NS_CUDA_GRAPHS", "1",
                                                partial(newton_schulz_triton, G, co, **kw))
    impls["torch"] = partial(newton_schulz_torch, G, co, **kw)
    impls["loop"] = partial(plain_loop, G, co, safety)
    if B > 1:
        impls["loop-per-matrix"] = lambda: [plain_loop(G[i:i + 1], co, safety) for i in range(B)]
    return impls


def _with_env(name: str, value: str, fn):
    """fn called with the environment variable ``name`` set to ``value`` (restored after)."""
    import os

    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def line3_rows(rows, device) -> list[str]:
    """``_config.LINE3`` rows: per shape, "cublas" where the standard iteration with line 3 on cuBLAS
    beat the one with the apply kernel (p50), else "triton"; keyed like the table."""
    from fastortho.kernels._config import line3_key

    if device.type != "cuda":
        return []
    major, minor = torch.cuda.get_device_capability(device)
    p50 = {(r["shape"], r["impl"]): r["ms_p50"] for r in rows}
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        B, m, n = map(int, shape.split("x"))
        cub = p50.get((shape, "triton-std-cublas3"))
        # the standard iteration with the apply kernel: "triton" unless the shape goes to Gram space
        tri = p50.get((shape, "triton-standard")) if _gram_auto(m, n) else p50.get((shape, "triton"))
        if cub is None or tri is None:
            continue
        key = line3_key(10 * major + minor, min(m, n), max(m, n))
        out.append(f"    {key}: {'cublas' if cub < tri else 'triton'!r},   # {shape}: cuBLAS {cub:.3f} ms, "
                   f"kernel {tri:.3f} ms")
    return out


def _gram_auto(m: int, n: int) -> bool:
    from fastortho.ops.newton_schulz import use_gram

    return use_gram(m, n)


def kernel_flops(impl: str, B: int, m: int, n: int, steps: int, device: torch.device) -> float:
    """Matmul FLOPs an implementation executes (tile-level for the Triton kernels)."""
    k, L = min(m, n), max(m, n)
    if not impl.startswith("triton"):
        return naive_flops(B, m, n, steps)
    from fastortho.ops.newton_schulz import use_gram

    gram = impl == "triton-gram" or (impl in ("triton", "triton-per-matrix", "triton-graphed") and use_gram(m, n))
    arch = 90
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    tile = pick_sym(k, L, 2, arch, interpreter_enabled() or device.type != "cuda").block_m
    return B * matmul_flops(k, L, steps, gram=gram, tile=tile)


def flop_table(shapes, steps: int) -> list[dict]:
    """Analytic FLOP ratios (no device needed): what the kernels save against the plain loop."""
    rows = []
    for B, m, n in shapes:
        k, L = min(m, n), max(m, n)
        naive = naive_flops(1, m, n, steps)
        tile = pick_sym(k, L, 2, 90, False).block_m
        row = {"shape": f"{B}x{m}x{n}", "naive": naive,
               "sym_exact": matmul_flops(k, L, steps, gram=False) / naive,
               "sym_tiles": matmul_flops(k, L, steps, gram=False, tile=tile) / naive}
        if L >= 1.5 * k:
            row["gram_exact"] = matmul_flops(k, L, steps, gram=True) / naive
            row["gram_tiles"] = matmul_flops(k, L, steps, gram=True, tile=tile) / naive
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (default when a GPU is visible) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: seconds on a CPU")
    ap.add_argument("--steps", type=int, default=5, help="Newton–Schulz steps per call (default 5)")
    ap.add_argument("--reps", type=int, default=20,
                    help="timed calls per case; p20/p50/p80 are reported (default 20; 3 for Triton on CPU)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="folder for the CSV and the PNG (default: a new temporary folder, printed)")
    ap.add_argument("--impl", action="append",
                    help="only these implementations (repeatable): triton, triton-standard, triton-gram, "
                         "triton-per-matrix, triton-std-cublas3 (line 3 on cuBLAS), triton-graphed "
                         "(FASTORTHO_NS_CUDA_GRAPHS=1, small inputs), torch, loop, loop-per-matrix")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    shapes = TINY if args.tiny else FULL
    co, safety = get_schedule("polar_express", args.steps)
    triton_ok = HAS_TRITON and (device.type == "cuda" or interpreter_enabled())
    dev = device_string(device)
    peak = peak_tflops(device)
    print(f"# Newton–Schulz, {args.steps} Polar Express steps, bf16 | {dev}")
    print(f"# peak {peak or 'unknown'} TFLOP/s; triton {'on' if triton_ok else 'off (needs CUDA or TRITON_INTERPRET=1)'}\n")

    print("## Matmul FLOPs per call relative to the plain loop (4m²n + 2m³ per step)\n")
    print("| shape | naive FLOPs | standard, exact triangle | standard, tiles | Gram, exact | Gram, tiles |")
    print("|---|---|---|---|---|---|")

    def ratio(r, key):
        return f"{r[key]:.4f}" if key in r else "—"

    for r in flop_table(FULL, args.steps):
        print(f"| {r['shape']} | {r['naive']:.3e} | {r['sym_exact']:.4f} | {r['sym_tiles']:.4f} | "
              f"{ratio(r, 'gram_exact')} | {ratio(r, 'gram_tiles')} |")
    print("\nMatmul FLOPs the kernels execute ÷ the plain loop's: exact = upper triangle of each symmetric "
          "product, tiles = whole triangle tiles; — = Gram space not used (long side < 1.5 × short side).\n")

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastortho-bench-ns-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"# CSV and PNG go to {out_dir}\n", flush=True)
    started = time.perf_counter()
    tag = "tiny" if args.tiny else device.type
    csv_path = out_dir / f"newton_schulz_{tag}.csv"
    rows = []
    print("| shape | impl | p20 ms | p50 ms | p80 ms | naive GFLOP | executed GFLOP | eff. TFLOP/s | % peak | vs loop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for B, m, n in shapes:
        G = torch.randn(B, m, n, device=device, dtype=torch.float32)
        impls = implementations(G, co, safety, triton_ok)
        if args.impl:
            impls = {k: v for k, v in impls.items() if k in args.impl}
        nf = naive_flops(B, m, n, args.steps)
        res = {}
        for name, fn in impls.items():
            reps = 3 if (device.type == "cpu" and name.startswith("triton")) else args.reps
            t = timeit(fn, device, warmup=1 if device.type == "cpu" else 3, reps=reps, max_time_s=60)
            res[name] = t
            print(f"  {B}x{m}x{n} {name}: {t.n} calls ({time.perf_counter() - started:.1f} s elapsed)",
                  file=sys.stderr, flush=True)
            eff = tflops(nf, t.p50)
            row = {"device": dev, "shape": f"{B}x{m}x{n}", "impl": name, "steps": args.steps,
                   **t.as_dict("ms_"), "naive_flops": nf,
                   "executed_flops": kernel_flops(name, B, m, n, args.steps, device),
                   "eff_tflops": eff, "pct_peak": (100 * eff / peak) if peak else float("nan")}
            rows.append(row)
        base = res.get("loop")
        for row in rows[-len(res):]:
            sp = base.p50 / row["ms_p50"] if base else float("nan")
            row["speedup_vs_loop"] = sp
            pct = (f"{row['pct_peak']:.1f}" if math.isfinite(row["pct_peak"])
                   else ("n/a on CPU" if device.type == "cpu" else "n/a (peak unknown)"))
            vs = f"{sp:.2f}×" if base else "n/a (no loop row)"
            print(f"| {row['shape']} | {row['impl']} | {row['ms_p20']:.3f} | {row['ms_p50']:.3f} | {row['ms_p80']:.3f} | "
                  f"{row['naive_flops'] / 1e9:.4g} | {row['executed_flops'] / 1e9:.4g} | {row['eff_tflops']:.4g} | "
                  f"{pct} | {vs} |", flush=True)
        if "triton" in res and "triton-per-matrix" in res:
            print(f"|  |  batched triton vs per-matrix: triton {res['triton-per-matrix'].p50 / res['triton'].p50:.2f}×, "
                  f"loop {res.get('loop-per-matrix', res['triton']).p50 / res['triton'].p50:.2f}× |")
        del G
    print("\np20/p50/p80: percentiles of the time per call (CUDA events on a GPU, wall clock on a CPU); "
          "eff. TFLOP/s = naive FLOPs / p50; % peak against the GPU's dense bf16 peak; "
          "vs loop: the plain PyTorch loop's p50 ÷ this row's.")
    write_csv(csv_path, rows)
    print(f"\nCSV: {csv_path}")
    _plot(rows, out_dir / f"newton_schulz_{tag}.png", dev)
    _goals(rows, device)
    l3 = line3_rows(rows, device)
    if l3:
        print("\n## Line 3 table rows for kernels/_config.LINE3 (standard iteration, p50)\n")
        print("\n".join(l3))
    return 0


def _plot(rows, path, dev):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(shapes)), 4))
    w = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, s in enumerate(shapes):
            for r in rows:
                if r["shape"] == s and r["impl"] == impl:
                    xs.append(i + j * w)
                    ys.append(r["eff_tflops"])
        ax.bar(xs, ys, width=w, label=impl)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(shapes))], shapes, rotation=20, fontsize=8)
    ax.set_ylabel("effective TFLOP/s (naive FLOPs / p50)")
    ax.set_title(f"Newton–Schulz 5 steps bf16\n{dev}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"PNG: {path}")


def _goals(rows, device):
    if device.type != "cuda":
        print("\nGoals (H100 SXM): timings need a GPU; FLOP ratios above are the measurable part.")
        return
    print("\n## Speed goals (H100 SXM)\n")

    def p50(shape, impl):
        return next((r["ms_p50"] for r in rows if r["shape"] == shape and r["impl"] == impl), math.nan)

    for key, (impl, goal, floor) in GOALS.items():
        B, m, n = key[-3:]
        t = p50(f"{B}x{m}x{n}", impl)
        print(f"- {B}x{m}x{n} {impl}: {t:.3f} ms (goal ≤ {goal} ms, {floor}) "
              f"{'PASS' if t <= goal else 'MISS'}")
    for shape in ("24x768x3072", "64x128x128"):
        t, pm = p50(shape, "triton"), p50(shape, "loop-per-matrix")
        print(f"- {shape} batched triton vs per-matrix loop: {pm / t:.2f}× (goal ≥ 3×) {'PASS' if pm / t >= 3 else 'MISS'}")


if __name__ == "__main__":
    sys.exit(main())
