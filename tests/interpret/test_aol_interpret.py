"""``coefficients="aol"`` on the Triton backend (under the interpreter) against the torch backend.

The Triton path forms the first Gram product with the symmetric kernel, applies the AOL row scaling
with the two kernels of ``kernels/newton_schulz_aol.py`` and runs the remaining work through the same
kernels as the norm-scaled schedules, standard and Gram-space; the torch backend's ``aol_precondition``
is the reference. Tolerances are the differential tests' (``test_differential.TOL_EPS``, in units of the
storage dtype's eps); the measured distances are next to them.
"""
from __future__ import annotations

import pytest
import torch
from _oracle import rel_to

from fastortho import newton_schulz

# Measured (relative Frobenius distance / storage eps) over the cases below: fp32 ≤ 3.8 standard,
# ≤ 24.3 Gram-space; bf16 (Gram-space: fp16) ≤ 1.4. Bounds: test_differential.TOL_EPS.
TOL_EPS = {torch.float32: 128.0, torch.bfloat16: 12.0}


def _input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(*shape, generator=g)
    # rows of very different norms: what AOL's row scaling equalizes
    return G * torch.logspace(-2, 1, shape[-2])[:, None]


@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 28)], ids=["wide", "tall", "batched"])
def test_triton_aol_matches_torch(shape, gram, cdt):
    G = _input(shape, seed=sum(shape))
    kw = dict(coefficients="aol", dtype=cdt, out_dtype=torch.float32)
    X = newton_schulz(G, backend="torch", **kw)
    Y = newton_schulz(G, backend="triton", gram=gram, **kw)
    d = rel_to(Y, X)
    print(f"aol {shape} gram={gram} {cdt}: {d / torch.finfo(cdt).eps:.2f} eps")
    assert d <= TOL_EPS[cdt] * torch.finfo(cdt).eps, f"triton-torch {d:.2e}"


@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16])
def test_triton_aol_zero_and_nonfinite_stay_in_their_matrix(cdt):
    G = _input((4, 12, 20), seed=3)
    G[1] = 0.0
    G[2, 3, 5] = float("nan")
    G[3, 0, 0] = float("inf")
    kw = dict(coefficients="aol", dtype=cdt, out_dtype=torch.float32)
    X = newton_schulz(G, backend="torch", **kw)
    Y = newton_schulz(G, backend="triton", **kw)
    assert torch.equal(Y[1], torch.zeros_like(Y[1])) and torch.equal(X[1], Y[1])
    assert torch.isnan(Y[2]).all() and torch.isnan(X[2]).all()
    assert torch.isnan(Y[3]).all() and torch.isnan(X[3]).all()
    assert rel_to(Y[0], X[0]) <= TOL_EPS[cdt] * torch.finfo(cdt).eps


def test_triton_aol_scale_invariant_and_zero_steps():
    """G·2^k gives the bits of G (the prescale is exact); 0 steps return X₀ = D·G itself."""
    G = _input((16, 24), seed=5)
    kw = dict(coefficients="aol", dtype=torch.float32, backend="triton")
    assert torch.equal(newton_schulz(G * 2.0**40, **kw), newton_schulz(G, **kw))
    X0 = newton_schulz(G, 0, **kw)
    ref = newton_schulz(G, 0, coefficients="aol", dtype=torch.float32, backend="torch")
    assert rel_to(X0, ref) <= 4 * torch.finfo(torch.float32).eps
    assert torch.linalg.matrix_norm(X0, ord=2) <= 1.0 + 1e-6


# ---- the fused row scaling (kernels/newton_schulz_aol.py) against the torch-op formulation it replaced ----
#
# The previous Triton path formed d, A₀ and X₀ with torch ops between kernels; `_torch_op_rescale` keeps that
# formulation verbatim. The kernels have the same math and rounding points, so every output is bit-identical
# whenever the row sums Σ_j |A'_ij| are exact (they are then independent of the summation order): integer-valued
# G below. For general G only the order of the row sum differs (torch's vs the kernel's fixed order): d is then
# compared within the bound of any-order summation, and the elementwise kernel is compared bit for bit given
# the same d.


