"""One Muon ``step()`` on a GPT-2-small-shaped set of matrices, three implementations side by side.

* **plain fp32**: a per-parameter PyTorch loop of the same update in fp32 (momentum with ``lerp``,
  Keller's 5-step NS with ``mm``/``addmm``, decoupled decay, ``√max(1, m/n)`` scale). The fair
  baseline for what fastortho adds: batching of same-shape matrices, fused momentum/apply (``_C``)
  and, where the NS backend has it, Gram-space iteration.
* **fastortho.Muon** with the same settings (Keller's triple, 5 steps, fp32 NS: ``ns_dtype=None`` on CPU).
* **torch.optim.Muon** as users get it: it always runs NS in bf16, and a CPU bf16 matmul is ~100×
  slower than fp32 (measured below), so its time says more about the dtype than the algorithm. At
  full size it would take most of an hour; it is timed on one ``d×d`` matrix and scaled by FLOPs
  (labelled "extrapolated") unless ``--torch-muon full``.

The matrices are the Muon part of GPT-2 small (12 layers, d = 768, nn.Linear layout ``(out, in)``):
per layer ``qkv (3d, d)``, ``attn proj (d, d)``, ``fc (4d, d)``, ``mlp proj (d, 4d)``: 85 M parameters.
Embeddings and LayerNorm gains go to AdamW in every variant and are left out.

FLOPs: NS on an m×n matrix (m ≤ n) costs 5·(4m²n + 2m³) per step in plain matmuls.

Usage::

    python bench/bench_optimizer.py            # full size, ≈ 4 min on 2 cores; one progress line per rep
    python bench/bench_optimizer.py --tiny     # seconds

At ``--tiny`` size fastortho.Muon is *slower* than the plain loop, and the script says why: the step
costs a few milliseconds, so fixed per-call costs dominate (see ``TINY_NOTE``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Timing, device_string, write_csv  # noqa: E402

from fastortho.coefficients import KELLER as KJ  # noqa: E402
from fastortho.flops import ns_flops as _ns_flops  # noqa: E402
from fastortho.optim import Muon  # noqa: E402

LR, WD, BETA = 0.02, 0.1, 0.95


def gpt2_shapes(layers: int, d: int) -> list[tuple[int, int]]:
    return [s for _ in range(layers) for s in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def ns_flops(shapes: list[tuple[int, int]], steps: int = 5) -> float:
    """NS flops of one optimizer step over ``shapes`` (``fastortho.flops.ns_flops`` per matrix)."""
    return float(sum(_ns_flops(m, n, steps) for m, n in shapes))


def plain_ns(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Keller's NS on one matrix in G's dtype, written as users write it (torch.optim.Muon's loop)."""
    a, b, c = KJ
    X = G.T if G.size(0) > G.size(1) else G
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if G.size(0) > G.size(1) else X


@torch.no_grad()
def plain_step(params, grads, bufs) -> None:
    for p, g, buf in zip(params, grads, bufs):
        buf.lerp_(g, 1 - BETA)
        u = g.lerp(buf, BETA)
        O = plain_ns(u)
        p.mul_(1 - LR * WD)
        p.add_(O, alpha=-LR * max(1, p.size(0) / p.size(1)) ** 0.5)


