"""Ahead-of-time compilation of the Newton–Schulz kernels for a GPU that is not there.

``triton.compile`` lowers a kernel to PTX and a cubin for any ``GPUTarget`` without a device;
Triton's bundled ``ptxas -v`` then reports registers and spill bytes. This is how CI checks,
on a CPU-only machine, that every config of the table (``kernels/_config.py``):

* uses tensor cores: ``mma.sync`` on sm_80, ``wgmma`` on sm_90 in the PTX;
* fits in shared memory (``metadata.shared`` ≤ the device's per-block limit);
* does not spill (``ptxas -v``: 0 bytes spill stores / loads).

Kernels are compiled for bf16 storage with the operand layout of a wide, row-major X
(unit column stride, 16-divisible sizes and strides) — the specialization Triton's JIT makes for
the common case on a GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from . import HAS_TRITON
from ._config import SMEM_LIMIT, Config

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from .newton_schulz import _apply_kernel, _sym_mm_kernel


@dataclass
class AotResult:
    kind: str
    arch: int
    config: Config
    mma: str            # tensor-core instruction found in the PTX ("" if none)
    shared: int         # bytes of shared memory the kernel needs
    smem_limit: int
    registers: int
    spill_stores: int
    spill_loads: int

    @property
    def ok(self) -> bool:
        return bool(self.mma) and self.shared <= self.smem_limit and self.spill_stores == 0 and self.spill_loads == 0


_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _divisible(fn, names):
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def compile_kernel(kind: str, cfg: Config, arch: int, dtype: str = "bf16", precision: str = "ieee"):
    """triton.compile one kernel ("sym" or "apply") for sm_<arch>; returns the CompiledKernel.

    dtype "fp32" with precision "tf32x3" is the fp32_first_gram variant, "ieee" fp32 storage."""
    if not HAS_TRITON:
        raise RuntimeError("AOT compilation needs triton")
    ptr = _TYPES[dtype]
    tdt = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    if kind == "sym":
        fn = _sym_mm_kernel
        sig = {n: ptr for n in ("P", "S", "Y", "C")}
        sig["SCALE"] = "*fp32"
        ints = ["K_OUT", "L", "N_TRI", "sp_b", "sp_r", "ss_b", "ss_r", "sy_b", "sy_r", "sc_b", "sc_r"]
        ones = ["sp_c", "ss_c", "sy_c", "sc_c"]
        sig.update({n: "i32" for n in ints})
        sig.update({"alpha": "fp32", "beta": "fp32"})
        const = dict(HAS_SCALE=False, HAS_Y=True, ROUND_DTYPE=tdt, DOT_DTYPE=tdt, INPUT_PRECISION=precision,
                     OUT_ROUND=tdt, SOFT_BF16=False, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k)
        div = ["P", "S", "Y", "C", "K_OUT", "L", "sp_b", "sp_r", "ss_b", "ss_r", "sy_b", "sy_r", "sc_b", "sc_r"]
    elif kind == "apply":
        fn = _apply_kernel
        sig = {n: ptr for n in ("Q", "X", "O")}
        sig["SCALE"] = "*fp32"
        ints = ["K_IN", "L", "TILES_M", "TILES_N", "sq_b", "sq_r", "sx_b", "sx_r", "so_b", "so_r"]
        ones = ["sq_c", "sx_c", "so_c"]
        sig.update({n: "i32" for n in ints})
        sig["a"] = "fp32"
        const = dict(HAS_AX=True, HAS_SCALE=False, ROUND_DTYPE=tdt, DOT_DTYPE=tdt, INPUT_PRECISION=precision,
                     OUT_ROUND=tdt, SOFT_BF16=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                     GROUP_M=cfg.group_m)
        div = ["Q", "X", "O", "K_IN", "L", "sq_b", "sq_r", "sx_b", "sx_r", "so_b", "so_r"]
    else:
        raise ValueError(kind)
    for n in ones:   # unit strides are compile-time constants, as the JIT specializes them
        sig[n] = "constexpr"
        const[n] = 1
    for n in const:
        sig[n] = "constexpr"
    sig = {n: sig[n] for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn, sig, const, _divisible(fn, div))
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``."""
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    r = subprocess.run([ptxas_path(), "-v", f"--gpu-name={sm}", "-", "-o", os.devnull],
                       input=ptx, capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    regs = int(m.group(1)) if (m := re.search(r"Used (\d+) registers", log)) else -1
    st = int(m.group(1)) if (m := re.search(r"(\d+) bytes spill stores", log)) else -1
    ld = int(m.group(1)) if (m := re.search(r"(\d+) bytes spill loads", log)) else -1
    return regs, st, ld


def analyze(kind: str, cfg: Config, arch: int, dtype: str = "bf16", precision: str = "ieee") -> AotResult:
    k = compile_kernel(kind, cfg, arch, dtype, precision)
    ptx = k.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "")
    if dtype == "fp32" and precision == "ieee":
        mma = mma or "fma (ieee fp32)"   # IEEE fp32 dots run on the FMA units by design
    regs, st, ld = ptxas_usage(ptx, arch)
    return AotResult(kind, arch, cfg, mma, int(k.metadata.shared), SMEM_LIMIT[arch], regs, st, ld)
