"""Tile configurations of the Newton–Schulz kernels: a small table, no autotune stall.

Two kernels need a config (``kernels/newton_schulz.py``):

* ``sym``: C = α·P·Sᵀ + β·Y on a k×k output, square BLOCK_M×BLOCK_M tiles (mirroring needs
  square tiles), reduction over the long side L in steps of BLOCK_K;
* ``apply``: X' = Q·X + a·X on a k×L output, BLOCK_M×BLOCK_N tiles, reduction over k.

The table is keyed on (k, L, storage dtype, arch) and never on the batch size: a matrix must see
the same tiles alone or inside any batch (batch invariance, checked with ``torch.equal``).
The opt-in autotuner (``FASTORTHO_TRITON_AUTOTUNE=1``) searches the same list, pruned of configs
whose shared-memory footprint exceeds the device.

Footprint model: a pipelined ``tl.dot`` keeps operand tiles of (BM·BK + BN·BK) elements in
shared memory, ``num_stages`` copies on sm_90 (TMA/wgmma pipeline) and ``num_stages − 1`` on
sm_80 (cp.async ring); Triton reuses that space for the epilogue. The AOT check
(``tests/test_kernels_compile.py``) verifies that this model bounds ``metadata.shared`` for every
config and that a config it prunes really does not fit.
"""
from __future__ import annotations

from dataclasses import dataclass

# Per-block shared-memory limits (opt-in maximum) in bytes, per compute capability (CUDA
# programming guide, "Technical Specifications per Compute Capability"): used ahead of time and as
# the default; at run time the launcher reads the device's own limit instead (``smem_limit``).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 120: 99 * 1024}
DEFAULT_SMEM_LIMIT = 99 * 1024   # the smallest limit of any arch ≥ sm_80


def smem_limit(arch: int, device_limit: int | None = None) -> int:
    """Per-block shared memory of ``arch``: the device's opt-in maximum when known, else the table."""
    if device_limit:
        return int(device_limit)
    return SMEM_LIMIT.get(arch, DEFAULT_SMEM_LIMIT)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def smem_bytes(self, elem_bytes: int, arch: int = 90) -> int:
        """Shared memory of the operand pipeline (see module docstring)."""
        buffers = self.num_stages if arch >= 90 else max(1, self.num_stages - 1)
        return buffers * (self.block_m + self.block_n) * self.block_k * elem_bytes

    def fits(self, arch: int, elem_bytes: int, limit: int | None = None) -> bool:
        """The operand pipeline fits in ``limit`` (default: the arch's table entry).
        ``elem_bytes``: size of the elements the kernel *loads* (4 for an fp32 input read by the
        first step even when it is rounded to bf16 in registers: the pipeline buffers hold fp32)."""
        return self.smem_bytes(elem_bytes, arch) <= (limit or smem_limit(arch))


# Candidate lists (the autotune space). Sym configs have block_n == block_m.
SYM_CONFIGS: tuple[Config, ...] = (
    Config(64, 64, 64, 4, 4),
    Config(64, 64, 128, 4, 3),
    Config(128, 128, 32, 8, 4),
    Config(128, 128, 64, 8, 3),
    Config(128, 128, 64, 8, 4),
    Config(128, 128, 128, 8, 3),
)
APPLY_CONFIGS: tuple[Config, ...] = (
    Config(64, 64, 64, 4, 4),
    Config(64, 128, 64, 4, 4),
    Config(128, 128, 32, 8, 4),
    Config(128, 128, 64, 8, 3),
    Config(128, 256, 64, 8, 3),
    Config(128, 256, 64, 8, 4),
)

# Under the interpreter every program is numpy work, so the block count sets the run time: small
# tiles on test-sized inputs (48×80 still spans several tiles, the triangle map and the masks),
# large tiles on the 512×2048 accuracy matrices. Keyed on shape only, like the GPU table.
def _interpret_sym(k: int) -> Config:
    t = 16 if k <= 64 else (32 if k <= 128 else 128)
    return Config(t, t, t, 1, 1)


def _interpret_apply(k: int, L: int) -> Config:
    if k <= 64:
        return Config(16, 32, 16, 1, 1, group_m=2)
    return Config(128, 128, 128, 1, 1, group_m=2)


# fp32 operand tiles (fp32_first_gram: 3xTF32 dots; fp32 storage: IEEE or TF32 dots) hold twice
# the bytes and, for 3xTF32, split every operand in two: the bf16 table overflows shared memory
# there (128×128×64: 256 KiB) and spills. Checked by AOT compile (0 spills on sm_80 and sm_90):
FP32_SYM = {"tf32x3": Config(64, 64, 32, 4, 3), "ieee": Config(64, 64, 32, 8, 3), "tf32": Config(64, 64, 32, 8, 3)}
FP32_APPLY = Config(64, 64, 32, 4, 3)


def pick_sym(k: int, L: int, elem_bytes: int, arch: int, interpret: bool, limit: int | None = None) -> Config:
    """Table lookup for C = α·P·Sᵀ + β·Y, P, S of logical shape k×L; ``elem_bytes`` of the loaded
    operands, checked against the arch's (or the device's) shared-memory ``limit``."""
    if interpret:
        return _interpret_sym(k)
    # Small outputs: 64-tiles keep enough programs in flight (a 256² output is 10 triangle tiles
    # of 64 but only 3 of 128) and waste less work on diagonal tiles (factor (T+1)/(2T)).
    # From k = 512 on, 128-tiles: 64-tiles run at about half the tensor-core peak, and the buckets
    # of that size come batched (24 × 768×3072: 504 programs of 128). The rule cannot look at the
    # batch (batch invariance), so a lone 768² matrix gets 21 programs; a GPU run decides the cut.
    if k < 512:
        cfg = SYM_CONFIGS[1] if L >= 2 * k else SYM_CONFIGS[0]
    else:
        cfg = SYM_CONFIGS[3]
    return _first_fitting((cfg, SYM_CONFIGS[0], FP32_SYM["ieee"]), arch, elem_bytes, limit)


