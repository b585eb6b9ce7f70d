"""Static resource report of fastortho's GPU kernels: registers, spills, shared memory, per arch.

No GPU needed. Sections (each a function returning rows, so more can be added independently):

* ``cuda_section``: the CUDA kernels of ``fastortho._C``. Reads the fatbin of the built extension with
  ``cuobjdump --dump-resource-usage`` (REG, STACK, SHARED, LOCAL per kernel and arch). With
  ``--ptxas`` it also recompiles ``csrc/cuda/muon_step.cu`` with ``nvcc -Xptxas -v`` for each arch,
  which is the only place spill bytes are printed (``N bytes spill stores, M bytes spill loads``).
* ``triton_section``: the Triton kernels; provided by ``bench/kernel_report_triton.py`` (function
  ``report(archs) -> list[dict]``) when that module exists (owned by the Triton kernels' author).

Rows have the keys: section, kernel, arch, registers, spill_stores, spill_loads, shared_bytes,
local_bytes, stack_bytes (None where a tool does not report it). ``--check`` exits non-zero when a
kernel spills (spill bytes or local memory > 0). Usage::

    python bench/kernel_report.py                 # cuobjdump on the built fastortho._C
    python bench/kernel_report.py --ptxas --check # plus exact spill bytes from ptxas (about a minute)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_ARCHS = ("80", "90")


# ----------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------
def _cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for c in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(c, "bin", "nvcc")):
            return os.path.realpath(c)
    return None


def find_tool(name: str) -> str | None:
    """A CUDA binary tool: $CUDA_HOME/bin, PATH, then the copy bundled in Triton's wheel."""
    home = _cuda_home()
    cands = [os.path.join(home, "bin", name)] if home else []
    if shutil.which(name):
        cands.append(shutil.which(name))
    cands.append(os.path.join(sysconfig.get_paths()["purelib"], "triton", "backends", "nvidia", "bin", name))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def short_kernel_name(name: str) -> str:
    """'void fastortho::cuda::(anonymous namespace)::muon_apply_kernel<__half, float>(...)' -> 'muon_apply_kernel<__half, float>'."""
    m = re.search(r"(\w+)(<[^()]*>)?\(", name.replace("(anonymous namespace)", "anon"))
    return (m.group(1) + (m.group(2) or "")) if m else name


# ----------------------------------------------------------------------------------------------
# CUDA section
# ----------------------------------------------------------------------------------------------
def _built_extension() -> str | None:
    sys.path.insert(0, ROOT)
    try:
        import importlib.util

        spec = importlib.util.find_spec("fastortho._C")
        return spec.origin if spec else None
    except ImportError:
        return None
    finally:
        sys.path.pop(0)


def parse_resource_usage(text: str) -> list[dict]:
    """Rows from ``cuobjdump --dump-resource-usage`` output."""
    rows, arch, pending = [], None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            pending = m.group(1)
            continue
        if pending and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append(dict(kernel=pending, arch=arch, registers=int(vals.get("REG", 0)),
                             stack_bytes=int(vals.get("STACK", 0)), shared_bytes=int(vals.get("SHARED", 0)),
                             local_bytes=int(vals.get("LOCAL", 0)), spill_stores=None, spill_loads=None))
            pending = None
    return rows


def parse_ptxas_verbose(text: str, arch: str) -> list[dict]:
    """Rows from ``nvcc -Xptxas -v`` output (one 'Compiling entry function' block per kernel)."""
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            cur = dict(kernel=m.group(1), arch=m.group(2) or arch, registers=None, stack_bytes=None,
                       shared_bytes=None, local_bytes=None, spill_stores=None, spill_loads=None)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["shared_bytes"] = int(sm.group(1)) if sm else 0
            lm = re.search(r"(\d+) bytes lmem", line)
            cur["local_bytes"] = int(lm.group(1)) if lm else 0
    return rows


