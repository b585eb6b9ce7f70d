"""fastortho.Muon: parity with torch.optim.Muon and a readable KellerJordan reference, shapes, routing to
the auxiliary AdamW, state and checkpoints, non-finite handling, telemetry, torch.compile.

Tolerances are measured, with the measured value next to each (torch 2.14.1, CPU, fp32 unless said).
"""
from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

import fastortho
from fastortho.optim import Muon
from fastortho.optim import functional as F
from fastortho.optim.param_groups import muon_param_groups

KJ = (3.4445, -4.7750, 2.0315)
SHAPES = [(32, 64), (64, 32), (48, 48), (48, 48)]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter((0.1 * torch.randn(*s, generator=g)).to(dtype)) for s in shapes]


def run(opt_fn, shapes=SHAPES, steps=10, dtype=torch.float32, grad_seed=1):
    """``steps`` steps on fresh params with reproducible random grads; returns (params, optimizer)."""
    ps = make_params(shapes, dtype)
    opt = opt_fn(ps)
    g = torch.Generator().manual_seed(grad_seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return [p.detach().clone() for p in ps], opt


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def TorchNS(params, **kw):
    """Muon with torch.optim.Muon's own bf16 Newton–Schulz as its ``orthogonalizer=`` callable (reading the
    optimizer's current ns settings, as loaded from a checkpoint too); counts its calls."""
    opt = None

    def torch_ns(stacked):
        TorchNS.calls += 1
        group = opt.param_groups[0]
        steps = group["ns_steps"] or 5
        return torch.stack([_zeropower_via_newtonschulz(x, group["ns_coefficients"], steps, group["eps"])
                            for x in stacked])

    opt = Muon(params, orthogonalizer=torch_ns, **kw)
    return opt


TorchNS.calls = 0


def kj_reference(params, grads_per_step, *, lr, wd, beta=0.95, nesterov=True, steps=5):
    """A readable re-statement of KellerJordan/Muon's update (fp32 NS, conv flattened, scale from the
    flattened shape): buf ← lerp(buf, g, 1−β); u = lerp(g, buf, β) or buf; O = NS5(u);
    p ← p(1 − lr·wd) − lr·√max(1, m/n)·O."""
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    a, b, c = KJ
    for grads in grads_per_step:
        for p, g, buf in zip(params, grads, bufs):
            buf.lerp_(g, 1 - beta)
            u = g.lerp(buf, beta) if nesterov else buf
            X = u.reshape(len(u), -1)
            tall = X.size(0) > X.size(1)
            if tall:
                X = X.T
            X = X / X.norm().clamp_min(1e-7)
            for _ in range(steps):
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
            if tall:
                X = X.T
            m, n = X.shape
            p.mul_(1 - lr * wd).add_(X.reshape(p.shape), alpha=-lr * max(1, m / n) ** 0.5)
    return params


# ------------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [True, False])
def test_bit_identical_to_torch_muon_with_its_ns(nesterov):
    """Everything but the NS numerics (momentum, scale, decay, apply) is torch's, bit for bit (fp32):
    plugging torch's own NS as the orthogonalizer gives identical parameters after 10 steps."""
    shapes = [(16, 32), (32, 16), (24, 24), (24, 24)]  # small: a CPU bf16 matmul is slow
    a, _ = run(lambda ps: torch.optim.Muon(ps, lr=0.02, nesterov=nesterov), shapes=shapes)
    b, _ = run(lambda ps: TorchNS(ps, lr=0.02, nesterov=nesterov, ns_dtype=torch.bfloat16), shapes=shapes)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_matches_torch_muon_to_its_bf16_tolerance():
    """With ns_dtype=bf16, 10 steps match torch.optim.Muon to the error its own bf16 NS implies.

    That error is measured as the distance between torch's bf16 result and the same update in fp32
    (fastortho with fp32 NS): 0.70–0.74 % of the parameter change. fastortho's bf16 NS rounds in other
    places (fp32 norm, fused scaling): 0.81–0.95 %. Bound: 2× the fp32 gap of the same parameter.
    """
    p0 = make_params()
    t, _ = run(lambda ps: torch.optim.Muon(ps, lr=0.02))
    ours16, _ = run(lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.bfloat16))
    ours32, _ = run(lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float32))
    for x0, xt, x16, x32 in zip(p0, t, ours16, ours32):
        dt, d16, d32 = xt - x0.detach(), x16 - x0.detach(), x32 - x0.detach()
        bf16_gap = rel(d32, dt)
        assert 1e-3 < bf16_gap < 2e-2  # the scale of bf16 NS noise (measured 7.0e-3 – 7.4e-3)
        assert rel(d16, dt) <= 2 * bf16_gap


