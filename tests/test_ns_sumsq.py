"""``newton_schulz(G, sumsq=…)``: the Frobenius scale from a sum of squares the caller already has.

The torch backend is checked here on CPU; the Triton backend's numbers run under the interpreter
(``tests/interpret/test_sumsq_interpret.py``). What the optimizer's step launches on the Triton path
is counted with every Triton kernel replaced by a counting stub (CPU tensors, nothing runs), as in
``tests/test_ns_host_path.py``.
"""
from __future__ import annotations

import pytest
import torch

import fastortho
from fastortho.kernels import HAS_TRITON, interpreter_enabled
from fastortho.ns_torch import scale_input

EPS32 = torch.finfo(torch.float32).eps


def _g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sumsq(G):
    return G.double().square().sum((-2, -1))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,err,match", [
    (lambda G: _sumsq(G).reshape(-1), ValueError, r"shape G.shape\[:-2\] = \(2, 3\)"),
    (lambda G: _sumsq(G)[..., None], ValueError, "one ‖G‖_F² per matrix"),
    (lambda G: _sumsq(G).half(), TypeError, "float64 \\(or float32\\), got torch.float16"),
    (lambda G: _sumsq(G).long(), TypeError, "float64"),
    (lambda G: _sumsq(G).to("meta"), ValueError, "sumsq is on meta but G on cpu"),
    (lambda G: 3.0, TypeError, "sumsq must be a Tensor or None, got float"),
])
def test_bad_sumsq_is_refused_with_the_fix(bad, err, match):
    G = _g(2, 3, 8, 12)
    with pytest.raises(err, match=match):
        fastortho.newton_schulz(G, sumsq=bad(G))


@pytest.mark.parametrize("kw", [dict(normalize="gram"), dict(coefficients="aol")])
def test_sumsq_only_with_the_frobenius_scale(kw):
    G = _g(2, 8, 12)
    with pytest.raises(ValueError, match="normalize='fro' only"):
        fastortho.newton_schulz(G, sumsq=_sumsq(G), **kw)