# The sm_90 / sm_100 symmetric kernel (``kernels/newton_schulz_tma.py``: TMA loads, persistent
# programs) takes the tile of ``pick_sym`` and launches SMs × CTAs-per-SM programs, with a register
# cap where one doubles the CTAs per SM. Per tile: (CTAs per SM, maxnreg), from the AOT compile of
# every variant newton_schulz launches (``tests/test_kernels_compile.py`` checks both), sm_90 bf16:
# 64×64×64 s4: 80–94 regs, 64 KiB (3 by shared memory); 64×64×128 s3: ≈ 90 regs, 96 KiB (2);
# 128×128×64 s3: 142–185 regs uncapped (1 CTA), 128 with the cap and no spill, 96 KiB (2). On
# sm_100 (tcgen05) the cap spills 272 B on that tile, which keeps 178 registers and 1 CTA per SM.
TMA_ARCHS = (90, 100)
TMA_SYM: dict[int, dict[Config, tuple[int, int | None]]] = {
    90: {SYM_CONFIGS[0]: (3, None), SYM_CONFIGS[1]: (2, None), SYM_CONFIGS[3]: (2, 128)},
    100: {SYM_CONFIGS[0]: (3, None), SYM_CONFIGS[1]: (2, None), SYM_CONFIGS[3]: (1, None)},
}
INTERPRET_TMA_PROGRAMS = 3   # interpreter: few programs, each walking several tiles


def pick_sym_tma(k: int, L: int, elem_bytes: int, arch: int, interpret: bool,
                 limit: int | None = None) -> tuple[Config, int, int | None]:
    """(tile config, persistent programs per SM, register cap or None) of the TMA symmetric
    kernel: the tile :func:`pick_sym` chooses and its row of ``TMA_SYM`` (1 CTA, no cap if none)."""
    cfg = pick_sym(k, L, elem_bytes, arch, interpret, limit)
    if interpret:
        return cfg, 1, None
    per_sm, maxnreg = TMA_SYM.get(arch, {}).get(cfg, (1, None))
    return cfg, per_sm, maxnreg


def pick_apply(k: int, L: int, elem_bytes: int, arch: int, interpret: bool, limit: int | None = None) -> Config:
    """Table lookup for X' = Q·X + a·X, Q k×k, X k×L (``elem_bytes``: see :func:`pick_sym`)."""
    if interpret:
        return _interpret_apply(k, L)
    if k * L <= 1024 * 1024 and k < 512:     # k ≥ 512: 128-row tiles, as in pick_sym
        cfg = APPLY_CONFIGS[1]
    elif k * L <= 1024 * 1024:
        cfg = APPLY_CONFIGS[3]
    elif arch >= 90:
        cfg = APPLY_CONFIGS[4]
    else:
        cfg = APPLY_CONFIGS[3]
    return _first_fitting((cfg, APPLY_CONFIGS[3], APPLY_CONFIGS[0], FP32_APPLY), arch, elem_bytes, limit)


def _first_fitting(cands: tuple[Config, ...], arch: int, elem_bytes: int, limit: int | None) -> Config:
    """The first candidate whose operand pipeline fits, largest tiles first (an fp32-input 4096²
    apply on sm_90: 128×256×64 needs 288 KiB, 128×128×64 fits in 192 KiB); the last (smallest,
    48 KiB in fp32 on sm_90) is taken regardless, so a caller always gets a config."""
    for c in cands:
        if c.fits(arch, elem_bytes, limit):
            return c
    return cands[-1]


# Line 3 of a standard Newton–Schulz step, X ← a·X + B·X, has two implementations: the apply kernel
# ("triton") and cuBLAS ("cublas": ``torch.baddbmm(X, B, X, beta=a, out=X_next)``, whose fp32 epilogue
# adds a·X before the single rounding, as the kernel does; ``bmm`` then ``add_`` would round twice:
# on CPU 42% of bf16 outputs then differ from the once-rounded result, against 0.005% for baddbmm).
# The choice is a table keyed on (arch, k, L) with k and L rounded up to powers of two, never on the
# batch size (batch invariance). Rows come from a GPU run of ``bench/bench_newton_schulz.py --line3``,
# which prints them in this format. No GPU has measured yet, so the table is empty and every shape
# takes the Triton apply kernel. ``FASTORTHO_NS_LINE3=triton|cublas`` forces one for every shape.
LINE3: dict[tuple[int, int, int], str] = {}
LINE3_DEFAULT = "triton"
LINE3_CHOICES = ("triton", "cublas")


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def line3_key(arch: int, k: int, L: int) -> tuple[int, int, int]:
    """The table key of a k×L step (k ≤ L) on ``arch``: (arch, k and L rounded up to powers of two)."""
    return (arch, _pow2_ceil(k), _pow2_ceil(L))


def pick_line3(k: int, L: int, arch: int) -> str:
    """"triton" or "cublas" for line 3 of a k×L step on ``arch`` (table row, else ``LINE3_DEFAULT``)."""
    return LINE3.get(line3_key(arch, k, L), LINE3_DEFAULT)