def test_matches_kellerjordan_reference():
    """fp32 NS vs a readable KJ reference in fp32, incl. conv kernels and tall/wide matrices.
    Relative difference of the 10-step parameter change: measured 5.0e-7 – 6.9e-7 (fp32 rounding
    order: fused kernels, batched matmuls); bound 2e-6."""
    shapes = [(32, 64), (64, 32), (16, 4, 3, 3), (16, 4, 3, 3)]
    ps = make_params(shapes)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(10)]
    p0 = [p.detach().clone() for p in ps]
    ref = kj_reference(ps, grads, lr=0.02, wd=0.1)
    opt = Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    for gs in grads:
        for p, gr in zip(ps, gs):
            p.grad = gr.clone()
        opt.step()
    for p, r, q in zip(ps, ref, p0):
        assert rel(p.detach() - q, r - q) < 2e-6


# ------------------------------------------------------------------------------------------------
# the peers' bugs, pinned
# ------------------------------------------------------------------------------------------------
def test_bf16_params_nesterov_false_keep_their_momentum():
    """torch.optim.Muon (2.13) normalizes a bf16 buffer in place when nesterov=False (the NS input
    aliases it). Here the buffer after two steps is the EMA of the grads, not a unit-norm matrix."""
    p = nn.Parameter(torch.randn(16, 32).bfloat16())
    opt = Muon([p], lr=0.02, nesterov=False, momentum=0.9)
    g1, g2 = torch.randn(16, 32).bfloat16(), torch.randn(16, 32).bfloat16()
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    expect = 0.9 * 0.1 * g1.float() + 0.1 * g2.float()
    buf = opt.state[p]["momentum_buffer"]
    assert rel(buf.float(), expect) < 1e-2  # bf16 rounding of the buffer (measured 2.2e-3)
    assert abs(buf.float().norm().item() - 1.0) > 0.5  # not normalized: ≈ 2.9 (torch 2.14.1's: 0.997)


@pytest.mark.parametrize("placement", ["before_ortho", "after_ortho"])
def test_grad_is_never_modified(placement):
    ps = make_params()
    grads = [torch.randn(p.shape) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt = Muon(ps, lr=0.02, momentum_placement=placement)
    opt.step()
    opt.step()
    for p, g in zip(ps, grads):
        assert torch.equal(p.grad, g)


def test_params_without_grad_are_skipped():
    ps = make_params()
    before = [p.detach().clone() for p in ps]
    opt = Muon(ps, lr=0.02)
    ps[0].grad = torch.randn(ps[0].shape)
    opt.step()
    assert not torch.equal(ps[0], before[0])
    for p, b in zip(ps[1:], before[1:]):
        assert p.grad is None and torch.equal(p.detach(), b)  # no weight decay either
        assert torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0


def test_sparse_and_complex_are_clear_errors():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon([emb.weight], lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    # torch.optim.Muon's contract (its error-input test): construction succeeds, step() raises
    c = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    c.grad = torch.randn_like(c)
    opt = Muon([c])
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        opt.step()


def test_conv_scale_from_flattened_shape():
    """A (16, 4, 3, 3) kernel is the 16×36 matrix: scale √max(1, 16/36) = 1 ("original") and
    √(16/36) ("spectral"); KJ's snapshot used kh/kw = 3/3."""
    for rule, s in (("original", 1.0), ("spectral", math.sqrt(16 / 36)), ("rms_match", 0.2 * 6.0)):
        p = nn.Parameter(torch.randn(16, 4, 3, 3))
        p0 = p.detach().clone()
        opt = Muon([p], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False,
                   orthogonalizer="svd", lr_scale=rule)
        p.grad = torch.randn(p.shape)
        opt.step()
        # exact polar factor of a full-rank 16×36 matrix has ‖UVᵀ‖_F = √16
        assert (p0 - p.detach()).norm().item() == pytest.approx(0.1 * s * 4.0, rel=1e-5)


@pytest.mark.parametrize("rule,fn", [
    ("original", lambda m, n: max(1, m / n) ** 0.5),
    ("rms_match", lambda m, n: 0.2 * max(m, n) ** 0.5),
    ("spectral", lambda m, n: (m / n) ** 0.5),
    ("none", lambda m, n: 1.0),
])
def test_lr_scale_formulas(rule, fn):
    for m, n in ((64, 16), (16, 64)):
        assert F.lr_scale_factor(m, n, rule) == pytest.approx(fn(m, n))
        p = nn.Parameter(torch.randn(m, n))
        p0 = p.detach().clone()
        opt = Muon([p], lr=0.01, weight_decay=0.0, momentum=0.0, nesterov=False,
                   orthogonalizer="svd", lr_scale=rule)
        p.grad = torch.randn(m, n)
        opt.step()
        assert (p0 - p.detach()).norm().item() == pytest.approx(0.01 * fn(m, n) * min(m, n) ** 0.5, rel=1e-5)


def test_adjust_lr_fn_is_torchs_name_for_lr_scale():
    p = make_params()[:1]
    assert Muon(p, adjust_lr_fn="match_rms_adamw").param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert F.resolve_lr_scale(None, "match_rms_adamw") == "rms_match"
    assert F.resolve_lr_scale(None, "spectral_unclamped") == "spectral"
    assert F.resolve_lr_scale(None, None) == "original"
    with pytest.raises(ValueError, match="contradicts"):
        Muon(p, adjust_lr_fn="original", lr_scale="spectral")
    # peers' names for the same rules are accepted as lr_scale (dion's spectral_norm = √(m/n)); others raise
    assert F.resolve_lr_scale("spectral_norm", None) == "spectral"
    with pytest.raises(ValueError, match="lr_scale must be one of"):
        Muon(p, lr_scale="spectral_nrom")


# ------------------------------------------------------------------------------------------------
# shapes and batching
# ------------------------------------------------------------------------------------------------
def _ns32_muon(ps, **kw):
    return Muon(ps, lr=0.05, weight_decay=0.0, ns_dtype=torch.float32, **kw)


def test_stacked_3d_equals_separate_matrices():
    """(E, m, n) experts are E independent matrices: same result as E separate 2-D parameters
    (max abs difference measured 0.0 with the torch backend; bound 1e-6 for BLAS that round bmm and mm
    differently)."""
    w = torch.randn(3, 16, 24)
    stacked = nn.Parameter(w.clone())
    sep = [nn.Parameter(w[i].clone()) for i in range(3)]
    o1, o2 = _ns32_muon([stacked]), _ns32_muon(sep)
    for _ in range(3):
        g = torch.randn(3, 16, 24)
        stacked.grad = g.clone()
        for i, p in enumerate(sep):
            p.grad = g[i].clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in sep]), atol=1e-6, rtol=0)


