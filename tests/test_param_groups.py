"""muon_param_groups: routing by module type and shape, never by names alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastortho.optim import Muon
from fastortho.param_groups import muon_param_groups


class TinyLM(nn.Module):
    """Embedding, attention with fused QKV (nn.MultiheadAttention), MLP, norms, MoE experts, a head."""

    def __init__(self, vocab=50, d=16, tied=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)  # deliberately not called "embed"
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.experts = nn.Parameter(torch.randn(4, d, d))  # stacked MoE matrices
        self.out = nn.Linear(d, vocab, bias=False)  # deliberately not called "lm_head"
        if tied:
            self.out.weight = self.tok.weight


def _route(groups):
    """{param id: (algorithm, flatten, split_sizes)}"""
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter appears twice"
            out[id(p)] = (g["algorithm"], g.get("flatten"), g.get("split_sizes"))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_language_model_routing(tied):
    m = TinyLM(tied=tied)
    r = _route(muon_param_groups(m))
    assert len(r) == len(list(m.parameters()))  # every parameter, once (a tied head counts once)
    assert r[id(m.tok.weight)][0] == "adamw"
    assert r[id(m.out.weight)][0] == "adamw"  # head by vocab size / tying, whatever its name
    for p in (m.norm.weight, m.norm.bias, m.up.bias, m.attn.in_proj_bias):
        assert r[id(p)][0] == "adamw"
    for p in (m.up.weight, m.down.weight, m.attn.out_proj.weight):
        assert r[id(p)] == ("muon", None, None)
    assert r[id(m.attn.in_proj_weight)] == ("muon", None, (16, 16, 16))
    assert r[id(m.experts)] == ("muon", False, None)


def test_cnn_routing_flattens_conv_kernels():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv1d(8, 8, 3),
                      nn.ConvTranspose2d(8, 4, 2), nn.Flatten(), nn.Linear(32, 16), nn.Linear(16, 10))
    r = _route(muon_param_groups(m))
    assert r[id(m[0].weight)] == ("muon", True, None)
    assert r[id(m[3].weight)] == ("muon", True, None)  # 3-D conv1d kernel: flattened, not stacked
    assert r[id(m[4].weight)][0] == "adamw"
    assert r[id(m[6].weight)] == ("muon", None, None)
    assert r[id(m[7].weight)][0] == "adamw"  # no embedding: the last Linear is the classifier head
    assert r[id(m[1].weight)][0] == "adamw"


def test_overrides_and_hyperparameters():
    m = TinyLM()
    groups = muon_param_groups(m, heads=[], force_adamw=["down.weight"], force_muon=[m.tok],
                               muon=dict(lr=0.02), adamw=dict(lr=3e-4, weight_decay=0.0))
    r = _route(groups)
    assert r[id(m.out.weight)][0] == "muon" and r[id(m.tok.weight)][0] == "muon"
    assert r[id(m.down.weight)][0] == "adamw"
    assert all(g["lr"] == (0.02 if g["algorithm"] == "muon" else 3e-4) for g in groups)
    with pytest.raises(ValueError, match="both"):
        muon_param_groups(m, force_adamw=[m.up], force_muon=[m.up.weight])
    with pytest.raises(KeyError):
        muon_param_groups(m, force_adamw=["no.such.param"])
    with pytest.raises(ValueError, match="1-D"):
        muon_param_groups(m, force_muon=[m.up.bias])


def test_groups_drive_one_optimizer_step():
    m = TinyLM()
    opt = Muon(muon_param_groups(m, muon=dict(lr=0.02), adamw=dict(lr=1e-3)))
    x = torch.randint(0, 50, (2, 5))
    h = m.tok(x)
    h = m.norm(h + m.attn(h, h, h, need_weights=False)[0])
    h = h + m.down(torch.relu(m.up(h))) + torch.einsum("btd,edf->btf", h, m.experts) / 4
    nn.functional.cross_entropy(m.out(h).flatten(0, 1), x.flatten()).backward()
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, m.parameters()))
