"""``python -m fastortho.kernels.aot``: write ``manifest.json``, ``manifest.md`` and the cubins."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .. import HAS_TRITON
from .manifest import build_manifest, parse_shape, summary_markdown, waves_markdown, with_tall
from .trace import _DT


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastortho.kernels.aot", description=sys.modules[__package__].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    ap.add_argument("--shape", action="append", help="MxN or BxMxN (repeatable)")
    ap.add_argument("--dtype", action="append", choices=sorted(_DT), help="input dtype of G (repeatable)")
    ap.add_argument("--no-tall", action="store_true", help="do not add the transpose of non-square shapes")
    ap.add_argument("--out", required=True, help="output folder (manifest.json, manifest.md, cubin/)")
    args = ap.parse_args(argv)
    if not HAS_TRITON:
        print("fastortho.kernels.aot: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    archs = args.arch or [80, 90]
    shapes = [parse_shape(s) for s in (args.shape or ["4096x4096"])]
    if not args.no_tall:
        shapes = with_tall(shapes)
    dtypes = args.dtype or ["bf16"]
    os.makedirs(args.out, exist_ok=True)
    entries = build_manifest(archs, shapes, dtypes, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(entries, f, indent=1)
    md = summary_markdown(entries)
    if any(e["arch"] == 90 for e in entries):
        md += "\n\nWaves on 132 SMs (sm_90, bf16 G):\n\n" + waves_markdown(entries)
    with open(os.path.join(args.out, "manifest.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0
