"""``Muon(..., capturable=True)``: lr / weight decay / momentum as device tensors, no host read in ``step()``.

The CPU test makes every host read of a tensor raise during ``step()`` (``item``, ``__bool__``, ``tolist``,
``__float__``, ``__int__``) and compares with ``capturable=False`` over steps with a changing lr (a
scheduler), a NaN gradient on one step (skipped on the device) and both Muon variants. The GPU test captures
``step()`` in a CUDA graph and replays it with a changing lr.
"""
from __future__ import annotations

import pytest
import torch

from fastortho import Muon
from helpers import no_host_reads

def test_patch_catches_host_reads():
    """The guard works: a plain (non-capturable) step with a CPU tensor lr reads it on the host."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([p], lr=torch.tensor(0.01))
    p.grad = torch.randn(4, 4)
    with no_host_reads(), pytest.raises(AssertionError, match="host read"):
        opt.step()


def model_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (6, 20), (3, 5, 4), (8, 2, 3, 3), (16,)]  # tall, wide, stack, conv, bias (AdamW)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


@pytest.mark.parametrize("variant", ["muon", "normuon"])
@pytest.mark.parametrize("zero_init", [True, False])
def test_no_host_read_and_matches_eager(variant, zero_init):
    results = {}
    for capturable in (False, True):
        ps = model_params()
        opt = Muon(ps, lr=0.02, weight_decay=0.1, adamw_lr=0.01, adamw_weight_decay=0.01, variant=variant,
                   zero_init=zero_init, capturable=capturable)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        if capturable:
            assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
            lr_tensors = [g["lr"] for g in opt.param_groups]
        gen = torch.Generator().manual_seed(1)
        for t in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            if t == 2:
                ps[0].grad[0, 0] = float("nan")  # skipped on the device: decay only, momentum reset
            if capturable:
                with no_host_reads():
                    opt.step()
            else:
                opt.step()
            sched.step()
        if capturable:  # the scheduler wrote into the same tensors (a captured graph reads them)
            assert all(g["lr"] is t for g, t in zip(opt.param_groups, lr_tensors))
            torch.testing.assert_close(opt.param_groups[0]["lr"], torch.tensor(0.02 / 6))
        results[capturable] = ([p.detach().clone() for p in ps], opt.nonfinite_count)
    (eager, n_eager), (capt, n_capt) = results[False], results[True]
    assert n_eager == n_capt == 1
    for a, b in zip(eager, capt):
        # float32 device scalars (1 − β, 1 − ηλ, η·s, bias corrections) instead of float64 host ones:
        # measured max |diff| 2.4e-7 over these 5 steps with max|W| = 3.39 (≈ 0.6 float32 eps of |W|);
        # bound 4 eps of max|W|
        torch.testing.assert_close(b, a, rtol=0, atol=4 * torch.finfo(torch.float32).eps * a.abs().max())


def test_capturable_rejects_raise_and_keeps_tensors_on_load():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="capturable=True cannot raise"):
        Muon([p], capturable=True, nonfinite="raise")
    opt = Muon([p], capturable=True)
    lr = opt.param_groups[0]["lr"]
    p.grad = torch.randn(4, 4)
    opt.step()
    sd = opt.state_dict()
    opt2 = Muon([torch.nn.Parameter(p.detach().clone())], capturable=True)
    opt2.load_state_dict(sd)
    assert isinstance(opt2.param_groups[0]["momentum"], torch.Tensor)
    assert opt.param_groups[0]["lr"] is lr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_matches_eager():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 96), (4, 16, 16), (64,)]
    init = [torch.randn(s, device=dev) for s in shapes]
    grads = [[torch.randn(s, device=dev) for s in shapes] for _ in range(6)]
    lrs = [0.02 / (1 + t) for t in range(6)]

    def make():
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        return ps, Muon(ps, lr=0.02, adamw_lr=0.01, capturable=True, ns_dtype=torch.float32)

    ps_e, opt_e = make()
    for t in range(6):
        for p, g in zip(ps_e, grads[t]):
            p.grad = g.clone()
        opt_e.param_groups[0]["lr"].fill_(lrs[t])
        opt_e.step()

    ps_g, opt_g = make()
    static = [torch.zeros_like(x) for x in init]
    for p, s in zip(ps_g, static):
        p.grad = s
    # warm up on a side stream (allocations, lazy init), then undo its effect by starting from the first step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ps_w, opt_w = make()
        for p, s in zip(ps_w, static):
            p.grad = s
        opt_w.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    # capture ran nothing: replay each step
    for t in range(6):
        for s, g in zip(static, grads[t]):
            s.copy_(g)
        opt_g.param_groups[0]["lr"].fill_(lrs[t])
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(ps_e, ps_g):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-6)
