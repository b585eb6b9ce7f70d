"""fastortho._C: the fused Muon step ops (CPU twins, CUDA registration, opcheck, hostile lists).

Reference = the pure-torch ``_foreach`` backend of ``fastortho.ops``, which is in turn checked
against the peers' own one-line torch formulas (torch.optim.Muon / Moonlight). Exactness claims:

* buffers and NS inputs: bit-identical to the reference for every dtype combination (same roundings
  in the same order: ``csrc/muon_step.h``), NaN compared as equal;
* ``sumsq`` (float64): the C kernels sum exact fp32 squares in float64, so they are within the
  float64 summation error of the oracle (bound used: one fp32 rounding, 2**-24 relative, as when the
  result was rounded to fp32); the foreach fallback squares a float64 ``_foreach_norm`` (bound used:
  1e-6 relative; an fp32 norm was off by 1.2% on the 64M tensor). It never overflows for finite input
  (a 1e20 gradient has a finite sumsq) and is non-finite exactly when an element is;
* ``muon_apply_`` with Python-number scalars: bit-identical; with tensor scalars the reference rounds
  ``a*O`` before the add where the kernel fuses it, so they differ by at most one ulp of the result
  (measured: max |diff| = 2.4e-7 on N(0,1) params, i.e. one fp32 ulp at magnitude 2-4).

Environment: ``FASTORTHO_REQUIRE_C=1`` (set it in CI) turns "``_C`` is not built" from a skip into a
failure.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastortho.ops import _load as _C_loader
from fastortho.ops import muon_apply_, muon_momentum_

KCHUNK = 16384  # csrc/muon_step.h
REQUIRE_C = os.environ.get("FASTORTHO_REQUIRE_C") == "1"
FOREACH_SUMSQ_RTOL = 1e-6  # float64 norm squared, see the module docstring

needs_c = pytest.mark.skipif(
    not _C_loader.HAS_C and not REQUIRE_C,
    reason=f"fastortho._C not built ({_C_loader.IMPORT_ERROR!r}); FASTORTHO_REQUIRE_C=1 makes this a failure",
)

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BUF_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [torch.bfloat16, torch.float32, torch.float16]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# tails around the vector width (4 on GPU, 16 lanes on CPU) and the chunk size
SHAPES = [(37, 53), (5, 7), (1,), (0, 3), (3, 0, 2), (KCHUNK + 1,), (2, KCHUNK - 3), (64, 64, 3)]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)) and \
        torch.equal(a.isnan(), b.isnan())


def _where_differ(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    i = int(d.nan_to_num(float("inf")).argmax())
    return f"{int((d != 0).sum())} of {d.numel()} differ; worst at flat {i}: {a.flatten()[i]} vs {b.flatten()[i]}"


def _lists(shapes, dtype, seed, device="cpu", scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes]


def _oracle_sumsq(us: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([float((u.double() ** 2).sum()) for u in us], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# build and registration
# ----------------------------------------------------------------------------------------------
def test_c_loaded():
    if not _C_loader.HAS_C:
        msg = f"fastortho._C did not load: {_C_loader.IMPORT_ERROR!r}"
        if REQUIRE_C:
            pytest.fail(msg)
        pytest.skip(msg + " (FASTORTHO_REQUIRE_C=1 makes this a failure)")
    for op in _C_loader.OPS:
        for key in ("CPU", "Meta"):
            assert _C_loader.has_kernel(op, key), f"{op} has no {key} kernel"


def _cuda_build_expected() -> str | None:
    """None if the CUDA flavour of _C must have been built here, else the reason it was not."""
    if not torch.version.cuda:
        return "torch is a CPU build: the CUDA flavour cannot be built"
    if os.environ.get("FASTORTHO_CUDA") == "0" or os.environ.get("FASTORTHO_BUILD_EXT") == "0":
        return "FASTORTHO_CUDA=0 / FASTORTHO_BUILD_EXT=0 in the environment"
    if not (os.environ.get("CUDA_HOME") or shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")):
        return "no nvcc on this machine: setup.py builds the CPU-only flavour"
    return None


def test_cuda_kernels_registered():
    reason = _cuda_build_expected()
    if reason is not None:
        pytest.skip(reason)
    if not _C_loader.HAS_C:
        pytest.fail(f"CUDA torch and nvcc are present but fastortho._C did not load: {_C_loader.IMPORT_ERROR!r}")
    missing = [op for op in _C_loader.OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}: _C was built CPU-only"
    assert _C_loader.HAS_C_CUDA


# ----------------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, aot dispatch) on CPU
# ----------------------------------------------------------------------------------------------
@needs_c
@pytest.mark.parametrize("ema,nesterov", [(True, True), (False, False)])
def test_opcheck_momentum(ema, nesterov):
    shapes = [(8, 12), (3,), (0, 4)]
    grads = _lists(shapes, torch.bfloat16, 0)
    bufs = _lists(shapes, torch.float32, 1)
    outs = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
    sumsq = torch.empty(len(shapes))
    torch.library.opcheck(torch.ops.fastortho.muon_momentum_.default,
                          (grads, bufs, outs, sumsq, 0.9, nesterov, ema))


@needs_c
@pytest.mark.parametrize("tensor_scalars", [False, True])
def test_opcheck_apply(tensor_scalars):
    shapes = [(8, 12), (5,)]
    params = _lists(shapes, torch.float32, 0)
    updates = _lists(shapes, torch.bfloat16, 1)
    if tensor_scalars:
        op, args = torch.ops.fastortho.muon_apply_.tensor, (params, updates, torch.tensor(0.02), torch.tensor(0.1),
                                                            torch.tensor([1.0, 2.0]))
    else:
        op, args = torch.ops.fastortho.muon_apply_.default, (params, updates, 0.02, 0.1, [1.0, 2.0])
    torch.library.opcheck(op, args)


@needs_c
def test_torch_compile_fullgraph():
    """Dynamo traces the Python API and the ops (Meta kernels, auto-functionalization) in one graph."""

    def step(gs, bs, ps):
        us, ss = muon_momentum_(gs, bs, momentum=0.9, nesterov=True, backend="c")
        muon_apply_(ps, us, lr=0.1, weight_decay=0.01, scales=[1.0, 2.0], backend="c")
        return ss

    gs = _lists([(8, 8), (5,)], torch.float32, 70)
    bs, ps = _lists([(8, 8), (5,)], torch.float32, 71), _lists([(8, 8), (5,)], torch.float32, 72)
    bs2, ps2 = [b.clone() for b in bs], [p.clone() for p in ps]
    torch._dynamo.reset()
    s1 = torch.compile(step, fullgraph=True, backend="aot_eager")(gs, bs, ps)
    s2 = step(gs, bs2, ps2)
    assert torch.equal(s1, s2)
    assert all(_equal(a, b) for a, b in zip(bs + ps, bs2 + ps2))


# ----------------------------------------------------------------------------------------------
# the reference itself against the peers' formulas
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["ema", "sum"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_foreach_matches_peer_formulas(convention, nesterov):
    beta = 0.95
    grads = _lists(SHAPES[:3], torch.float32, 2)
    bufs = _lists(SHAPES[:3], torch.float32, 3)
    ref_b = [b.clone() for b in bufs]
    outs, _ = muon_momentum_(grads, bufs, momentum=beta, nesterov=nesterov, convention=convention,
                             out_dtype=torch.float32, backend="foreach")
    for g, b, rb, u in zip(grads, bufs, ref_b, outs):
        if convention == "ema":  # torch.optim.Muon._single_tensor_muon
            rb.lerp_(g, 1 - beta)
            ru = g.lerp(rb, beta) if nesterov else rb
        else:  # Moonlight
            rb.mul_(beta).add_(g)
            ru = g.add(rb, alpha=beta) if nesterov else rb
        assert _equal(b, rb) and _equal(u, ru)
        assert u.data_ptr() != b.data_ptr(), "the NS input must not alias the buffer"


def test_foreach_apply_matches_torch_optim_muon():
    lr, wd, scales = 0.02, 0.1, [1.5, 0.7, 3.0]
    params = _lists(SHAPES[:3], torch.float32, 4)
    updates = _lists(SHAPES[:3], torch.float32, 5)
    ref = [p.clone() for p in params]
    muon_apply_(params, updates, lr=lr, weight_decay=wd, scales=scales, backend="foreach")
    for p, r, o, s in zip(params, ref, updates, scales):
        r.mul_(1 - lr * wd)
        r.add_(o, alpha=-lr * s)
        assert _equal(p, r)


# ----------------------------------------------------------------------------------------------
# CPU twins against the reference
# ----------------------------------------------------------------------------------------------
def _run_momentum(backend, grads, bufs, **kw):
    bufs = [b.clone() for b in bufs]
    outs, sumsq = muon_momentum_(grads, bufs, backend=backend, **kw)
    return bufs, outs, sumsq


@needs_c
@pytest.mark.parametrize("gdt", GRAD_DTYPES)
@pytest.mark.parametrize("bdt", BUF_DTYPES)
@pytest.mark.parametrize("odt", OUT_DTYPES)
def test_cpu_momentum_matches_reference(gdt, bdt, odt):
    grads = _lists(SHAPES, gdt, 10)
    bufs = _lists(SHAPES, bdt, 11)
    grads_before = [g.clone() for g in grads]
    for convention in ("ema", "sum"):
        for nesterov in (True, False):
            kw = dict(momentum=0.95, nesterov=nesterov, convention=convention, out_dtype=odt)
            cb, cu, cs = _run_momentum("c", grads, bufs, **kw)
            rb, ru, rs = _run_momentum("foreach", grads, bufs, **kw)
            for i in range(len(SHAPES)):
                assert _equal(cb[i], rb[i]), f"{convention} nesterov={nesterov} buf[{i}]: {_where_differ(cb[i], rb[i])}"
                assert _equal(cu[i], ru[i]), f"{convention} nesterov={nesterov} u[{i}]: {_where_differ(cu[i], ru[i])}"
            # sumsq of the fp32 u: the fp32 u is the reference's fp32 u (bit-identical buffers)
            assert cs.dtype == torch.float64 and cs.shape == (len(SHAPES),)
            oracle = _oracle_sumsq(muon_momentum_(grads, [b.clone() for b in bufs], backend="foreach",
                                                  **{**kw, "out_dtype": torch.float32})[0])
            rel = 2.0**-24 * 1.01  # one rounding of a float64 sum (exact squares) to fp32
            torch.testing.assert_close(cs.double(), oracle, rtol=rel, atol=0)
            torch.testing.assert_close(rs.double(), oracle, rtol=FOREACH_SUMSQ_RTOL, atol=0)
    for g, g0 in zip(grads, grads_before):
        assert _equal(g, g0), "grads must never be written"


@needs_c
def test_cpu_result_independent_of_thread_count():
    grads = _lists([(300, 301), (KCHUNK * 3 + 7,)], torch.bfloat16, 90)
    bufs = _lists([(300, 301), (KCHUNK * 3 + 7,)], torch.float32, 91)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b1, u1, s1 = _run_momentum("c", grads, bufs, momentum=0.9, nesterov=True)
        torch.set_num_threads(max(2, old))
        b2, u2, s2 = _run_momentum("c", grads, bufs, momentum=0.9, nesterov=True)
    finally:
        torch.set_num_threads(old)
    assert all(_equal(x, y) for x, y in zip(b1 + u1, b2 + u2)) and torch.equal(s1, s2)


_BASELINE_SCRIPT = """
import torch
from fastortho.ops import muon_momentum_, muon_apply_
gen = torch.Generator().manual_seed(0)
shapes = [(37, 53), (16384 + 5,), (1,)]
for gdt, bdt, odt in [(torch.bfloat16, torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16, torch.float16),
                      (torch.float32, torch.float32, torch.float32)]:
    for conv in ("ema", "sum"):
        g = [torch.randn(s, generator=gen).to(gdt) for s in shapes]
        b = [torch.randn(s, generator=gen).to(bdt) for s in shapes]
        b2 = [x.clone() for x in b]
        u1, _ = muon_momentum_(g, b, momentum=0.95, nesterov=True, convention=conv, out_dtype=odt, backend="c")
        u2, _ = muon_momentum_(g, b2, momentum=0.95, nesterov=True, convention=conv, out_dtype=odt, backend="foreach")
        assert all(torch.equal(x, y) for x, y in zip(b + u1, b2 + u2)), (gdt, bdt, odt, conv)
        p = [torch.randn(s, generator=gen).to(gdt) for s in shapes]
        p2 = [x.clone() for x in p]
        muon_apply_(p, u1, lr=0.02, weight_decay=0.1, scales=[1.0, 2.0, 3.0], backend="c")
        muon_apply_(p2, u2, lr=0.02, weight_decay=0.1, scales=[1.0, 2.0, 3.0], backend="foreach")
        assert all(torch.equal(x, y) for x, y in zip(p, p2)), (gdt, odt)
