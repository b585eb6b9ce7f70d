#!/usr/bin/env python
"""Analytic H100 model of ``fastortho.newton_schulz`` (Triton backend): a *prediction*, not a measurement.

What it counts (no GPU needed):

* the launches ``newton_schulz`` makes, found by running the real launchers on fake CUDA tensors
  for sm_90 (``fastortho.kernels.aot.trace_newton_schulz``): configs, grids and flags as on a GPU;
* per launch the FLOPs the kernel *executes*: a symmetric product runs whole triangle tiles,
  diagonal tiles included, ``programs · BM² · 2L``; the apply ``programs · BM·BN · 2k``. Their
  sum equals ``kernels.newton_schulz_iteration.matmul_flops(..., tile=BM)``, the package's NS FLOP formula (tested);
* per launch the compulsory HBM bytes (operands read once, output written once).

Kernel classes and rates (H100 SXM, TFLOP/s on executed FLOPs; low–high), each a fraction of the
measured cuBLAS rate:

* cuBLAS bf16 GEMM: **789 TFLOP/s** measured at 4096³ (torch 2.7 cu128 on H100 SXM5,
  zzc0721/torch-performance-test-data #79; 80 % of the 989 TFLOP/s datasheet peak);
* copy / memory-bound: **3.0 TB/s** (QuACK's memory-bound kernels on H100 SXM, 3.01 TB/s softmax,
  quack ``media/2025-07-10-membound-sol.md``; 90 % of 3.35 TB/s);
* ``sym`` pipelined (async wgmma, cp.async ring, 128² tiles): 0.66–0.80 × cuBLAS = 520–630.
  flash-muon's Triton XXᵀ on an H800 (README: 8192, 1.453 ms against torch's 2.264 ms) ran at
  0.79× of torch's rate on the same card, executed FLOPs;
* ``apply`` pipelined (128×256 tiles, 241 registers): 0.76–0.89 × cuBLAS = 600–700 (Triton's
  non-persistent tutorial GEMM ≈ 0.95× cuBLAS, triton-lang/triton PR #5461; minus the register and
  epilogue cost the AOT manifest shows);
* ``sym-tma`` (the sm_90 persistent TMA symmetric kernel, ``kernels/newton_schulz_tma.py``): no
  published measurement of a persistent TMA symmetric (SYRK-like) Triton kernel was found
  (flash-muon's XXᵀ is non-persistent cp.async; Emerging-Optimizers' SYRK PRs #47/#49 publish no
  rates), so it keeps the ``sym`` rate above; only its wave accounting differs;
* ``apply-tma`` (the sm_90 persistent TMA apply kernel, 128×256×64 tiles, 1 CTA/SM, TMA store):
  **666–755 TFLOP/s** = 0.84–0.96 × cuBLAS, the published bf16 rates of Triton's persistent TMA
  matmul (the 09-persistent-matmul tutorial kernel) on H100-class cards: 665.9 / 673.6 / 688.7
  TFLOP/s at 8192×8192×{4096, 8192, 16384} (tritonbench, ``--only triton_tma_persistent_matmul``,
  meta-pytorch/tritonbench PR #894, "Before" table) and 754.7 TFLOP/s at 6144×8192×8192
  (FBGEMM's bf16 ``tma_persistent`` gemm, pytorch/FBGEMM issue #2766). Neither thread names the card;
  both exceed any pre-Hopper bf16 peak. Consistent with triton-lang/triton PR #5461 (H100): the
  descriptor-persistent kernel +3.5 % (fp8) / +13 % (fp16) over the plain persistent one;
* launches whose operand tiles are converted in registers (``-sync`` classes: an operand loaded in
  another dtype than the dot's; the manifest shows wgmma waiting to 0 in their loop): 0.5–0.65 ×
  the pipelined rate, an engineering estimate for a synchronous wgmma with a register round trip
  (no published measurement). Since the per-matrix scale moved to the epilogues and the first
  step reads X' = round(p·G) in the storage dtype, the default call has no such launch;
* norm pass (``sumsq``): 0.5–1.0 TB/s (non-pipelined, ≤ 64 programs per matrix: estimate);
* cast pass (``cast``: X' = round(p·G), one read of G, one write of X'): 2.0–3.0 TB/s, a copy-class
  kernel (one 32×128 tile per program, thousands of programs, 128-bit stores): the copy rate above
  at the high end, two thirds of it at the low end for strided (tall) reads (estimate);
* wave accounting: a one-tile-per-program launch is rounded up to whole waves of 132 programs;
  a persistent kernel (``N_PROG`` in its arguments) runs its tiles over a fixed grid, so its
  efficiency is tiles / (⌈tiles / programs⌉ · programs), the busiest program's share;
* ``small`` (``kernels/newton_schulz_small.py``: one program per matrix runs the whole iteration, the
  eligible small inputs such as 64 × 128×128): executed FLOPs from its loop structure, per matrix
  2·bk²·Lp (first Gram product over the column chunks) + steps·(2·bk³ (A·A) + 2·bk²·Lp (B·X, chunk by
  chunk) + 2·bk²·Lp (X·Xᵀ, accumulated over the chunks, also after the last step)) with bk = BLOCK_K
  (k padded to a power of two) and Lp = L rounded up to whole BLOCK_C chunks: 16 products of 2·128³
  = 67.1 MFLOP per 128×128 matrix for 5 steps. Rate, per program (one SM each, 1 CTA/SM): **0.20–0.40
  of the per-SM share of the cuBLAS rate** (789/132 = 5.98 TFLOP/s → 1.20–2.39 TFLOP/s), an
  engineering estimate, no published measurement of a single-CTA chained-GEMM Triton kernel of this
  kind was found. The nearest published Triton kernel that chains dependent dots inside one CTA,
  the fused-attention tutorial, runs at 420–440 TFLOP/s forward on H100 (triton-lang/triton PR #2444,
  "Better tuning for H100 flash attention") and 406.8 TFLOP/s at N_CTX = 1024, d = 128
  (facebookexperimental/triton PR #205, its non-warp-specialized baseline; the card is not named, the
  PR's kernels target Hopper): ≈ 0.52–0.56 × cuBLAS, a ceiling here, because that kernel
  pipelines loads and the next QKᵀ across iterations with many CTAs per SM, while the small kernel
  has num_stages = 1, one CTA per SM, wgmma waiting to 0 on every product (each feeds the next:
  ``tests/test_small_compile.py``) and 16-column chunks (n16 MMAs for B·X). Cross-check by latency:
  40 chunk round trips per 5 steps (L2 load, B·X, epilogue, store, barrier, X·Xᵀ; ≈ 1000–1500
  cycles each, not overlapped) + 5 A·A + 2 passes over G from HBM ≈ 35–55 µs at 1.83 GHz, i.e.
  ≈ 0.20–0.32 of that share. Programs beyond 132 run in further waves;
* per launch a GPU floor of 3 µs (launch + tail of a small grid). Host cost without CUDA graphs:
  the Python of a call as measured by ``bench/bench_ns_host.py`` (kernels stubbed, this 2-core CPU;
  64 × 128×128: 18.7–19.4 µs with the single-program kernel, 283–346 µs = 15.7–19.2 µs per launch on
  the multi-kernel path) plus 12–24 µs per Triton launch (Triton's own launch path, which the stubs
  skip; estimate). Back-to-back calls overlap host and GPU, so a call costs max(host, GPU).

Reference: a torch loop with the same coefficients on cuBLAS (A = XXᵀ; B = baddbmm(A, A, A, b, c);
X = baddbmm(X, B, X, a)): naive FLOPs at 789 TFLOP/s scaled by the cuBLAS grid's wave efficiency
(128×256 tiles on 132 SMs), plus one defensive copy of X per step at 3.0 TB/s, with a 5 µs floor
per GEMM. Uncertainty about ±20–25 %: replace by measurements (``bench/gpu_acceptance.py``).

    python bench/ns_model.py            # table of predictions beside the goals
    python bench/ns_model.py --json F   # also the per-class breakdown
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

CUBLAS_TFLOPS = 789.0         # H100 SXM, bf16, 4096³ (zzc0721/torch-performance-test-data #79)
COPY_TBS = 3.0                # H100 SXM memory-bound kernels (QuACK membound SOL note)
H100_SMS = 132

# (low, high) TFLOP/s on executed FLOPs (or TB/s for "norm"), see the module docstring.
RATES = {
    "sym": (0.66 * CUBLAS_TFLOPS, 0.80 * CUBLAS_TFLOPS),
    "apply": (0.76 * CUBLAS_TFLOPS, 0.89 * CUBLAS_TFLOPS),
    "sym-tma": (0.66 * CUBLAS_TFLOPS, 0.80 * CUBLAS_TFLOPS),   # no published rate: the sym rate, kept
    "apply-tma": (666.0, 755.0),     # tritonbench PR #894 (665.9 TFLOP/s), FBGEMM #2766 (754.7)
}
SYNC_FACTOR = (0.50, 0.65)
NORM_TBS = (0.5, 1.0)
CAST_TBS = (2.0, 3.0)
GPU_FLOOR_US = 3.0
HOST_US = (12.0, 24.0)          # Triton's own launch path per launch (estimate; the stubbed bench skips it)
# Python per call measured by bench/bench_ns_host.py (kernels stubbed, 64 × 128×128, this CPU): the
# single-program path per call, and the multi-kernel path per launch (283–346 µs / 18 launches).
HOST_PY_SMALL_US = (18.7, 19.4)
HOST_PY_PER_LAUNCH_US = (283.0 / 18, 346.0 / 18)
# "small": fraction of the per-SM share of the cuBLAS rate one program reaches (module docstring).
SMALL_SM_FRACTION = (0.20, 0.40)
CUBLAS_FLOOR_US = 5.0

# The four shapes of the goals: (B, m, n), steps, goal text, goal ms or None, goal ratio, ratio against.
SHAPES = [
    ((1, 4096, 4096), "≤ 1.9 ms and ≥ 1.4× the cuBLAS loop", 1.9, 1.4, "loop"),
    ((1, 4096, 16384), "≤ 3.6 ms and ≥ 2.2× the cuBLAS loop (Gram space)", 3.6, 2.2, "loop"),
    ((24, 768, 3072), "≥ 3× a per-matrix loop", None, 3.0, "per-matrix loop"),
    ((64, 128, 128), "≤ 50 µs per call", 0.050, None, None),
]


@dataclass
class LaunchCost:
    kernel: str          # sym / apply / sumsq / scale
    klass: str           # sym / sym-tma / sym-sync / apply / apply-tma / apply-sync / norm / cast / small / tiny
    flops: float         # executed
    bytes: float         # compulsory HBM traffic
    programs: int
    tiles: int = 0       # output tiles of a persistent kernel (0: one tile per program)


def _elem(dt) -> int:
    s = str(dt)
    return 4 if "32" in s else (8 if "64" in s else 2)


def _torch_of(tl_dtype) -> str:
    """torch spelling of a Triton dot dtype ('bf16' -> 'torch.bfloat16')."""
    return {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}.get(str(tl_dtype), "")


def launch_costs(shape, input_dtype: str = "bf16", arch: int = 90, sass: bool = False) -> list[LaunchCost]:
    """Executed FLOPs and bytes of every launch ``newton_schulz`` makes for G of ``shape``.

    A matmul launch is in the synchronous class when an operand is loaded in another dtype than
    the dot's (converted in registers), or, with ``sass=True``, when its compiled sm_90 SASS has no
    wgmma wait with a group in flight inside the main loop (``aot.compile_launch``: follows the
    kernels as they change)."""
    from fastortho.kernels.aot import _TensorArg, _short, compile_launch, trace_newton_schulz

    out = []
    for ln in trace_newton_schulz(shape, input_dtype, arch):
        names = list(ln.fn.arg_names)
        arg = dict(zip(names, ln.args))
        kw = ln.kwargs
        programs = math.prod(ln.grid)
        kern = _short(ln.kernel)
        tens = [a for a in ln.args if isinstance(a, _TensorArg)]
        operands = [arg[n] for n in (("P", "S") if kern == "sym" else ("Q", "X")) if n in arg]
        scaled = kern in ("sym", "apply") and any(str(t.dtype) != _torch_of(kw.get("DOT_DTYPE")) for t in operands)
        if sass and _short(ln.kernel) in ("sym", "apply"):
            waits = compile_launch(ln, arch)["sass"]["wgmma_waits_in_loop"]
            scaled = not waits or min(waits) < 1
        persistent = "N_PROG" in arg
        tiles = 0
        if kern == "sym":
            bm, L = kw["BLOCK_M"], int(arg["L"])
            # tiles executed: one per program, or (persistent TMA kernel) every triangle tile of the batch
            tiles = int(arg["N_BATCH"]) * int(arg["N_TRI"]) if persistent else 0
            flops = (tiles or programs) * bm * bm * 2.0 * L
            P, S, Y, C = (arg[n] for n in ("P", "S", "Y", "C"))
            nbytes = math.prod(P.shape) * _elem(P.dtype) * (1 if P == S else 2) + math.prod(C.shape) * _elem(C.dtype)
            if kw.get("HAS_Y"):
                nbytes += math.prod(Y.shape) * _elem(Y.dtype)
            klass = "sym-sync" if scaled else ("sym-tma" if persistent else "sym")
        elif kern == "apply":
            bm, bn, k = kw["BLOCK_M"], kw["BLOCK_N"], int(arg["K_IN"])
            tiles = int(arg["N_BATCH"]) * int(arg["TILES_M"]) * int(arg["TILES_N"]) if persistent else 0
            flops = (tiles or programs) * bm * bn * 2.0 * k
            Q, X, O = (arg[n] for n in ("Q", "X", "O"))
            nbytes = sum(math.prod(t.shape) * _elem(t.dtype) for t in (Q, X, O))
            klass = "apply-sync" if scaled else ("apply-tma" if persistent else "apply")
        elif kern == "ns_small":
            # the loop structure of _ns_small_kernel, per program (matrix): first Gram product over the
            # column chunks, then per step A·A and, chunk by chunk, B·X and X·Xᵀ
            bk, bc, L, steps = kw["BLOCK_K"], kw["BLOCK_C"], int(arg["L"]), int(arg["STEPS"])
            lp = math.ceil(L / bc) * bc
            flops = programs * (2.0 * bk * bk * lp + steps * (2.0 * bk ** 3 + 4.0 * bk * bk * lp))
            nbytes = sum(math.prod(t.shape) * _elem(t.dtype) for t in (arg["G"], arg["OUT"]))
            klass = "small"
        elif kern == "cast":
            flops = 0.0
            nbytes = sum(math.prod(t.shape) * _elem(t.dtype) for t in (arg["X"], arg["OUT"]))
            klass = "cast"
        else:
            flops = 0.0
            nbytes = sum(math.prod(t.shape) * _elem(t.dtype) for t in tens[:1])
            klass = "norm" if nbytes > 1 << 16 else "tiny"
        out.append(LaunchCost(kern, klass, flops, float(nbytes), programs, tiles))
    return out


def _wave_eff(programs: int, ctas_per_sm: int = 1, tiles: int = 0) -> float:
    """Busy fraction of the launch: one tile per program, whole waves of ``ctas_per_sm``·132 programs;
    or (``tiles`` > 0, a persistent grid of ``programs``) the mean over the busiest program's tile count."""
    if tiles:
        return tiles / (math.ceil(tiles / programs) * programs)
    slots = ctas_per_sm * H100_SMS
    return programs / (math.ceil(programs / slots) * slots) if programs else 1.0


