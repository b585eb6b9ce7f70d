"""Compiling kernels for an arch without a GPU and reading what the compiler made of them: ``ptxas -v``
(registers, spills) and the SASS (``cuobjdump``) facts of the pipeline."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass

from .. import HAS_TRITON
from .._config import Config
from .occupancy import smem_limit
from .trace import Launch, _short, _TensorArg

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from ..newton_schulz import _apply_kernel, _sym_mm_kernel


# ----------------------------------------------------------------------------------------------
# configs (the tile table)
# ----------------------------------------------------------------------------------------------
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


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def tool_path(name: str) -> str | None:
    """cuobjdump / nvdisasm / ptxas bundled in Triton's wheel (None if absent)."""
    if not HAS_TRITON:
        return None
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return p if os.path.isfile(p) and os.access(p, os.X_OK) else None


def _gpu_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` with Triton's flags.

    Triton compiles with ``--regAllocOptLevel=2``; the same flag here keeps the register count equal
    to the cubin's. Results are cached on disk by the PTX hash (ptxas is most of a compile)."""
    key = hashlib.sha256(f"{arch}\n{ptx}".encode()).hexdigest()[:32]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "fastortho-aot")
    path = os.path.join(cache, key + ".json")
    if os.path.exists(path):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                return tuple(json.load(f))
    r = subprocess.run([_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={_gpu_name(arch)}", "-",
                        "-o", os.devnull], input=ptx, capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    regs = int(m.group(1)) if (m := re.search(r"Used (\d+) registers", log)) else -1
    st = int(m.group(1)) if (m := re.search(r"(\d+) bytes spill stores", log)) else -1
    ld = int(m.group(1)) if (m := re.search(r"(\d+) bytes spill loads", log)) else -1
    with contextlib.suppress(OSError):
        os.makedirs(cache, exist_ok=True)
        with open(path, "w") as f:
            json.dump([regs, st, ld], f)
    return regs, st, ld


def analyze(kind: str, cfg: Config, arch: int, dtype: str = "bf16", precision: str = "ieee") -> AotResult:
    k = compile_kernel(kind, cfg, arch, dtype, precision)
    ptx = k.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "")
    if dtype == "fp32" and precision == "ieee":
        mma = mma or "fma (ieee fp32)"   # IEEE fp32 dots run on the FMA units by design
    regs, st, ld = ptxas_usage(ptx, arch)
    return AotResult(kind, arch, cfg, mma, int(k.metadata.shared), smem_limit(arch), regs, st, ld)


# ----------------------------------------------------------------------------------------------
# SASS facts
# ----------------------------------------------------------------------------------------------
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_text(cubin: bytes | str) -> str:
    """``cuobjdump -sass`` of a cubin (bytes, or a path)."""
    tool = tool_path("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found in the triton wheel (backends/nvidia/bin)")
    if isinstance(cubin, bytes):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout


def sass_facts(sass: str) -> dict:
    """What the SASS says about the pipeline.

    Loops are the ranges [target, branch] of backward branches. The *main loop* is the innermost
    loop holding tensor-core instructions (HGMMA on sm_90, HMMA on sm_80). ``wgmma_waits_in_loop``
    lists the ``WARPGROUP.DEPBAR.LE gsb0, N`` values inside it: N ≥ 1 means the next wgmma group is
    issued while the previous one still runs; only 0 means every k-step waits for its own product.
    Stores are counted by width (``STG.E.U16`` scalar 2-byte, ``STG.E.128`` 16-byte) and TMA
    (``UTMALDG`` loads, ``UTMASTG`` stores)."""
    insts: list[tuple[int, str]] = []
    for m in _SASS_LINE.finditer(sass):
        insts.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in insts:
        b = re.search(r"\bBRA\b(?:\.\w+)*\s+(?:`\()?(0x[0-9a-f]+)", text)
        if b and int(b.group(1), 16) <= addr:
            loops.append((int(b.group(1), 16), addr))

    def body(lo, hi):
        return [t for a, t in insts if lo <= a <= hi]

    mma_loops = [lp for lp in loops if any(re.search(r"\b(HGMMA|HMMA|UTC\w*MMA)", t) for t in body(*lp))]
    main = min(mma_loops, key=lambda lp: lp[1] - lp[0]) if mma_loops else None
    waits_in_loop = []
    if main:
        for t in body(*main):
            if (w := re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)", t)):
                waits_in_loop.append(int(w.group(1), 16))
    ops = [t.split()[1] if t.startswith("@") else t.split()[0] for _, t in insts if t.strip()]
    stores = [o for o in ops if o.startswith("STG")]
    return {
        "n_instructions": len(insts),
        "hgmma": sum(o.startswith("HGMMA") for o in ops),
        "hmma": sum(o.startswith("HMMA") for o in ops),
        "tcgen05": sum(o.startswith("UTC") and "MMA" in o for o in ops),   # sm_100 tensor-core MMA
        "main_loop": [hex(main[0]), hex(main[1])] if main else None,
        "wgmma_waits_in_loop": sorted(set(waits_in_loop)),
        "utmaldg": sum(o.startswith("UTMALDG") for o in ops),
        "utmastg": sum(o.startswith("UTMASTG") for o in ops),
        "ldgsts": sum(o.startswith("LDGSTS") for o in ops),
        "stg_total": len(stores),
        "stg_128": sum(o.endswith(".128") for o in stores),
        "stg_64": sum(o.endswith(".64") for o in stores),
        "stg_u16": sum(o.endswith(".U16") or o.endswith(".16") for o in stores),
        "stl_ldl": sum(o.startswith(("STL", "LDL")) for o in ops),
    }