print("ok")
"""


@needs_c
def test_cpu_baseline_copy_is_bit_identical():
    """The portable (no AVX2/FMA) copy of the CPU loops, forced by FASTORTHO_CPU_BASELINE=1, in a
    subprocess because the choice is made once per process."""
    import subprocess
    import sys

    env = {**os.environ, "FASTORTHO_CPU_BASELINE": "1"}
    p = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


@needs_c
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_cpu_momentum_lerp_branches(beta):
    """lerp switches formula at |w| = 0.5: both branches, and the end points, must match torch."""
    grads = _lists(SHAPES[:2], torch.float32, 12)
    bufs = _lists(SHAPES[:2], torch.float32, 13)
    for nesterov in (True, False):
        kw = dict(momentum=beta, nesterov=nesterov, convention="ema", out_dtype=torch.float32)
        cb, cu, _ = _run_momentum("c", grads, bufs, **kw)
        rb, ru, _ = _run_momentum("foreach", grads, bufs, **kw)
        assert all(_equal(x, y) for x, y in zip(cb + cu, rb + ru))


@needs_c
@pytest.mark.parametrize("pdt", PARAM_DTYPES)
@pytest.mark.parametrize("odt", OUT_DTYPES)
def test_cpu_apply_matches_reference(pdt, odt):
    params = _lists(SHAPES, pdt, 20)
    updates = _lists(SHAPES, odt, 21)
    updates_before = [o.clone() for o in updates]
    scales = [0.5 + 0.25 * i for i in range(len(SHAPES))]
    # Python-number scalars: bit-identical
    cp, rp = [p.clone() for p in params], [p.clone() for p in params]
    muon_apply_(cp, updates, lr=0.02, weight_decay=0.1, scales=scales, backend="c")
    muon_apply_(rp, updates, lr=0.02, weight_decay=0.1, scales=scales, backend="foreach")
    for i, (a, b) in enumerate(zip(cp, rp)):
        assert _equal(a, b), f"params[{i}]: {_where_differ(a, b)}"
    # tensor scalars (device-side lr/wd/scales): the reference rounds a*O (fp32) before the add, the
    # kernel does not; then both round to p's dtype. Bound: one ulp of p's dtype at the result plus
    # one fp32 ulp of a*O (a cancellation p*d ~ a*O makes the second term dominate).
    kw = dict(lr=torch.tensor(0.02), weight_decay=torch.tensor(0.1), scales=torch.tensor(scales))
    cp, rp = [p.clone() for p in params], [p.clone() for p in params]
    muon_apply_(cp, updates, backend="c", **kw)
    muon_apply_(rp, updates, backend="foreach", **kw)
    for i, (a, b) in enumerate(zip(cp, rp)):
        a_o = (0.02 * scales[i] * updates[i].float()).abs()
        bound = torch.finfo(pdt).eps * torch.maximum(a.float().abs(), b.float().abs()) + \
            torch.finfo(torch.float32).eps * a_o
        assert bool(((a.float() - b.float()).abs() <= bound).all()), f"params[{i}]: {_where_differ(a, b)}"
    # the same tensor scalars through the C kernel's host path give the fp32 math exactly
    cp2 = [p.clone() for p in params]
    muon_apply_(cp2, updates, backend="c", lr=torch.tensor(0.02), weight_decay=torch.tensor(0.1),
                scales=torch.tensor(scales))
    assert all(_equal(a, b) for a, b in zip(cp, cp2))
    assert all(_equal(o, o0) for o, o0 in zip(updates, updates_before)), "updates must never be written"


@needs_c
def test_cpu_apply_mixed_scalar_sources():
    """lr as a tensor with wd and scales as numbers (and the other combinations) use fp32 scalar math."""
    params = _lists(SHAPES[:3], torch.float32, 22)
    updates = _lists(SHAPES[:3], torch.bfloat16, 23)
    for lr, wd, sc in [(torch.tensor(0.02), 0.1, [1.0, 2.0, 3.0]), (0.02, torch.tensor(0.1), [1.0, 2.0, 3.0]),
                       (0.02, 0.1, torch.tensor([1.0, 2.0, 3.0]))]:
        cp, rp = [p.clone() for p in params], [p.clone() for p in params]
        muon_apply_(cp, updates, lr=lr, weight_decay=wd, scales=sc, backend="c")
        muon_apply_(rp, updates, lr=lr, weight_decay=wd, scales=sc, backend="foreach")
        for a, b, o, s_i in zip(cp, rp, updates, [1.0, 2.0, 3.0]):
            bound = torch.finfo(torch.float32).eps * (a.abs() + (0.02 * s_i * o.float()).abs())
            assert bool(((a - b).abs() <= bound).all()), _where_differ(a, b)


@needs_c
def test_mixed_dtype_lists_are_grouped():
    """The Python API splits a list with mixed dtypes into one C call per dtype combination."""
    shapes = [(4, 5), (6,), (3, 3), (7,)]
    grads = [torch.randn(s).to(dt) for s, dt in zip(shapes, [torch.float32, torch.bfloat16, torch.float32, torch.float16])]
    bufs = [torch.randn(s).to(dt) for s, dt in zip(shapes, [torch.float32, torch.float32, torch.bfloat16, torch.float32])]
    kw = dict(momentum=0.9, nesterov=True, out_dtype=torch.bfloat16)
    cb, cu, cs = _run_momentum("c", grads, bufs, **kw)
    rb, ru, rs = _run_momentum("foreach", grads, bufs, **kw)
    assert all(_equal(x, y) for x, y in zip(cb + cu, rb + ru))
    torch.testing.assert_close(cs, rs, rtol=FOREACH_SUMSQ_RTOL, atol=0)
    params = [torch.randn(s).to(dt) for s, dt in zip(shapes, [torch.float32, torch.bfloat16, torch.float16, torch.float32])]
    cp, rp = [p.clone() for p in params], [p.clone() for p in params]
    muon_apply_(cp, cu, lr=0.1, weight_decay=0.01, scales=[1, 2, 3, 4], backend="c")
    muon_apply_(rp, ru, lr=0.1, weight_decay=0.01, scales=[1, 2, 3, 4], backend="foreach")
    assert all(_equal(x, y) for x, y in zip(cp, rp))


@pytest.mark.parametrize("backend", ["foreach", pytest.param("c", marks=needs_c)])
def test_preallocated_outputs(backend):
    grads = _lists([(6, 7), (9,)], torch.float32, 80)
    bufs = _lists([(6, 7), (9,)], torch.float32, 81)
    ref_b = [b.clone() for b in bufs]
    ref_u, ref_s = muon_momentum_(grads, ref_b, momentum=0.9, nesterov=True, backend=backend)
    out = [torch.full(g.shape, 7.0, dtype=torch.bfloat16) for g in grads]
    s_out = torch.full((2,), 7.0, dtype=torch.float64)
    u, s = muon_momentum_(grads, bufs, momentum=0.9, nesterov=True, backend=backend, out=out, sumsq_out=s_out)
    assert all(a is b for a, b in zip(u, out)) and s is s_out
    assert all(_equal(a, b) for a, b in zip(u + bufs, ref_u + ref_b)) and torch.equal(s, ref_s)
    with pytest.raises(TypeError, match="dtype"):
        muon_momentum_(grads, bufs, momentum=0.9, nesterov=True, backend=backend,
                       out=[o.float() for o in out])
    with pytest.raises(ValueError, match="sumsq_out"):
        muon_momentum_(grads, bufs, momentum=0.9, nesterov=True, backend=backend, sumsq_out=torch.empty(3))


@pytest.mark.parametrize("backend", ["foreach", pytest.param("c", marks=needs_c)])
@pytest.mark.parametrize("gdt", GRAD_DTYPES)
def test_huge_finite_values_have_finite_sumsq(backend, gdt):
    """Finite u of magnitude 1e19..3e38 (fp32 max; 6e4 for fp16 grads) has Σu² up to ~1e80: float64
    holds it, an fp32 sum overflowed to inf and flagged a finite update as non-finite."""
    top = 6e4 if gdt == torch.float16 else 3e38
    grads = [(torch.randn(16, 8) * s).clamp(-top, top).to(gdt) for s in (1e20, 1e30, 1e38)]
    grads[2][0, 0] = top
    bufs = [torch.zeros(g.shape) for g in grads]
    us, sumsq = muon_momentum_(grads, bufs, momentum=0.9, nesterov=True, out_dtype=torch.float32, backend=backend)
    assert sumsq.dtype == torch.float64 and bool(sumsq.isfinite().all())
    rtol = 2.0**-24 if backend == "c" else FOREACH_SUMSQ_RTOL
    torch.testing.assert_close(sumsq, _oracle_sumsq(us).to(sumsq), rtol=rtol, atol=0)
    # a float32 sumsq_out still gets the rounded sum (and saturates): the opt-in legacy form
    s32 = torch.empty(3, dtype=torch.float32)
    muon_momentum_(grads, [torch.zeros(g.shape) for g in grads], momentum=0.9, nesterov=True,
                   backend=backend, sumsq_out=s32)
    assert torch.equal(s32, sumsq.float())


def test_float64_fallback():
    """float64 grads/buffers/NS inputs/params run torch.optim.Muon's formulas in float64 on the
    foreach path ("auto" picks it); the statistic is scaled, saturates at float64's max for finite
    input beyond its range, and is NaN exactly when an element is not finite."""
    g = torch.randn(6, 5, dtype=torch.float64)
    b = torch.randn(6, 5, dtype=torch.float64)
    rb = b.clone()
    (u,), s = muon_momentum_([g], [b], momentum=0.95, nesterov=True, out_dtype=torch.float64)
    rb.lerp_(g, 1 - 0.95)
    assert torch.equal(b, rb) and torch.equal(u, g.lerp(rb, 0.95))
    torch.testing.assert_close(s, _oracle_sumsq([u]), rtol=1e-14, atol=0)
    huge = [torch.full((4, 4), 1e300, dtype=torch.float64), torch.full((3,), 1e-300, dtype=torch.float64),
            torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, float("inf")], dtype=torch.float64),
            torch.zeros(0, dtype=torch.float64)]
    _, s = muon_momentum_(huge, [torch.zeros_like(x) for x in huge], momentum=0.9, nesterov=False,
                          out_dtype=torch.float64)
    assert s[0] == torch.finfo(torch.float64).max
    assert s[1] == 0.0  # 3e-600 underflows, as any float64 sum would: finite and small is all it says
    assert s[2] == 0 and s[4] == 0 and bool(s[3].isnan())
    # mixed lists: fp32 tensors keep the fp32 path bit for bit, the fp64 ones run in float64
    g32, b32 = torch.randn(7, 3), torch.randn(7, 3)
    ref_b = b32.clone()
    (u32, _), _ = muon_momentum_([g32, g], [b32, b.clone()], momentum=0.9, nesterov=True)
    (ref_u,), _ = muon_momentum_([g32], [ref_b], momentum=0.9, nesterov=True, backend="foreach")
    assert _equal(u32, ref_u) and _equal(b32, ref_b)
    p, o = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5).bfloat16()
    rp = p.clone()
    muon_apply_([p], [o], lr=0.02, weight_decay=0.1, scales=[1.5])
    rp.mul_(1 - 0.02 * 0.1).add_(o, alpha=-0.02 * 1.5)
    assert torch.equal(p, rp)


@pytest.mark.parametrize("backend", ["foreach", pytest.param("c", marks=needs_c)])
def test_non_finite_shows_in_sumsq(backend):
    grads = _lists([(16, 16), (33,), (5, 5)], torch.float32, 30)
    grads[0][3, 4] = float("nan")
    grads[2][1, 1] = float("inf")
    bufs = [torch.zeros_like(g) for g in grads]
    _, sumsq = muon_momentum_(grads, bufs, momentum=0.9, nesterov=True, backend=backend)
    # inf - inf inside the Nesterov lerp gives NaN, so only "non-finite" is promised
    assert not sumsq[0].isfinite() and sumsq[1].isfinite() and not sumsq[2].isfinite()


# ----------------------------------------------------------------------------------------------
# hostile lists
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["foreach", pytest.param("c", marks=needs_c)])
def test_empty_list(backend):
    outs, sumsq = muon_momentum_([], [], momentum=0.9, nesterov=True, backend=backend)
    assert outs == [] and sumsq.shape == (0,) and sumsq.dtype == torch.float64
    muon_apply_([], [], lr=0.1, weight_decay=0.1, scales=[], backend=backend)


@needs_c
def test_c_op_empty_list_direct():
    # sumsq carries the dispatch key; muon_apply_ with no tensor at all cannot be dispatched by torch
    # (the Python API returns before calling it)
    torch.ops.fastortho.muon_momentum_([], [], [], torch.empty(0), 0.9, True, True)


@needs_c
@pytest.mark.parametrize("shape", [(0,), (0, 5), (1,), (1, 1)])
def test_empty_and_single_element(shape):
    grads = [torch.randn(shape)]
    bufs = [torch.randn(shape)]
    cb, cu, cs = _run_momentum("c", grads, bufs, momentum=0.9, nesterov=False)
    rb, ru, rs = _run_momentum("foreach", grads, bufs, momentum=0.9, nesterov=False)
    assert _equal(cb[0], rb[0]) and _equal(cu[0], ru[0]) and cu[0].shape == shape
    torch.testing.assert_close(cs, rs, rtol=FOREACH_SUMSQ_RTOL, atol=0)
    if grads[0].numel() == 0:
        assert cs[0] == 0.0


@needs_c
def test_ten_thousand_tiny_tensors():
    gen = torch.Generator().manual_seed(40)
    sizes = torch.randint(0, 40, (10_000,), generator=gen).tolist()
    grads = [torch.randn(n, generator=gen).bfloat16() for n in sizes]
    bufs = [torch.randn(n, generator=gen) for n in sizes]
    kw = dict(momentum=0.95, nesterov=True, convention="sum")
    cb, cu, cs = _run_momentum("c", grads, bufs, **kw)
    rb, ru, rs = _run_momentum("foreach", grads, bufs, **kw)
    assert all(_equal(x, y) for x, y in zip(cb, rb))
    assert all(_equal(x, y) for x, y in zip(cu, ru))
    torch.testing.assert_close(cs, rs, rtol=FOREACH_SUMSQ_RTOL, atol=0)
    params = [torch.randn(n, generator=gen) for n in sizes]
    cp, rp = [p.clone() for p in params], [p.clone() for p in params]
    scales = [1.0 + (i % 7) for i in range(len(sizes))]
    muon_apply_(cp, cu, lr=0.01, weight_decay=0.1, scales=scales, backend="c")
    muon_apply_(rp, ru, lr=0.01, weight_decay=0.1, scales=scales, backend="foreach")
    assert all(_equal(x, y) for x, y in zip(cp, rp))


@needs_c
def test_64m_element_tensor():
    n = 64 * 2**20
    gen = torch.Generator().manual_seed(50)
    g = torch.randn(n, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen)
    b_ref = b.clone()
    (u,), sumsq = muon_momentum_([g], [b], momentum=0.95, nesterov=True, backend="c")
    # reference on the same data, via the foreach backend
    (u_ref,), s_ref = muon_momentum_([g], [b_ref], momentum=0.95, nesterov=True, backend="foreach")
    assert _equal(b, b_ref) and _equal(u, u_ref)
    torch.testing.assert_close(sumsq, s_ref, rtol=FOREACH_SUMSQ_RTOL, atol=0)
    p = torch.randn(n, generator=gen).bfloat16()
    p_ref = p.clone()
    muon_apply_([p], [u], lr=0.02, weight_decay=0.1, scales=[2.0], backend="c")
    muon_apply_([p_ref], [u_ref], lr=0.02, weight_decay=0.1, scales=[2.0], backend="foreach")
    assert _equal(p, p_ref)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["foreach", pytest.param("c", marks=needs_c)])
def test_errors_momentum(backend):
    g, b = torch.randn(4, 4), torch.randn(4, 4)
    mm = lambda gs, bs, **kw: muon_momentum_(gs, bs, momentum=0.9, nesterov=True, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="same length"):
        mm([g], [b, b])
    with pytest.raises(ValueError, match="shape"):
        mm([g], [torch.randn(4, 5)])
    with pytest.raises(ValueError, match="contiguous"):
        mm([g.t()[:, :2]], [torch.randn(4, 2)])
    with pytest.raises(TypeError, match="dtype"):
        mm([g.to(torch.complex64)], [b])
    if backend == "c":  # float64 has no kernel; the foreach fallback takes it (test_float64_fallback)
        with pytest.raises(TypeError, match="dtype"):
            mm([g], [b.double()])
    with pytest.raises(ValueError, match="layout"):
        mm([g.to_sparse()], [b])
    with pytest.raises(ValueError, match="device"):
        mm([g], [b.to("meta")])
    with pytest.raises(ValueError, match="convention"):
        mm([g], [b], convention="adam")
    with pytest.raises(TypeError, match="out_dtype"):
        mm([g], [b], out_dtype=torch.int32)
    if backend == "c":
        with pytest.raises(TypeError, match="dtype"):
            mm([g], [b], out_dtype=torch.float64)


@pytest.mark.parametrize("backend", ["foreach", pytest.param("c", marks=needs_c)])
def test_errors_apply(backend):
    p, o = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="scales"):
        muon_apply_([p], [o], lr=0.1, weight_decay=0.0, scales=[1.0, 2.0], backend=backend)
    with pytest.raises(ValueError, match="shape"):
        muon_apply_([p], [o.flatten()], lr=0.1, weight_decay=0.0, scales=[1.0], backend=backend)
    with pytest.raises(ValueError, match="one-element"):
        muon_apply_([p], [o], lr=torch.ones(2), weight_decay=0.0, scales=[1.0], backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        muon_apply_([p.t()[:2]], [torch.randn(2, 4)], lr=0.1, weight_decay=0.0, scales=[1.0], backend=backend)


@needs_c
def test_c_op_checks_direct():
    """The C++ checks (shared by CPU, CUDA and Meta kernels) catch what bypasses the Python API."""
    g, b, o = torch.randn(4), torch.randn(4), torch.empty(4, dtype=torch.bfloat16)
    op = torch.ops.fastortho.muon_momentum_
    with pytest.raises(RuntimeError, match="one dtype per list"):
        op([g, g.bfloat16()], [b, b.clone()], [o, o.clone()], torch.empty(2), 0.9, True, True)
    with pytest.raises(RuntimeError, match="sumsq"):
        op([g], [b], [o], torch.empty(2), 0.9, True, True)
    with pytest.raises(RuntimeError, match="distinct"):
        op([g], [b], [b], torch.empty(1), 0.9, True, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        op([torch.randn(4, 4).t()], [torch.randn(4, 4)], [torch.empty(4, 4)], torch.empty(1), 0.9, True, True)


def test_backend_c_on_unsupported_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='c'"):
        muon_momentum_([torch.randn(2, device="meta")], [torch.randn(2, device="meta")], momentum=0.9,
                       nesterov=True, backend="c")


# ----------------------------------------------------------------------------------------------
# CUDA kernels against the CPU twins (needs a GPU)
# ----------------------------------------------------------------------------------------------
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _C_loader.HAS_C_CUDA:
        pytest.fail("a CUDA device is present but fastortho._C has no CUDA kernels")


@pytest.mark.gpu
@pytest.mark.parametrize("gdt", GRAD_DTYPES)
@pytest.mark.parametrize("bdt", BUF_DTYPES)
def test_cuda_momentum_matches_cpu_twin(gdt, bdt):
    _cuda_or_skip()
    shapes = SHAPES + [(3 * KCHUNK + 5,), (1000, 1001)]
    grads = _lists(shapes, gdt, 60)
    bufs = _lists(shapes, bdt, 61)
    for odt in OUT_DTYPES:
        for convention in ("ema", "sum"):
            for nesterov in (True, False):
                kw = dict(momentum=0.95, nesterov=nesterov, convention=convention, out_dtype=odt, backend="c")
                hb = [b.clone() for b in bufs]
                hu, hs = muon_momentum_(grads, hb, **kw)
                db = [b.cuda() for b in bufs]
                du, ds = muon_momentum_([g.cuda() for g in grads], db, **kw)
                for i in range(len(shapes)):
                    assert _equal(db[i].cpu(), hb[i]), f"buf[{i}]: {_where_differ(db[i].cpu(), hb[i])}"
                    assert _equal(du[i].cpu(), hu[i]), f"u[{i}]: {_where_differ(du[i].cpu(), hu[i])}"
                torch.testing.assert_close(ds.cpu(), hs, rtol=2.0**-23, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("pdt", PARAM_DTYPES)
@pytest.mark.parametrize("odt", OUT_DTYPES)
def test_cuda_apply_matches_cpu_twin(pdt, odt):
    _cuda_or_skip()
    shapes = SHAPES + [(3 * KCHUNK + 5,)]
    params = _lists(shapes, pdt, 62)
    updates = _lists(shapes, odt, 63)
    scales = [0.5 + i for i in range(len(shapes))]
    for kw in (dict(lr=0.02, weight_decay=0.1, scales=scales),
               dict(lr=torch.tensor(0.02), weight_decay=torch.tensor(0.1), scales=torch.tensor(scales))):
        hp = [p.clone() for p in params]
        muon_apply_(hp, updates, backend="c", **kw)
        dkw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        dp = [p.cuda() for p in params]
        muon_apply_(dp, [o.cuda() for o in updates], backend="c", **dkw)
        for i in range(len(shapes)):
            assert _equal(dp[i].cpu(), hp[i]), f"params[{i}]: {_where_differ(dp[i].cpu(), hp[i])}"


@pytest.mark.gpu
def test_cuda_misaligned_views_and_many_tensors():
    """Views at odd offsets take the scalar path; > 96 tensors take several launches."""
    _cuda_or_skip()
    base = torch.randn(10_000, device="cuda")
    grads = [base[1:5001], base[3:3003]]  # 4-byte aligned only
    bufs = [torch.randn(5000, device="cuda"), torch.randn(3000, device="cuda")]
    grads += [torch.randn(17, device="cuda") for _ in range(300)]
    bufs += [torch.randn(17, device="cuda") for _ in range(300)]
    kw = dict(momentum=0.9, nesterov=True, backend="c")
    hb = [b.cpu() for b in bufs]
    hu, hs = muon_momentum_([g.cpu() for g in grads], hb, **kw)
    du, ds = muon_momentum_(grads, bufs, **kw)
    assert all(_equal(d.cpu(), h) for d, h in zip(bufs + du, hb + hu))
    torch.testing.assert_close(ds.cpu(), hs, rtol=2.0**-23, atol=0)


# ----------------------------------------------------------------------------------------------
# CUDA-graph capture: scalars that a graph would freeze; builds without a kernel image for the GPU
# ----------------------------------------------------------------------------------------------
def test_capture_scalars_decision():
    """The decision ``muon_apply_`` takes while a CUDA graph is captured, on CPU: a tensor scalar on
    another device than the params is refused (its host read would be recorded once), naming the fix."""
    from fastortho.ops.muon_step import check_capture_scalars

    dev = torch.device("meta")  # stands in for the params' CUDA device: only device equality matters
    cpu_lr = torch.tensor(0.02)
    with pytest.raises(ValueError, match=r"lr is a tensor on cpu.*capturable=True"):
        check_capture_scalars(dev, True, lr=cpu_lr, weight_decay=0.1, scales=[1.0])
    with pytest.raises(ValueError, match=r"scales is a tensor on cpu"):
        check_capture_scalars(dev, True, lr=0.02, weight_decay=0.1, scales=torch.ones(2))
    # device tensors and Python numbers (constants by contract) pass; nothing is refused outside capture
    check_capture_scalars(dev, True, lr=torch.tensor(0.02, device=dev), weight_decay=0.1, scales=[1.0])
    check_capture_scalars(dev, False, lr=cpu_lr, weight_decay=torch.tensor(0.1), scales=torch.ones(2))


@pytest.mark.parametrize("op", ["apply", "momentum"])
def test_no_kernel_image_falls_back_on_auto_only(monkeypatch, op):
    """A launch refused with "no kernel image" (a ``_C`` built without SASS/PTX for the GPU) falls back
    to the ``_foreach`` ops with a warning under backend='auto', and is raised under backend='c'.
    Simulated on CPU by making the C path raise the CUDA binding's message."""
    import fastortho.ops.muon_step as ms

    msg = "muon_apply_: fastortho._C has no kernel image for this GPU (cuda:0, sm_100): rebuild"
    if op == "apply":
        def boom(*a, **k):
            raise RuntimeError(msg)
        monkeypatch.setattr(ms, "_apply_c", boom)
    else:
        class _Ops:
            def __getattr__(self, name):
                def launch(*a, **k):
                    raise RuntimeError(msg)
                return launch
        monkeypatch.setattr(ms.torch.ops, "fastortho", _Ops(), raising=False)
    monkeypatch.setattr(ms, "_pick_backend", lambda backend, *a: "foreach" if backend == "foreach" else "c")
    torch.manual_seed(0)
    x, y = torch.randn(5, 7), torch.randn(5, 7)

    def run(backend):
        p, o = x.clone(), y.clone()
        if op == "apply":
            muon_apply_([p], [o], lr=0.1, weight_decay=0.01, scales=[1.5], backend=backend)
        else:
            muon_momentum_([o], [p], momentum=0.9, nesterov=True, backend=backend)
        return p

    with pytest.warns(RuntimeWarning, match="(?s)no kernel image.*Falling back"):
        got = run("auto")
    want = run("foreach")
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="no kernel image"):
        run("c")


@pytest.mark.gpu
def test_cuda_capture_refuses_cpu_lr_and_replays_device_lr():
    """Inside CUDA-graph capture a CPU 0-dim lr would be read once at record time: refused, naming
    capturable=True. A device lr is read by the kernel at replay: a new value takes effect."""
    _cuda_or_skip()
    p = [torch.zeros(1000, device="cuda")]
    o = [torch.ones(1000, device="cuda")]
    lr = torch.tensor(0.5, device="cuda")
    muon_apply_(p, o, lr=lr, weight_decay=0.0, scales=[1.0])  # warm-up outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="capturable=True"):
        with torch.cuda.graph(g):
            muon_apply_(p, o, lr=torch.tensor(0.5), weight_decay=0.0, scales=[1.0])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        muon_apply_(p, o, lr=lr, weight_decay=0.0, scales=[1.0])
    p[0].zero_()
    lr.fill_(0.25)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(p[0], torch.full_like(p[0], -0.25))