def predict_fastortho(costs: list[LaunchCost], ctas_per_sm: int = 1, scenario: str = "as-compiled") -> dict:
    """(best, worst) milliseconds on an H100 SXM, GPU time and host-bound time separately."""
    sc = SCENARIOS[scenario]
    rates = {k: sc.get(k, v) for k, v in RATES.items()}
    sync = sc.get("sync", SYNC_FACTOR)
    best = worst = 0.0
    by_class: dict[str, float] = {}
    for c in costs:
        by_class[c.klass] = by_class.get(c.klass, 0.0) + c.flops
        mem = c.bytes / (COPY_TBS * 1e12)
        if c.klass in ("sym", "apply", "sym-sync", "apply-sync", "sym-tma", "apply-tma"):
            lo, hi = rates[c.klass.removesuffix("-sync")]
            if c.klass.endswith("sync"):
                lo, hi = lo * sync[0], hi * sync[1]
            eff = _wave_eff(c.programs, ctas_per_sm, c.tiles)
            t_best = max(c.flops / (hi * 1e12 * eff), mem)
            t_worst = max(c.flops / (lo * 1e12 * eff), mem)
        elif c.klass == "small":
            # one program per SM, all running at once; programs past one wave run in further waves
            waves = math.ceil(c.programs / H100_SMS) if c.programs else 0
            per_prog = c.flops / max(c.programs, 1)
            sm = CUBLAS_TFLOPS * 1e12 / H100_SMS
            t_best = max(waves * per_prog / (SMALL_SM_FRACTION[1] * sm), mem)
            t_worst = max(waves * per_prog / (SMALL_SM_FRACTION[0] * sm), mem)
        elif c.klass == "norm":
            t_best, t_worst = c.bytes / (NORM_TBS[1] * 1e12), c.bytes / (NORM_TBS[0] * 1e12)
        elif c.klass == "cast":
            t_best, t_worst = c.bytes / (CAST_TBS[1] * 1e12), c.bytes / (CAST_TBS[0] * 1e12)
        else:
            t_best = t_worst = 0.0
        best += max(t_best, GPU_FLOOR_US * 1e-6)
        worst += max(t_worst, GPU_FLOOR_US * 1e-6)
    n = len(costs)
    if n == 1 and costs[0].klass == "small":
        py = HOST_PY_SMALL_US
    else:
        py = (n * HOST_PY_PER_LAUNCH_US[0], n * HOST_PY_PER_LAUNCH_US[1])
    host = ((py[0] + n * HOST_US[0]) * 1e-6, (py[1] + n * HOST_US[1]) * 1e-6)
    return dict(gpu_ms=(best * 1e3, worst * 1e3), host_ms=(host[0] * 1e3, host[1] * 1e3),
                call_ms=(max(best, host[0]) * 1e3, max(worst, host[1]) * 1e3), launches=n,
                executed_flops=sum(c.flops for c in costs), flops_by_class=by_class)


