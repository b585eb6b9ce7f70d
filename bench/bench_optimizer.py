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

    python bench/bench_optimizer.py            # full size, several minutes on 2 cores
    python bench/bench_optimizer.py --tiny     # seconds (CI)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Timing, device_string, write_csv  # noqa: E402

from fastortho.optim import Muon  # noqa: E402

KJ = (3.4445, -4.7750, 2.0315)
LR, WD, BETA = 0.02, 0.1, 0.95


def gpt2_shapes(layers: int, d: int) -> list[tuple[int, int]]:
    return [s for _ in range(layers) for s in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def ns_flops(shapes: list[tuple[int, int]], steps: int = 5) -> float:
    tot = 0.0
    for m, n in shapes:
        m, n = min(m, n), max(m, n)
        tot += steps * (4 * m * m * n + 2 * m**3)
    return tot


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


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several callables alternately, rep by rep, so that load from other processes on a shared
    machine hits them alike (a back-to-back timing on this 2-core box drifted by 2-4x)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, xs in samples.items():
        q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
        out[k] = Timing(q[1], statistics.median(xs), q[7], len(xs))
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2 layers, d=64 (seconds)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-muon", choices=["full", "one", "skip"], default=None,
                    help="time torch.optim.Muon on the full set, on one d×d matrix (default at full size), "
                         "or not at all")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--csv", default=None, help="append rows to this CSV")
    args = ap.parse_args()
    if args.tiny:
        args.layers, args.d, args.reps = 2, 64, 5
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

    def record(name, t, fl, note=""):
        rows.append(dict(impl=name, p20_ms=t.p20, p50_ms=t.p50, p80_ms=t.p80, n=t.n,
                         gflops=fl / (t.p50 * 1e-3) / 1e9, note=note))

    ps = make(shapes)
    bufs = [torch.zeros_like(p) for p in ps]
    grads = [p.grad for p in ps]
    qs = make(shapes)
    opt = Muon(qs, lr=LR, weight_decay=WD, momentum=BETA)
    fns = {"plain": lambda: plain_step(ps, grads, bufs), "ours": opt.step}
    if torch_mode == "full":
        ts = make(shapes)
        fns["torch"] = torch.optim.Muon(ts, lr=LR, weight_decay=WD, momentum=BETA).step
    t = interleaved(fns, args.reps)
    t_plain = t["plain"]
    record("plain fp32 per-parameter loop", t_plain, flops)
    record("fastortho.Muon (fp32 NS, batched, fused _C)", t["ours"], flops)
    if torch_mode == "full":
        record("torch.optim.Muon (bf16 NS, forced)", t["torch"], flops)

    if torch_mode == "one":
        sub = [(args.d, args.d)]
        ts = make(sub)
        topt = torch.optim.Muon(ts, lr=LR, weight_decay=WD, momentum=BETA)
        t0 = time.perf_counter()
        topt.step()
        ms = (time.perf_counter() - t0) * 1e3
        scale = flops / ns_flops(sub)
        ext = Timing(ms * scale, ms * scale, ms * scale, 1)
        record("torch.optim.Muon (bf16 NS, forced)", ext, flops,
               note=f"extrapolated x{scale:.0f} by FLOPs from one {args.d}x{args.d} step ({ms:.0f} ms)")
    print(f"\n| implementation | p20 ms | p50 ms | p80 ms | n | GFLOP/s | speedup vs plain (p50) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['p20_ms']:.1f} | {r['p50_ms']:.1f} | {r['p80_ms']:.1f} | {r['n']} | "
              f"{r['gflops']:.1f} | {t_plain.p50 / r['p50_ms']:.2f}× | {r['note']} |")
    if args.csv:
        dev = device_string("cpu")
        write_csv(args.csv, [dict(r, layers=args.layers, d=args.d, device=dev, accuracy=acc) for r in rows])


if __name__ == "__main__":
    main()
