"""Ahead-of-time compile of the single-program small-matrix kernel (``kernels/newton_schulz_small.py``)
for sm_80/86/89/90/100, as ``newton_schulz`` launches it (its launcher traced on fake CUDA tensors by
``fastortho.kernels.aot``): one launch per call, no spills, shared memory within each arch's limit,
tensor-core MMA in the SASS. 64 × 128×128 (also with a given float64 sum of squares, as Muon passes
it: the kernel forms the scale from it) and the largest padded variant (k = 100 → 128, tall, fp32 G,
"gram") run by default; the 4-warp, fp32-storage, TF32 and float32-sum variants with ``-m slow``."""
from __future__ import annotations

import pytest
import torch

from fastortho.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

ARCHS = (80, 86, 89, 90, 100)
F64 = torch.float64
# (shape (B, m, n), G dtype, storage dtype, normalize, allow_tf32, dtype of a given sumsq or None)
DEFAULT = [((64, 128, 128), torch.bfloat16, torch.bfloat16, "fro", False, None),
           ((64, 128, 128), torch.bfloat16, torch.bfloat16, "fro", False, F64),
           ((8, 1000, 100), torch.float32, torch.bfloat16, "gram", False, None)]
SLOW = [((4, 48, 64), torch.bfloat16, torch.float16, "fro", False, None),
        ((4, 32, 128), torch.float32, torch.float32, "fro", False, None),
        ((4, 128, 20), torch.float32, torch.float32, "gram", True, None),
        ((8, 1000, 100), torch.float32, torch.bfloat16, "fro", False, torch.float32),
        ((4, 32, 128), torch.float32, torch.float32, "fro", False, F64)]


def _trace(arch, shape, gdt, cdt, normalize, tf32, qdt=None):
    from fastortho.coefficients import get_schedule
    from fastortho.kernels.aot import trace_launches
    from fastortho.ops import newton_schulz as ns_op

    co, safety = get_schedule("polar_express")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with trace_launches(arch) as recs:
            G = torch.empty(shape, device="cuda", dtype=gdt)
            q = None if qdt is None else torch.empty(shape[0], device="cuda", dtype=qdt)
            ns_op._impl(G, co, safety=safety, normalize=normalize, eps=1e-7, compute_dtype=cdt, out_dtype=gdt,
                        fp32_first_gram=False, gram=None, sumsq=q)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return recs


def _params(cases, marks=()):
    return [pytest.param(arch, *c, marks=marks,
                         id=f"sm{arch}-{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{str(c[2])[6:]}-{c[3]}"
                            + ("-tf32" if c[4] else "") + (f"-sumsq{str(c[5])[6:]}" if c[5] else ""))
            for c in cases for arch in ARCHS]


@pytest.mark.parametrize("arch,shape,gdt,cdt,normalize,tf32,qdt", _params(DEFAULT) + _params(SLOW, pytest.mark.slow))
def test_small_kernel_compiles_clean(arch, shape, gdt, cdt, normalize, tf32, qdt):
    from fastortho.kernels.aot import compile_launch, smem_limit

    recs = _trace(arch, shape, gdt, cdt, normalize, tf32, qdt)
    assert [r.kernel for r in recs] == ["_ns_small_kernel"], [r.kernel for r in recs]
    assert recs[0].kwargs["HAS_SUMSQ"] is (qdt is not None)
    r = compile_launch(recs[0], arch)
    s = r["sass"]
    assert r["spill_bytes"] == 0 and s["stl_ldl"] == 0, f"{r['spill_stores']} / {r['spill_loads']} B spilled"
    assert r["smem_bytes"] <= smem_limit(arch), f"{r['smem_bytes']} B > {smem_limit(arch)} B on sm_{arch}"
    if cdt != torch.float32 or tf32:
        # wgmma needs 64-row tiles: k ≤ 32 on sm_90 runs mma.sync (HMMA), also tensor cores
        mma = s["hgmma"] + s["hmma"] + s["tcgen05"]
        assert mma > 0, f"no tensor-core MMA in the SASS on sm_{arch}: {s}"


def test_sm90_small_kernel_waits_to_zero_by_design():
    """On sm_90 the small kernel's products run on wgmma (HGMMA) and wait to 0 inside the loop
    (``WARPGROUP.DEPBAR.LE gsb0, 0x0``): every product feeds the next (B from A·A, each X chunk from
    B·X, then X·Xᵀ from that chunk), so no group can stay in flight. This is why the kernel is outside
    the "a wgmma group in flight" check of tests/test_kernels_compile.py (which covers the pipelined
    sym/apply kernels) and why bench/ns_model.py rates it as a synchronous chain (class "small"); a
    change here means that rate must be revisited."""
    from fastortho.kernels.aot import compile_launch

    s = compile_launch(_trace(90, (64, 128, 128), torch.bfloat16, torch.bfloat16, "fro", False)[0], 90)["sass"]
    assert s["hgmma"] > 0 and s["wgmma_waits_in_loop"] == [0], s
    # item 5's store rule holds: every global store is 128-bit (measured: 2 of 2, no 2-byte stores)
    assert s["stg_total"] > 0 and s["stg_128"] == s["stg_total"] and s["stg_u16"] == 0, s


def test_manifest_short_names():
    """The AOT manifest names the single-program and AOL kernels short, like sym/apply/cast."""
    from fastortho.coefficients import get_schedule
    from fastortho.kernels.aot import _short, trace_launches, trace_newton_schulz
    from fastortho.ops import newton_schulz as ns_op

    assert [_short(r.kernel) for r in trace_newton_schulz((64, 128, 128), "bf16", 90)] == ["ns_small"]
    co, _ = get_schedule("polar_express")
    with trace_launches(90) as recs:
        G = torch.empty(1, 512, 512, device="cuda", dtype=torch.bfloat16)
        ns_op._impl(G, co, safety=1.0, normalize="aol", eps=1e-7, compute_dtype=torch.bfloat16,
                    out_dtype=torch.bfloat16, fp32_first_gram=False, gram=None)
    names = {_short(r.kernel) for r in recs}
    assert {"aol_row_scale", "aol_apply"} <= names and not any(n.startswith("_") or n.endswith("_kernel")
                                                               for n in names), names