def test_sumsq_needs_a_matrix():
    with pytest.raises(ValueError, match="1-D G is normalized exactly without it"):
        fastortho.newton_schulz(torch.ones(5), sumsq=torch.tensor(5.0, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# the torch backend: same contract, same result up to the rounding of the scale
# ---------------------------------------------------------------------------------------------
def test_torch_x0_within_two_ulps():
    """X₀ = (G·p)/d with d from the given float64 sum (one rounding) vs from the fp32 norm:
    measured max 2 fp32 ulps elementwise (4 × 48×80, seed 0)."""
    G = _g(4, 48, 80)
    a, _ = scale_input(G, safety=1.02, normalize="fro", eps=1e-7)
    b, _ = scale_input(G, safety=1.02, normalize="fro", eps=1e-7, sumsq=_sumsq(G))
    assert (a.view(torch.int32) - b.view(torch.int32)).abs().max() <= 2


@pytest.mark.parametrize("shape", [(4, 48, 80), (3, 80, 48)])
def test_torch_result_equals_the_standard_call(shape):
    """Five Polar Express steps in fp32 carry the ≤ 2-ulp change of X₀ to the output: measured
    11.6·eps (4 × 48×80) and below for the tall case; bound 32·eps."""
    G = _g(*shape)
    a = fastortho.newton_schulz(G, backend="torch")
    b = fastortho.newton_schulz(G, backend="torch", sumsq=_sumsq(G))
    assert (a - b).abs().max() <= 32 * EPS32
    c = fastortho.newton_schulz(G, backend="torch", sumsq=_sumsq(G).float())   # float32 sums accepted
    assert (a - c).abs().max() <= 32 * EPS32


@pytest.mark.parametrize("k", [60, -10])
def test_torch_power_of_two_invariance(k):
    """G·2^k with sumsq·4^k gives the bits of G (p absorbs 2^k exactly) while safety·ν > eps."""
    G = _g(3, 24, 40)
    ref = fastortho.newton_schulz(G, backend="torch", sumsq=_sumsq(G))
    assert torch.equal(fastortho.newton_schulz(G * 2.0 ** k, backend="torch", sumsq=_sumsq(G) * 4.0 ** k), ref)


def test_torch_nonfinite_sumsq_gives_a_nan_matrix_like_a_nonfinite_g():
    """A NaN/Inf G gives an all-NaN matrix through the norm; so does a NaN/Inf sumsq. The other
    matrices keep their bits."""
    G = _g(4, 16, 24)
    q = _sumsq(G)
    Gbad = G.clone()
    Gbad[1, 3, 5], Gbad[2, 0, 0] = float("inf"), float("nan")
    assert fastortho.newton_schulz(Gbad, backend="torch").flatten(1).isnan().all(1).tolist() == [0, 1, 1, 0]
    qbad = q.clone()
    qbad[1], qbad[2] = float("inf"), float("nan")
    out = fastortho.newton_schulz(G, backend="torch", sumsq=qbad)
    assert out.flatten(1).isnan().all(1).tolist() == [0, 1, 1, 0]
    ref = fastortho.newton_schulz(G, backend="torch", sumsq=q)
    assert torch.equal(out[[0, 3]], ref[[0, 3]])


def test_zero_matrix_with_zero_sumsq_stays_zero():
    G = torch.zeros(2, 8, 12)
    out = fastortho.newton_schulz(G, backend="torch", sumsq=torch.zeros(2, dtype=torch.float64))
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# the optimizer hands its sums over
# ---------------------------------------------------------------------------------------------
def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


def _step(shapes, **kw):
    ps = _params(shapes)
    opt = fastortho.Muon([{"params": ps, "algorithm": "muon"}], lr=0.02, **kw)
    opt.step()
    return [p.detach().clone() for p in ps]


def test_optimizer_with_sumsq_equals_without_torch_backend(monkeypatch):
    """The default step (sums handed over) against the step with the norms taken by newton_schulz
    (REUSE_SUMSQ off): parameters within 4 fp32 ulps of their magnitude (measured: max |Δθ| = 2.4e-10
    on |θ| ~ 1, lr = 0.02)."""
    from fastortho.optim import functional as F

    shapes = [(32, 48), (48, 32), (32, 48)]
    seen = []
    real = F.bucket_sumsq

    def spy(bucket):
        q = real(bucket)
        seen.append(q is not None)
        return q

    assert F.REUSE_SUMSQ  # the default
    monkeypatch.setattr(F, "bucket_sumsq", spy)
    with_q = _step(shapes, backend="torch")
    assert seen and all(seen)
    monkeypatch.setattr(F, "REUSE_SUMSQ", False)
    monkeypatch.setattr(F, "bucket_sumsq", real)
    without = _step(shapes, backend="torch")
    for a, b in zip(with_q, without):
        assert (a - b).abs().max() <= 4 * EPS32 * b.abs().max()


def test_units_get_sumsq_only_when_the_sum_is_theirs():
    """A whole 2-D or flattened parameter: its Σu²; a stack (per-tensor sum of B matrices) and a
    row-split parameter: None (the norm pass stays)."""
    from fastortho.optim import functional as F

    ps = _params([(8, 12), (3, 8, 12), (4, 2, 3, 3), (10, 6)])
    bufs = [torch.zeros_like(p) for p in ps]
    us, finite, sumsq = F.momentum_phase(ps, [p.grad for p in ps], bufs, momentum=0.9, nesterov=True,
                                         convention="ema", placement="before_ortho", ns_dtype=torch.float32,
                                         nonfinite="skip", names=list("abcd"), backend="auto", reduce_sumsq=None)
    units = F.matrix_units(ps[:3], bufs[:3], us[:3], lr_scale="original", flatten=None, split_sizes=None,
                           fan_in_first=False, group_index=0, names=list("abc"), sumsqs=sumsq[:3])
    assert [u.sumsq is not None for u in units] == [True, False, True]
    for u in (units[0], units[2]):
        assert torch.allclose(u.sumsq, u.ns_input.double().square().sum((-2, -1)), rtol=1e-12)
    split = F.matrix_units(ps[3:], bufs[3:], us[3:], lr_scale="original", flatten=None, split_sizes=[4, 6],
                           fan_in_first=False, group_index=0, names=["d"], sumsqs=sumsq[3:])
    assert [u.sumsq for u in split] == [None, None]


def test_skip_policy_zeroes_the_sum_with_the_input():
    """nonfinite="skip" zeroes a non-finite u; its sum must become 0 too, or the NaN sum would turn
    the zero update into a NaN one (default configuration)."""
    ps = _params([(8, 12), (8, 12)])
    ps[1].grad[0, 0] = float("nan")
    before = ps[1].detach().clone()
    opt = fastortho.Muon([{"params": ps, "algorithm": "muon"}], lr=0.02, nonfinite="skip", backend="torch",
                         weight_decay=0.0)
    opt.step()
    assert torch.isfinite(ps[0]).all() and torch.equal(ps[1].detach(), before)


def test_reduced_sums_are_the_norms_and_the_check():
    """``reduce_sumsq`` (the distributed engine's all-reduce of shard sums) is applied before the
    policy: the returned sums are the reduced ones, the finite mask is read from them (a NaN that only
    another shard held skips this parameter), and "skip" zeroes the skipped sum and input."""
    from fastortho.optim import functional as F

    ps = _params([(8, 12), (8, 12), (6, 4)])
    bufs = [torch.zeros_like(p) for p in ps]
    other = torch.tensor([1.5, float("nan"), 0.0], dtype=torch.float64)  # "another rank's" shard sums
    seen = []

    def reduce(q):
        seen.append(q.clone())
        return q + other

    us, finite, sumsq = F.momentum_phase(ps, [p.grad for p in ps], bufs, momentum=0.9, nesterov=True,
                                         convention="ema", placement="before_ortho", ns_dtype=torch.float32,
                                         nonfinite="skip", names=list("abc"), backend="auto", reduce_sumsq=reduce)
    local = seen[0]
    assert finite.tolist() == [True, False, True]
    assert sumsq.tolist() == [local[0].item() + 1.5, 0.0, local[2].item()]
    assert torch.equal(us[1], torch.zeros_like(us[1])) and torch.equal(bufs[1], torch.zeros_like(bufs[1]))


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches per kernel name during a Muon step on the Triton path (CPU tensors; the
    op's CUDA check is lifted, the kernels never run)."""
    if not HAS_TRITON or interpreter_enabled():
        pytest.skip("needs triton, no interpreter")
    import fastortho.kernels.newton_schulz_launch as launch
    import fastortho.ops.newton_schulz as op
    from fastortho.kernels.launch_stubs import counting_stubs

    monkeypatch.setattr(launch, "SYM_TMA", "off", raising=False)
    monkeypatch.setattr(op, "interpreter_enabled", lambda: True)
    monkeypatch.setattr(fastortho.kernels, "interpreter_enabled", lambda: True)   # Muon's CPU check
    monkeypatch.setenv("FASTORTHO_NS_LINE3", "triton")
    with counting_stubs() as count:
        yield count


def test_optimizer_step_launches_no_norm_pass(launches, monkeypatch):
    """Default configuration: two buckets of whole matrices, one sumsq launch each, no norm pass
    (2 launches a bucket with the REUSE_SUMSQ escape hatch off)."""
    assert fastortho.optim.functional.REUSE_SUMSQ
    _step([(256, 512), (256, 512), (512, 256)], backend="triton")
    assert launches.get("_sumsq_partial_kernel", 0) == 0 and launches.get("_scale_kernel", 0) == 0
    assert launches["_sumsq_scale_kernel"] == 2
    launches.clear()
    monkeypatch.setattr(fastortho.optim.functional, "REUSE_SUMSQ", False)
    _step([(256, 512), (256, 512), (512, 256)], backend="triton")
    assert launches["_sumsq_partial_kernel"] == 2 and "_sumsq_scale_kernel" not in launches


def test_optimizer_keeps_the_norm_pass_where_it_has_no_sum(launches):
    """A stack of 3 matrices has one Σu² for all three: the bucket it shares with a 256×512 matrix
    runs the norm pass (for all four); so does momentum_placement="after_ortho", whose NS input is
    the raw gradient."""
    _step([(256, 512), (3, 256, 512)], backend="triton")
    assert launches["_sumsq_partial_kernel"] == 1 and "_sumsq_scale_kernel" not in launches
    launches.clear()
    _step([(256, 512)], backend="triton", momentum_placement="after_ortho")
    assert launches["_sumsq_partial_kernel"] == 1 and "_sumsq_scale_kernel" not in launches


@pytest.mark.skipif(not HAS_TRITON or interpreter_enabled(), reason="GPU tiles: needs triton, no interpreter")
@pytest.mark.parametrize("k,L,programs", [(4096, 4096, 512), (4096, 16384, 512), (768, 3072, 72), (128, 128, 1)])
def test_norm_pass_programs_per_matrix(k, L, programs):
    """The norm pass's grid (bench/RESULTS.md, the analytic model): ⌊64×64 tiles / 8⌋ programs per matrix,
    clamped to [1, 512]; a function of the shape only (was ≤ 64: 64 at 4096²)."""
    from fastortho.kernels.newton_schulz_launch import _split

    assert _split(k, L) == programs == _split(L, k)