def cublas_loop_ms(B: int, m: int, n: int, steps: int, per_matrix: bool = False) -> float:
    """Predicted torch cuBLAS loop (module docstring) for B matrices, batched or one call per matrix."""
    k, L = min(m, n), max(m, n)
    bb = 1 if per_matrix else B

    def gemm(M, N, K):
        tiles = math.ceil(M / 128) * math.ceil(N / 256) * bb
        eff = tiles / (math.ceil(tiles / H100_SMS) * H100_SMS)
        return max(bb * 2.0 * M * N * K / (CUBLAS_TFLOPS * 1e12 * eff), CUBLAS_FLOOR_US * 1e-6)

    copy_x = bb * 2 * k * L * 2 / (COPY_TBS * 1e12)     # baddbmm's defensive copy of X (read + write)
    step = gemm(k, k, L) + gemm(k, k, k) + gemm(k, L, k) + copy_x
    t = steps * step
    return (B * t if per_matrix else t) * 1e3


# What-if rates: the same launches with the kernel work of the issue done (still predictions).
SCENARIOS = {
    "as-compiled": {},
    "async-everywhere": {"sync": (1.0, 1.0)},       # scale in the epilogue: every launch pipelined
    "hopper-native": {"sync": (1.0, 1.0), "sym": (700.0, 750.0), "apply": (0.89 * CUBLAS_TFLOPS, CUBLAS_TFLOPS),
                      "sym-tma": (700.0, 750.0), "apply-tma": (0.89 * CUBLAS_TFLOPS, CUBLAS_TFLOPS)},
}


