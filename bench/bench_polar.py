"""Accurate polar factor: iterations, error vs the float64 SVD, FLOPs and time, all methods in one run.

For each size m×n (m ≤ n) and condition number κ (σ log-spaced over [1/κ, 1], Haar singular
vectors) it runs on the same float64 matrices:

* ``fastortho.polar`` with method "qdwh" and "higham" (float32 and float64 working precision);
* ``torch.linalg.svd`` → UVᵀ in float32 and float64 (the baseline every accuracy claim is
  measured against: its own error at the same precision);
* ``jax.scipy.linalg.polar(method="qdwh")`` in float32 and float64, when jax is installed
  (optional: the script runs without it);
* Newton–Schulz (Polar Express, 5 and 8 steps, float32): the fast approximate path, for scale.

Columns: iterations (per matrix, max over the batch), relative Frobenius error vs the float64 SVD
factor (the full one: directions below a method's rank cut count as error), rank kept (singular
values of the output > ½), model FLOPs per matrix, and p20/p50/p80 wall time per call.

FLOP models (m ≤ n, per matrix; a QR of p×q costs 2pq² − ⅔q³ plus the same to form Q):
* qdwh: ``fastortho.polar.qdwh.qdwh_flops`` (QR of Gᵀ, QR steps on [√c X; I], Cholesky steps,
  NS polish, the final Q₀X) + the m³ check of XᵀX;
* higham: QR of the n×m tall orientation and forming Q (4nm² − 4/3m³), Q·X (2nm²), per step one
  LU inverse (2m³) or a Newton–Schulz tail step (3m³ with the symmetric Gram), averaged as 2.5m³;
* svd: Golub–Van Loan R-SVD with U, V (6nm² + 20m³) + UVᵀ (2m²n);
* NS: per step 4m²n + 2m³ (naive; 3m²n + m³ with symmetry).

Also ``scipy.linalg.polar`` (float64, SVD-based) when scipy is installed.

``--speed``: the speed rows (float32 1024×1024, 1024×4096, 32×256×256; higham vs qdwh vs a
``torch.linalg.svd`` polar, ratios from the same pass; CPU time of the process on the CPU, so that
neighbours on a shared box do not count; ``--repeat N``: N passes, medians; on CUDA
when available, else CPU), how higham spent its work (inverses, tail steps, matrices through the
rank check and the SVD) and the component kernels' times (LU inverse, GEMM, Cholesky, QR, SVD).
``--storage``: the low-precision storage model of Higham's iteration (X rounded to bf16/fp16 after
every step, or after the Newton–Schulz tail steps only; products in float32).

Usage: ``python bench/bench_polar.py [--tiny] [--speed [--repeat N]] [--storage] [--csv out.csv] [--threads N]``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_string, timeit, write_csv  # noqa: E402

import fastortho  # noqa: E402
from fastortho.flops import ns_flops  # noqa: E402
from fastortho.polar.qdwh import qdwh_flops  # noqa: E402
from fastortho.reference import polar_error, polar_svd  # noqa: E402

F32, F64 = torch.float32, torch.float64


def spectrum_matrix(m: int, n: int, kappa: float, seed: int = 0) -> torch.Tensor:
    """float64 U·diag(logspace(0, −log10 κ, m))·Vᵀ with Haar U (m×m), V (n×m)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=F64))
    s = torch.logspace(0, -math.log10(kappa), m, dtype=F64)
    return (U * s) @ V.mT


def higham_flops(m: int, n: int, iters: int) -> float:
    # QR of the n×m tall orientation and forming Q (4nm² − 4/3m³), Q·X (2nm²), per step one
    # inverse (2m³: Newton) or XXᵀ + product (3m³: tail, symmetric Gram counted at half).
    qr = 4 * n * m * m - 4 * m**3 / 3 + 2 * n * m * m if n > m else 0.0
    return qr + iters * 2.5 * m**3


def svd_flops(m: int, n: int) -> float:
    return 6 * n * m * m + 20 * m**3 + 2 * m * m * n