def test_split_sizes_equal_separate_blocks():
    """Fused QKV (3d, d) with split_sizes=(d, d, d) equals three separate (d, d) parameters."""
    d = 16
    w = torch.randn(3 * d, d)
    fused = nn.Parameter(w.clone())
    sep = [nn.Parameter(b.clone()) for b in w.split(d)]
    o1 = _ns32_muon([dict(params=[fused], split_sizes=(d, d, d))], lr_scale="spectral")
    o2 = _ns32_muon(sep, lr_scale="spectral")
    for _ in range(3):
        g = torch.randn(3 * d, d)
        fused.grad = g.clone()
        for p, gb in zip(sep, g.split(d)):
            p.grad = gb.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in sep]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="split_sizes"):
        Muon([dict(params=[nn.Parameter(torch.randn(10, 4))], split_sizes=(3, 3))])


def test_same_shapes_share_one_batched_call():
    """4 params in 2 groups with 3 distinct shapes → 3 orthogonalizer calls per step."""
    ps = make_params()
    opt = TorchNS([dict(params=ps[:3]), dict(params=ps[3:], lr=0.01)], ns_dtype=torch.bfloat16)
    for p in ps:
        p.grad = torch.randn(p.shape)
    TorchNS.calls = 0
    opt.step()
    assert TorchNS.calls == 3


def test_non_contiguous_param():
    """A channels_last conv kernel gets the same update as its contiguous copy (measured: identical)."""
    w = torch.randn(8, 4, 3, 3)
    a = nn.Parameter(w.clone().to(memory_format=torch.channels_last))
    b = nn.Parameter(w.clone())
    assert not a.is_contiguous()
    oa, ob = _ns32_muon([a]), _ns32_muon([b])
    for _ in range(2):
        g = torch.randn(8, 4, 3, 3)
        a.grad, b.grad = g.clone().to(memory_format=torch.channels_last), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# momentum conventions and placement
