"""fastortho.Muon's arguments: checked at construction with messages that name the argument and the fix;
``orthogonalizer=`` names and callables; ``qk_clip=``."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import fastortho.optim.functional as F
from fastortho.optim import Muon
from fastortho.optim.qk_clip import QKClip
from fastortho.polar import polar


def _params(seed=0, shapes=((12, 8), (12, 8), (6, 10))):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(ps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


# ----------------------------------------------------------------------------------------------
# errors at construction, not at the first step()
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, exc, match", [
    (dict(ns_dtype=torch.int32), TypeError, r"ns_dtype must be None .*torch\.int32.*ns_dtype=torch\.bfloat16"),
    (dict(coefficients="polar_expres"), ValueError, r"did you mean coefficients='polar_express'"),
    (dict(coefficients="polar_expres", ns_steps=5), ValueError, r"did you mean coefficients='polar_express'"),
    (dict(backend="triton"), ValueError, r"backend='triton' runs on CUDA tensors.*backend='auto'"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \['auto', 'torch', 'triton'\]"),
    (dict(adamw_lr="3e-4"), TypeError, r"adamw_lr must be a number.*got str '3e-4'; pass e.g. adamw_lr=3e-4"),
    (dict(lr="0.02"), TypeError, r"lr must be a number or a 1-element tensor, got str"),
    (dict(orthogonalizer="qdwhh"), ValueError, r"orthogonalizer must be one of .*'qdwh'.* or a callable"),
    (dict(qk_clip=object()), TypeError, r"qk_clip must have an apply\(\) method"),
])
def test_bad_argument_raises_at_construction(kw, exc, match):
    from fastortho.kernels import interpreter_enabled

    if kw.get("backend") == "triton" and interpreter_enabled():
        pytest.skip("TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors: backend='triton' is valid")
    with pytest.raises(exc, match=match):
        Muon(_params(), **kw)


def test_bad_group_key_raises_at_construction():
    ps = _params()
    with pytest.raises(TypeError, match="lr must be a number"):
        Muon([dict(params=ps[:1], lr="1e-2"), dict(params=ps[1:])])
    with pytest.raises(ValueError, match="did you mean coefficients='keller'"):
        Muon([dict(params=ps[:1], coefficients="kellr"), dict(params=ps[1:])])


def test_consumed_generator_says_so():
    model = nn.Linear(4, 4)
    params = model.parameters()
    torch.optim.SGD(params, lr=0.1)  # reads the generator to its end
    with pytest.raises(ValueError, match="already consumed.*call model.parameters\\(\\) again"):
        Muon(params)
    with pytest.raises(ValueError, match="empty parameter list"):  # an empty list: torch's message
        Muon([])


# ----------------------------------------------------------------------------------------------
# orthogonalizer=
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qdwh", "higham", "svd"])
def test_orthogonalizer_name_runs_that_polar_method(name, monkeypatch):
    """Each name calls fastortho.polar(method=name); one step from zero momentum moves each matrix by
    -lr·s·polar(g) (the Nesterov input (1-β)(1+β)g has the same polar factor). Measured max abs error
    against the float64 SVD polar factor of the raw gradient: 1 float32 eps (qdwh, higham), 0.25 eps
    (svd); bound 16 eps, room for another CPU's LAPACK."""
    seen = []

    def spy(X, method="qdwh", **kw):
        seen.append(method)
        return polar(X, method=method, **kw)

    monkeypatch.setattr(F, "polar", spy)
    ps = _params()
    p0 = [p.detach().clone() for p in ps]
    _grads(ps)
    lr = 0.1
    Muon(ps, lr=lr, weight_decay=0.0, orthogonalizer=name, ns_dtype=torch.float32).step()
    assert seen and set(seen) == {name}
    for p, x0 in zip(ps, p0):
        m, n = p.shape
        want = x0 - lr * max(1.0, m / n) ** 0.5 * polar(p.grad.double(), method="svd").float()
        torch.testing.assert_close(p.detach(), want, atol=16 * torch.finfo(torch.float32).eps, rtol=0)


