"""Benchmark of the fused Muon step ops (``fastortho.ops``) against their memory floor.

Both ops are pure memory traffic, so the figure of merit is bytes that *must* move per element
(each operand read or written exactly once) over time:

* ``muon_momentum_``: read g, read buf, write buf, write u  ->  |g| + 2|buf| + |u|
  (bf16 g, fp32 buf, bf16 u: 12 B/element)
* ``muon_apply_``: read p, write p, read O  ->  2|p| + |O|  (fp32 p, bf16 O: 10 B/element)

Implementations compared, on the same parameter list (GPT-2 small's 48 matrices, 84.9M elements, by
default):

* ``c``: ``backend="c"``, the ``fastortho._C`` multi-tensor kernels (one launch per ~96 tensors);
* ``foreach``: ``backend="foreach"``, the pure-torch ``_foreach`` fallback;
* ``loop``: a per-tensor loop of the peers' torch formulas (``buf.lerp_(g, 1-b); u = g.lerp(buf, b)``,
  cast, ``u.square().sum()``; ``p.mul_(1-lr*wd).add_(O, alpha=-lr*s)``), what torch.optim.Muon does.

The reference rate is the device's copy bandwidth, measured here as ``dst.copy_(src)`` on a 1 GiB
(CUDA) or 256 MiB (CPU) fp32 buffer, read + write counted. Goal: >= 85% of it on an H100; on the CPU,
faster than the foreach fallback. Usage::

    python bench/bench_muon_step.py --device cpu            # GPT-2 small on the CPU
    python bench/bench_muon_step.py --device cuda --csv out.csv
    python bench/bench_muon_step.py --device cpu --scale 0.01 --reps 3   # CI smoke size
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_string, gbps, timeit, write_csv  # noqa: E402

from fastortho.ops import _load as _C_loader  # noqa: E402
from fastortho.ops import muon_apply_, muon_momentum_  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpt2_small_shapes(n_layer: int = 12, d: int = 768) -> list[tuple[int, int]]:
    """The Muon (2-D, non-embedding) parameters of GPT-2 small: 4 per block, 84.9M elements."""
    per_block = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    return per_block * n_layer


def scaled_shapes(scale: float) -> list[tuple[int, int]]:
    if scale == 1.0:
        return gpt2_small_shapes()
    d = max(8, int(round(768 * scale**0.5 / 8)) * 8)
    return gpt2_small_shapes(d=d)


def momentum_loop(grads, bufs, beta, out_dtype):
    """Per-tensor torch formulas (torch.optim.Muon, EMA + Nesterov) with the same outputs as the op."""
    outs, sumsq = [], []
    for g, b in zip(grads, bufs):
        b.lerp_(g.float(), 1 - beta)
        u = g.float().lerp(b, beta)
        outs.append(u.to(out_dtype))
        sumsq.append(u.square().sum())
    return outs, torch.stack(sumsq)


def apply_loop(params, updates, lr, wd, scales):
    for p, o, s in zip(params, updates, scales):
        p.mul_(1 - lr * wd).add_(o, alpha=-lr * s)


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """GB/s of dst.copy_(src) on 1 GiB (CUDA) or 256 MiB (CPU) of fp32; bytes counted: read + write."""
    n = 2**28 if device.type == "cuda" else 2**26
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    return gbps(2 * n * 4, t.p50)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (default when a GPU is visible) or cpu")
    ap.add_argument("--grad-dtype", default="bf16", choices=DTYPES, help="gradient dtype (default bf16)")
    ap.add_argument("--buf-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="momentum buffer dtype (default fp32)")
    ap.add_argument("--out-dtype", default="bf16", choices=DTYPES,
                    help="dtype of the Newton–Schulz input u and of the update O (default bf16)")
    ap.add_argument("--param-dtype", default="fp32", choices=DTYPES, help="parameter dtype (default fp32)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of GPT-2 small's matrix elements")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per case; p20/p50/p80 reported (default 10)")
    ap.add_argument("--impls", default="c,foreach,loop",
                    help="comma-separated: c (fastortho._C kernels), foreach (torch fallback), loop (per tensor)")
    ap.add_argument("--csv", default=None, help="append result rows to this CSV")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    gdt, bdt, odt, pdt = (DTYPES[args.grad_dtype], DTYPES[args.buf_dtype], DTYPES[args.out_dtype],
                          DTYPES[args.param_dtype])
    shapes = scaled_shapes(args.scale)
    numel = sum(m * n for m, n in shapes)
    esize = lambda dt: torch.finfo(dt).bits // 8  # noqa: E731
    mom_bytes = numel * (esize(gdt) + 2 * esize(bdt) + esize(odt))
    app_bytes = numel * (2 * esize(pdt) + esize(odt))

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=gdt) for s in shapes]
    bufs = [torch.randn(s, generator=gen).to(device=device, dtype=bdt) for s in shapes]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=pdt) for s in shapes]
    updates = [torch.randn(s, generator=gen).to(device=device, dtype=odt) for s in shapes]
    scales = [max(1.0, m / n) ** 0.5 for m, n in shapes]
    beta, lr, wd = 0.95, 0.02, 0.01

    impls = [i for i in args.impls.split(",") if i]
    if "c" in impls and not (_C_loader.HAS_C and _C_loader.has_kernel("fastortho::muon_momentum_",
                                                                      {"cpu": "CPU", "cuda": "CUDA"}[device.type])):
        print(f"# skipping impl 'c': no {device.type} kernels in fastortho._C ({_C_loader.IMPORT_ERROR!r})")
        impls.remove("c")

    dev = device_string(device)
    print(f"# {dev}")
    print(f"# {len(shapes)} tensors, {numel / 1e6:.1f}M elements; g {args.grad_dtype}, buf {args.buf_dtype}, "
          f"u/O {args.out_dtype}, p {args.param_dtype}")
    print(f"# must-move bytes: momentum {mom_bytes / numel:.0f} B/elem ({mom_bytes / 1e9:.3f} GB), "
          f"apply {app_bytes / numel:.0f} B/elem ({app_bytes / 1e9:.3f} GB)")
    peak = copy_bandwidth(device, args.reps)
    print(f"# copy bandwidth (dst.copy_(src), fp32, read+write counted): {peak:.1f} GB/s")

    rows = []
    header = f"{'op':<10} {'impl':<8} {'p20 ms':>9} {'p50 ms':>9} {'p80 ms':>9} {'GB/s':>8}"
    header += f" {'% copy':>7}" if peak else ""
    print(header)
    started = time.perf_counter()
    for op in ("momentum", "apply"):
        base = None
        for impl in impls:
            if op == "momentum":
                if impl == "loop":
                    fn = lambda: momentum_loop(grads, bufs, beta, odt)  # noqa: E731
                else:
                    fn = lambda impl=impl: muon_momentum_(grads, bufs, momentum=beta, nesterov=True,  # noqa: E731
                                                          out_dtype=odt, backend=impl)
                nbytes = mom_bytes
            else:
                if impl == "loop":
                    fn = lambda: apply_loop(params, updates, lr, wd, scales)  # noqa: E731
                else:
                    fn = lambda impl=impl: muon_apply_(params, updates, lr=lr, weight_decay=wd,  # noqa: E731
                                                       scales=scales, backend=impl)
                nbytes = app_bytes
            t = timeit(fn, device, warmup=2, reps=args.reps)
            rate = gbps(nbytes, t.p50)
            if impl == "foreach":
                base = t.p50
            line = f"{op:<10} {impl:<8} {t.p20:9.3f} {t.p50:9.3f} {t.p80:9.3f} {rate:8.1f}"
            if peak:
                line += f" {100 * rate / peak:6.1f}%"
            print(line + f"   ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
            rows.append(dict(device=dev, op=op, impl=impl, tensors=len(shapes), numel=numel, bytes=nbytes,
                             p20_ms=t.p20, p50_ms=t.p50, p80_ms=t.p80, gbps=rate,
                             copy_gbps=peak or "", frac_copy=(rate / peak) if peak else "",
                             grad_dtype=args.grad_dtype, buf_dtype=args.buf_dtype, out_dtype=args.out_dtype,
                             param_dtype=args.param_dtype, threads=torch.get_num_threads()))
        if base is not None:
            for r in rows:
                if r["op"] == op:
                    r["speedup_vs_foreach"] = base / r["p50_ms"]
            print("#   speed-up vs foreach: " + ", ".join(
                f"{r['impl']} {r['speedup_vs_foreach']:.2f}x" for r in rows if r["op"] == op))
    print("# p20/p50/p80: percentiles of the time per call; GB/s: must-move bytes (each operand read or "
          "written once) / p50; % copy: that rate against dst.copy_(src) on this device.")
    if args.csv:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