def predictions(steps: int | None = None, scenario: str = "as-compiled", sass: bool = False) -> list[dict]:
    from fastortho.kernels.aot import ns_call_args

    nsteps = len(ns_call_args()["coefficients"]) if steps is None else steps
    rows = []
    for shape, goal, goal_ms, goal_ratio, against in SHAPES:
        B, m, n = shape
        costs = launch_costs(shape, sass=sass)
        p = predict_fastortho(costs, scenario=scenario)
        loop = cublas_loop_ms(B, m, n, nsteps)
        per = cublas_loop_ms(B, m, n, nsteps, per_matrix=True)
        ref = per if against == "per-matrix loop" else loop
        ratio = (ref / p["call_ms"][1], ref / p["call_ms"][0])    # (worst, best)
        met_ms = None if goal_ms is None else (p["call_ms"][0] <= goal_ms, p["call_ms"][1] <= goal_ms)
        met_ratio = None if goal_ratio is None else (ratio[1] >= goal_ratio, ratio[0] >= goal_ratio)
        checks = [x for x in (met_ms, met_ratio) if x is not None]
        if all(w for _, w in checks):
            verdict = "predicted met"
        elif not all(b for b, _ in checks):
            verdict = "predicted missed"          # a goal fails even at the optimistic end
        else:
            verdict = "uncertain (met only at the optimistic end)"
        rows.append(dict(shape=shape, goal=goal, steps=nsteps, executed_gflop=p["executed_flops"] / 1e9,
                         flops_by_class={k: v / 1e9 for k, v in p["flops_by_class"].items()},
                         launches=p["launches"], gpu_ms=p["gpu_ms"], host_ms=p["host_ms"], call_ms=p["call_ms"],
                         cublas_loop_ms=loop, cublas_per_matrix_loop_ms=per, ratio=ratio, ratio_against=against,
                         verdict=verdict))
    return rows


