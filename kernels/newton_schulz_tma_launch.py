"""Launch helpers of the TMA kernels (``kernels/newton_schulz_tma.py``, sm_90 / sm_100): which layouts a
tensor descriptor can describe, the descriptor scratch allocator, and the launcher of the persistent
apply kernel. ``kernels/newton_schulz_launch.py`` decides when to call them (arch, settings) and
passes the device facts it reads, so this module imports nothing from it.

A tensor descriptor needs a 16-byte aligned base, one axis of stride 1 and every other stride a
multiple of 16 bytes; the TMA kernels also apply no rounding to their operands in registers (that
would make wgmma wait for every k-step), so the operands must already be in the dot's storage dtype.
"""
from __future__ import annotations

import torch

import triton

from . import _config, interpreter_enabled
from .newton_schulz_tma import _apply_tma_kernel

#: Which apply kernel ``apply_q`` launches: "auto" = the TMA kernel on sm_90 / sm_100 when the operands
#: allow it, else the cp.async kernel; "on" = the TMA kernel wherever the operands allow it, also
#: under the interpreter (tests); "off" = always the cp.async kernel.
APPLY_TMA = "auto"

# CTAs per SM and register cap of the persistent apply kernel per tile, from its AOT compile for sm_90
# (Triton 3.8; ``tests/test_apply_tma_compile.py`` checks that registers and shared memory allow exactly
# this many). The output tile is staged in shared memory for the TMA store, on top of the operand ring:
# 128×256×64 s3 (the large-matrix tile): 154–254 registers, 208 KiB -> 1 CTA; 128×128×64 s3: ≈ 100
# registers, 128 KiB -> 1 CTA (shared memory); 64×128×64 s4 (k < 512): 128 registers, 112 KiB -> 2.
# Other tiles (and sm_100, not compiled for this table): 1 CTA per SM, no register cap.
TMA_APPLY: dict[int, dict[_config.Config, tuple[int, int | None]]] = {
    90: {_config.APPLY_CONFIGS[4]: (1, None), _config.APPLY_CONFIGS[3]: (1, None), _config.APPLY_CONFIGS[1]: (2, None)},
}


def apply_tma_wanted(arch: int) -> bool:
    """The TMA apply kernel is wanted on ``arch`` (0 off CUDA) under the setting ``APPLY_TMA``."""
    if APPLY_TMA not in ("auto", "on", "off"):
        raise ValueError(f"newton_schulz_tma_launch.APPLY_TMA must be 'auto', 'on' or 'off', got {APPLY_TMA!r}")
    if APPLY_TMA == "on":
        return True
    return APPLY_TMA == "auto" and not interpreter_enabled() and arch in _config.TMA_ARCHS


def tma_trans(X: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool | None:
    """Whether X (B, r, c) is described through its transpose (row stride 1), False when its column
    stride is 1, None when no descriptor can describe it (dtype not in ``dtypes``, misaligned base,
    no unit stride, another stride not a multiple of 16 bytes)."""
    if X.dtype not in dtypes or not _aligned16(X):
        return None
    sb, sr, sc = X.stride()
    if sc == 1:
        other = (sb, sr)
    elif sr == 1:
        other = (sb, sc)
    else:
        return None
    if any((s * X.element_size()) % 16 for s in other):
        return None
    return sc != 1


def apply_tma_layout(Q: torch.Tensor, X: torch.Tensor, out: torch.Tensor,
                     xrd: torch.dtype) -> tuple[bool, bool, bool] | None:
    """(Q, X, out read/written transposed) when the TMA apply kernel can run ``apply_q`` on these
    tensors, else None: Q and X in the operand dtype ``xrd`` (a 16-bit one on a GPU: the fp32 first
    step of ``fp32_first_gram`` keeps the cp.async kernel), out in any storage dtype, all three
    describable."""
    if not interpreter_enabled() and xrd not in (torch.bfloat16, torch.float16):
        return None
    lay = (tma_trans(Q, (xrd,)), tma_trans(X, (xrd,)), tma_trans(out, (torch.bfloat16, torch.float16, torch.float32)))
    return None if None in lay else lay


def _aligned16(X: torch.Tensor) -> bool:
    """X's first element is 16-byte aligned (fake tensors of the AOT trace: from the storage offset,
    as fresh allocations are 256-byte aligned)."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(X):
        return (X.storage_offset() * X.element_size()) % 16 == 0
    return X.data_ptr() % 16 == 0


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for the descriptors the TMA kernels build on the device (128 B each)."""
    dev = "cpu" if interpreter_enabled() or not torch.cuda.is_available() else torch.cuda.current_device()
    return torch.empty(size, dtype=torch.int8, device=dev)


def _ensure_allocator() -> None:
    """Kernels that build tensor descriptors need ``triton.set_allocator``; install one unless the
    caller has (the setting is per thread: a context variable)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def sm_slots(t: torch.Tensor, per_sm: int) -> int:
    """Persistent programs: SMs × CTAs per SM (``_config.INTERPRET_TMA_PROGRAMS`` under the interpreter)."""
    if interpreter_enabled() or t.device.type != "cuda":
        return _config.INTERPRET_TMA_PROGRAMS
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(idx).multi_processor_count * per_sm


def apply_q_tma(Q: torch.Tensor, X: torch.Tensor, out: torch.Tensor, layout: tuple[bool, bool, bool], *,
                a: float, scale: torch.Tensor | None, cfg: _config.Config, arch: int, dot_dt, prec: str,
                out_round) -> torch.Tensor:
    """``apply_q`` through the persistent TMA kernel, tile ``cfg`` (the cp.async kernel's, so both give
    the same bits): a grid of min(tiles, SMs × CTAs per SM) programs."""
    B, k, L = X.shape
    per_sm, maxnreg = TMA_APPLY.get(arch, {}).get(cfg, (1, None))
    tm, tn = -(-k // cfg.block_m), -(-L // cfg.block_n)
    programs = max(1, min(B * tm * tn, sm_slots(X, per_sm)))
    _ensure_allocator()
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
    q_t, x_t, o_t = layout
    _apply_tma_kernel[(programs,)](
        Q, X, out, scale if scale is not None else out, B, k, L, tm, tn, programs,
        *Q.stride(), *X.stride(), *out.stride(), float(a),
        HAS_AX=a != 0.0, HAS_SCALE=scale is not None, Q_T=q_t, X_T=x_t, O_T=o_t, DOT_DTYPE=dot_dt,
        INPUT_PRECISION=prec, OUT_ROUND=out_round, SOFT_BF16=interpreter_enabled(), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **extra)
    return out