# ------------------------------------------------------------------------------------------------
def test_sum_and_ema_conventions_agree_after_exact_orthogonalization():
    """At constant β, 'sum' is 1/(1−β) × 'ema', and the polar factor ignores the scale
    (max abs difference measured 3.0e-8; bound 1e-6)."""
    a, _ = run(lambda ps: Muon(ps, lr=0.02, orthogonalizer="svd", momentum_convention="ema"), steps=4)
    b, _ = run(lambda ps: Muon(ps, lr=0.02, orthogonalizer="svd", momentum_convention="sum"), steps=4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_after_ortho_placement_matches_its_definition():
    """B ← lerp(B, O(g), 1−β); update = lerp(O(g), B, β) (Nesterov); exact polar for O.
    Max abs difference to the float64 recurrence: measured 4.0e-7; bound 1e-6."""
    p = nn.Parameter(torch.randn(12, 20))
    ref, buf = p.detach().clone().double(), torch.zeros(12, 20, dtype=torch.float64)
    opt = Muon([p], lr=0.03, weight_decay=0.1, orthogonalizer="svd", momentum_placement="after_ortho")
    for _ in range(3):
        g = torch.randn(12, 20)
        p.grad = g
        opt.step()
        O = fastortho.reference.polar_svd(g.double())
        buf.lerp_(O, 0.05)
        ref.mul_(1 - 0.03 * 0.1).add_(O.lerp(buf, 0.95), alpha=-0.03)
    torch.testing.assert_close(p.detach().double(), ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# non-finite updates
# ------------------------------------------------------------------------------------------------
def test_nonfinite_update_is_skipped_and_counted():
    ps = make_params()
    clean = [p.detach().clone() for p in ps]
    opt = Muon(ps, lr=0.02, weight_decay=0.1)
    for i, p in enumerate(ps):
        p.grad = torch.randn(p.shape)
    ps[2].grad[3, 4] = float("nan")
    opt.step()
    assert opt.nonfinite_count == 1
    assert torch.equal(ps[2].detach(), clean[2] * (1 - 0.02 * 0.1))  # decay only
    assert torch.count_nonzero(opt.state[ps[2]]["momentum_buffer"]) == 0  # reset, not NaN
    # ps[3] has the same shape and shares the batched call: unaffected, finite
    assert torch.isfinite(ps[3]).all() and not torch.equal(ps[3].detach(), clean[3] * (1 - 0.02 * 0.1))
    ps[2].grad = torch.randn(ps[2].shape)
    opt.step()
    assert opt.nonfinite_count == 1 and all(torch.isfinite(p).all() for p in ps)
    # the count travels with the checkpoint
    opt2 = Muon(make_params(), lr=0.02)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.nonfinite_count == 1


def test_nonfinite_raise():
    p = make_params()[0]
    opt = Muon([p], nonfinite="raise")
    p.grad = torch.full(p.shape, float("inf"))
    with pytest.raises(FloatingPointError):
        opt.step()


# ------------------------------------------------------------------------------------------------
# state, checkpoints, schedulers, closures
# ------------------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_state_is_eager_and_keys_portable():
    model = _model()
    opt = Muon(muon_param_groups(model), lr=0.02)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(6))  # every param, keyed by index (no id())
    assert {g["algorithm"] for g in sd["param_groups"]} == {"muon", "adamw"}


def test_state_dict_roundtrip_through_cpu_resumes_bit_identically():
    model = _model()
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=1e-2)
    _train(model, opt, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=1)

    model2 = _model()
    opt2 = Muon(muon_param_groups(model2), lr=0.02, adamw_lr=1e-2)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    _train(model2, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_setstate_fills_new_defaults_and_torch_checkpoints_load():
    ps = make_params()
    topt = torch.optim.Muon(ps, lr=0.02)
    for p in ps:
        p.grad = torch.randn(p.shape)
    topt.step()
    opt = Muon(ps, lr=0.02)
    opt.load_state_dict(topt.state_dict())  # torch's groups lack every fastortho key
    g = opt.param_groups[0]
    assert g["algorithm"] == "muon" and g["momentum_placement"] == "before_ortho" and g["nonfinite"] == "skip"
    assert torch.equal(opt.state[ps[0]]["momentum_buffer"], topt.state[ps[0]]["momentum_buffer"])
    opt.step()
    # pickled optimizer from an older version without some keys
    old = copy.deepcopy(opt)
    for grp in old.param_groups:
        del grp["momentum_convention"], grp["split_sizes"]
    del old.__dict__["_nonfinite_count"]
    new = pickle.loads(pickle.dumps(old))
    assert new.param_groups[0]["momentum_convention"] == "ema" and new.nonfinite_count == 0


def test_lr_scheduler_and_closure():
    model = _model()
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t >= 1 else 1.0)
    x, y = torch.randn(16, 8), torch.randn(16, 4)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    sched.step()
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    frozen = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)  # lr 0: no step, and decoupled decay is lr·wd = 0
    for a, b in zip(model.parameters(), frozen):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# auxiliary AdamW