def _shape(s) -> str:
    B, m, n = s
    return f"{m}×{n}" if B == 1 else f"{B}×{m}×{n}"


def to_markdown(rows: list[dict]) -> str:
    lines = ["| shape (5 steps, bf16 G) | executed GFLOP (sym / sym-tma / sym-sync / apply / apply-tma / apply-sync / small) | launches | "
             "predicted GPU ms | host ms (no graph) | predicted call ms | cuBLAS loop ms (pred.) | predicted ratio | goal | "
             "verdict (prediction) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fc = r["flops_by_class"]
        cls = " / ".join(f"{fc.get(c, 0.0):.3g}" if c == "small" else f"{fc.get(c, 0.0):.0f}"
                         for c in ("sym", "sym-tma", "sym-sync", "apply", "apply-tma", "apply-sync", "small"))
        ref = r["cublas_per_matrix_loop_ms"] if r["ratio_against"] == "per-matrix loop" else r["cublas_loop_ms"]
        ratio = "—" if r["ratio_against"] is None else f"{r['ratio'][0]:.2f}–{r['ratio'][1]:.2f}× {r['ratio_against']}"
        fmt = (lambda a, b: f"{a * 1e3:.0f}–{b * 1e3:.0f} µs") if r["call_ms"][1] < 0.5 else (lambda a, b: f"{a:.2f}–{b:.2f}")
        lines.append(f"| {_shape(r['shape'])} | {r['executed_gflop']:.2f} ({cls}) | {r['launches']} | "
                     f"{fmt(*r['gpu_ms'])} | {fmt(*r['host_ms'])} | {fmt(*r['call_ms'])} | {ref:.3g} | {ratio} | "
                     f"{r['goal']} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="rates to use (repeatable; default: as-compiled)")
    ap.add_argument("--sass", action="store_true",
                    help="classify synchronous launches from the compiled sm_90 SASS (compiles; ~1–2 min cold)")
    args = ap.parse_args(argv)
    out = {}
    for sc in args.scenario or ["as-compiled"]:
        try:
            rows = predictions(scenario=sc, sass=args.sass)
        except ImportError as exc:
            print(f"ns_model: needs fastortho and triton importable ({exc})", file=sys.stderr)
            return 2
        print(f"\nPREDICTIONS for one H100 SXM, scenario {sc!r} (analytic model, not measurements)")
        print(to_markdown(rows))
        out[sc] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
