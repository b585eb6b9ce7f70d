"""The distributed cost model (``bench/simulate_distributed.py``) against what the optimizer really does.

One gloo spawn per world size (W = 2, 4, 8; forked, one thread per rank) runs one optimizer step of a
small model under several layouts, and every rank reports ``comm_stats`` (bytes per collective kind,
NS flops) and the owners its engine assigned. The model, which re-implements the plan (LPT owners,
torch's shard chunking, the byte formulas) from the shapes alone, must predict every rank's numbers
exactly, so the load imbalance (max/mean NS flops over ranks) matches too.

Layouts: FSDP (1-D mesh; 2-D matrices on Shard(0)/Shard(1): a2a; a 3-D stack on Shard(1): a2a; a 3-D
stack on Shard(0): whole experts, local), the same DTensors with ``strategy="gather"``, DDP (plain
tensors, ``process_group``: owner, fp32 NS so the element size is exercised), and at W ≥ 4 HSDP
(2 × W/2, a2a on the shard sub-group) and FSDP×TP (2 × W/2, (Shard(0), Shard(1)): gather over both
dims). No timed assertions: the time half of the model is a documented assumption.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import simulate_distributed as S  # noqa: E402
from model_presets import PRESETS  # noqa: E402

from fastortho.optim import distributed as D  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# (shape, dim sharded under FSDP): uneven rows (33), an empty shard (1x16 at W >= 2), tall and wide,
# a tiny matrix, a stack of 3 experts on its expert dim (whole experts, uneven: 2+1, 1+1+1+0, ...)
# and a stack sharded on a matrix dim
SPECS = [((33, 16), 0), ((16, 64), 1), ((64, 16), 0), ((24, 33), 1), ((40, 40), 0), ((5, 7), 0),
         ((1, 16), 0), ((64, 16), 1), ((3, 6, 10), 0), ((2, 12, 10), 1)]
LAYOUTS = ("fsdp", "gather", "ddp", "hsdp", "fsdp_tp", "ep_fsdp")
# ep_fsdp: the 2-D SPECS on Shard(d) over the whole world, then expert stacks on (ep, fsdp) =
# (Shard(0), Shard(1)) (whole experts per ep rank, their rows over fsdp): a2a over fsdp on the local
# experts, whose LPT starts from the loads the world group's LPT gave the same ranks
EXPERTS = [(4, 24, 16), (4, 16, 24), (2, 40, 40)]


def _layouts(world):
    return [n for n in LAYOUTS if world >= 4 or n not in ("hsdp", "fsdp_tp", "ep_fsdp")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_layout(name, rank, world):
    import fastortho
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    g = torch.Generator().manual_seed(3)
    full = [torch.randn(s, generator=g) for s, _ in SPECS]
    grads = [torch.randn(s, generator=g) for s, _ in SPECS]
    kw = dict(lr=0.02, ns_dtype=torch.bfloat16)
    if name == "ep_fsdp":
        world_mesh, mesh = init_device_mesh("cpu", (world,)), init_device_mesh("cpu", (2, world // 2))
        ts = [(t, gr, world_mesh, [Shard(d)]) for (s, d), t, gr in zip(SPECS, full, grads) if len(s) == 2]
        ts += [(torch.randn(s, generator=g), torch.randn(s, generator=g), mesh, [Shard(0), Shard(1)])
               for s in EXPERTS]
        ps = []
        for t, gr, m, pl in ts:
            ps.append(torch.nn.Parameter(distribute_tensor(t.clone(), m, pl, src_data_rank=None)))
            ps[-1].grad = distribute_tensor(gr.clone(), m, pl, src_data_rank=None)
        opt = fastortho.Muon(ps, **kw)
    elif name == "ddp":
        ps = [torch.nn.Parameter(t.clone()) for t in full]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt = fastortho.Muon(ps, lr=0.02, ns_dtype=torch.float32, process_group=dist.group.WORLD)
    else:
        if name in ("fsdp", "gather"):
            mesh, pl = init_device_mesh("cpu", (world,)), [[Shard(d)] for _, d in SPECS]
        elif name == "hsdp":
            mesh, pl = init_device_mesh("cpu", (2, world // 2)), [[Replicate(), Shard(d)] for _, d in SPECS]
        else:  # fsdp_tp: a 2-D sharding of every matrix (stacks: expert dim and rows)
            mesh = init_device_mesh("cpu", (2, world // 2))
            pl = [[Shard(len(s) - 2), Shard(len(s) - 1)] for s, _ in SPECS]
        ps = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, p, src_data_rank=None))
              for t, p in zip(full, pl)]
        for p, gr in zip(ps, grads):
            p.grad = distribute_tensor(gr.clone(), mesh, p.placements, src_data_rank=None)
        if name == "gather":
            kw["strategy"] = "gather"
        opt = fastortho.Muon(ps, **kw)
    opt.step()
    st = opt.comm_stats
    return dict(bytes=dict(st["bytes"]), ns_flops=st["ns_flops"], owners=list(opt._dist_engine._owners))


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        for name in _layouts(world):
            try:
                out[name] = _run_layout(name, rank, world)
            except Exception:
                out[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
        dist.barrier()
        dist.destroy_process_group()


def _spawn(world):
    import torch.distributed.tensor  # noqa: F401  (import once before forking)

    import fastortho  # noqa: F401

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, _free_port(), d), nprocs=world, join=True,
                           start_method=method)
        res = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.pkl"), "rb") as f:
                res.append(pickle.load(f))
    return res


_CACHE: dict[int, list] = {}


def _measured(world):
    if world not in _CACHE:
        _CACHE[world] = _spawn(world)
    return _CACHE[world]


def _tasks(name, world) -> tuple[list[S.Task], int]:
    """The model's tasks for a layout of the test model, and the NS element size."""
    tasks = []
    if name == "ep_fsdp":
        g, g_ep, g_f = S.Group(world, 1), S.Group(2, world // 2), S.Group(world // 2, 1)
        for s, d in SPECS:
            if len(s) == 2:
                tasks.append(S.Task((1, *s), "a2a", group=g, axis=1 + d, flags=(g,)))
        for s in EXPERTS:  # this rank's experts (E/2, even here), rows over fsdp
            tasks.append(S.Task((s[0] // 2, s[1], s[2]), "a2a", group=g_f, axis=1, flags=(g_ep, g_f)))
        return tasks, 2
    if name == "ddp":
        g = S.Group(world, 1)
        for s, _ in SPECS:
            tasks.append(S.Task((1, *s) if len(s) == 2 else s, "owner", group=g))
        return tasks, 4
    for s, d in SPECS:
        sh = (1, *s) if len(s) == 2 else s
        if name in ("fsdp", "gather"):
            g = S.Group(world, 1)
        elif name == "hsdp":
            g = S.Group(world // 2, 1)
        if name == "fsdp_tp":
            gs = (S.Group(2, world // 2), S.Group(world // 2, 1))
            tasks.append(S.Task(sh, "gather", gather=gs, flags=gs))
        elif len(s) == 3 and d == 0:  # whole experts on each rank: local
            tasks.append(S.Task(sh, "local", stack=(g,), flags=(g,)))
        elif name == "gather":
            tasks.append(S.Task(sh, "gather", gather=(g,), flags=(g,)))
        else:
            axis = 1 + d - (len(s) - 2)
            tasks.append(S.Task(sh, "a2a", group=g, axis=axis, flags=(g,)))
    return tasks, 2


def _check(world, name):
    """Owners and bytes must match on every rank; returns (measured, predicted) NS flops per rank."""
    per_rank = _measured(world)
    tasks, nb = _tasks(name, world)
    meas_fl, pred_fl = [], []
    for r, res in enumerate(per_rank):
        got = res[name]
        assert "error" not in got, f"rank {r}:\n{got.get('error')}"
        want = S.rank_prediction(tasks, r, nbytes=nb)
        assert got["owners"] == want["owners"], (r, got["owners"], want["owners"])
        assert got["bytes"] == want["bytes"], (r, got["bytes"], want["bytes"])
        meas_fl.append(got["ns_flops"])
        pred_fl.append(want["ns_flops"])
    return meas_fl, pred_fl


@pytest.mark.parametrize("world", [2, 4, 8])
def test_model_matches_optimizer(world):
    """Owners, bytes per kind and NS flops of every rank, for every layout, at one spawn per world size."""
    for name in _layouts(world):
        meas, pred = _check(world, name)
        assert meas == pred, (name, meas, pred)
        assert max(meas) / (sum(meas) / world) == max(pred) / (sum(pred) / world)  # LPT imbalance


@pytest.mark.parametrize("world", [2, 4, 8])
def test_local_stack_flops(world):
    """The work of a Shard(0) expert stack is its own experts (2 and 1 of 3 at W = 2): ``comm_stats``
    counts that, not the stack's global cost on every rank."""
    for name in ("fsdp", "gather"):
        meas, pred = _check(world, name)
        assert meas == pred, (name, meas, pred)


# ------------------------------------------------------------------------------------------------
# no process group
# ------------------------------------------------------------------------------------------------
def test_plan_functions_agree_with_the_optimizer():
    g = torch.Generator().manual_seed(0)
    for world in (1, 2, 3, 8, 64):
        costs = torch.randint(1, 6, (40,), generator=g).tolist()  # many ties: the tie rules matter
        assert S.lpt(costs, world) == D.lpt_owners(costs, world)
        loads = torch.randint(0, 8, (world,), generator=g).tolist()
        assert S.lpt(costs, world, loads) == D.lpt_owners(costs, world, loads)
    for size in (0, 1, 5, 33, 384):
        for world in (1, 2, 4, 8, 1024):
            assert S.shard_extents(size, world) == D.shard_extents(size, world)
    for shape in ((1, 64, 16), (3, 16, 64), (2, 7, 7)):
        assert S.ns_flops(*shape) == D.ns_flops(*shape)


def test_presets_have_published_sizes():
    """Totals of the published models (parameters): GPT-2 XL 1.56e9, Llama 3 8.03e9 / 70.6e9, Kimi K2
    1.04e12 total and 3.2e10 activated."""
    P = {k: v.total for k, v in PRESETS.items()}
    assert P["gpt2-xl"] == pytest.approx(1.558e9, rel=2e-3)
    assert P["llama3-8b"] == pytest.approx(8.030e9, rel=2e-3)
    assert P["llama3-70b"] == pytest.approx(70.55e9, rel=2e-3)
    assert P["moe-1t"] == pytest.approx(1.03e12, rel=2e-2)
    assert PRESETS["moe-1t"].active_per_token == pytest.approx(3.2e10, rel=2e-2)


def test_simulation_scales_and_ranks_layouts():
    """At scale: a2a bytes per parameter approach 4(W−1)/W² (bf16), every-rank NS (gather) costs W×
    the owner strategies' mean, and the CLI runs (no plot written into the repo)."""
    p = PRESETS["llama3-70b"]
    hw = S.Hardware()
    a2a = S.simulate(p, S.Layout("fsdp", fsdp=256), "a2a", hw)
    gat = S.simulate(p, S.Layout("fsdp", fsdp=256), "gather", hw)
    assert a2a.bytes_per_param == pytest.approx(4 * 255 / 256**2, rel=1e-3)
    assert gat.ns_flops_max == pytest.approx(256 * a2a.ns_flops_mean, rel=1e-9)
    assert 1.0 <= a2a.imbalance < 1.5
    assert a2a.t_opt < gat.t_opt
    S.main(["--model", "gpt2-xl", "--world", "16", "--no-png"])
