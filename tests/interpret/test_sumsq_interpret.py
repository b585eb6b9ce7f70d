"""The normalization kernels under the Triton interpreter: the streaming norm pass (many programs per
matrix, running exponent across tiles and programs) and the scale from a given sum of squares
(``newton_schulz(G, sumsq=…)``), against float64 and against the call that runs the norm pass."""
from __future__ import annotations

import pytest
import torch
from _common import ns_triton, plain_loop, rel

import fastortho
from fastortho.kernels.newton_schulz_launch import _split, inv_norm_scale, sumsq_norm_scale

SAFETY, EPS = 1.02, 1e-7


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sumsq(G):
    return G.double().square().sum((-2, -1))


def _ulps32(a, b):
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def _mixed(B, R, N, seed=0):
    """Rows of very different scales (1e30 … 1e-30) so that the running exponent rises inside a program
    and differs between programs."""
    G = torch.randn(B, R, N, generator=_gen(seed))
    scale = 10.0 ** torch.linspace(-30, 30, R)[torch.randperm(R, generator=_gen(seed + 1))]
    return G * scale[None, :, None]


@pytest.mark.parametrize("shape", [(2, 130, 200), (1, 200, 130), (3, 17, 5)])
def test_norm_pass_matches_float64(shape):
    """s = 1/(safety·‖G‖_F) from the split pass (interpreter tiles 16×32: 7, 7 and 1 programs per
    matrix) within 2 fp32 ulps of float64 rounded once (measured ≤ 1), on rows spanning 1e±30."""
    G = _mixed(*shape)
    assert _split(*shape[1:]) == max(1, (-(-shape[1] // 16) * -(-shape[2] // 32)) // 8)
    ns = inv_norm_scale(G, safety=SAFETY, eps=EPS)
    ref = (1.0 / (SAFETY * _sumsq(G).sqrt())).float()
    assert _ulps32(ns.s, ref).max() <= 2
    assert torch.equal(ns.t * ns.p, ns.s)


def test_norm_pass_is_batch_invariant():
    G = _mixed(3, 130, 200)
    whole = inv_norm_scale(G, safety=SAFETY, eps=EPS)
    for b in range(3):
        one = inv_norm_scale(G[b : b + 1], safety=SAFETY, eps=EPS)
        assert torch.equal(one.s, whole.s[b : b + 1]) and torch.equal(one.p, whole.p[b : b + 1])


def test_norm_pass_tall_view_same_as_contiguous():
    """The logical view G.mT (row stride 1) and a contiguous copy of it give the same (s, p) up to the
    fp32 summation order inside a tile (measured: equal)."""
    G = _mixed(2, 130, 200)
    a = inv_norm_scale(G.mT, safety=SAFETY, eps=EPS)
    b = inv_norm_scale(G.mT.contiguous(), safety=SAFETY, eps=EPS)
    assert torch.equal(a.p, b.p) and _ulps32(a.s, b.s).max() <= 1


def test_sumsq_scale_agrees_with_the_norm_pass():
    """Same s within 1 fp32 ulp (measured 0–1 on these inputs; a float32 sum, which saturates above
    3.4e38 and so only serves moderate G, within 2); t·p = s exactly; p the power of two below √sumsq."""
    Gs = (_mixed(4, 48, 80), torch.randn(4, 48, 80, generator=_gen(5)))
    for G, q in ((Gs[0], _sumsq(Gs[0])), (Gs[1], _sumsq(Gs[1]).float())):
        ns = inv_norm_scale(G, safety=SAFETY, eps=EPS)
        gs = sumsq_norm_scale(q, safety=SAFETY, eps=EPS)
        assert _ulps32(gs.s, ns.s).max() <= (1 if q.dtype == torch.float64 else 2)
        assert torch.equal(gs.t * gs.p, gs.s)
        nu = q.double().sqrt()
        assert bool(((nu * gs.p.double() >= 1) & (nu * gs.p.double() < 2)).all())


def test_sumsq_scale_special_values():
    q = torch.tensor([float("inf"), float("nan"), 0.0, 4.0], dtype=torch.float64)
    gs = sumsq_norm_scale(q, safety=1.0, eps=EPS)
    assert gs.s[:2].isnan().all() and gs.t[:2].isnan().all()
    assert gs.s[2] == torch.tensor(1 / EPS, dtype=torch.float32) and gs.s[3] == 0.5 and gs.t[3] == 1.0


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 40, 24)])
def test_ns_with_sumsq_equals_the_standard_call(shape):
    """Standard NS in bf16 storage: the output with the given float64 sum vs the norm pass's.
    The s differ by ≤ 1 ulp and t enters only fp32 epilogues; measured: bit-identical but for one
    matrix at 1 bf16 ulp (relative Frobenius difference 4.9e-8); bound 2 bf16 ulps per entry."""
    G = torch.randn(*shape, generator=_gen(1))
    a = ns_triton(G, cdt=torch.bfloat16, out=torch.float32)
    b = ns_triton(G, cdt=torch.bfloat16, out=torch.float32, sumsq=_sumsq(G))
    assert bool(((a - b).abs() <= 2.0 ** -6 * a.abs()).all())