def _jax_polar():
    """(fn(G float64 tensor, dtype) -> (P tensor, iters), version) or None without jax."""
    try:
        # Same thread budget as torch (--threads 1 by default): XLA's CPU client otherwise spreads
        # one call over every core, which on a shared box measures the neighbours.
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        from jax import lax
        from jax.scipy.linalg import polar as jpolar
    except ImportError:
        return None
    qdwh = jax.jit(lambda a: lax.linalg.qdwh(a)[::2])  # (u, num_iters)
    polar_j = jax.jit(lambda a: jpolar(a, method="qdwh")[0])

    def run(G: torch.Tensor, dtype: torch.dtype):
        a = jnp.asarray(G.mT.numpy(), dtype=jnp.float32 if dtype == F32 else jnp.float64)  # JAX wants m ≥ n
        u = polar_j(a).block_until_ready()
        _, it = qdwh(a)
        return torch.from_numpy(np.array(u)).mT, int(it)

    def timed(G: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
        a = jnp.asarray(G.mT.numpy(), dtype=jnp.float32 if dtype == F32 else jnp.float64)
        polar_j(a).block_until_ready()
        return lambda: polar_j(a).block_until_ready()

    return run, timed, f"jax {jax.__version__}"


def bench(m: int, n: int, kappa: float, reps: int, jaxfns) -> list[dict]:
    G = spectrum_matrix(m, n, kappa)
    ref = polar_svd(G)
    rows = []

    def add(method: str, dtype: torch.dtype, P: torch.Tensor, iters, flops: float, fn):
        t = timeit(fn, "cpu", warmup=1, reps=reps, max_time_s=10.0)
        S = torch.linalg.svdvals(P.double())
        rows.append(dict(m=m, n=n, kappa=f"{kappa:.0e}", method=method, dtype=str(dtype).split(".")[-1],
                         iters=iters, error=polar_error(P, G, reference=ref).item(),
                         rank=int((S > 0.5).sum()), mflop=flops / 1e6, **t.as_dict("ms_")))

    for dtype in (F32, F64):
        Gd = G.to(dtype)
        for method in ("qdwh", "higham"):
            P, it = fastortho.polar(Gd, method=method, return_iterations=True)
            k = int(it.max())
            if method == "qdwh":
                # The schedule's QR phase: steps with c > 100 (the first 1 in fp32, 2 in fp64 here).
                n_qr = 1 if dtype == F32 else 2
                fl = qdwh_flops(m, n, min(n_qr, k), max(k - n_qr, 0)) + m**3
            else:
                fl = higham_flops(m, n, k)
            add(method, dtype, P, k, fl, lambda Gd=Gd, method=method: fastortho.polar(Gd, method=method))
        if dtype == F64:  # unscaled and 1,∞-scaled Newton, for the scaling comparison
            P, it = fastortho.polar(Gd, method="higham", scaling="none", max_iter=60, return_iterations=True)
            k = int(it.max())
            add("higham scaling=fro", dtype, P, k, higham_flops(m, n, k),
                lambda Gd=Gd: fastortho.polar(Gd, method="higham", scaling="none", max_iter=60))
        from fastortho.polar.higham import higham_polar

        P, it = higham_polar(Gd.unsqueeze(0), dtype=dtype, scaling="1inf")
        add("higham scaling=1inf", dtype, P[0], int(it.max()), higham_flops(m, n, int(it.max())),
            lambda Gd=Gd: higham_polar(Gd.unsqueeze(0), dtype=dtype, scaling="1inf"))
        U, _, Vh = torch.linalg.svd(Gd, full_matrices=False)
        add("torch.svd", dtype, U @ Vh, "-", svd_flops(m, n),
            lambda Gd=Gd: (lambda U, S, Vh: U @ Vh)(*torch.linalg.svd(Gd, full_matrices=False)))
        if jaxfns is not None:
            run, timed, _ = jaxfns
            P, it = run(G, dtype)
            add("jax qdwh", dtype, P, it, float("nan"), timed(G, dtype))
    try:
        import scipy.linalg

        Gn = G.numpy()
        P = torch.from_numpy(scipy.linalg.polar(Gn)[0])
        add("scipy.linalg.polar", F64, P, "-", svd_flops(m, n), lambda: scipy.linalg.polar(Gn))
    except ImportError:
        pass
    G32 = G.float()
    for steps in (5, 8):
        P = fastortho.newton_schulz(G32, steps=steps)
        add(f"NS-{steps} (polar_express)", F32, P, steps, ns_flops(m, n, steps),
            lambda steps=steps: fastortho.newton_schulz(G32, steps=steps))
    return rows


def _higham_counts(G: torch.Tensor) -> dict:
    """How one ``polar(G, method="higham")`` call spends its work: LU inverses, Newton–Schulz tail
    steps (Gram products), matrices through the rank check and through the SVD (counted by
    wrapping the calls; batched calls count once per matrix)."""
    from fastortho.polar import higham as ph

    n = {"inverses": 0, "tail steps": 0, "checked": 0, "svd": 0}
    real = (torch.linalg.inv_ex, ph.gram, torch.linalg.cholesky_ex, torch.linalg.svd)

    def wrap(key, fn, per=1):
        def f(A, *a, **k):
            n[key] += (A.shape[0] if A.ndim == 3 else 1) // per
            return fn(A, *a, **k)
        return f

    torch.linalg.inv_ex, ph.gram = wrap("inverses", real[0]), wrap("tail steps", real[1])
    torch.linalg.cholesky_ex, torch.linalg.svd = wrap("checked", real[2], per=2), wrap("svd", real[3])
    try:
        _, it = fastortho.polar(G, method="higham", return_iterations=True)
    finally:
        torch.linalg.inv_ex, ph.gram, torch.linalg.cholesky_ex, torch.linalg.svd = real
    n["iters"] = str(sorted(set(it.tolist())))
    return n


def components(n: int, dev: str, reps: int) -> dict:
    """p50 ms of the kernels higham/qdwh/SVD polar are made of, float32 n×n, one call each."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g).to(dev)
    S = A @ A.mT + n * torch.eye(n, device=dev)
    fns = {"LU inverse (inv_ex)": lambda: torch.linalg.inv_ex(A), "GEMM": lambda: A @ A,
           "Cholesky": lambda: torch.linalg.cholesky_ex(S), "QR": lambda: torch.linalg.qr(A),
           "SVD (gesdd)": lambda: torch.linalg.svd(A, full_matrices=False)}
    if dev != "cpu":
        return {k: timeit(f, dev, warmup=1, reps=reps, max_time_s=20.0).p50 for k, f in fns.items()}
    out = {}
    for k, f in fns.items():  # CPU time, as in the speed rows
        f()
        xs = []
        for _ in range(reps):
            t0 = time.process_time()
            f()
            xs.append((time.process_time() - t0) * 1e3)
        out[k] = float(np.median(xs))
    return out


def speed(reps: int, tiny: bool = False, repeat: int = 1) -> list[dict]:
    """higham vs qdwh vs SVD polar, float32: times (median of ``reps`` calls, CPU time of the process
    on the CPU, CUDA events on a GPU; with ``repeat`` > 1 the
    median over that many passes of the whole set, each pass measuring the three methods back to
    back) and ratios, plus how higham spent its work and the component kernels' times."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(1, 64, 64)] if tiny else [(1, 1024, 1024), (1, 1024, 4096), (32, 256, 256)]
    inputs = {s: torch.randn(*s, generator=torch.Generator().manual_seed(0)).to(dev) for s in shapes}

    def svd_polar(G):
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        return U @ Vh

    def p50(fn) -> float:
        if dev != "cpu":
            return timeit(fn, dev, warmup=1, reps=reps, max_time_s=30.0).p50
        # CPU time of this process (torch runs on --threads threads): on a shared box the wall
        # clock also counts the time slices the neighbours take.
        fn()
        xs = []
        for _ in range(reps):
            t0 = time.process_time()
            fn()
            xs.append((time.process_time() - t0) * 1e3)
        return float(np.median(xs))

    times: dict[tuple, list[dict]] = {s: [] for s in shapes}
    for r in range(repeat):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"pass {r + 1}/{repeat}: load average {load:.1f}", flush=True)
        for s, G in inputs.items():
            t = {}
            for name, fn in (("higham", lambda G=G: fastortho.polar(G, method="higham")),
                             ("qdwh", lambda G=G: fastortho.polar(G, method="qdwh")),
                             ("svd", lambda G=G: svd_polar(G))):
                t[name] = p50(fn)
            t["load"] = load
            times[s].append(t)
    rows = []
    for s, G in inputs.items():
        med = {k: float(np.median([t[k] for t in times[s]])) for k in ("higham", "qdwh", "svd")}
        # ratios per pass (same pass, same load), then the median
        rq = float(np.median([t["higham"] / t["qdwh"] for t in times[s]]))
        rs = float(np.median([t["higham"] / t["svd"] for t in times[s]]))
        c = _higham_counts(G)
        rows.append(dict(shape="×".join(map(str, s)), device=dev, higham_ms=med["higham"], qdwh_ms=med["qdwh"],
                         svd_ms=med["svd"], higham_over_qdwh=rq, higham_over_svd=rs,
                         passes=[(round(t["higham"]), round(t["qdwh"]), round(t["svd"])) for t in times[s]],
                         higham_iters=c.pop("iters"), work=c))
    print("| shape | device | higham ms | qdwh ms | svd ms | higham/qdwh | higham/svd | higham iters | higham work |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = ", ".join(f"{v} {k}" for k, v in r["work"].items())
        print(f"| {r['shape']} | {r['device']} | {r['higham_ms']:.0f} | {r['qdwh_ms']:.0f} | {r['svd_ms']:.0f} | "
              f"{r['higham_over_qdwh']:.2f} | {r['higham_over_svd']:.2f} | {r['higham_iters']} | {w} |")
    if repeat > 1:
        for r in rows:
            print(f"  {r['shape']}: (higham, qdwh, svd) ms per pass: {r['passes']}")
    n = shapes[0][-1]
    comp = components(n, dev, reps)
    print(f"components, float32 {n}×{n}, p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in comp.items()))
    return rows


def storage_model(tiny: bool = False) -> list[dict]:
    """Error of Higham's iteration when X is stored in bf16/fp16 (fp32 products) vs fp32 storage."""
    from fastortho.polar.higham import higham_polar

    m, n = (16, 40) if tiny else (128, 256)
    rows = []
    for kappa in (1e1, 1e3):
        G = spectrum_matrix(m, n, kappa)[None]
        for st, tail_only in ((None, False), (torch.bfloat16, False), (torch.bfloat16, True),
                              (torch.float16, False), (torch.float16, True)):
            # The step cannot fall below the storage rounding: stop at 8·u of the storage.
            tol = None if st is None else 8 * torch.finfo(st).eps
            P, it = higham_polar(G.float(), dtype=F32, storage=st, storage_tail_only=tail_only, tol=tol)
            S = torch.linalg.svdvals(P.double())
            rows.append(dict(kappa=f"{kappa:.0e}", storage=str(st or F32).split(".")[-1],
                             where="tail only" if tail_only else "every step", iters=int(it.max()),
                             error=polar_error(P, G).item(), orth=(S - 1).abs().max().item()))
    print(f"| κ | storage | rounded after | iters | error vs fp64 SVD | max abs(σ(P) − 1) |  ({m}×{n})")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kappa']} | {r['storage']} | {r['where']} | {r['iters']} | {r['error']:.1e} | {r['orth']:.1e} |")
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = "| m×n | κ | method | dtype | iters | error vs fp64 SVD | rank kept | MFLOP | p20 / p50 / p80 ms |"
    out = [head, "|" + "---|" * 9]
    for r in rows:
        fl = "—" if math.isnan(r["mflop"]) else f"{r['mflop']:.1f}"
        out.append(f"| {r['m']}×{r['n']} | {r['kappa']} | {r['method']} | {r['dtype']} | {r['iters']} | "
                   f"{r['error']:.1e} | {r['rank']}/{r['m']} | {fl} | "
                   f"{r['ms_p20']:.2f} / {r['ms_p50']:.2f} / {r['ms_p80']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="one 16×40 size, 1 rep (CI smoke run)")
    p.add_argument("--sizes", default="64x128,256x512", help="comma-separated m×n, m ≤ n")
    p.add_argument("--kappas", default="1e3,1e8",
                   help="comma-separated condition numbers κ (test matrix: σ log-spaced from 1 to 1/κ)")
    p.add_argument("--reps", type=int, default=10,
                   help="timed calls per row after one warm-up (p20/p50/p80 printed; stops after 10 s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (jax uses its own pool)")
    p.add_argument("--no-jax", action="store_true",
                   help="leave out the jax.scipy.linalg.polar (QDWH) rows, also when jax is installed")
    p.add_argument("--csv", default=None, metavar="PATH", help="also append the rows to this CSV file")
    p.add_argument("--speed", action="store_true", help="only the speed rows (1024², 1024×4096, 32×256²)")
    p.add_argument("--repeat", type=int, default=1, help="--speed: passes over the set (median reported)")
    p.add_argument("--storage", action="store_true", help="only the bf16/fp16 storage model")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.speed:
        print(device_string("cuda" if torch.cuda.is_available() else "cpu"))
        return speed(1 if a.tiny else a.reps, a.tiny, a.repeat)
    if a.storage:
        return storage_model(a.tiny)
    sizes = [(16, 40)] if a.tiny else [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    reps = 1 if a.tiny else a.reps
    jaxfns = None if a.no_jax else _jax_polar()
    print(device_string("cpu") + ("" if jaxfns is None else f" | {jaxfns[2]}"))
    rows = []
    for m, n in sizes:
        for kappa in (float(k) for k in a.kappas.split(",")):
            rows += bench(m, n, kappa, reps, jaxfns)
    print(to_markdown(rows))
    if a.csv:
        write_csv(a.csv, rows)
    return rows


if __name__ == "__main__":
    main()