def _torch_op_rescale(raw, Gv, p, eps, cdt, xdt, exact_sqrt=True):
    """d, A₀ and X₀ exactly as the Triton path computed them before the kernels (torch ops on fp32).

    One substitution: the square root is the correctly rounded fp32 one (the float64 root rounded once,
    exact for fp32 since 53 ≥ 2·24 + 2), which is what torch's CUDA ``sqrt`` returns. torch's CPU ``sqrt``
    (Sleef, within 0.5001 ulp) is not correctly rounded: measured 1 ulp off on some of the exact sums below.
    ``exact_sqrt=False``: the verbatim torch ops (the launch count)."""
    s = raw.abs().sum(dim=-1)
    s = s.double().sqrt().float() if exact_sqrt else s.sqrt()
    lim = (eps * p).clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    d = 1.0 / torch.where(s < lim, lim, s)
    A = (raw * d[:, :, None] * d[:, None, :]).to(cdt)
    X = torch.empty(Gv.shape, dtype=xdt)
    X.copy_((Gv.float() * p[:, None, None]) * d[:, :, None])
    return d, A, X


def _gram_of_scaled(Gv, cdt, fp32_first):
    """(raw A' = X'X'ᵀ in fp32, p, X' storage dtype) as aol_first_step receives them."""
    from fastortho.kernels.newton_schulz_launch import inv_norm_scale, scale_cast, sym_mm

    xdt = torch.float32 if fp32_first else cdt
    B, k, L = Gv.shape
    p = inv_norm_scale(Gv, safety=1.0, eps=1e-7, root=2).p
    Xp = scale_cast(Gv, p, torch.empty(B, k, L, dtype=xdt))
    raw = sym_mm(Xp, Xp, torch.empty(B, k, k, dtype=torch.float32), round_dtype=xdt, first_fp32=fp32_first)
    return raw, p, xdt


def _same_bits(a, b):
    """Equal bit patterns, NaN positions equal (a NaN's sign and payload are not part of the contract)."""
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    iv = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a[~na].view(iv), b[~nb].view(iv))


def _exact_sum_input(shape, seed):
    """Small integers: p·G, the Gram entries and every row sum of |A'| are exact in fp32 (and G in bf16)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).float()


def _hostile_exact(shape):
    G = _exact_sum_input(shape, seed=sum(shape))
    G[1] = 0.0                          # zero matrix: d = 1/max(eps·p, 2^-126), A₀ = X₀ = 0
    G[2, 1, 3] = float("nan")           # NaN: the whole matrix
    G[3, 0, 0] = float("inf")           # Inf: the whole matrix non-finite
    G[4] *= 2.0 ** 100                  # huge and tiny powers of two: absorbed exactly by p
    G[5] *= 2.0 ** -100
    G[6, 2] = 0.0                       # one zero row
    return G


RESCALE_CASES = [(cdt, f32) for cdt in (torch.float32, torch.bfloat16, torch.float16) for f32 in (False, True)]


@pytest.mark.parametrize("cdt,fp32_first", RESCALE_CASES)
@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
def test_fused_rescale_bit_identical_to_torch_ops_when_row_sums_are_exact(cdt, fp32_first, tall):
    from fastortho.kernels.newton_schulz_aol import aol_rescale

    G = _hostile_exact((7, 37, 21) if tall else (7, 21, 37))
    Gv = G.mT if tall else G            # the wide logical view the iteration runs on, no copy
    raw, p, xdt = _gram_of_scaled(Gv, cdt, fp32_first)
    for eps in (1e-7, 3.0):             # 3.0: the floor eps·p decides for some rows
        d, A, X = _torch_op_rescale(raw, Gv, p, eps, cdt, xdt)
        A2, X2 = aol_rescale(raw, Gv, p, torch.empty_like(A), torch.empty_like(X), eps=eps)
        assert _same_bits(A2, A) and _same_bits(X2, X), (cdt, fp32_first, tall, eps)
    # NaN: every row sum is NaN, so all of A₀ and X₀; Inf: the row sums are Inf or NaN, d is 0 or NaN, and
    # A₀, X₀ hold NaN that the first step spreads over the matrix (test_triton_aol_zero_and_nonfinite_...).
    assert torch.isnan(X2[2]).all() and torch.isnan(A2[2]).all()
    assert torch.isnan(A2[3]).any() and torch.isnan(X2[3]).any()
    assert torch.isfinite(X2[[0, 1, 4, 5, 6]]).all() and not X2[1].any() and not A2[1].any()


def _general_input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(*shape, generator=g) * torch.logspace(-2, 1, shape[-2])[:, None]
    G[1] *= 1e-30                       # tiny and huge, not powers of two
    G[2] *= 1e30
    G[3, 4] *= 1e-20                    # one row far below the others
    return G


@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 21, 37), (4, 37, 21)], ids=["wide", "tall"])
def test_fused_rescale_general_inputs(cdt, shape):
    """d within the bound of summing k non-negative terms in another order ((k−1)·u per sum, halved by the
    square root, plus the final rounding; measured: ≤ 2 ulps); A₀ and X₀ bit-identical given the same d."""
    from fastortho.kernels.newton_schulz_aol import aol_apply, aol_row_scale

    G = _general_input(shape, seed=11)
    Gv = G.mT if shape[-2] > shape[-1] else G
    raw, p, xdt = _gram_of_scaled(Gv, cdt, False)
    d, A, X = _torch_op_rescale(raw, Gv, p, 1e-7, cdt, xdt)
    d2 = aol_row_scale(raw, p, eps=1e-7)
    k = raw.shape[-1]
    u = torch.finfo(torch.float32).eps / 2
    assert ((d2.double() - d.double()).abs() <= (k * u + 2 * u) * d.double()).all()
    A2, X2 = aol_apply(raw, d, Gv, p, torch.empty_like(A), torch.empty_like(X))
    assert _same_bits(A2, A) and _same_bits(X2, X)


def test_fused_rescale_batch_invariant():
    """A matrix gets the same d, A₀, X₀ bits alone or anywhere in a batch (general input: inexact row sums)."""
    from fastortho.kernels.newton_schulz_iteration import aol_first_step
    from fastortho.kernels.newton_schulz_launch import inv_norm_scale, scale_cast

    def run(G):
        p = inv_norm_scale(G, safety=1.0, eps=1e-7, root=2).p
        Xp = scale_cast(G, p, torch.empty(G.shape, dtype=torch.bfloat16))
        return aol_first_step(G, Xp, p, eps=1e-7, cdt=torch.bfloat16, fp32_first=False)

    G = _general_input((4, 40, 70), seed=12)     # k = 40 > the interpreter's 32-wide row-sum chunk
    full = run(G)
    for i in (0, 3):
        one = run(G[i:i + 1])
        assert _same_bits(one.A[0], full.A[i]) and _same_bits(one.X[0], full.X[i])
    perm = torch.tensor([3, 1])
    part = run(G[perm])
    assert _same_bits(part.A, full.A[perm]) and _same_bits(part.X, full.X[perm])


# ---- launches per AOL rescale: before (torch ops between kernels) and after (two kernels) ----


class _LaunchCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that run a device kernel (views and allocations launch none)."""

    FREE = {"empty.memory_format", "empty_strided.default", "empty_like.default"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.overloadpacket.__name__}.{func._overloadname}"
        if not func.is_view and name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def stub_kernels(monkeypatch):
    """Every Triton kernel of the path replaced by a counting stub (nothing runs; ``kernels.launch_stubs``)."""
    import fastortho.kernels.newton_schulz_launch as launch
    from fastortho.kernels.launch_stubs import counting_stubs

    monkeypatch.setattr(launch, "SYM_TMA", "off")
    with counting_stubs() as count:
        yield count


