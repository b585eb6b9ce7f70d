"""torch's own optimizer configurations for Muon, run on fastortho.Muon side by side with torch.optim.Muon.

The inputs come from torch (``torch.testing._internal.common_optimizers``: the ``OptimizerInfo`` of
``torch.optim.Muon``, its ``optim_inputs_func`` and ``optim_error_inputs_func``); the test bodies are
written here and check the generic behaviours torch checks on every optimizer: equal steps,
state_dict save/load/resume (with ``torch.load(weights_only=True)``), both directions between the two
classes, step and state_dict hooks, deepcopy, closures, tensor lr, an LR scheduler, a param group
added mid-run, and torch's error inputs.

"Equal" is bit for bit wherever fastortho claims it: with torch's own bf16 Newton–Schulz plugged into
the ``orthogonalizer=`` callable (:func:`TorchNS`), every other operation (momentum, lr scale, decay, apply) is
torch's, on the fused C kernels and on the ``_foreach`` fallback alike. fastortho's own bf16 NS rounds
elsewhere: it is held to 2× the gap between torch's bf16 NS and an fp32 NS of the same steps (the
bound of ``tests/test_muon.py::test_matches_torch_muon_to_its_bf16_tolerance``).
"""
from __future__ import annotations

import copy
import io
import re
import sys
import types
import unittest

import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

from fastortho.optim import Muon

try:
    import expecttest  # noqa: F401  (torch's internal test utilities import it at module level)
except ImportError:  # only its TestCase base class is touched on import; common_optimizers needs no more
    _stub = types.ModuleType("expecttest")
    _stub.TestCase = unittest.TestCase
    sys.modules["expecttest"] = _stub
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db  # noqa: E402

MUON_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.Muon)
INPUTS = MUON_INFO.optim_inputs_func(device="cpu", dtype=torch.float32)
ERROR_INPUTS = MUON_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)
IDS = [i.desc for i in INPUTS]
SHAPES = [(12, 8), (8, 12), (10, 10)]  # tall, wide, square; small: a CPU bf16 matmul is slow


def TorchNS(params, **kw):
    """fastortho.Muon with torch.optim.Muon's own bf16 Newton–Schulz as its ``orthogonalizer=`` callable,
    reading the optimizer's current ns settings (those a loaded checkpoint brings too)."""
    opt = None

    def torch_ns(stacked):
        group = opt.param_groups[0]
        return torch.stack([_zeropower_via_newtonschulz(x, group["ns_coefficients"], group["ns_steps"],
                                                        group["eps"]) for x in stacked])

    opt = Muon(params, orthogonalizer=torch_ns, **kw)
    return opt


