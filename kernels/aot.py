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

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from . import HAS_TRITON
from ._config import Config

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from .newton_schulz import _apply_kernel, _sym_mm_kernel

# Per-block opt-in shared memory (bytes) when ``_config.SMEM_LIMIT`` has no entry for an arch
# (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
_SMEM_LIMIT_FALLBACK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                        100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024}
# Per-SM occupancy limits (same source): shared memory per SM, resident warps, resident CTAs.
SM_SMEM = {80: 164 * 1024, 86: 100 * 1024, 87: 164 * 1024, 89: 100 * 1024, 90: 228 * 1024,
           100: 228 * 1024, 103: 228 * 1024, 120: 100 * 1024}
SM_WARPS = {80: 64, 86: 48, 87: 48, 89: 48, 90: 64, 100: 64, 103: 64, 120: 48}
SM_CTAS = {80: 32, 86: 16, 87: 16, 89: 24, 90: 32, 100: 32, 103: 32, 120: 24}
SM_REGS = 65536
CTA_SMEM_RESERVED = 1024      # the driver reserves 1 KiB of shared memory per resident CTA (sm_80+)
H100_SMS = 132                # H100 SXM5 / H200


def smem_limit(arch: int) -> int:
    """Per-block shared-memory limit used by the launchers for ``arch`` (their table first)."""
    from . import _config

    table = getattr(_config, "SMEM_LIMIT", {})
    if arch in table:
        return int(table[arch])
    return int(_SMEM_LIMIT_FALLBACK.get(arch, 99 * 1024))


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


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> int:
    """Resident CTAs per SM from registers (256-register warp allocation units), shared memory
    (+1 KiB reserved per CTA) and the warp / CTA limits of the arch."""
    if regs <= 0 or num_warps <= 0:
        return 0
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGS // per_warp) // num_warps
    by_smem = SM_SMEM.get(arch, 100 * 1024) // (smem + CTA_SMEM_RESERVED) if smem else 10 ** 9
    by_warps = SM_WARPS.get(arch, 48) // num_warps
    return max(0, min(by_regs, by_smem, by_warps, SM_CTAS.get(arch, 16)))


