#!/usr/bin/env python
"""One command for the day a GPU is lent: the GPU acceptance run of fastortho (≈ 8 minutes, H100/H200).

    python bench/gpu_acceptance.py --out DIR            # on the GPU machine
    python bench/gpu_acceptance.py --out DIR --dry-run  # anywhere: print the plan, exit 0

Sections, in this order (each has a time cap; a missing piece is reported and the run goes on):

1. ``env``: device, driver/toolkit, torch/triton versions, SM count, per-block shared memory.
2. ``ns``: ``fastortho.newton_schulz`` (Triton) on 4096², 4096×16384 (Gram space), 24×768×3072 and
   64×128×128, with bf16 and fp32 G, against a torch cuBLAS loop with the same coefficients
   (``bmm``/``baddbmm``: A = XXᵀ, B = cA² + bA, X = BX + aX), the plain eager loop, a per-matrix
   loop for batches, and ``gram_newton_schulz.GramNewtonSchulz`` when that package is importable
   (same coefficients, its own restart at 2). Times: CUDA-event p20/p50/p80 per call, and for the
   small shape also the wall-clock time per call of back-to-back calls (host cost included).
   Goals (issue: H100/H200): 4096² ≤ 1.9 ms and ≥ 1.4×; 4096×16384 ≤ 3.6 ms and ≥ 2.2×;
   24×768×3072 ≥ 3× a per-matrix loop; 64×128×128 ≤ 50 µs per call. The analytic predictions of
   ``bench/ns_model.py`` are printed beside the measurements.
3. ``muon_ops``: ``muon_momentum_`` and ``muon_apply_`` bandwidth on a 4096×16384 tensor against
   a device-to-device copy of the same bytes.
4. ``pytest_gpu``: ``pytest -m gpu`` (the GPU test suite, device-guard and graph-capture tests
   included), with a JUnit XML in DIR; the device/graph tests are listed by name in the results.
5. ``sanitizer``: ``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` on a small
   Newton–Schulz call and the Muon ops, when the tool exists (CUDA toolkit).

Writes DIR/results.json and DIR/results.md (also after a section fails). Needs nothing from
outside the machine: no downloads, no network.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BUDGET_S = 8 * 60
SHAPES = [(1, 4096, 4096), (1, 4096, 16384), (24, 768, 3072), (64, 128, 128)]
GOALS = {
    (1, 4096, 4096): dict(ms=1.9, ratio=1.4, against="cublas_loop"),
    (1, 4096, 16384): dict(ms=3.6, ratio=2.2, against="cublas_loop"),
    (24, 768, 3072): dict(ms=None, ratio=3.0, against="cublas_per_matrix"),
    (64, 128, 128): dict(ms=0.050, ratio=None, against=None, wall=True),
}
# Run order and caps in seconds: the goal measurements first, so a slow suite cannot crowd them out.
SECTIONS = {
    "env": 20, "ns": 200, "muon_ops": 30, "pytest_gpu": 170, "sanitizer": 110,
}


def plan_text() -> str:
    lines = [f"gpu_acceptance plan (total budget {BUDGET_S} s):"]
    for name, cap in SECTIONS.items():
        doc = {
            "env": "device, versions, SMs, shared memory per block",
            "pytest_gpu": f"{sys.executable} -m pytest -m gpu tests (JUnit XML; device-guard and graph-capture tests named)",
            "ns": "newton_schulz (triton) vs torch cuBLAS loop, eager loop, per-matrix loop, gram_newton_schulz if "
                  "importable; shapes " + ", ".join("x".join(map(str, s)) for s in SHAPES) + "; G in bf16 and fp32",
            "muon_ops": "muon_momentum_ / muon_apply_ GB/s vs a device copy (4096x16384)",
            "sanitizer": "compute-sanitizer memcheck + racecheck on small calls (if the tool exists)",
        }[name]
        lines.append(f"  [{name}] cap {cap} s: {doc}")
    lines.append("  writes results.json and results.md; model predictions from bench/ns_model.py beside the goals")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
class Run:
    def __init__(self, out: Path):
        self.out = out
        self.t0 = time.perf_counter()
        self.results: dict = {"sections": {}, "notes": []}

    def left(self) -> float:
        return BUDGET_S - (time.perf_counter() - self.t0)

    def note(self, msg: str) -> None:
        print(f"[gpu_acceptance] {msg}", flush=True)
        self.results["notes"].append(msg)

    def section(self, name: str, fn) -> None:
        if self.left() < 10:
            self.results["sections"][name] = {"status": "skipped", "reason": "time budget spent"}
            self.note(f"{name}: skipped, time budget spent")
            return
        t = time.perf_counter()
        self.note(f"{name}: start ({self.left():.0f} s left)")
        try:
            res = fn(self, min(SECTIONS[name], self.left()))
            res.setdefault("status", "ok")
        except Exception as exc:  # noqa: BLE001 - a failing section must not stop the others
            res = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            self.note(f"{name}: ERROR {type(exc).__name__}: {exc}")
        res["seconds"] = round(time.perf_counter() - t, 1)
        self.results["sections"][name] = res
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(to_markdown(self.results))


# ----------------------------------------------------------------------------------------------
def sec_env(run: Run, cap: float) -> dict:
    import torch

    res = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1),
                   smem_per_block_optin=getattr(p, "shared_memory_per_block_optin", None),
                   device_count=torch.cuda.device_count())
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv"],
                           capture_output=True, text=True, timeout=20, check=False)
        res["nvidia_smi"] = r.stdout.strip()
    try:
        from fastortho import HAS_C_CUDA

        res["fastortho_C_cuda"] = bool(HAS_C_CUDA)
    except Exception as exc:  # noqa: BLE001
        res["fastortho_C_cuda"] = f"unknown ({exc})"
    return res


def sec_pytest(run: Run, cap: float) -> dict:
    xml = run.out / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEsx", "-p", "no:cacheprovider",
           f"--junitxml={xml}", str(ROOT / "tests")]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap, check=False)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    (run.out / "pytest_gpu.log").write_text(out)
    cases = []
    if xml.exists():
        import xml.etree.ElementTree as ET

        for tc in ET.parse(xml).getroot().iter("testcase"):
            state = "passed"
            for child in tc:
                if child.tag in ("failure", "error", "skipped"):
                    state = child.tag
            cases.append({"name": f"{tc.get('classname')}::{tc.get('name')}", "state": state})
    focus = [c for c in cases if any(w in c["name"].lower() for w in ("device", "guard", "graph", "capture"))]
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    return {"status": "ok" if rc == 0 else "failed", "returncode": rc, "summary": summary,
            "counts": {s: sum(c["state"] == s for c in cases) for s in ("passed", "failure", "error", "skipped")},
            "device_guard_and_graph_tests": focus, "log": "pytest_gpu.log"}


def _cublas_loop(G, co, safety):
    """torch cuBLAS loop with the same coefficients: bmm for A, baddbmm for B and for the update."""
    import torch

    X = G.mT if G.shape[-2] > G.shape[-1] else G
    Xf = X.float()
    X = (Xf / (safety * torch.linalg.vector_norm(Xf, dim=(-2, -1), keepdim=True)).clamp_min(1e-7)).to(torch.bfloat16)
    for a, b, c in co:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if G.shape[-2] > G.shape[-1] else X


def _eager_loop(G, co, safety):
    import torch

    X = G.mT if G.shape[-2] > G.shape[-1] else G
    Xf = X.float()
    X = (Xf / (safety * torch.linalg.vector_norm(Xf, dim=(-2, -1), keepdim=True)).clamp_min(1e-7)).to(torch.bfloat16)
    for a, b, c in co:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def _gns(co):
    try:
        from gram_newton_schulz import GramNewtonSchulz  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001
        return None, f"gram_newton_schulz not importable ({type(exc).__name__}: {exc})"
    try:
        return GramNewtonSchulz(ns_coefficients=[list(t) for t in co], gram_newton_schulz_reset_iterations=[2]), None
    except Exception as exc:  # noqa: BLE001
        return None, f"GramNewtonSchulz(...) failed: {type(exc).__name__}: {exc}"


def _wall_per_call(fn, n: int = 200) -> float:
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def sec_ns(run: Run, cap: float) -> dict:
    import torch
    from common import timeit

    import fastortho
    from fastortho.coefficients import get_schedule

    t_end = time.perf_counter() + cap
    co, safety = get_schedule("polar_express", None)
    gns, gns_note = _gns(co)
    if gns_note:
        run.note(gns_note)
    rows = []
    for shape in SHAPES:
        for gdt in (torch.bfloat16, torch.float32):
            if time.perf_counter() > t_end:
                rows.append({"shape": shape, "g_dtype": str(gdt), "status": "skipped (section cap)"})
                continue
            B, m, n = shape
            G = torch.randn(B, m, n, device="cuda", dtype=gdt)
            impls = {
                "fastortho": lambda: fastortho.newton_schulz(G, backend="triton"),
                "cublas_loop": lambda: _cublas_loop(G, co, safety),
                "eager_loop": lambda: _eager_loop(G, co, safety),
            }
            if B > 1:
                impls["fastortho_per_matrix"] = lambda: [fastortho.newton_schulz(G[i], backend="triton") for i in range(B)]
                impls["cublas_per_matrix"] = lambda: [_cublas_loop(G[i:i + 1], co, safety) for i in range(B)]
            if gns is not None:
                impls["gram_newton_schulz"] = lambda: gns(G if B > 1 else G[0])
            row = {"shape": shape, "g_dtype": str(gdt).replace("torch.", "")}
            for name, fn in impls.items():
                if time.perf_counter() > t_end:
                    row[name] = {"error": "skipped (section cap)"}
                    continue
                try:
                    t = timeit(fn, "cuda", warmup=3, reps=15, max_time_s=6.0)
                    row[name] = {"p20": t.p20, "p50": t.p50, "p80": t.p80, "n": t.n}
                except Exception as exc:  # noqa: BLE001
                    row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if GOALS[shape].get("wall"):
                try:
                    row["fastortho_wall_ms_per_call"] = _wall_per_call(impls["fastortho"])
                except Exception as exc:  # noqa: BLE001
                    row["fastortho_wall_ms_per_call"] = f"error: {exc}"
            try:   # accuracy sanity: the result is orthogonal-ish (σ in [0.6, 1.25] for PE 5 steps)
                X = impls["fastortho"]().float()
                k = min(m, n)
                Xs = X if m <= n else X.mT
                gram = Xs @ Xs.mT
                row["fastortho_max_abs_gram_minus_I"] = float((gram - torch.eye(k, device="cuda")).abs().max())
            except Exception as exc:  # noqa: BLE001
                row["fastortho_max_abs_gram_minus_I"] = f"error: {exc}"
            row["goal"] = _goal_check(shape, row)
            rows.append(row)
            run.note(f"ns {shape} {row['g_dtype']}: " + ", ".join(
                f"{k}={v['p50']:.3f} ms" for k, v in row.items() if isinstance(v, dict) and "p50" in v))
            del G
            torch.cuda.empty_cache()
    try:
        import ns_model

        pred = ns_model.predictions()
    except Exception as exc:  # noqa: BLE001
        pred = f"ns_model failed: {exc}"
    return {"rows": rows, "predictions": pred, "gram_newton_schulz": gns_note or "measured"}


def _goal_check(shape, row) -> dict:
    g = GOALS[shape]
    out = {}
    ours = row.get("fastortho", {}).get("p50")
    if ours is None:
        return {"error": "no fastortho timing"}
    if g.get("ms") is not None:
        val = row.get("fastortho_wall_ms_per_call") if g.get("wall") else ours
        if isinstance(val, float):
            out["ms"] = {"measured": val, "goal": g["ms"], "met": val <= g["ms"]}
    if g.get("ratio") is not None:
        ref = row.get(g["against"], {}).get("p50")
        if ref:
            out["ratio"] = {"measured": ref / ours, "goal": g["ratio"], "against": g["against"],
                            "met": ref / ours >= g["ratio"]}
    return out


def sec_muon_ops(run: Run, cap: float) -> dict:
    import torch
    from common import timeit

    from fastortho import muon_apply_, muon_momentum_

    m, n = 4096, 16384
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    buf = torch.zeros(m, n, device="cuda", dtype=torch.float32)
    p = torch.randn(m, n, device="cuda", dtype=torch.float32)
    o = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    res = {"shape": [m, n]}
    # bytes: momentum reads g (2) and buf (4), writes buf (4) and u (2); apply reads p (4), o (2), writes p (4)
    cases = {
        "muon_momentum_": (lambda: muon_momentum_([g], [buf], momentum=0.95, nesterov=True), m * n * 12),
        "muon_apply_": (lambda: muon_apply_([p], [o], lr=0.02, weight_decay=0.01, scales=[1.0]), m * n * 10),
    }
    src = torch.empty(m * n * 12 // 2, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), "cuda", warmup=3, reps=20)
    copy_gbs = 2 * src.numel() / (t.p50 * 1e-3) / 1e9
    res["device_copy_GBps"] = copy_gbs
    for name, (fn, nbytes) in cases.items():
        try:
            t = timeit(fn, "cuda", warmup=3, reps=20)
            gbs = nbytes / (t.p50 * 1e-3) / 1e9
            res[name] = {"p50_ms": t.p50, "GBps": gbs, "fraction_of_copy": gbs / copy_gbs}
        except Exception as exc:  # noqa: BLE001
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return res


SANITIZER_SNIPPET = textwrap.dedent("""
    import torch, fastortho
    from fastortho import muon_momentum_, muon_apply_
    G = torch.randn(3, 96, 160, device="cuda", dtype=torch.bfloat16)
    fastortho.newton_schulz(G, backend="triton")
    fastortho.newton_schulz(G.float().mT.contiguous(), backend="triton")
    fastortho.newton_schulz(torch.randn(2, 256, 640, device="cuda"), backend="triton", gram=True)
    g = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16); b = torch.zeros(64, 96, device="cuda")
    muon_momentum_([g], [b], momentum=0.9, nesterov=True)
    p = torch.randn(64, 96, device="cuda"); muon_apply_([p], [g], lr=0.1, weight_decay=0.1, scales=[1.0])
    torch.cuda.synchronize(); print("sanitizer snippet done")