def make(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(0.02 * torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


TINY_NOTE = (
    "Why fastortho.Muon is slower here: at d={d} a whole step costs a few milliseconds, so fixed per-call "
    "costs dominate, not matmuls. fastortho's Newton–Schulz guards every input (power-of-two prescaling "
    "against overflow, zero and non-finite matrices) and the optimizer buckets matrices and dispatches its "
    "fused ops: about {extra:.1f} ms more CPU per step than the plain loop here, for {k} matrices. The plain "
    "loop has none of these guards. At GPT-2 size (d=768) they are under 1% of the step, and fastortho.Muon "
    "is the faster one (bench/RESULTS.md, summary)."
)


def interleaved(fns: dict, reps: int, warmup: int = 1,
                progress: Callable[[str], None] | None = None) -> tuple[dict[str, Timing], dict[str, Timing]]:
    """Time several callables alternately, rep by rep; return (wall, cpu) timings in ms.

    On a shared machine the wall clock measures the neighbours as much as the code (here, with a load
    average of 7–16 on 2 cores, wall time was 2–6× the CPU time and drifted between reps), so the
    process CPU time (``time.process_time``, all threads of this process) is reported next to it:
    with ``--threads 1`` it is the compute cost alone. Alternating the implementations makes the
    wall-clock comparison fair too, if noisy."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for rep in range(reps):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            cpu[k].append((time.process_time() - c0) * 1e3)
            wall[k].append((time.perf_counter() - t0) * 1e3)
        if progress is not None:
            progress(f"rep {rep + 1}/{reps}: " + ", ".join(f"{k} {cpu[k][-1]:.0f} ms CPU" for k in fns)
                     + f" ({time.perf_counter() - start:.0f} s elapsed)")

    def pct(xs: list[float]) -> Timing:
        q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
        return Timing(q[1], statistics.median(xs), q[7], len(xs))

    return {k: pct(v) for k, v in wall.items()}, {k: pct(v) for k, v in cpu.items()}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2 layers, d=64 (seconds)")
    ap.add_argument("--layers", type=int, default=12, help="transformer layers, 4 matrices each (default 12)")
    ap.add_argument("--d", type=int, default=768, help="model width (default 768, GPT-2 small)")
    ap.add_argument("--reps", type=int, default=5,
                    help="timed steps per implementation, interleaved; the median is reported (default 5)")
    ap.add_argument("--torch-muon", choices=["full", "one", "skip"], default=None,
                    help="time torch.optim.Muon on the full set, on one d×d matrix (default at full size), "
                         "or not at all")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--csv", default=None, help="append rows to this CSV")
    args = ap.parse_args()
    if args.tiny:
        args.layers, args.d, args.reps = 2, 64, 15
    if args.threads:
        torch.set_num_threads(args.threads)
    torch_mode = args.torch_muon or ("full" if args.tiny else "one")
    shapes = gpt2_shapes(args.layers, args.d)
    flops = ns_flops(shapes)
    nparam = sum(m * n for m, n in shapes)
    print(f"# device: {device_string('cpu')}")
    print(f"# {args.layers} layers, d={args.d}: {len(shapes)} matrices, {nparam / 1e6:.1f} M params, "
          f"NS {flops / 1e9:.1f} GFLOP per step (5 Keller steps, plain-matmul count)")

    # accuracy at equal settings: one step from identical state, update vs update
    pa, pb = make(shapes), make(shapes)
    p0 = [p.detach().clone() for p in pa]
    plain_step(pa, [p.grad for p in pa], [torch.zeros_like(p) for p in pa])
    opt = Muon(pb, lr=LR, weight_decay=WD, momentum=BETA)
    opt.step()
    acc = max(rel(b.detach() - q, a.detach() - q) for a, b, q in zip(pa, pb, p0))
    print(f"# fastortho vs plain fp32, max relative difference of the update over matrices: {acc:.1e}")
    del pa, pb, p0, opt

    rows = []

    def record(name, t, c, fl, note=""):
        rows.append(dict(impl=name, wall_p20_ms=t.p20, wall_p50_ms=t.p50, wall_p80_ms=t.p80,
                         cpu_p20_ms=c.p20 if c else float("nan"), cpu_p50_ms=c.p50 if c else float("nan"),
                         cpu_p80_ms=c.p80 if c else float("nan"), n=t.n,
                         gflops_cpu=fl / ((c.p50 if c else t.p50) * 1e-3) / 1e9, note=note))

    ps = make(shapes)
    bufs = [torch.zeros_like(p) for p in ps]
    grads = [p.grad for p in ps]
    qs = make(shapes)
    opt = Muon(qs, lr=LR, weight_decay=WD, momentum=BETA)
    fns = {"plain": lambda: plain_step(ps, grads, bufs), "ours": opt.step}
    if torch_mode == "full":
        ts = make(shapes)
        fns["torch"] = torch.optim.Muon(ts, lr=LR, weight_decay=WD, momentum=BETA).step
    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    wall, cpu = interleaved(fns, args.reps, progress=progress if not args.tiny else None)
    record("plain fp32 per-parameter loop", wall["plain"], cpu["plain"], flops)
    record("fastortho.Muon (fp32 NS, batched, fused _C)", wall["ours"], cpu["ours"], flops)
    if torch_mode == "full":
        record("torch.optim.Muon (bf16 NS, forced)", wall["torch"], cpu["torch"], flops)

    if torch_mode == "one":
        sub = [(args.d, args.d)]
        ts = make(sub)
        topt = torch.optim.Muon(ts, lr=LR, weight_decay=WD, momentum=BETA)
        w, c = interleaved({"torch": topt.step}, reps=1, warmup=0)
        scale = flops / ns_flops(sub)
        ext = [Timing(t.p20 * scale, t.p50 * scale, t.p80 * scale, 1) for t in (w["torch"], c["torch"])]
        record("torch.optim.Muon (bf16 NS, forced)", ext[0], ext[1], flops,
               note=f"extrapolated x{scale:.0f} by FLOPs from one {args.d}x{args.d} step "
                    f"({c['torch'].p50:.0f} ms CPU)")

    base_c, base_w = rows[0]["cpu_p50_ms"], rows[0]["wall_p50_ms"]
    print("\n| implementation | CPU ms p20 / p50 / p80 | wall ms p20 / p50 / p80 | n | GFLOP/s (CPU) "
          "| speedup vs plain, CPU (wall) | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['cpu_p20_ms']:.0f} / {r['cpu_p50_ms']:.0f} / {r['cpu_p80_ms']:.0f} | "
              f"{r['wall_p20_ms']:.0f} / {r['wall_p50_ms']:.0f} / {r['wall_p80_ms']:.0f} | {r['n']} | "
              f"{r['gflops_cpu']:.1f} | {base_c / r['cpu_p50_ms']:.2f}× ({base_w / r['wall_p50_ms']:.2f}×) | "
              f"{r['note']} |")
    print("\nCPU ms: process CPU time of one step (all threads), wall ms: elapsed time; p20/p50/p80 over n "
          "interleaved steps; GFLOP/s: Newton–Schulz flops (plain-matmul count) / CPU p50; speedup: plain "
          "loop's p50 ÷ this row's.")
    ours = next(r for r in rows if r["impl"].startswith("fastortho"))
    if ours["cpu_p50_ms"] > base_c:
        print("\n" + TINY_NOTE.format(d=args.d, extra=ours["cpu_p50_ms"] - base_c, k=len(shapes)))
    if args.csv:
        dev = device_string("cpu")
        write_csv(args.csv, [dict(r, layers=args.layers, d=args.d, device=dev, accuracy=acc) for r in rows])


if __name__ == "__main__":
    main()
