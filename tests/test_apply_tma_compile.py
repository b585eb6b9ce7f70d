"""The persistent TMA apply kernel compiled ahead of time (no GPU): which apply kernel ``apply_q``
launches per arch, and, for each tile of the sm_90 table, what the SASS shows (TMA loads and store,
asynchronous wgmma, no spills) and that the CTAs per SM of ``TMA_APPLY`` (the persistent grid's size)
are what registers and shared memory allow."""
from __future__ import annotations

import pytest

from fastortho.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def _apply_launches(arch, k, L, *, tall=False, x_dtype="bfloat16", out_dtype="bfloat16", B=1, **kw):
    """The launches ``apply_q`` makes for Q (B, k, k) and X (B, k, L) on sm_<arch> (fake tensors);
    ``tall``: X and out are transposes of row-major L×k matrices."""
    import torch

    from fastortho.kernels import newton_schulz_launch as ns_launch
    from fastortho.kernels.aot import trace_launches

    with trace_launches(arch) as recs:
        def mat(dt):
            dt = getattr(torch, dt)
            return torch.empty(B, L, k, device="cuda", dtype=dt).mT if tall else torch.empty(B, k, L, device="cuda", dtype=dt)

        Q = torch.empty(B, k, k, device="cuda", dtype=torch.bfloat16)
        ns_launch.apply_q(Q, mat(x_dtype), mat(out_dtype), a=1.5, **kw)
    return recs


@pytest.mark.parametrize("arch", [80, 86, 89, 90, 100])
def test_apply_kernel_choice_per_arch(arch):
    """The TMA kernel on sm_90 / sm_100 (wide and tall), the cp.async kernel below sm_90; the fp32
    first step of ``fp32_first_gram`` (X in fp32, converted in registers) and an fp32 output whose
    staging box would overflow shared memory keep the cp.async kernel everywhere."""
    import torch

    want = "_apply_tma_kernel" if arch >= 90 else "_apply_kernel"
    for tall in (False, True):
        (ln,) = _apply_launches(arch, 4096, 4096, tall=tall)
        assert ln.kernel == want, (arch, tall)
        if want == "_apply_tma_kernel":
            assert ln.kwargs["X_T"] == ln.kwargs["O_T"] == tall and not ln.kwargs["Q_T"]
    (ln,) = _apply_launches(arch, 1024, 4096, x_dtype="float32", round_dtype=torch.bfloat16,
                            x_round_dtype=torch.float32, first_fp32=True)
    assert ln.kernel == "_apply_kernel"
    (ln,) = _apply_launches(arch, 4096, 4096, out_dtype="float32", round_dtype=torch.bfloat16)
    assert ln.kernel == "_apply_kernel"     # 144 KiB ring + a 128 KiB fp32 output box > 227 KiB


def test_newton_schulz_launches_tma_apply_on_sm90():
    """Every apply of a bf16 / fp32-input NS call on the issue's shapes runs the TMA kernel on sm_90."""
    from fastortho.kernels.aot import trace_newton_schulz

    for shape in ((1, 4096, 4096), (1, 4096, 16384), (1, 16384, 4096), (24, 768, 3072)):
        for dt in ("bf16", "fp32"):
            kinds = {ln.kernel for ln in trace_newton_schulz(shape, dt, 90) if "apply" in ln.kernel}
            assert kinds == {"_apply_tma_kernel"}, (shape, dt, kinds)


# (k, L, tall) whose table tile is each row of TMA_APPLY[90]: 128×256×64, 128×128×64, 64×128×64; a
# tall operand read through transposed boxes; a batch (24 × 768×3072) whose tiles outnumber the slots.
CASES = [(4096, 4096, False, 1), (1024, 1024, False, 1), (256, 1024, False, 1), (4096, 16384, True, 1),
         (768, 3072, False, 24)]


@pytest.mark.parametrize("k,L,tall,B", CASES, ids=lambda v: str(v))
def test_tma_apply_tiles_compile(k, L, tall, B):
    """sm_90: UTMALDG loads (no cp.async), a TMA store (no 2-byte stores), wgmma waiting with a group
    in flight in the main loop, no spills, shared memory within the limit, and the table's CTAs per SM
    equal to what the compiled registers and shared memory allow; grid = min(tiles, 132 × CTAs/SM)."""
    from fastortho.kernels.aot import compile_launch, describe, occupancy, smem_limit
    from fastortho.kernels.newton_schulz_tma_launch import TMA_APPLY

    (ln,) = _apply_launches(90, k, L, tall=tall, B=B)
    assert ln.kernel == "_apply_tma_kernel"
    r = compile_launch(ln, 90)
    s = r["sass"]
    cfg = describe(ln)[1]
    table = {(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages): n for c, (n, _) in TMA_APPLY[90].items()}
    n = table[(cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["num_warps"], cfg["num_stages"])]
    assert s["utmaldg"] > 0 and s["ldgsts"] == 0
    assert s["utmastg"] > 0 and s["stg_u16"] == 0
    assert s["wgmma_waits_in_loop"] and min(s["wgmma_waits_in_loop"]) >= 1, s["wgmma_waits_in_loop"]
    assert r["spill_bytes"] == 0 and s["stl_ldl"] == 0
    assert r["smem_bytes"] <= smem_limit(90)
    assert occupancy(90, r["regs"], r["smem_bytes"], r["num_warps"]) == n, (r["regs"], r["smem_bytes"])
    tiles = B * -(-k // cfg["block_m"]) * -(-L // cfg["block_n"])
    assert ln.grid == (min(132 * n, tiles),)


def test_manifest_waves_of_persistent_launches():
    """The manifest counts a persistent launch's tiles, not its programs: 4096² apply on sm_90 is 512
    tiles of 128×256 over 132 programs, 3.88 tiles per program, efficiency 512 / 528 (the busiest
    programs run 4); a one-tile-per-program launch keeps whole waves of programs."""
    from fastortho.kernels.aot import manifest_entries
    from fastortho.kernels.aot.manifest import persistent_tiles, waves_markdown

    (ln,) = _apply_launches(90, 4096, 4096)
    assert persistent_tiles(ln) == 512
    (e,) = manifest_entries(90, (1, 4096, 4096), "bf16", launches=[ln])
    assert (e["programs"], e["tiles"], e["waves_h100"], e["wave_efficiency_h100"]) == (132, 512, round(512 / 132, 3),
                                                                                      round(512 / 528, 4))
    assert "| 132 | 512 |" in waves_markdown([e])
    (old,) = _apply_launches(80, 4096, 4096)
    assert persistent_tiles(old) is None