""")


def _find_sanitizer() -> str | None:
    cands = [shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            cands += [os.path.join(home, "bin", "compute-sanitizer"),
                      os.path.join(home, "compute-sanitizer", "compute-sanitizer")]
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def sec_sanitizer(run: Run, cap: float) -> dict:
    tool = _find_sanitizer()
    if tool is None:
        return {"status": "unavailable", "reason": "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda)"}
    snippet = run.out / "sanitizer_snippet.py"
    snippet.write_text(SANITIZER_SNIPPET)
    res = {"tool": tool}
    per = cap / 2
    for t in ("memcheck", "racecheck"):
        cmd = [tool, "--tool", t, "--error-exitcode", "99", "--target-processes", "all", sys.executable, str(snippet)]
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=per, check=False)
            log = r.stdout + r.stderr
            (run.out / f"sanitizer_{t}.log").write_text(log)
            summ = [ln for ln in log.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
            res[t] = {"returncode": r.returncode, "clean": r.returncode == 0, "summary": summ[-1:] or log[-300:]}
        except subprocess.TimeoutExpired:
            res[t] = {"returncode": "timeout", "clean": None, "summary": f"over {per:.0f} s"}
    return res


# ----------------------------------------------------------------------------------------------
def _shape(s) -> str:
    return "x".join(map(str, s[1:] if s[0] == 1 else s))


def _fmt_ms(v) -> str:
    return f"{v['p50']:.3f}" if isinstance(v, dict) and "p50" in v else ("err" if isinstance(v, dict) else "—")


def to_markdown(res: dict) -> str:
    s = res.get("sections", {})
    lines = ["# GPU acceptance run", ""]
    env = s.get("env", {})
    lines.append(f"Device: {env.get('device', '?')} (sm {env.get('capability', '?')}, {env.get('sms', '?')} SMs) | "
                 f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}) | triton {env.get('triton', '?')}")
    lines.append("")
    for name, sec in s.items():
        lines.append(f"- **{name}**: {sec.get('status')} ({sec.get('seconds', '?')} s)"
                     + (f" — {sec.get('error') or sec.get('reason')}" if sec.get("status") not in ("ok",) else ""))
    pt = s.get("pytest_gpu")
    if pt and "counts" in pt:
        lines += ["", f"pytest -m gpu: {pt['summary']}", ""]
        for c in pt.get("device_guard_and_graph_tests", []):
            lines.append(f"- {c['name']}: {c['state']}")
    ns = s.get("ns")
    if ns and "rows" in ns:
        impls = ["fastortho", "cublas_loop", "eager_loop", "fastortho_per_matrix", "cublas_per_matrix",
                 "gram_newton_schulz"]
        lines += ["", "## Newton–Schulz, p50 ms (CUDA events)", "",
                  "| shape | G | " + " | ".join(impls) + " | wall ms/call | goal checks |",
                  "|---|---|" + "---|" * len(impls) + "---|---|"]
        for r in ns["rows"]:
            if "status" in r:
                lines.append(f"| {_shape(r['shape'])} | {r['g_dtype']} | {r['status']} |")
                continue
            goals = "; ".join(f"{k}: {v['measured']:.3g} vs {v['goal']} {'MET' if v['met'] else 'missed'}"
                              for k, v in r.get("goal", {}).items() if isinstance(v, dict))
            wall = r.get("fastortho_wall_ms_per_call")
            lines.append(f"| {_shape(r['shape'])} | {r['g_dtype']} | "
                         + " | ".join(_fmt_ms(r.get(i)) for i in impls)
                         + f" | {wall if not isinstance(wall, float) else f'{wall:.3f}'} | {goals} |")
        lines += ["", f"gram_newton_schulz: {ns.get('gram_newton_schulz')}"]
        if isinstance(ns.get("predictions"), list):
            lines += ["", "Model predictions (bench/ns_model.py, as compiled):", ""]
            for p in ns["predictions"]:
                lines.append(f"- {p['shape']}: predicted {p['call_ms'][0]:.3f}–{p['call_ms'][1]:.3f} ms, "
                             f"cuBLAS loop {p['cublas_loop_ms']:.3f} ms; {p['verdict']}")
    mo = s.get("muon_ops")
    if mo and "device_copy_GBps" in mo:
        lines += ["", f"## Muon ops (4096×16384), device copy {mo['device_copy_GBps']:.0f} GB/s", ""]
        for k in ("muon_momentum_", "muon_apply_"):
            v = mo.get(k, {})
            lines.append(f"- {k}: " + (f"{v['GBps']:.0f} GB/s ({v['fraction_of_copy']:.0%} of copy), {v['p50_ms']:.3f} ms"
                                       if "GBps" in v else str(v)))
    sa = s.get("sanitizer")
    if sa and sa.get("status") == "ok":
        lines += ["", "## compute-sanitizer", ""]
        for t in ("memcheck", "racecheck"):
            if t in sa:
                lines.append(f"- {t}: clean={sa[t]['clean']} {sa[t]['summary']}")
    if res.get("notes"):
        lines += ["", "## Log", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json, results.md and logs")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit 0 (no GPU needed)")
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only these sections (repeatable)")
    args = ap.parse_args(argv)
    print(plan_text())
    if args.dry_run:
        return 0
    run = Run(Path(args.out))
    try:
        import torch
    except ImportError as exc:
        run.note(f"torch is not importable: {exc}")
        run.write()
        return 2
    run.section("env", sec_env)
    if not torch.cuda.is_available():
        run.note("no CUDA device: nothing to accept here (use --dry-run on a CPU machine)")
        run.write()
        return 2
    fns = {"ns": sec_ns, "muon_ops": sec_muon_ops, "pytest_gpu": sec_pytest, "sanitizer": sec_sanitizer}
    for name, fn in fns.items():
        if args.only and name not in args.only:
            continue
        run.section(name, fn)
    run.results["total_seconds"] = round(time.perf_counter() - run.t0, 1)
    run.write()
    print((run.out / "results.md").read_text())
    bad = [n for n, v in run.results["sections"].items() if v.get("status") in ("error", "failed")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