def test_gram_space_with_sumsq_within_its_own_rounding():
    """Gram-space NS in fp16 amplifies a 1-ulp change of t (its iterate is a polynomial in R, whose
    rounding errors compound): measured relative difference 2.7e-3 on the matrix whose s moved by an
    ulp (0 on the other), against 4.0e-3 between the kernel and the float64 loop. Bound: the
    difference stays below the kernel's own error."""
    G = torch.randn(2, 24, 64, generator=_gen(1))
    a = ns_triton(G, cdt=torch.bfloat16, out=torch.float32, gram=True)
    b = ns_triton(G, cdt=torch.bfloat16, out=torch.float32, gram=True, sumsq=_sumsq(G))
    assert bool((rel(a, b) < rel(a, plain_loop(G))).all())


@pytest.mark.parametrize("k", [50, -10])
def test_ns_with_sumsq_power_of_two_invariance(k):
    G = torch.randn(2, 24, 40, generator=_gen(2))
    ref = ns_triton(G, cdt=torch.bfloat16, sumsq=_sumsq(G))
    assert torch.equal(ns_triton(G * 2.0 ** k, cdt=torch.bfloat16, sumsq=_sumsq(G) * 4.0 ** k), ref)


def test_ns_nonfinite_sumsq_gives_a_nan_matrix_like_a_nonfinite_g():
    G = torch.randn(3, 16, 24, generator=_gen(3))
    Gbad = G.clone()
    Gbad[1, 2, 3] = float("inf")
    assert ns_triton(Gbad).flatten(1).isnan().all(1).tolist() == [False, True, False]
    q = _sumsq(G)
    qbad = q.clone()
    qbad[1] = float("inf")
    out = ns_triton(G, sumsq=qbad)
    assert out.flatten(1).isnan().all(1).tolist() == [False, True, False]
    qbad[1] = float("nan")
    assert torch.equal(ns_triton(G, sumsq=qbad)[[0, 2]], ns_triton(G, sumsq=q)[[0, 2]])


def test_op_checks_sumsq():
    G = torch.randn(2, 8, 12)
    with pytest.raises(ValueError, match="normalize='fro' only"):
        ns_triton(G, normalize="gram", sumsq=_sumsq(G))
    with pytest.raises(ValueError, match=r"must be a \(2,\) float64 or float32 tensor"):
        ns_triton(G, sumsq=_sumsq(G)[:1])


def test_optimizer_with_sumsq_equals_without(monkeypatch):
    """A Muon step on the Triton path with the momentum kernel's sums vs with the norm pass
    (REUSE_SUMSQ off; on is the default): parameters within 4 fp32 ulps of their magnitude (measured: equal)."""
    from fastortho.optim import functional as F

    def step():
        g = _gen(4)
        ps = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(16, 24), (24, 16)]]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        fastortho.Muon([{"params": ps, "algorithm": "muon"}], lr=0.02, backend="triton").step()
        return [p.detach() for p in ps]

    monkeypatch.setattr(F, "REUSE_SUMSQ", True)
    with_q = step()
    monkeypatch.setattr(F, "REUSE_SUMSQ", False)
    for a, b in zip(with_q, step()):
        assert (a - b).abs().max() <= 4 * torch.finfo(torch.float32).eps * b.abs().max()
