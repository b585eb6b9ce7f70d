"""What ``newton_schulz`` launches: its real launchers run on fake CUDA tensors with every Triton kernel
replaced by a recorder, and each recorded launch described by its variant and tile config."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .. import HAS_TRITON
from .occupancy import H100_SMS, SM_REGS, SM_SMEM, SM_WARPS, smem_limit

_KERNELS = __name__.rsplit('.', 2)[0]     # fastortho.kernels


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
    return {"_sym_mm_kernel": "sym", "_sym_mm_tma_kernel": "sym", "_apply_kernel": "apply",
            "_apply_tma_kernel": "apply", "_sumsq_partial_kernel": "sumsq",
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

    Every ``triton.JITFunction`` in the modules of ``fastortho.kernels`` (launchers and the kernels they
    import by name; nothing compiles inside the block) is replaced by a recorder, the launchers'
    device queries answer for sm_<arch>, and tensors are fake CUDA tensors (no memory, no GPU).
    Yields the list the launches are appended to."""
    if not HAS_TRITON:
        raise RuntimeError("tracing the launchers needs triton")
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    from .. import newton_schulz_launch as ns_launch

    mods = [importlib.import_module(f"{_KERNELS}.{m.name}") for m in pkgutil.iter_modules(importlib.import_module(_KERNELS).__path__)
            if not m.ispkg]

    recs: list[Launch] = []
    saved: list[tuple[object, str, object]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        for mod in mods:
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, JITFunction):
                    patch(mod, name, _Recorder(obj, name, recs))
        if hasattr(ns_launch, "_arch"):
            patch(ns_launch, "_arch", lambda t: arch)
        if hasattr(ns_launch, "_device_smem"):   # memoized per device index: answer per traced arch
            patch(ns_launch, "_device_smem", lambda t: smem_limit(arch))
        patch(torch.cuda, "get_device_capability", lambda *a, **k: divmod(arch, 10))
        patch(torch.cuda, "get_device_properties", lambda *a, **k: _FakeProps(arch))
        patch(torch.cuda, "is_current_stream_capturing", lambda: False)
        patch(torch.cuda, "current_device", lambda: 0)
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