def _kwargs(inp) -> dict:
    """The input's kwargs, with tensors copied (a scheduler or a step must not share them)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.kwargs.items()}


def _params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(steps, seed=1, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _train(opt, ps, grads):
    for step in grads:
        for p, x in zip(ps, step):
            p.grad = x.clone()
        opt.step()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _same(ps, qs):
    return all(torch.equal(p.detach(), q.detach()) for p, q in zip(ps, qs))


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inp", INPUTS, ids=IDS)
def test_steps_match_torch(inp, step_path):
    grads = _grads(3)
    ref = _params()
    _train(torch.optim.Muon(ref, **_kwargs(inp)), ref, grads)
    hooked = _params()
    _train(TorchNS(hooked, ns_dtype=torch.bfloat16, **_kwargs(inp)), hooked, grads)
    assert _same(hooked, ref)
    p0 = _params()
    ours16, ours32 = _params(), _params()
    _train(Muon(ours16, ns_dtype=torch.bfloat16, **_kwargs(inp)), ours16, grads)
    _train(Muon(ours32, ns_dtype=torch.float32, **_kwargs(inp)), ours32, grads)
    for x0, r, a, b in zip(p0, ref, ours16, ours32):
        gap = _rel(b - x0, r - x0)
        assert gap < 5e-2
        assert _rel(a - x0, r - x0) <= 2 * gap


def test_step_is_noop_when_params_have_no_grad():
    ps = _params()
    before = [p.detach().clone() for p in ps]
    opt = Muon(ps, lr=0.1)
    opt.step()
    opt.zero_grad()
    opt.step()
    assert _same(ps, before)


# ----------------------------------------------------------------------------------------------
# state dicts
# ----------------------------------------------------------------------------------------------
def _saved(sd) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("inp", INPUTS, ids=IDS)
def test_state_dict_save_load_resume(inp, step_path):
    """Save after 2 steps, load (weights_only) into a fresh optimizer on copies, resume 2 steps: bit for
    bit the uninterrupted run. Across classes: torch's checkpoint into fastortho and fastortho's into
    torch, each resumed bit for bit like torch's uninterrupted run (torch's NS in the hook)."""
    grads = _grads(4)
    ps = _params()
    opt = Muon(ps, ns_dtype=torch.float32, **_kwargs(inp))
    _train(opt, ps, grads[:2])
    sd = _saved(opt.state_dict())
    copies = [nn.Parameter(p.detach().clone()) for p in ps]
    _train(opt, ps, grads[2:])
    opt2 = Muon(copies, ns_dtype=torch.float32, **_kwargs(inp))
    opt2.load_state_dict(sd)
    _train(opt2, copies, grads[2:])
    assert _same(ps, copies)

    ref = _params()
    _train(torch.optim.Muon(ref, **_kwargs(inp)), ref, grads)
    for first, second in ((torch.optim.Muon, TorchNS), (TorchNS, torch.optim.Muon)):
        ps = _params()
        kw = {} if first is torch.optim.Muon else dict(ns_dtype=torch.bfloat16)
        a = first(ps, **_kwargs(inp), **kw)
        _train(a, ps, grads[:2])
        b = second(ps) if second is torch.optim.Muon else second(ps, ns_dtype=torch.bfloat16)
        b.load_state_dict(_saved(a.state_dict()))  # every hyperparameter comes from the checkpoint
        _train(b, ps, grads[2:])
        assert _same(ps, ref), f"{first.__name__} -> {second.__name__}"


def test_load_state_dict_keeps_param_identity_and_casts_state():
    """Loading keeps the live parameters, and state follows the parameter's dtype (torch's rule)."""
    ps = _params()
    opt = Muon(ps)
    _train(opt, ps, _grads(1))
    sd = opt.state_dict()
    qs = [nn.Parameter(p.detach().double()) for p in ps]
    opt2 = Muon(qs)
    opt2.load_state_dict(sd)
    assert all(a is b for a, b in zip(opt2.param_groups[0]["params"], qs))
    assert all(opt2.state[q]["momentum_buffer"].dtype == torch.float64 for q in qs)
    _train(opt2, qs, [[x.double() for x in step] for step in _grads(1, seed=2)])
    assert all(q.dtype == torch.float64 and torch.isfinite(q).all() for q in qs)


# ----------------------------------------------------------------------------------------------
# hooks, deepcopy, closures
# ----------------------------------------------------------------------------------------------
def _hook_trace(cls, **kw):
    trace = []
    ps = _params()
    opt = cls(ps, **kw)
    opt.register_step_pre_hook(lambda o, args, kwargs: trace.append(("pre", ps[0].detach().clone())))
    opt.register_step_post_hook(lambda o, args, kwargs: trace.append(("post", ps[0].detach().clone())))
    opt.register_state_dict_pre_hook(lambda o: trace.append(("sd_pre",)))

    def sd_post(o, sd):
        trace.append(("sd_post",))
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        trace.append(("load_pre", sd.get("extra")))
        sd = dict(sd)
        sd.pop("extra")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: trace.append(("load_post",)))
    _train(opt, ps, _grads(2))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    return trace


def test_hooks_run_as_on_torch_muon(step_path):
    ours = _hook_trace(TorchNS, ns_dtype=torch.bfloat16)
    theirs = _hook_trace(torch.optim.Muon)
    assert [t[0] for t in ours] == [t[0] for t in theirs] == [
        "pre", "post", "pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]
    for a, b in zip(ours, theirs):
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a[1:], b[1:]))
    assert not torch.equal(ours[0][1], ours[1][1])  # post hook sees the updated parameter


def test_deepcopy_copies_all_public_attrs_and_is_independent():
    ps = _params()
    opt = Muon(ps, lr=torch.tensor(0.01))
    _train(opt, ps, _grads(1))
    dup = copy.deepcopy(opt)
    public = sorted(k for k in vars(opt) if not k.startswith("_"))
    assert public == sorted(k for k in vars(dup) if not k.startswith("_"))
    for k in public:
        assert type(getattr(opt, k)) is type(getattr(dup, k)), k
    # torch's __setstate__ adds its generic flags (e.g. "differentiable") on a copy: same keys as torch's copy
    t = torch.optim.Muon(_params(), lr=0.01)
    assert dup.defaults.keys() - opt.defaults.keys() == copy.deepcopy(t).defaults.keys() - t.defaults.keys()
    assert all(dup.defaults[k] == v for k, v in opt.defaults.items() if not isinstance(v, torch.Tensor))
    a, b = opt.state_dict(), dup.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert torch.equal(a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"])
    dup_ps = dup.param_groups[0]["params"]
    assert all(p is not q for p, q in zip(ps, dup_ps))
    before = [opt.state[p]["momentum_buffer"].clone() for p in ps]
    _train(dup, dup_ps, _grads(1, seed=5))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(ps, before))


def test_closure_runs_once_with_grad_and_returns_the_loss():
    model = nn.Linear(8, 6, bias=False)
    opt = Muon(model.parameters(), lr=0.01)
    x = torch.randn(4, 8)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True] and isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.step() is None


# ----------------------------------------------------------------------------------------------
# tensor lr, schedulers, param groups
# ----------------------------------------------------------------------------------------------
def test_tensor_lr_equals_float_lr(step_path):
    grads = _grads(3)
    a, b, r = _params(), _params(), _params()
    _train(Muon(a, lr=torch.tensor(0.01), ns_dtype=torch.float32), a, grads)
    _train(Muon(b, lr=0.01, ns_dtype=torch.float32), b, grads)
    assert _same(a, b)
    _train(torch.optim.Muon(r, lr=torch.tensor(0.01)), r, grads)
    h = _params()
    _train(TorchNS(h, lr=torch.tensor(0.01), ns_dtype=torch.bfloat16), h, grads)
    assert _same(h, r)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler_side_by_side(tensor_lr, step_path):
    """ExponentialLR then StepLR (a chain, as torch's scheduler tests build): same lr each step and
    bit-identical parameters (torch's NS in the hook)."""
    grads = _grads(5)
    runs = []
    for cls, kw in ((torch.optim.Muon, {}), (TorchNS, dict(ns_dtype=torch.bfloat16))):
        ps = _params()
        opt = cls(ps, lr=torch.tensor(0.02) if tensor_lr else 0.02, **kw)
        sched = torch.optim.lr_scheduler.ChainedScheduler([
            torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
            torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)])
        lrs = []
        for step in grads:
            for p, x in zip(ps, step):
                p.grad = x.clone()
            opt.step()
            sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
        runs.append((ps, lrs))
    (ref, ref_lrs), (ours, our_lrs) = runs
    assert our_lrs == ref_lrs and our_lrs[-1] < 0.02
    assert _same(ours, ref)


def test_add_param_group_mid_run(step_path):
    grads = _grads(4)
    extra_grads = _grads(2, seed=3, shapes=[(6, 9)])
    runs = []
    for cls, kw in ((torch.optim.Muon, {}), (TorchNS, dict(ns_dtype=torch.bfloat16))):
        ps = _params()
        opt = cls(ps, lr=0.02, **kw)
        _train(opt, ps, grads[:2])
        new = _params(seed=4, shapes=[(6, 9)])
        opt.add_param_group({"params": new, "lr": 0.005, "weight_decay": 0.0})
        for step, extra in zip(grads[2:], extra_grads):
            for p, x in zip(ps + new, step + extra):
                p.grad = x.clone()
            opt.step()
        assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.005
        runs.append(ps + new)
    assert _same(runs[1], runs[0])


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
# fastortho.Muon accepts what torch.optim.Muon rejects here, by design (README, class docstring):
# a 3-D parameter is a stack of matrices orthogonalized independently (MoE experts).
ACCEPTED_BY_DESIGN = {"only support 2D parameters"}


@pytest.mark.parametrize("err", ERROR_INPUTS, ids=[e.optimizer_error_input.desc for e in ERROR_INPUTS])
def test_torch_error_inputs(err):
    inp = err.optimizer_error_input
    params, kwargs = inp.params, inp.kwargs
    if inp.desc in ACCEPTED_BY_DESIGN:
        opt = Muon(params, **kwargs)
        opt.step()
        assert all(torch.isfinite(p).all() for p in params)
        with pytest.raises(err.error_type, match=err.error_regex):  # torch still rejects it
            torch.optim.Muon(params, **kwargs)
        return
    if issubclass(err.error_type, Warning):
        assert err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
        with pytest.warns(err.error_type, match=err.error_regex):
            Muon(params, **kwargs)
        return
    if err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(err.error_type, match=err.error_regex):
            Muon(params, **kwargs)
    else:
        opt = Muon(params, **kwargs)
        with pytest.raises(err.error_type, match=err.error_regex):
            opt.step()


def test_every_error_input_is_covered():
    """No silently dropped case: every torch error input is either matched or listed as accepted."""
    descs = {e.optimizer_error_input.desc for e in ERROR_INPUTS}
    assert ACCEPTED_BY_DESIGN <= descs and len(ERROR_INPUTS) >= 9
    assert any(re.search("Adjust learning rate", e.error_regex) for e in ERROR_INPUTS)