def waves(programs: int, ctas_per_sm: int, sms: int = H100_SMS) -> tuple[float, float]:
    """(waves, wave efficiency): programs / slots, and the busy fraction of the last-wave-rounded grid."""
    slots = ctas_per_sm * sms
    if slots <= 0 or programs <= 0:
        return 0.0, 0.0
    w = programs / slots
    return w, programs / (-(-programs // slots) * slots)


# ----------------------------------------------------------------------------------------------
# launches: what newton_schulz runs
# ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its grid and its arguments."""

    kernel: str
    fn: object = field(repr=False)
    grid: tuple
    args: tuple = field(repr=False)        # tensors replaced by _TensorArg
    kwargs: dict = field(repr=False)


@dataclass(frozen=True)
class _TensorArg:
    dtype: object
    shape: tuple
    strides: tuple

    def data_ptr(self) -> int:   # fresh torch allocations are ≥ 256-byte aligned
        return 0


def _short(name: str) -> str:
    return {"_sym_mm_kernel": "sym", "_apply_kernel": "apply", "_sumsq_partial_kernel": "sumsq",
            "_scale_kernel": "scale", "_scale_cast_kernel": "cast"}.get(name, name.strip("_").removesuffix("_kernel"))


class _Recorder:
    def __init__(self, fn, name: str, out: list):
        self.fn, self.name, self.out = fn, name, out

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            import torch

            conv = tuple(_TensorArg(a.dtype, tuple(a.shape), tuple(a.stride())) if isinstance(a, torch.Tensor) else a
                         for a in args)
            g = grid(kwargs) if callable(grid) else grid
            self.out.append(Launch(self.name, self.fn, tuple(int(x) for x in g), conv, dict(kwargs)))
        return call

    def __getattr__(self, item):   # attribute reads (arg_names, …) go to the real kernel
        return getattr(self.fn, item)


class _FakeProps:
    def __init__(self, arch: int):
        self.major, self.minor = divmod(arch, 10)
        self.name = f"AOT sm_{arch}"
        self.multi_processor_count = H100_SMS
        self.shared_memory_per_block_optin = smem_limit(arch)
        self.shared_memory_per_multiprocessor = SM_SMEM.get(arch, 100 * 1024)
        self.shared_memory_per_block = 48 * 1024
        self.regs_per_multiprocessor = SM_REGS
        self.max_threads_per_multi_processor = 32 * SM_WARPS.get(arch, 48)
        self.total_memory = 80 * 2 ** 30
        self.warp_size = 32


@contextlib.contextmanager
def trace_launches(arch: int) -> Iterator[list]:
    """Inside the block, the NS launchers record their Triton launches instead of running them.

    Every ``triton.JITFunction`` in the launcher module is replaced by a recorder, the launchers'
    device queries answer for sm_<arch>, and tensors are fake CUDA tensors (no memory, no GPU).
    Yields the list the launches are appended to."""
    if not HAS_TRITON:
        raise RuntimeError("tracing the launchers needs triton")
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    from . import newton_schulz_launch as ns_launch

    recs: list[Launch] = []
    saved: list[tuple[object, str, object]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        for name, obj in list(vars(ns_launch).items()):
            if isinstance(obj, JITFunction):
                patch(ns_launch, name, _Recorder(obj, name, recs))
        if hasattr(ns_launch, "_arch"):
            patch(ns_launch, "_arch", lambda t: arch)
        if hasattr(ns_launch, "_device_smem"):   # memoized per device index: answer per traced arch
            patch(ns_launch, "_device_smem", lambda t: smem_limit(arch))
        patch(torch.cuda, "get_device_capability", lambda *a, **k: divmod(arch, 10))
        patch(torch.cuda, "get_device_properties", lambda *a, **k: _FakeProps(arch))
        patch(torch.cuda, "is_current_stream_capturing", lambda: False)
        patch(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
        patch(torch.cuda, "current_stream", lambda *a, **k: None)
        patch(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
        with FakeTensorMode():
            yield recs
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


_DT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def ns_call_args() -> dict:
    """The Triton-backend arguments ``fastortho.newton_schulz`` derives from its defaults on CUDA:
    schedule and safety, normalization, eps, compute dtype (bf16 on CUDA), fp32_first_gram, gram."""
    import torch

    from fastortho.coefficients import get_schedule
    from fastortho.newton_schulz import newton_schulz

    p = inspect.signature(newton_schulz).parameters
    coeffs, safety = get_schedule(p["coefficients"].default, p["steps"].default)
    dtype = p["dtype"].default or torch.bfloat16
    return dict(coefficients=list(coeffs), safety=safety, normalize=p["normalize"].default, eps=p["eps"].default,
                compute_dtype=dtype, fp32_first_gram=p["fp32_first_gram"].default, gram=p["gram"].default)


def trace_newton_schulz(shape: Sequence[int], input_dtype: str, arch: int) -> list[Launch]:
    """The launches of ``newton_schulz(G)`` (default arguments, Triton backend) for G of ``shape``
    ((m, n) or (B, m, n)) and ``input_dtype`` on sm_<arch>, in launch order."""
    import torch

    from fastortho.ops import newton_schulz as ns_op

    B, m, n = (1, *shape) if len(shape) == 2 else tuple(shape)
    kw = ns_call_args()
    coeffs = kw.pop("coefficients")
    with trace_launches(arch) as recs:
        G = torch.empty(B, m, n, device="cuda", dtype=getattr(torch, _DT[input_dtype]))
        # ns_op._impl is the body of the custom op newton_schulz_triton (the op itself would
        # dispatch to its fake kernel under FakeTensorMode); out_dtype: newton_schulz keeps G's.
        ns_op._impl(G, coeffs, out_dtype=G.dtype, **kw)
    return recs


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


def _tname(dt) -> str:
    s = str(dt).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(s, s)


def describe(launch: Launch) -> tuple[str, dict]:
    """(variant name, config dict) of a launch, from its constexpr flags, dtypes and strides.

    Variant tags: ``scale`` = the per-matrix scale applied in the epilogue (first step or
    restart), ``y`` / ``ax`` = β·Y / a·X epilogue terms, ``dt=`` dtypes of the matrix arguments,
    ``tall`` = an operand read through transposed strides (row stride 1), ``prec=`` non-IEEE dot."""
    kw = launch.kwargs
    tags = [n[4:].lower() for n in sorted(kw) if n.startswith("HAS_") and kw[n] is True]
    tens = [a for a in launch.args if isinstance(a, _TensorArg)]
    mats = sorted({_tname(a.dtype) for a in tens if len(a.shape) >= 2})
    if mats:
        tags.append("dt=" + "+".join(mats))
    if any(len(a.strides) == 3 and a.strides[1] == 1 and a.strides[2] != 1 and a.shape[2] > 1 for a in tens):
        tags.append("tall")
    if kw.get("INPUT_PRECISION", "ieee") != "ieee":
        tags.append(f"prec={kw['INPUT_PRECISION']}")
    cfg = {k.lower(): v for k, v in kw.items() if k.startswith(("BLOCK_", "GROUP_")) and isinstance(v, int)}
    cfg.update(num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", 3))
    return " ".join(tags) or "plain", cfg


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


def parse_shape(s: str) -> tuple[int, int, int]:
    """'4096x16384' -> (1, 4096, 16384); '24x768x3072' -> (24, 768, 3072)."""
    parts = [int(p) for p in s.lower().split("x")]
    if len(parts) == 2:
        return (1, *parts)
    if len(parts) == 3:
        return tuple(parts)
    raise ValueError(f"shape {s!r}: write MxN or BxMxN")


def shape_str(shape: Sequence[int]) -> str:
    B, m, n = shape
    return f"{m}x{n}" if B == 1 else f"{B}x{m}x{n}"


def with_tall(shapes: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The shapes plus the transpose of each non-square one (the tall orientation: XᵀX kernels)."""
    out = list(shapes)
    for B, m, n in shapes:
        if m != n and (B, n, m) not in out:
            out.append((B, n, m))
    return out


def manifest_entries(arch: int, shape: tuple[int, int, int], input_dtype: str, out_dir: str | None = None,
                     launches: list[Launch] | None = None) -> list[dict]:
    """One manifest entry per distinct compiled kernel that newton_schulz launches for this input."""
    launches = trace_newton_schulz(shape, input_dtype, arch) if launches is None else launches
    groups: dict[str, dict] = {}
    for i, ln in enumerate(launches):
        rec = compile_launch(ln, arch, out_dir)
        variant, cfg = describe(ln)
        e = groups.get(rec["key"])
        if e is None:
            programs = 1
            for g in ln.grid:
                programs *= g
            ctas = occupancy(arch, rec["regs"], rec["smem_bytes"], rec["num_warps"])
            w, eff = waves(programs, ctas)
            e = groups[rec["key"]] = dict(
                kernel=_short(ln.kernel), variant=variant, arch=arch, shape=shape_str(shape),
                input_dtype=input_dtype, config=cfg, regs=rec["regs"], spill_bytes=rec["spill_bytes"],
                smem_bytes=rec["smem_bytes"], smem_limit=smem_limit(arch), cubin=rec.get("cubin"),
                programs=programs, ctas_per_sm=ctas, waves_h100=round(w, 3), wave_efficiency_h100=round(eff, 4),
                launches=0, launch_index=[], mma=rec["sass"]["mma_ptx"], sass=rec["sass"])
        e["launches"] += 1
        e["launch_index"].append(i)
    return list(groups.values())


def build_manifest(archs: Sequence[int], shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[str],
                   out_dir: str | None = None, log=None) -> list[dict]:
    entries = []
    for arch in archs:
        for shape in shapes:
            for dt in dtypes:
                es = manifest_entries(arch, shape, dt, out_dir)
                if log:
                    log(f"sm_{arch} {shape_str(shape)} {dt}: {len(es)} kernels")
                entries += es
    return entries


def summary_markdown(entries: list[dict]) -> str:
    """Markdown table of a manifest (one row per entry)."""
    lines = ["| arch | shape | G | kernel | variant | config | regs | spill B | smem KiB / limit | CTAs/SM | "
             "programs | wave eff. (132 SMs) | wgmma waits in loop | loads | C stores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        c = e["config"]
        if "block_m" in c and "block_k" in c:
            tile = f"{c['block_m']}x{c.get('block_n', c['block_m'])}x{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
        else:
            tile = f"w{c['num_warps']}"
        s = e["sass"]
        waits = ",".join(str(w) for w in s["wgmma_waits_in_loop"]) or ("—" if not s["hgmma"] else "none")
        loads = f"TMA {s['utmaldg']}" if s["utmaldg"] else (f"cp.async {s['ldgsts']}" if s["ldgsts"] else "LDG")
        st = (f"TMA {s['utmastg']}" if s["utmastg"] else
              f"{s['stg_128']}×128b {s['stg_u16']}×16b" if s["stg_total"] else "—")
        lines.append(f"| sm_{e['arch']} | {e['shape']} | {e['input_dtype']} | {e['kernel']} | {e['variant']} | {tile} | "
                     f"{e['regs']} | {e['spill_bytes']} | {e['smem_bytes'] / 1024:.0f} / {e['smem_limit'] // 1024} | "
                     f"{e['ctas_per_sm']} | {e['programs']} | {e['wave_efficiency_h100']:.0%} | {waits} | {loads} | {st} |")
    return "\n".join(lines)


def waves_markdown(entries: list[dict], arch: int = 90, input_dtype: str = "bf16") -> str:
    """Per shape and launched kernel on sm_<arch>: programs, CTAs/SM (registers + shared memory),
    waves and wave efficiency on the 132 SMs of an H100 SXM / H200."""
    lines = ["| shape | kernel [variant] | tile | launches | programs | regs | smem KiB | CTAs/SM | waves | "
             "wave efficiency |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if e["arch"] != arch or e["input_dtype"] != input_dtype:
            continue
        c = e["config"]
        tile = (f"{c['block_m']}x{c.get('block_n', c['block_m'])}x{c['block_k']}" if "block_m" in c else "—")
        lines.append(f"| {e['shape']} | {e['kernel']} [{e['variant']}] | {tile} | {e['launches']} | {e['programs']} | "
                     f"{e['regs']} | {e['smem_bytes'] / 1024:.0f} | {e['ctas_per_sm']} | {e['waves_h100']:.2f} | "
                     f"{e['wave_efficiency_h100']:.0%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastortho.kernels.aot", description=__doc__,
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


if __name__ == "__main__":
    sys.exit(main())