@pytest.mark.parametrize("cdt", [torch.float32, torch.bfloat16])
def test_aol_first_step_launches(stub_kernels, cdt):
    """fp32 G. Before: the symmetric kernel, then 15 torch kernels with bf16 storage (abs, sum, sqrt, eps·p,
    clamp_min, <, where, reciprocal, ·1, two products for A₀, its cast, p·G, ·d, the cast copy into X₀; 14 in
    fp32 storage, where the cast of A₀ is free; one more for a bf16 G's .float()), and the fill of t. After:
    the symmetric kernel, the two AOL kernels and the fill of t (bench/RESULTS.md)."""
    from fastortho.kernels.newton_schulz_iteration import aol_first_step
    from fastortho.kernels.newton_schulz_launch import sym_mm

    B, k, L = 2, 24, 40
    G, p, Xp = torch.zeros(B, k, L), torch.ones(B), torch.zeros(B, k, L, dtype=cdt)
    with _LaunchCounter() as before:
        raw = sym_mm(Xp, Xp, torch.empty(B, k, k), round_dtype=cdt)
        _torch_op_rescale(raw, G, p, 1e-7, cdt, cdt, exact_sqrt=False)
        torch.ones(B)
    old = dict(stub_kernels)
    stub_kernels.clear()
    with _LaunchCounter() as after:
        aol_first_step(G, Xp, p, eps=1e-7, cdt=cdt, fp32_first=False)
    torch_before = 15 if cdt == torch.bfloat16 else 14
    assert old == {"_sym_mm_kernel": 1} and len(before.ops) == torch_before + 1, before.ops
    assert stub_kernels == {"_sym_mm_kernel": 1, "_aol_row_scale_kernel": 1, "_aol_apply_kernel": 1}
    assert after.ops == ["ones.default"], after.ops
