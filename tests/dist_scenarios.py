"""Scenarios for ``tests/test_distributed.py``: run inside one gloo process group per world size.

:func:`run_world` spawns W processes once; each runs every scenario named and writes a dict of results
per scenario (``{"ok": bool, ...metrics}`` or ``{"error": traceback}``) that the parent merges by rank.
The spawn is the expensive part (seconds per process on a busy CPU), so nothing here spawns per case.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

LR = 0.02
K = 3  # optimizer steps per identical-gradient scenario


# ------------------------------------------------------------------------------------------------
# harness
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for name in names:
            try:
                results[name] = SCENARIOS[name](rank, world)
            except Exception:  # report, keep the group alive for the next scenario
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, names: list[str]) -> dict[str, list[dict]]:
    """Run ``names`` in one spawn of ``world`` gloo processes; returns name -> per-rank result dicts."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, _free_port(), d, names), nprocs=world, join=True)
        per_rank = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.pkl"), "rb") as f:
                per_rank.append(pickle.load(f))
    return {n: [pr[n] for pr in per_rank] for n in names}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class A2ACounter:
    """Independent byte counter: wraps ``dist.all_to_all_single`` and adds what each call sends to other
    ranks (input bytes minus the split a rank sends itself)."""

    def __enter__(self):
        self.bytes, self.calls = 0, 0
        self._orig = dist.all_to_all_single

        def wrapped(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            me = dist.get_rank(group)
            if input_split_sizes:
                own = input_split_sizes[me]
            else:
                own = input.numel() // dist.get_world_size(group)
            self.bytes += (input.numel() - own) * input.element_size()
            self.calls += 1
            return self._orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = wrapped
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig


def _sum_all(x: float | int) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def _grads(shapes, step, seed=7):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(s, generator=g) for s in shapes]


def _nan_at(shapes, step):
    """(param index, flat index) of an injected NaN: step 2, param 0, row 0 (rank 0's shard)."""
    return (0, 0) if step == 1 else None


# the shapes of the identical-gradient scenarios: uneven rows (33), an empty shard (1×16), tall/wide,
# a flattened conv kernel, a 3-D expert stack, tiny (5×7); a split group; an AdamW group
MATS = [(33, 16), (33, 16), (33, 16), (1, 16), (24, 33), (16, 64), (64, 16), (64, 16), (5, 7),
        (8, 3, 3, 3), (4, 6, 10), (3, 6, 10), (2, 6, 10)]
SPLIT = [(12, 20)]
VECS = [(5,), (33,)]


def _ident_run(rank, world, *, placement_fn, strategy, ns_dtype, plain=False, nan=True, mesh=None,
               steps=K):
    """Distributed vs single-process fastortho.Muon on identical full gradients; returns a result dict."""
    import fastortho
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor, init_device_mesh

    torch.manual_seed(0)
    full_m = [0.1 * torch.randn(s) for s in MATS]
    full_s = [0.1 * torch.randn(s) for s in SPLIT]
    full_v = [0.1 * torch.randn(s) for s in VECS]
    mesh = mesh or init_device_mesh("cpu", (world,))

    def groups(ps_m, ps_s, ps_v):
        return [dict(params=ps_m, algorithm="muon"),
                dict(params=ps_s, algorithm="muon", split_sizes=(4, 4, 4)),
                dict(params=ps_v, algorithm="adamw")]

    kw = dict(lr=LR, weight_decay=0.1, ns_dtype=ns_dtype)
    ref_p = [nn.Parameter(t.clone()) for t in full_m + full_s + full_v]
    nm, ns_ = len(full_m), len(full_s)
    ref = fastortho.Muon(groups(ref_p[:nm], ref_p[nm:nm + ns_], ref_p[nm + ns_:]), **kw)
    if plain:
        dp = [nn.Parameter(t.clone()) for t in full_m + full_s + full_v]
        opt = fastortho.Muon(groups(dp[:nm], dp[nm:nm + ns_], dp[nm + ns_:]), **kw,
                             process_group=dist.group.WORLD, strategy=strategy)
    else:
        dp = [nn.Parameter(distribute_tensor(t.clone(), mesh, placement_fn(i, t), src_data_rank=None))
              for i, t in enumerate(full_m + full_s + full_v)]
        opt = fastortho.Muon(groups(dp[:nm], dp[nm:nm + ns_], dp[nm + ns_:]), **kw, strategy=strategy)
    shapes = [tuple(p.shape) for p in ref_p]
    res = {"bytes": [], "ideal": [], "measured": [], "collectives": []}
    for step in range(steps):
        gs = _grads(shapes, step)
        if nan and step == 1:
            gs[0][0, 0] = float("nan")  # row 0: on rank 0 under Shard(0); the whole matrix is skipped
        for p, g in zip(ref_p, gs):
            p.grad = g.clone()
        ref.step()
        for p, g, i in zip(dp, gs, range(len(gs))):
            p.grad = g.clone() if plain else distribute_tensor(g.clone(), p.device_mesh, p.placements,
                                                               src_data_rank=None)
        with A2ACounter() as c:
            opt.step()
        st = opt.comm_stats
        res["bytes"].append(dict(st["bytes"]))
        res["ideal"].append(dict(st["ideal"]))
        res["measured"].append(c.bytes)
        res["collectives"].append(dict(st["collectives"]))
    full = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in dp]
    diffs = [(a.double() - b.double()).abs().max().item() if a.numel() else 0.0
             for a, b in zip(full, [p.detach() for p in ref_p])]
    res["equal"] = all(torch.equal(a, b) for a, b in zip(full, [p.detach() for p in ref_p]))
    res["max_diff"] = max(diffs)
    res["nonfinite"] = (opt.nonfinite_count, ref.nonfinite_count)
    res["strategies"] = sorted(opt.comm_stats["numel"])
    sd = opt.state_dict()
    res["state_keys"] = sorted((k, tuple(sorted(v))) for k, v in sd["state"].items())
    res["ok"] = res["equal"] and res["nonfinite"][0] == res["nonfinite"][1] == 1
    return res


def _cycle_shard(i, t):
    from torch.distributed.tensor import Shard

    # rows, columns, last dim: Shard(0), Shard(1), Shard(-1) in turn; vectors on Shard(0)
    return [Shard(0)] if t.ndim == 1 else [(Shard(0), Shard(1), Shard(t.ndim - 1))[i % 3]]


def _replicate(i, t):
    from torch.distributed.tensor import Replicate

    return [Replicate()]


def sc_ident_a2a(rank, world):
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="auto", ns_dtype=None)


def sc_ident_a2a_bf16(rank, world):
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="a2a", ns_dtype=torch.bfloat16)


def sc_ident_gather(rank, world):
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="gather", ns_dtype=None)


def sc_ident_owner(rank, world):
    return _ident_run(rank, world, placement_fn=None, strategy="auto", ns_dtype=torch.bfloat16, plain=True)


def sc_ident_local(rank, world):
    return _ident_run(rank, world, placement_fn=_replicate, strategy="auto", ns_dtype=None)


SCENARIOS = {
    "ident_a2a": sc_ident_a2a,
    "ident_a2a_bf16": sc_ident_a2a_bf16,
    "ident_gather": sc_ident_gather,
    "ident_owner": sc_ident_owner,
    "ident_local": sc_ident_local,
}
