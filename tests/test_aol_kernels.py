"""The AOL row-scaling kernels (``kernels/newton_schulz_aol.py``) compiled ahead of time for sm_80 and sm_90,
no GPU: the launches ``aol_first_step`` makes (recorded on fake CUDA tensors) compile without spills and
within each arch's shared memory, with 128-bit accesses where the operands are contiguous. Numerics are
checked under the interpreter (``tests/interpret/test_aol_interpret.py``).
"""
from __future__ import annotations

import pytest

from fastortho.kernels import HAS_TRITON, interpreter_enabled

pytestmark = pytest.mark.skipif(not HAS_TRITON or interpreter_enabled(), reason="needs triton, no interpreter")

# (k, L, G dtype, storage dtype, fp32 X₀, tall): bf16 G (default), fp32 G, a tall G read through transposed
# strides, fp32_first_gram (X₀ in fp32), Gram-space storage (fp16), and a batched small bucket.
VARIANTS = {
    "bf16": (4096, 4096, "bfloat16", "bfloat16", False, False),
    "fp32-G": (4096, 16384, "float32", "bfloat16", False, False),
    "tall": (4096, 16384, "bfloat16", "bfloat16", False, True),
    "fp32-first": (768, 3072, "float32", "bfloat16", True, False),
    "fp16": (128, 128, "float32", "float16", False, False),
}


def _record(arch, k, L, gdt, cdt, fp32_x, tall):
    """The two launches of ``aol_rescale`` as ``aol_first_step`` makes them, on fake sm_<arch> tensors."""
    import torch

    import fastortho.kernels.newton_schulz_aol as aol
    from fastortho.kernels.aot import trace_launches
    from fastortho.kernels.aot.trace import _Recorder

    with trace_launches(arch) as recs:
        saved = {n: getattr(aol, n) for n in ("_aol_row_scale_kernel", "_aol_apply_kernel")}
        try:
            for n, fn in saved.items():
                setattr(aol, n, _Recorder(fn, n, recs))
            g, c = getattr(torch, gdt), getattr(torch, cdt)
            G = torch.empty(1, L, k, device="cuda", dtype=g).mT if tall else torch.empty(1, k, L, device="cuda", dtype=g)
            raw = torch.empty(1, k, k, device="cuda", dtype=torch.float32)
            p = torch.empty(1, device="cuda", dtype=torch.float32)
            X = torch.empty(1, k, L, device="cuda", dtype=torch.float32 if fp32_x else c)
            aol.aol_rescale(raw, G, p, torch.empty(1, k, k, device="cuda", dtype=c), X, eps=1e-7)
        finally:
            for n, fn in saved.items():
                setattr(aol, n, fn)
    assert [r.kernel for r in recs] == ["_aol_row_scale_kernel", "_aol_apply_kernel"]
    return recs


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_aol_kernels_compile_clean(arch, variant):
    from fastortho.kernels.aot import compile_launch, smem_limit

    for ln in _record(arch, *VARIANTS[variant]):
        r = compile_launch(ln, arch)
        s = r["sass"]
        print(f"sm_{arch} {variant} {ln.kernel}: {r['regs']} regs, {r['smem_bytes']} B smem, stores {s['stg_128']}x128 "
              f"{s['stg_64']}x64 {s['stg_total']} total, grid {ln.grid}")
        assert r["spill_bytes"] == 0 and s["stl_ldl"] == 0, (ln.kernel, r["spill_stores"], r["spill_loads"])
        assert r["smem_bytes"] <= smem_limit(arch)
        assert 0 < r["regs"] <= 128, r["regs"]      # 4 warps: ≥ 4 CTAs/SM by registers
        if ln.kernel == "_aol_apply_kernel" and not VARIANTS[variant][5]:
            assert s["stg_128"] > 0, s              # contiguous outputs leave in 16-byte stores