# ------------------------------------------------------------------------------------------------
def test_aux_adamw_is_torch_adamw_bit_for_bit():
    ps, qs = make_params([(7,), (5, 3)], seed=4), make_params([(7,), (5, 3)], seed=4)
    opt = Muon([dict(params=ps, algorithm="adamw")], adamw_lr=1e-2, adamw_weight_decay=0.05,
               adamw_betas=(0.9, 0.95))
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95), foreach=True)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("zero_init", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_aux_adamw_switches(zero_init, bias_correction):
    """Seed 003's four (zero-init, bias-correction) variants, against the formulas written out in
    float64 (max abs difference measured 6e-8 – 1.1e-7; bound 1e-6)."""
    b1, b2, eps, lr = 0.9, 0.99, 1e-8, 0.01
    p = nn.Parameter(torch.randn(6))
    ref = p.detach().clone().double()
    opt = Muon([p], adamw_lr=lr, adamw_betas=(b1, b2), zero_init=zero_init, bias_correction=bias_correction)
    m = v = None
    for t in range(1, 4):
        g = torch.randn(6)
        p.grad = g
        opt.step()
        g = g.double()
        if m is None:
            m, v = (torch.zeros_like(g), torch.zeros_like(g)) if zero_init else (g.clone(), g * g)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
        ref -= lr * mh / (vh.sqrt() + eps)
    torch.testing.assert_close(p.detach().double(), ref, atol=1e-6, rtol=0)


def test_auto_split_routes_vectors_to_adamw():
    model = _model()
    opt = Muon(model.parameters(), lr=0.02, adamw_lr=3e-4)
    algos = [(g["algorithm"], g["lr"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups]
    assert algos[0][0] == "muon" and algos[0][1] == 0.02 and all(len(s) == 2 for s in algos[0][2])
    assert algos[1][0] == "adamw" and algos[1][1] == 3e-4 and all(len(s) == 1 for s in algos[1][2])
    named = Muon(model.named_parameters())  # torch's (name, param) pairs split the same way
    assert [g["param_names"] for g in named.param_groups] == [
        ["0.weight", "2.weight", "4.weight"], ["0.bias", "2.bias", "4.bias"]]
    with pytest.raises(ValueError, match="AdamW"):
        Muon([dict(params=[nn.Parameter(torch.randn(3))], algorithm="muon")])


# ------------------------------------------------------------------------------------------------
# telemetry, dtype defaults, compile
# ------------------------------------------------------------------------------------------------
def test_telemetry_update_rms_is_the_applied_step():
    p = nn.Parameter(torch.randn(24, 40))
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.02, weight_decay=0.0, telemetry=True, lr_scale="rms_match")
    p.grad = torch.randn(24, 40)
    opt.step()
    (rep,) = opt.telemetry_report()
    step_rms = (p.detach() - p0).pow(2).mean().sqrt().item()
    assert rep["update_rms"] == pytest.approx(step_rms, rel=1e-4)
    # Keller's triple leaves σ in roughly [0.7, 1.2] (measured [0.68, 1.13] here)
    assert 0.5 < rep["sigma_min"] <= rep["sigma_max"] < 1.3
    assert Muon([p]).telemetry_report() == []


def test_ns_dtype_default_is_fp32_on_cpu():
    assert F.resolve_ns_dtype(None, torch.device("cpu")) == torch.float32
    assert F.resolve_ns_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert F.resolve_ns_dtype(torch.float16, torch.device("cuda")) == torch.float16


def test_named_schedule_and_polar_orthogonalizers_run():
    for kw in (dict(coefficients="polar_express"), dict(coefficients=[KJ] * 3), dict(orthogonalizer="polar")):
        ps, _ = run(lambda ps: Muon(ps, lr=0.02, **kw), steps=2)
        assert all(torch.isfinite(p).all() for p in ps)


def test_functional_muon_equals_class():
    a, _ = run(lambda ps: Muon(ps, lr=0.02), steps=3)
    ps = make_params()
    bufs = [torch.zeros_like(p) for p in ps]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        with torch.no_grad():
            F.muon(ps, grads, bufs, lr=0.02)
    for x, y in zip(a, ps):
        assert torch.equal(x, y.detach())


def test_step_under_torch_compile_cpu_inductor():
    """step() compiles with inductor on CPU and matches eager (max abs diff measured ≤ 1e-7)."""
    torch._dynamo.reset()
    shapes = [(16, 32), (32, 16)]
    ea, _ = run(lambda ps: Muon(ps, lr=0.02), shapes=shapes, steps=2)
    ps = make_params(shapes)
    opt = Muon(ps, lr=0.02)
    step = torch.compile(opt.step, backend="inductor")
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        step()
    for x, y in zip(ea, ps):
        torch.testing.assert_close(x, y.detach(), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_has_no_host_sync_on_cuda():
    """The whole step (Muon with skip checks, aux AdamW, telemetry off) runs with sync debug mode 'error'."""
    ps = [nn.Parameter(torch.randn(s, device="cuda")) for s in [(64, 128), (64, 128), (128, 64), (32,)]]
    opt = Muon(ps, lr=0.02)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up: lazy inits (cuBLAS handles, kernel loads) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in ps)


# ------------------------------------------------------------------------------------------------
# against torch.optim.Muon as the oracle: extreme scales, every dtype, defaults, checkpoints, errors
# ------------------------------------------------------------------------------------------------
def _steps(opt_fn, p0, grads):
    p = nn.Parameter(p0.clone())
    opt = opt_fn([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach().clone(), opt


def test_huge_finite_gradient_gets_its_update(step_path):
    """A finite gradient of 1e20 is not "non-finite": its fp32 sum of squares (1e42) overflows, the
    float64 one cannot. Muon's update is scale-invariant, so at g·2^66 (exact scaling) the parameters
    are bit-identical to those at g and the buffer is exactly 2^66 times as large."""
    g = torch.Generator().manual_seed(7)
    p0 = torch.randn(16, 8, generator=g)
    grads = [torch.randn(16, 8, generator=g) for _ in range(3)]
    big = 2.0**66  # ≈ 7.4e19
    kw = dict(lr=0.02, ns_dtype=torch.float32, nonfinite="raise")
    a, oa = _steps(lambda ps: Muon(ps, **kw), p0, grads)
    b, ob = _steps(lambda ps: Muon(ps, **kw), p0, [x * big for x in grads])
    assert torch.equal(a, b) and ob.nonfinite_count == 0
    (pa,), (pb,) = oa.param_groups[0]["params"], ob.param_groups[0]["params"]
    assert torch.equal(ob.state[pb]["momentum_buffer"], oa.state[pa]["momentum_buffer"] * big)
    skip = Muon([nn.Parameter(p0.clone())], lr=0.02)
    skip.param_groups[0]["params"][0].grad = torch.randn(16, 8) * 1e20
    skip.step()
    assert skip.nonfinite_count == 0


def test_extreme_gradient_scales_match_torch_muon(step_path):
    """torch.optim.Muon as the oracle at 1e20 and 1e-30 (bf16 NS on both sides).

    1e-30: the momentum's norm (≈1e-30·√128) is below eps = 1e-7, so both divide by eps and the
    update is ~1e-25: parameters are bit-identical (weight decay only). 1e20: torch's own bf16
    Frobenius norm overflows to inf (‖u‖² ≈ 1e41 > 3.4e38) and its update collapses to zero; the
    update it means is that of the same gradient at scale 1 (Muon is scale-invariant), which is the
    oracle here, within the bound of ``test_matches_torch_muon_to_its_bf16_tolerance``: 2× the gap
    between torch's bf16 and fastortho's fp32 NS (measured ratio to that gap: 0.91)."""
    g = torch.Generator().manual_seed(8)
    p0 = torch.randn(16, 8, generator=g)
    grads = [torch.randn(16, 8, generator=g) for _ in range(3)]
    ours = lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.bfloat16)  # noqa: E731
    theirs = lambda ps: torch.optim.Muon(ps, lr=0.02)  # noqa: E731
    tiny_ours, o = _steps(ours, p0, [x * 1e-30 for x in grads])
    tiny_torch, _ = _steps(theirs, p0, [x * 1e-30 for x in grads])
    assert torch.equal(tiny_ours, tiny_torch) and o.nonfinite_count == 0
    huge_ours, o = _steps(ours, p0, [x * 1e20 for x in grads])
    assert o.nonfinite_count == 0
    ref, _ = _steps(theirs, p0, grads)
    ours32, _ = _steps(lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float32), p0, grads)
    gap = rel(ours32 - p0, ref - p0)
    assert 1e-3 < gap < 2e-2
    assert rel(huge_ours - p0, ref - p0) <= 2 * gap


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_torch_dtype_side_by_side_with_torch_muon(dtype, step_path):
    """Every floating dtype torch.optim.Muon steps (fp16, bf16, fp32, fp64) steps here too, with the
    fused kernels where they exist (fp16/bf16/fp32) and the float64 fallback, side by side with torch
    for 5 steps (relative difference of the parameter change).

    fp32/fp64, torch's own NS as the orthogonalizer: every operation is torch's, bit for bit. fastortho's
    bf16 NS: within 2× the gap between torch's bf16 NS and an fp32 NS (measured 1.0–1.1×).

    fp16/bf16: fastortho rounds the buffer once (torch: after ``lerp_`` and again in the Nesterov
    ``lerp``) and applies p(1−ηλ) − ηsO with one rounding (torch: two). The scale of that is torch's own
    storage noise at the dtype: torch's run vs torch's run on fp32 storage of the same values,
    measured 1.2–1.3e-2 (fp16) and 5.7e-2–9.2e-2 (bf16). fastortho (hooked, bf16 NS, fp32 NS)
    measured 0.93–1.18× that noise; bound 1.5×."""
    shapes = [(16, 32), (24, 12)]
    p0 = [p.detach() for p in make_params(shapes, dtype)]
    g = torch.Generator().manual_seed(9)
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(5)]

    def go(opt_fn, storage=dtype):
        ps = [nn.Parameter(x.clone().to(storage)) for x in p0]
        opt = opt_fn(ps)
        for gs in grads:
            for p, x in zip(ps, gs):
                p.grad = x.clone().to(storage)
            opt.step()
        assert all(p.dtype == storage and opt.state[p]["momentum_buffer"].dtype == storage for p in ps)
        return [p.detach() for p in ps]

    ref = go(lambda ps: torch.optim.Muon(ps, lr=0.02))
    hooked = go(lambda ps: TorchNS(ps, lr=0.02, ns_dtype=torch.bfloat16))
    ours16 = go(lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.bfloat16))
    ours32 = go(lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float32))
    if dtype in (torch.float32, torch.float64):
        for x0, r, h, o16, o32 in zip(p0, ref, hooked, ours16, ours32):
            assert torch.equal(h, r)
            gap = rel(o32 - x0, r - x0)
            assert 1e-3 < gap < 2e-2 and rel(o16 - x0, r - x0) <= 2 * gap
        return
    ref_wide = go(lambda ps: torch.optim.Muon(ps, lr=0.02), storage=torch.float32)
    for x0, r, rw, h, o16, o32 in zip(p0, ref, ref_wide, hooked, ours16, ours32):
        noise = rel(r - x0, rw - x0)
        assert 0 < noise < 0.2
        for ours in (h, o16, o32):
            assert rel(ours - x0, r - x0) <= 1.5 * noise


