#!/usr/bin/env python
"""Triton section of the kernel report: every Newton–Schulz kernel config, compiled ahead of time.

For each (kernel, config, arch) kept by the table of ``kernels/_config.py`` (configs whose shared
memory would not fit the arch are pruned and listed as such) it compiles bf16 PTX/cubin without a
GPU (``fastortho.kernels.aot``) and reports the tensor-core instruction found in the PTX
(mma.sync on sm_80, wgmma on sm_90), shared memory against the device limit, registers and spill
bytes from ``ptxas -v``.

``report(archs)`` returns rows for ``bench/kernel_report.py`` (keys: kernel, arch, registers,
spill_stores, spill_loads, shared_bytes, local_bytes, stack_bytes, plus mma, smem_limit, ok).
Run alone it prints its own markdown table (the one in ``bench/RESULTS.md``)::

    python bench/kernel_report_triton.py [--archs 80,90] [--check]

``--launched`` reports instead what ``newton_schulz`` really launches for the goal shapes (first
step, restart, steady state, tall, fp32 G; ``fastortho.kernels.aot.build_manifest``), with the SASS
facts: wgmma waits inside the main loop, TMA, store widths, CTAs/SM and wave efficiency on 132 SMs.
"""
from __future__ import annotations

import argparse
import sys


def _name(kind, c):
    return f"ns_{kind} {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"


def report(archs=("80", "90")) -> list[dict]:
    from fastortho.kernels import HAS_TRITON
    from fastortho.kernels._config import APPLY_CONFIGS, SMEM_LIMIT, SYM_CONFIGS

    if not HAS_TRITON:
        return []
    from fastortho.kernels.aot import analyze

    rows = []
    for a in archs:
        arch = int(str(a).replace("sm_", ""))
        for kind, cfgs in (("sym", SYM_CONFIGS), ("apply", APPLY_CONFIGS)):
            for c in cfgs:
                row = {"section": "triton", "kernel": _name(kind, c), "arch": arch, "local_bytes": None,
                       "stack_bytes": None, "smem_limit": SMEM_LIMIT[arch]}
                if not c.fits(arch, 2):
                    row.update(registers=None, spill_stores=None, spill_loads=None, shared_bytes=None,
                               mma="pruned (smem)", ok=True)
                else:
                    r = analyze(kind, c, arch)
                    row.update(registers=r.registers, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                               shared_bytes=r.shared, mma=r.mma or "none", ok=r.ok)
                rows.append(row)
    return rows


def to_markdown(rows) -> str:
    lines = ["| kernel config (bf16) | arch | tensor-core instr. | shared KiB / limit | registers | spills st/ld B | ok |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sh = "—" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.0f}"
        sp = "—" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['mma']} | {sh} / {r['smem_limit'] // 1024} | "
                     f"{r['registers'] if r['registers'] is not None else '—'} | {sp} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


LAUNCH_SHAPES = ("4096x4096", "4096x16384", "24x768x3072", "64x128x128")


def launched(archs=("90",), shapes=LAUNCH_SHAPES, dtypes=("bf16", "fp32")) -> list[dict]:
    """Manifest entries (``fastortho.kernels.aot``) of the kernels newton_schulz launches."""
    from fastortho.kernels import HAS_TRITON

    if not HAS_TRITON:
        return []
    from fastortho.kernels.aot import build_manifest, parse_shape, with_tall

    return build_manifest([int(str(a).replace("sm_", "")) for a in archs],
                          with_tall([parse_shape(s) for s in shapes]), list(dtypes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--check", action="store_true", help="exit 1 if a kept config lacks mma, overflows or spills")
    ap.add_argument("--launched", action="store_true", help="report the launched variants (manifest) instead")
    args = ap.parse_args(argv)
    if args.launched:
        from fastortho.kernels.aot import summary_markdown

        entries = launched(tuple(a.strip() for a in args.archs.split(",")))
        print(summary_markdown(entries))
        bad = [e for e in entries if e["spill_bytes"] or e["smem_bytes"] > e["smem_limit"]]
        return 1 if args.check and bad else 0
    rows = report(tuple(a.strip() for a in args.archs.split(",")))
    print(to_markdown(rows))
    return 1 if args.check and not all(r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
