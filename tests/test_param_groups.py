"""muon_param_groups: routing by module type and shape, never by names alone."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fastortho.optim import Muon
from fastortho.optim.param_groups import describe_param_groups, muon_param_groups


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
    with pytest.warns(UserWarning, match=r"guessed '7.weight' \(10, 16\) as the output head"):
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


def _no_warning(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kw)


def test_sizes_are_not_evidence_of_a_head():
    # The filed reproduction: d = context = 1024 (GPT-2 medium). c_proj is a hidden matrix.
    m = nn.ModuleDict(dict(wte=nn.Embedding(50304, 1024), wpe=nn.Embedding(1024, 1024),
                           c_proj=nn.Linear(1024, 1024)))
    with pytest.warns(UserWarning, match=r"no output head found.*'c_proj.weight', go to Muon.*heads=\[\]"):
        r = _route(muon_param_groups(m))
    assert r[id(m.c_proj.weight)] == ("muon", None, None)
    assert r[id(m.wte.weight)][0] == r[id(m.wpe.weight)][0] == "adamw"
    # Told explicitly: no warning.
    r = _route(_no_warning(muon_param_groups, m, heads=[m.c_proj]))
    assert r[id(m.c_proj.weight)][0] == "adamw"


def test_bare_transformer_encoder_warns_and_guesses_no_head():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 3)
    with pytest.warns(UserWarning, match=r"every Linear is inside a repeated block.*layers.2.linear2.weight"):
        r = _route(muon_param_groups(enc))
    assert all(r[id(layer.linear2.weight)][0] == "muon" for layer in enc.layers)
    _no_warning(muon_param_groups, enc, heads=[])


def test_head_names_and_repeated_blocks():
    class BertLayer(nn.Module):  # BERT's per-layer "output" module is part of the body
        def __init__(self):
            super().__init__()
            self.intermediate = nn.Linear(8, 32)
            self.output = nn.Sequential(nn.Linear(32, 8), nn.LayerNorm(8))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 8)
            self.layer = nn.ModuleList(BertLayer() for _ in range(2))
            # torchvision-style classifier: hidden Linear, then the logits Linear
            self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    m = Net()
    rows = {x.name: x for x in _no_warning(describe_param_groups, m)}
    assert rows["layer.0.output.0.weight"].group == rows["layer.1.output.0.weight"].group == "muon"
    assert rows["classifier.0.weight"].group == "muon"
    assert rows["classifier.2.weight"].group == "adamw"
    assert rows["classifier.2.weight"].reason == "output head (last Linear of 'classifier')"


@pytest.mark.parametrize("name", ["lm_head", "head", "output", "classifier", "fc", "score", "logits"])
def test_each_head_name_is_recognised(name):
    m = nn.Module()
    m.emb, m.body = nn.Embedding(10, 6), nn.Linear(6, 6)
    setattr(m, name, nn.Linear(6, 10))
    rows = {x.name: x for x in _no_warning(describe_param_groups, m)}
    assert rows[f"{name}.weight"].group == "adamw" and rows["body.weight"].group == "muon"


def test_tied_head_registered_before_its_embedding():
    m = nn.Module()
    m.proj_out, m.hidden, m.tok = nn.Linear(4, 20, bias=False), nn.Linear(4, 4), nn.Embedding(20, 4)
    m.tok.weight = m.proj_out.weight  # first owner is the Linear
    rows = {x.name: x for x in _no_warning(describe_param_groups, m)}
    assert rows["proj_out.weight"].group == "adamw" and "tied" in rows["proj_out.weight"].reason
    assert rows["hidden.weight"].group == "muon"


def test_verbose_prints_the_routing_table(capsys):
    m = TinyLM()
    _no_warning(muon_param_groups, m, verbose=True)
    out = capsys.readouterr().out
    assert "parameter" in out and "reason" in out
    assert "out.weight" in out and "output head (named 'out')" in out
    assert "tok.weight" in out and "embedding (lookup table)" in out
    rows = describe_param_groups(m)
    assert [r.name for r in rows] == [n for n, _ in m.named_parameters()]
    assert f"{sum(r.group == 'muon' for r in rows)} parameter(s) to Muon" in out


@pytest.mark.parametrize("bad", ["list", "generator", "dict"])
def test_a_list_of_parameters_is_a_clear_type_error(bad):
    m = TinyLM()
    arg = {"list": list(m.parameters()), "generator": m.parameters(), "dict": dict(m.named_parameters())}[bad]
    with pytest.raises(TypeError, match=r"expected the nn.Module.*muon_param_groups\(model\)"):
        muon_param_groups(arg)
    with pytest.raises(TypeError, match="nn.Module"):
        describe_param_groups(arg)