def test_defaults_are_torchs():
    """Every key of torch.optim.Muon's defaults carries torch's value (README: "same defaults")."""
    p = make_params()[:1]
    ours, theirs = Muon(p).defaults, torch.optim.Muon(p).defaults
    for k, v in theirs.items():
        assert ours[k] == v, f"defaults[{k!r}]: {ours[k]!r} != torch's {v!r}"
        assert type(ours[k]) is type(v) or v is None, k
    # a named schedule stores its native length, and a group's own schedule keeps it
    assert Muon(p, coefficients="polar_express_paper").defaults["ns_steps"] == 8
    opt = Muon([dict(params=p, coefficients="polar_express_paper")])
    assert opt.param_groups[0]["ns_steps"] == 8


def test_checkpoints_round_trip_torch_fastortho_torch():
    """torch → fastortho → torch: each loads the other's state dict and steps; the resumed run stays
    within torch's own bf16 noise of torch's uninterrupted run (fastortho with bf16 NS for its 3
    steps: measured 1.0e-3 relative on the 9-step parameter change; torch's bf16 noise, measured as
    the gap of torch's 9 steps to fastortho's fp32-NS 9 steps: 7.3e-3. Bound: that gap)."""
    shapes = [(16, 32), (32, 16)]
    p0 = [p.detach() for p in make_params(shapes)]
    g = torch.Generator().manual_seed(10)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(9)]

    def train(opt, ps, gs):
        for step in gs:
            for p, x in zip(ps, step):
                p.grad = x.clone()
            opt.step()

    ps = [nn.Parameter(x.clone()) for x in p0]
    train(torch.optim.Muon(ps, lr=0.02), ps, grads)
    ref = [p.detach().clone() for p in ps]
    ps = [nn.Parameter(x.clone()) for x in p0]
    train(Muon(ps, lr=0.02, ns_dtype=torch.float32), ps, grads)
    noise = max(rel(a - x0, r - x0) for a, r, x0 in zip(ps, ref, p0))

    ps = [nn.Parameter(x.clone()) for x in p0]
    t1 = torch.optim.Muon(ps, lr=0.02)
    train(t1, ps, grads[:3])
    f = Muon(ps, lr=0.02, ns_dtype=torch.bfloat16)
    f.load_state_dict(t1.state_dict())
    train(f, ps, grads[3:6])
    buf = io.BytesIO()
    torch.save(f.state_dict(), buf)
    buf.seek(0)
    t2 = torch.optim.Muon(ps, lr=0.5)
    t2.load_state_dict(torch.load(buf, weights_only=True))
    assert t2.param_groups[0]["lr"] == 0.02 and t2.param_groups[0]["ns_steps"] == 5
    train(t2, ps, grads[6:])
    for p, r, x0 in zip(ps, ref, p0):
        assert torch.isfinite(p).all()
        assert rel(p.detach() - x0, r - x0) <= noise


