"""Ahead-of-time compilation of every Newton–Schulz kernel config for sm_80 and sm_90, no GPU.

For each (kernel, config, arch) of ``kernels/_config.py`` that the table keeps for that arch:
tensor-core instructions in the PTX (mma.sync / wgmma), shared memory within the device limit
and within the footprint model, zero spill bytes from Triton's bundled ``ptxas -v``. Each config
is compiled once per session (≈ 2–4 s each on the CI box).
"""
from __future__ import annotations

import pytest

from fastortho.kernels import HAS_TRITON
from fastortho.kernels._config import (
    APPLY_CONFIGS,
    FP32_APPLY,
    FP32_SYM,
    SMEM_LIMIT,
    SYM_CONFIGS,
    Config,
    pick_apply,
    pick_sym,
)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

ARCHS = (80, 90)
MMA = {80: "mma.sync", 90: "wgmma"}
BF16 = 2


def _cases():
    for arch in ARCHS:
        for kind, cfgs in (("sym", SYM_CONFIGS), ("apply", APPLY_CONFIGS)):
            for cfg in cfgs:
                if cfg.fits(arch, BF16):
                    yield kind, cfg, arch


CASES = list(_cases())
IDS = [f"{k}-sm{a}-{c.block_m}x{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}" for k, c, a in CASES]


@pytest.fixture(scope="session")
def aot_results():
    from fastortho.kernels.aot import analyze

    cache: dict = {}

    def get(kind, cfg, arch):
        key = (kind, cfg, arch)
        if key not in cache:
            cache[key] = analyze(kind, cfg, arch)
        return cache[key]

    return get


@pytest.mark.parametrize("kind,cfg,arch", CASES, ids=IDS)
def test_config_compiles_clean(aot_results, kind, cfg, arch):
    r = aot_results(kind, cfg, arch)
    assert r.mma == MMA[arch], f"no {MMA[arch]} in the PTX of {kind} {cfg} (found {r.mma!r})"
    assert r.shared <= SMEM_LIMIT[arch], f"{r.shared} B shared > {SMEM_LIMIT[arch]} B on sm_{arch}"
    assert r.shared <= cfg.smem_bytes(BF16, arch), "footprint model underestimates: pruning would be unsafe"
    assert r.spill_stores == 0 and r.spill_loads == 0, f"ptxas spills: {r.spill_stores} B st / {r.spill_loads} B ld"
    assert 0 < r.registers <= 255


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_config_really_overflows(arch):
    """A config the model prunes must also be rejected by the compiler's own accounting."""
    from fastortho.kernels.aot import compile_kernel

    big = Config(256, 256, 64, 8, 4)
    assert not big.fits(arch, BF16)
    assert compile_kernel("apply", big, arch).metadata.shared > SMEM_LIMIT[arch]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k,L", [(128, 128), (768, 3072), (1024, 1024), (4096, 4096), (4096, 16384), (8192, 8192)])
def test_table_choices_are_compiled_configs(arch, k, L):
    """The first call never waits for autotuning: the table answers with a checked config."""
    s, a = pick_sym(k, L, BF16, arch, False), pick_apply(k, L, BF16, arch, False)
    assert ("sym", s, arch) in CASES and ("apply", a, arch) in CASES
    assert s.block_m == s.block_n   # mirrored tiles must be square


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
@pytest.mark.parametrize("kind", ["sym", "apply"])
def test_fp32_operand_configs(kind, precision, arch):
    """fp32 operands: the fp32_first_gram step (3xTF32 on tensor cores) and fp32 storage (IEEE)."""
    from fastortho.kernels.aot import analyze

    cfg = FP32_SYM[precision] if kind == "sym" else FP32_APPLY
    r = analyze(kind, cfg, arch, "fp32", precision)
    if precision == "tf32x3":
        assert r.mma == MMA[arch]
    assert r.shared <= SMEM_LIMIT[arch]
    assert r.spill_stores == 0 and r.spill_loads == 0, f"ptxas spills: {r.spill_stores}/{r.spill_loads} B"
