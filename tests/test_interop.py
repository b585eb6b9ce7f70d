"""Interop with the Muon code users already have: peers' group flags, their optimizer state (so a run can
switch to fastortho mid-training, keeping momentum), their lr-scale names, and Hugging Face's Conv1D.

State layouts, from each project's published optimizer:
* KellerJordan/Muon ``MuonWithAuxAdam``: groups flagged ``use_muon``; Muon groups (lr, momentum,
  weight_decay) keep ``state["momentum_buffer"]``; Adam groups (lr, betas, eps, weight_decay) keep
  ``exp_avg``, ``exp_avg_sq`` and ``step`` as a Python int.
* timm ``Muon`` (installed, used directly): one group mixes Muon and its AdamW fallback; per parameter
  ``state["use_muon"]`` caches the routing, Muon keeps ``momentum_buffer``, the fallback ``step`` (a
  0-dim tensor), ``exp_avg``, ``exp_avg_sq``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fastortho import Muon, muon_param_groups
from fastortho.optim import functional as F
from fastortho.optim.shapes import LR_SCALE_ALIASES, lr_scale_factor, resolve_lr_scale


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in ((8, 6), (8,), (10, 4))]


# -- group flags -------------------------------------------------------------------------------
def test_use_muon_and_use_fallback_flags_pick_the_algorithm():
    w, b, e = params()
    opt = Muon([dict(params=[w], use_muon=True), dict(params=[e, b], use_muon=False)])
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw"]
    assert "use_muon" not in opt.param_groups[0]
    assert "exp_avg" in opt.state[e]  # a 2-D parameter flagged for Adam stays with AdamW
    opt = Muon([dict(params=[w]), dict(params=[e], use_fallback=True)])
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw"]
    with pytest.raises(ValueError, match="contradict"):
        Muon([dict(params=[w], use_muon=True, use_fallback=True)])
    with pytest.raises(ValueError, match="algorithm='adamw' but its peer flag"):
        Muon([dict(params=[w], use_muon=True, algorithm="adamw")])


# -- KellerJordan/Muon MuonWithAuxAdam ---------------------------------------------------------
def keller_state(w, b, e, gen):
    """A MuonWithAuxAdam state dict after 3 steps, in its published layout."""
    return {
        "state": {
            0: {"momentum_buffer": torch.randn(w.shape, generator=gen)},
            1: {"exp_avg": torch.randn(b.shape, generator=gen), "exp_avg_sq": torch.rand(b.shape, generator=gen),
                "step": 3},
            2: {"exp_avg": torch.randn(e.shape, generator=gen), "exp_avg_sq": torch.rand(e.shape, generator=gen),
                "step": 3},
        },
        "param_groups": [
            dict(lr=0.02, momentum=0.95, weight_decay=0.01, use_muon=True, params=[0]),
            dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, use_muon=False, params=[1, 2]),
        ],
    }


def test_keller_state_loads_and_continues():
    w, b, e = params()
    gen = torch.Generator().manual_seed(1)
    sd = keller_state(w, b, e, gen)
    ref = copy.deepcopy(sd)
    opt = Muon([dict(params=[w], use_muon=True), dict(params=[b, e], use_muon=False)])
    opt.load_state_dict(sd)
    mg, ag = opt.param_groups
    assert (mg["lr"], mg["momentum"], mg["weight_decay"]) == (0.02, 0.95, 0.01)
    assert (ag["lr"], ag["betas"], ag["adamw_eps"]) == (3e-4, (0.9, 0.95), 1e-10)
    assert torch.equal(opt.state[w]["momentum_buffer"], ref["state"][0]["momentum_buffer"])
    assert float(opt.state[b]["step"]) == 3.0
    # one more step, against MuonWithAuxAdam's update rules (EMA momentum, Adam with bias correction)
    grads = [torch.randn(p.shape, generator=gen) for p in (w, b, e)]
    before = [p.detach().clone() for p in (w, b, e)]
    for p, g in zip((w, b, e), grads):
        p.grad = g.clone()
    opt.step()
    buf = ref["state"][0]["momentum_buffer"].lerp(grads[0], 1 - 0.95)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf, rtol=0, atol=0)
    for i, p in ((1, b), (2, e)):
        st = ref["state"][i]
        m = st["exp_avg"].lerp(grads[i], 1 - 0.9)
        v = st["exp_avg_sq"].lerp(grads[i].square(), 1 - 0.95)
        upd = (m / (1 - 0.9**4)) / ((v / (1 - 0.95**4)).sqrt() + 1e-10)
        expect = before[i] - 3e-4 * upd
        # same math, different rounding order (√v/√(1−β₂ᵗ) vs √(v/(1−β₂ᵗ))): measured max |diff| 0 here
        # (|p| ≤ 2.6); the bound allows a few float32 ulps for another CPU's libm
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 4)
        assert float(opt.state[p]["step"]) == 4.0


def test_mismatched_routing_says_how_to_fix():
    w, b, e = params()
    sd = keller_state(w, b, e, torch.Generator().manual_seed(1))
    opt = Muon([dict(params=[w], use_muon=True), dict(params=[b, e])])  # e (2-D) would go to Muon
    with pytest.raises(ValueError, match="route it the same way"):
        opt.load_state_dict(sd)
    opt = Muon([w, b, e])
    with pytest.raises(ValueError, match="same param groups"):
        opt.load_state_dict(sd)


# -- timm -------------------------------------------------------------------------------------
def test_timm_state_loads_and_continues():
    timm_optim = pytest.importorskip("timm.optim")
    w, b, _ = params()
    peer = timm_optim.Muon([w, b], lr=0.02, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        for p in (w, b):
            p.grad = torch.randn(p.shape, generator=gen)
        peer.step()
    assert peer.state[w]["use_muon"] and not peer.state[b]["use_muon"]
    sd = copy.deepcopy(peer.state_dict())
    w2, b2 = (nn.Parameter(p.detach().clone()) for p in (w, b))
    opt = Muon([w2, b2])  # the same params as timm got: split into a Muon and an AdamW group
    opt.load_state_dict(sd)
    mg, ag = opt.param_groups
    assert mg["lr"] == 0.02 and mg["nesterov"] is False and F.unit_args(mg)["lr_scale"] == "rms_match"
    assert ag["lr"] == 0.02 and ag["betas"] == (0.9, 0.95) and ag["weight_decay"] == 0.01
    assert torch.equal(opt.state[w2]["momentum_buffer"], peer.state[w]["momentum_buffer"])
    assert torch.equal(opt.state[b2]["exp_avg_sq"], peer.state[b]["exp_avg_sq"])
    grads = [torch.randn(p.shape, generator=gen) for p in (w, b)]
    for o, ps in ((peer, (w, b)), (opt, (w2, b2))):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    # momentum kept: the buffers agree after a step taken by each (both lerp in float32)
    torch.testing.assert_close(opt.state[w2]["momentum_buffer"], peer.state[w]["momentum_buffer"], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[b2]["exp_avg"], peer.state[b]["exp_avg"], rtol=0, atol=0)
    # AdamW fallback parameter: same update up to rounding order; measured max |diff| 0 (|b| ≤ 2)
    torch.testing.assert_close(b2.detach(), b.detach(), rtol=0, atol=4 * torch.finfo(torch.float32).eps)


def test_torch_muon_state_still_loads():
    w = nn.Parameter(torch.randn(8, 6))
    peer = torch.optim.Muon([w], lr=0.05, adjust_lr_fn="match_rms_adamw")
    w.grad = torch.randn(8, 6)
    peer.step()
    opt = Muon([nn.Parameter(w.detach().clone())])
    opt.load_state_dict(copy.deepcopy(peer.state_dict()))
    g = opt.param_groups[0]
    assert g["lr"] == 0.05 and F.unit_args(g)["lr_scale"] == "rms_match"
    assert torch.equal(opt.state[g["params"][0]]["momentum_buffer"], peer.state[w]["momentum_buffer"])


# -- lr conventions ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,rule", sorted(LR_SCALE_ALIASES.items()))
def test_peer_lr_scale_names(name, rule):
    assert resolve_lr_scale(name, None) == rule
    m, n = 12, 3
    expect = {"rms_match": 0.2 * math.sqrt(max(m, n)), "spectral": math.sqrt(m / n)}[rule]
    assert lr_scale_factor(m, n, resolve_lr_scale(name, None)) == pytest.approx(expect, rel=1e-15)


def test_timm_adjust_lr_fn_name_is_accepted():
    w = nn.Parameter(torch.randn(4, 4))
    assert F.unit_args(Muon([w], adjust_lr_fn="rms_to_rms").param_groups[0])["lr_scale"] == "spectral"


# -- Hugging Face Conv1D ----------------------------------------------------------------------
def test_hf_conv1d_gets_the_scale_of_its_linear_map():
    """GPT-2's c_fc is Conv1D(nf=4d, nx=d) with weight (d, 4d): the map is d -> 4d, a tall matrix in
    (out, in) terms, whose "original" scale is √(4d/d) = 2 (read from the stored shape it would be 1)."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    d = 4
    model = nn.Sequential(pytorch_utils.Conv1D(4 * d, d), nn.Linear(4 * d, 2))
    groups = muon_param_groups(model, heads=[model[1]])
    conv_group = next(g for g in groups if any(p is model[0].weight for p in g["params"]))
    assert conv_group.get("fan_in_first") is True
    w = model[0].weight  # (d, 4d)
    lin = nn.Parameter(w.detach().t().contiguous())  # the same map as an (out, in) Linear weight
    grad = torch.randn_like(w)
    before = w.detach().clone()
    opt = Muon([conv_group], lr=0.1, weight_decay=0.0, orthogonalizer="svd")
    opt_lin = Muon([lin], lr=0.1, weight_decay=0.0, orthogonalizer="svd")
    w.grad, lin.grad = grad.clone(), grad.t().contiguous()
    opt.step()
    opt_lin.step()
    # exact polar factors of transposed inputs are transposes; measured max |diff| 0 (5.4e-2 when the
    # scale is read from the stored shape, i.e. with fan_in_first=False)
    torch.testing.assert_close(w.detach(), lin.detach().t(), rtol=0, atol=1e-6)
    step = (before - w.detach()).square().mean().sqrt()  # RMS of η·s·O with ‖O‖²_F = d
    assert step.item() == pytest.approx(0.1 * 2 * math.sqrt(d / (4 * d * d)), rel=1e-4)
