"""Ahead-of-time compilation of the Newton–Schulz kernels for a GPU that is not there.

``triton.compile`` lowers a kernel to PTX and a cubin for any ``GPUTarget`` without a device, and
the ``ptxas``/``cuobjdump`` that ship inside Triton's wheel report registers, spills and SASS.
Two levels:

* **configs** (``compile_kernel``, ``analyze``): one kernel of the tile table
  (``kernels/_config.py``) in the bf16 steady-state specialization;
* **launches** (``trace_launches``, ``build_manifest``): every kernel that
  ``fastortho.newton_schulz`` would launch for an input (B, m, n) of a dtype on an arch, found by
  running the real launchers on fake CUDA tensors (``torch._subclasses.FakeTensorMode``) with each
  Triton kernel replaced by a recorder. The launchers therefore choose configs, grids, constexpr
  flags (first-step scale, Y term, precisions) and strides (tall inputs) exactly as on a GPU, and
  each distinct launch is compiled through Triton's own JIT specialization (``int == 1`` and
  16-divisible arguments specialized, pointers 16-aligned, as for fresh torch allocations).

``python -m fastortho.kernels.aot --arch 90 --shape 4096x4096 --dtype bf16 --out DIR`` writes
``DIR/manifest.json``: one entry per distinct compiled kernel per (arch, shape, input dtype) with
{"kernel", "variant", "arch", "shape", "input_dtype", "config", "regs", "spill_bytes",
"smem_bytes", "smem_limit", "cubin"} plus the grid, launch count, occupancy and the SASS facts
(wgmma waits inside the main loop, TMA loads/stores, store widths) that ``sass_facts`` extracts.
"""
from __future__ import annotations

from .cli import main
from .compiler import (
    AotResult,
    analyze,
    compile_kernel,
    compile_launch,
    ptxas_path,
    ptxas_usage,
    resource_usage,
    sass_facts,
    sass_text,
    tool_path,
)
from .compiler import _specialize  # noqa: F401  (the Triton JIT's specialization, read by tests)
from .manifest import (
    build_manifest,
    manifest_entries,
    parse_shape,
    shape_str,
    summary_markdown,
    waves_markdown,
    with_tall,
)
from .occupancy import (
    CTA_SMEM_RESERVED,
    H100_SMS,
    SM_CTAS,
    SM_REGS,
    SM_SMEM,
    SM_WARPS,
    occupancy,
    smem_limit,
    waves,
)
from .trace import Launch, describe, ns_call_args, trace_launches, trace_newton_schulz
from .trace import _short, _TensorArg  # noqa: F401  (kernel short names and traced tensor args, read by tests/bench)

__all__ = [
    "AotResult", "CTA_SMEM_RESERVED", "H100_SMS", "Launch", "SM_CTAS", "SM_REGS", "SM_SMEM", "SM_WARPS",
    "analyze", "build_manifest", "compile_kernel", "compile_launch", "describe", "main", "manifest_entries",
    "ns_call_args", "occupancy", "parse_shape", "ptxas_path", "ptxas_usage", "resource_usage", "sass_facts",
    "sass_text", "shape_str", "smem_limit", "summary_markdown", "tool_path", "trace_launches",
    "trace_newton_schulz", "waves", "waves_markdown", "with_tall",
]