def resource_usage(cubin_path: str) -> dict:
    """REG / SHARED / LOCAL / STACK of the cubin's kernel from ``cuobjdump --dump-resource-usage``."""
    tool = tool_path("cuobjdump")
    if tool is None:
        return {}
    out = subprocess.run([tool, "--dump-resource-usage", cubin_path], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if "REG:" in line:
            return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return {}


def _specialize(launch: Launch, arch: int):
    """(ASTSource, options dict) the Triton JIT would build for this launch on sm_<arch>."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [MockTensor(a.dtype, list(a.shape)) if isinstance(a, _TensorArg) else a for a in launch.args]
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, target



_COMPILED: dict = {}     # specialization key -> record (compile once per process)


def compile_launch(launch: Launch, arch: int, out_dir: str | None = None) -> dict:
    """Compile one launch for sm_<arch>; returns regs, spills, smem and SASS facts (cached)."""
    src, opts, target = _specialize(launch, arch)
    key = hashlib.sha256(repr((launch.kernel, arch, sorted(src.signature.items()),
                               sorted((str(k), repr(v)) for k, v in src.constants.items()),
                               sorted((str(k), repr(v)) for k, v in src.attrs.items()),
                               sorted((k, repr(v)) for k, v in opts.items()))).encode()).hexdigest()[:16]
    if key not in _COMPILED:
        k = triton.compile(src, target=target, options=opts)
        ptx, cubin = k.asm["ptx"], k.asm["cubin"]
        regs, st, ld = ptxas_usage(ptx, arch)
        facts = sass_facts(sass_text(cubin))
        facts["mma_ptx"] = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "")
        _COMPILED[key] = dict(key=key, regs=regs, spill_bytes=max(st, 0) + max(ld, 0), spill_stores=st,
                              spill_loads=ld, smem_bytes=int(k.metadata.shared), cubin_bytes=cubin,
                              num_warps=int(opts.get("num_warps", 4)), sass=facts)
    rec = _COMPILED[key]
    if out_dir is not None:
        rel = os.path.join("cubin", f"sm{arch}_{_short(launch.kernel)}_{key}.cubin")
        path = os.path.join(out_dir, rel)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(rec["cubin_bytes"])
        rec = dict(rec, cubin=rel)
    return rec