def cuda_section(archs=DEFAULT_ARCHS, ptxas: bool = False) -> tuple[list[dict], list[str]]:
    """(rows, notes) for the CUDA kernels of fastortho._C."""
    notes: list[str] = []
    rows: list[dict] = []
    so = _built_extension()
    cuobjdump = find_tool("cuobjdump")
    if so is None:
        notes.append("fastortho._C is not built: no cuobjdump report")
    elif cuobjdump is None:
        notes.append("cuobjdump not found (CUDA toolkit or Triton wheel): no cuobjdump report")
    else:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True, check=False)
        rows = parse_resource_usage(out.stdout)
        if not rows:
            notes.append(f"no CUDA kernels in {os.path.basename(so)} (CPU-only build?)")
        notes.append(f"cuobjdump: {cuobjdump} on {so}")
    if ptxas:
        nvcc = find_tool("nvcc")
        if nvcc is None:
            notes.append("--ptxas: nvcc not found; set CUDA_HOME")
        else:
            src = os.path.join(ROOT, "csrc", "cuda", "muon_step.cu")
            by_key = {(r["kernel"], r["arch"]): r for r in rows}
            with tempfile.TemporaryDirectory() as tmp:
                for arch in archs:
                    cmd = [nvcc, "-O3", "--fmad=false", "-std=c++17", "-I", os.path.join(ROOT, "csrc"),
                           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-cubin",
                           "-o", os.path.join(tmp, f"k{arch}.cubin"), src]
                    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if p.returncode != 0:
                        notes.append(f"nvcc sm_{arch} failed: {p.stderr[-500:]}")
                        continue
                    for r in parse_ptxas_verbose(p.stderr, arch):
                        old = by_key.get((r["kernel"], r["arch"]))
                        if old is None:
                            rows.append(r)
                        else:
                            old["spill_stores"], old["spill_loads"] = r["spill_stores"], r["spill_loads"]
            notes.append(f"ptxas -v via {nvcc}")
    names = demangle([r["kernel"] for r in rows])
    for r, n in zip(rows, names):
        r["kernel"] = short_kernel_name(n)
        r["section"] = "cuda"
    rows = [r for r in rows if r["arch"] in archs]
    rows.sort(key=lambda r: (r["arch"], r["kernel"]))
    return rows, notes


# ----------------------------------------------------------------------------------------------
# Triton section (hook)
# ----------------------------------------------------------------------------------------------
def triton_section(archs=DEFAULT_ARCHS) -> tuple[list[dict], list[str]]:
    """Rows from ``bench/kernel_report_triton.py:report(archs)`` when that module exists."""
    sys.path.insert(0, HERE)
    try:
        mod = importlib.import_module("kernel_report_triton")
    except ImportError as exc:
        return [], [f"no Triton section ({exc})"]
    finally:
        sys.path.pop(0)
    rows = list(mod.report(archs))
    for r in rows:
        r.setdefault("section", "triton")
    return rows, []


# ----------------------------------------------------------------------------------------------
def to_markdown(rows: list[dict]) -> str:
    cols = ["section", "kernel", "arch", "registers", "spill_stores", "spill_loads", "shared_bytes",
            "local_bytes", "stack_bytes", "mma"]
    fmt = lambda v: "—" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="compute capabilities, e.g. 80,90")
    ap.add_argument("--ptxas", action="store_true", help="recompile with ptxas -v for spill bytes")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if any kernel spills, uses local memory, or (Triton) lacks MMA or overflows smem")
    args = ap.parse_args(argv)
    archs = tuple(a.strip().replace("sm_", "").replace(".", "") for a in args.archs.split(",") if a.strip())

    rows, notes = [], []
    for section in (lambda: cuda_section(archs, args.ptxas), lambda: triton_section(archs)):
        r, n = section()
        rows += r
        notes += n
    print(to_markdown(rows))
    for n in notes:
        print(f"# {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    # Triton rows carry their own verdict ("ok": tensor-core instruction present, shared memory
    # within the device limit, no spills); CUDA rows are judged on spills and local memory.
    bad = [r for r in rows if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) + (r.get("local_bytes") or 0) > 0
           or r.get("ok") is False]
    if bad:
        print(f"# {len(bad)} kernel(s) failing the check: " + ", ".join(f"{r['kernel']}@sm_{r['arch']}" for r in bad))
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