# every ValueError torch/optim/_muon.py raises for an argument value, as (kwargs, raised at step)
_TORCH_BAD_ARGS = [
    (dict(lr=torch.tensor([1e-3, 1e-3])), False),
    (dict(lr=-1.0), False),
    (dict(momentum=-0.5), False),
    (dict(weight_decay=-0.1), False),
    (dict(adjust_lr_fn="arbitrary"), False),
    (dict(ns_steps=100), True),
    (dict(ns_coefficients=(3.4, -4.7)), True),
]


@pytest.mark.parametrize("kwargs,at_step", _TORCH_BAD_ARGS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_torch_arguments_raise_torchs_error(kwargs, at_step):
    """Same exception type and torch's message (torch raises two of them at the first step; fastortho
    at construction, earlier)."""
    def torch_error():
        p = nn.Parameter(torch.randn(4, 6))
        p.grad = torch.randn(4, 6)
        try:
            opt = torch.optim.Muon([p], **kwargs)
            if at_step:
                opt.step()
        except Exception as e:  # noqa: BLE001 - whatever torch raises is the oracle
            return e
        raise AssertionError(f"torch.optim.Muon accepted {kwargs}")

    expected = torch_error()
    with pytest.raises(type(expected)) as info:
        Muon([nn.Parameter(torch.randn(4, 6))], **kwargs)
    assert str(info.value).startswith(str(expected)), (str(info.value), str(expected))


@pytest.mark.parametrize("method", ["svd", "qdwh", "higham"])
def test_polar_orthogonalizers_cut_at_the_bf16_parameters_precision(method):
    """A bf16 parameter's momentum reaches the orthogonalizer as a float32 copy; its bf16 rounding noise
    (σ ≈ 1e-3·σ_max) must still map to 0, so a rank-1 gradient gives a rank-1 update of norm lr·s = √2.
    Measured ‖Δ‖_F: 1.41404 (bf16 parameter rounding) for all three; before the precision-aware cut
    7.6 (svd, higham) and 7.9 (qdwh)."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(64, 32, dtype=torch.bfloat16))
    opt = Muon([p], lr=1.0, weight_decay=0.0, orthogonalizer=method, adjust_lr_fn="original")
    p.grad = (torch.randn(64, 1, generator=g) @ torch.randn(1, 32, generator=g)).bfloat16()
    opt.step()
    d = p.detach().double()
    assert abs(d.norm().item() / math.sqrt(2) - 1) < 2.0**-8  # a bf16 relative rounding step
    S = torch.linalg.svdvals(d)
    assert S[1].item() < 2.0**-8 * S[0].item()  # what is left is the bf16 storage of p (measured 7.9e-4)


def test_mixed_dtype_group_cuts_each_parameter_at_its_own_precision():
    """One group, a bf16 and a float32 parameter of one shape: they go to separate svd calls, each with the
    cut of its storage dtype. The float32 gradient's σ = 1e-2 directions (below bf16's cut √ε_bf16 = 0.088,
    far above float32's 64·ε_fp32 = 7.6e-6) must each get a unit singular value."""
    g = torch.Generator().manual_seed(1)
    pb = nn.Parameter(torch.zeros(64, 32, dtype=torch.bfloat16))
    pf = nn.Parameter(torch.zeros(64, 32))
    opt = Muon([pb, pf], lr=1.0, weight_decay=0.0, orthogonalizer="svd", adjust_lr_fn="original")
    pb.grad = (torch.randn(64, 1, generator=g) @ torch.randn(1, 32, generator=g)).bfloat16()
    U, _ = torch.linalg.qr(torch.randn(64, 32, generator=g))
    V, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    sigma = torch.logspace(0, -2, 32)
    pf.grad = (U * sigma) @ V.T
    opt.step()
    Sb = torch.linalg.svdvals(pb.detach().double())
    assert Sb[1].item() < 2.0**-8 * Sb[0].item()
    Sf = torch.linalg.svdvals(pf.detach().double()) / math.sqrt(2)
    assert (Sf - 1).abs().max().item() < 1e-5  # float32 update of an exact polar factor (measured 4.8e-8)
    # Newton–Schulz ignores the storage dtype: its units keep sharing one batched call.
    cfg = F.OrthoConfig()
    assert cfg.for_data(pb, pf) is cfg and F.OrthoConfig(orthogonalizer="svd").for_data(pb, pf).data_dtype == torch.bfloat16