def test_polar_is_a_deprecated_alias_of_higham(monkeypatch):
    seen = []
    monkeypatch.setattr(F, "polar", lambda X, method="qdwh", **kw: seen.append(method) or polar(X, method=method))
    ps = _params()
    with pytest.warns(DeprecationWarning, match="orthogonalizer='polar' is deprecated.*'higham'"):
        opt = Muon(ps, orthogonalizer="polar")
    _grads(ps)
    opt.step()
    assert set(seen) == {"higham"}


def test_callable_orthogonalizer_gets_batched_stacks_and_its_result_is_applied():
    """Same-shape matrices arrive as one (B, m, n) stack; the callable's output is the update: an exact
    SVD polar callable reproduces orthogonalizer="svd" bit for bit."""
    shapes = []

    def svd_polar(X):
        shapes.append(tuple(X.shape))
        return polar(X, method="svd").to(X.dtype)

    a, b = _params(), _params()
    _grads(a)
    _grads(b)
    Muon(a, orthogonalizer=svd_polar, ns_dtype=torch.float32).step()
    Muon(b, orthogonalizer="svd", ns_dtype=torch.float32).step()
    assert sorted(shapes) == [(1, 6, 10), (2, 12, 8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ps = _params()
    _grads(ps)
    with pytest.raises(ValueError, match="must return a tensor of the input's shape"):
        Muon(ps, orthogonalizer=lambda X: X[:, :1]).step()


def test_callable_orthogonalizer_state_dict_round_trip():
    """A function is not checkpoint data: the state dict holds "custom"; the loading optimizer supplies the
    callable again, and one without it says so."""
    def ns(X):
        return F.orthogonalize(X, F.OrthoConfig(coefficients="keller"))

    ps = _params()
    opt = Muon(ps, orthogonalizer=ns)
    _grads(ps)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["param_groups"][0]["orthogonalizer"] == "custom"
    again = Muon(_params(), orthogonalizer=ns)
    again.load_state_dict(sd)
    assert again.param_groups[0]["orthogonalizer"] is ns
    with pytest.raises(ValueError, match="callable orthogonalizer.*orthogonalizer=<that callable>"):
        Muon(_params()).load_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# qk_clip=
# ----------------------------------------------------------------------------------------------
def _attn(seed):
    torch.manual_seed(seed)
    m = nn.Module()
    m.q_proj, m.k_proj = nn.Linear(8, 8), nn.Linear(8, 8)
    return m


def _clip_run(mode):
    m = _attn(3)
    clip = QKClip(m, tau=1.0)
    clip.attention(m, q="q_proj", k="k_proj", n_heads=2, n_kv_heads=2, hooks=False)
    opt = Muon(m.parameters(), lr=0.02, **(dict(qk_clip=clip) if mode == "kwarg" else {}))
    _grads(list(m.parameters()))
    clip.update_max_logits(m, torch.tensor([5.0, 0.5]))  # head 0 above tau: its q/k rows get rescaled
    opt.step()
    if mode == "by_hand":
        clip.apply()
    return [p.detach().clone() for p in m.parameters()]


def test_qk_clip_kwarg_applies_the_clip_at_the_end_of_step():
    kwarg, by_hand, none = _clip_run("kwarg"), _clip_run("by_hand"), _clip_run("none")
    assert all(torch.equal(x, y) for x, y in zip(kwarg, by_hand))
    assert not all(torch.equal(x, y) for x, y in zip(kwarg, none))

    calls = []

    class Probe:
        def apply(self):
            calls.append(torch.is_grad_enabled())

    ps = _params()
    opt = Muon(ps, qk_clip=Probe())
    _grads(ps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert calls == [False]


def test_normalize_gram_accepted_and_spectral_is_a_deprecated_alias():
    # newton_schulz renamed normalize="spectral" (it is ‖GGᵀ‖_F^{1/2}, not σ_max) to "gram": Muon takes the
    # new name and maps the old one with one DeprecationWarning at construction, not one per step.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16))
    p.grad = torch.randn(8, 16)
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    Muon([p], lr=0.1, normalize="gram").step()
    with pytest.warns(DeprecationWarning, match="gram"):
        opt = Muon([q], lr=0.1, normalize="spectral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(p, q)
