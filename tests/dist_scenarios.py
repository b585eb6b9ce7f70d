"""Scenarios for ``tests/test_distributed.py``: run inside one gloo process group per world size.

:func:`run_world` spawns W processes once; each runs every scenario named and writes a dict of results
per scenario (``{"ok": bool, ...metrics}`` or ``{"error": traceback}``) that the parent merges by rank.
The spawn is the expensive part (seconds per process on a busy CPU), so nothing here spawns per case.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import no_host_reads as refuse_host_reads

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
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on nn.Sequential
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a bug that desynchronizes the ranks fails the collective after 60 s instead of hanging CI
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                results[name] = SCENARIOS[name](rank, world)
            except Exception:  # report, keep the group alive for the next scenario
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
            results[name]["seconds"] = time.perf_counter() - t0
    finally:
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, names: list[str], worker=None) -> dict[str, list[dict]]:
    """Run ``names`` in one spawn of ``world`` gloo processes; returns name -> per-rank result dicts.
    ``worker``: a module-level function with ``_worker``'s signature (default ``_worker``; another
    harness passes one that registers its own scenarios first)."""
    # fork after importing what every worker needs: a spawned worker re-imports torch, DTensor and FSDP
    # (seconds each on a busy 2-core machine); the workers use one thread, so forking is safe
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401

    import fastortho  # noqa: F401

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(worker or _worker, args=(world, _free_port(), d, names), nprocs=world, join=True,
                           start_method=method)
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

        def wrapped(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                    async_op=False):
            me = dist.get_rank(group)
            if input_split_sizes:
                own = input_split_sizes[me]
            else:
                own = input.numel() // dist.get_world_size(group)
            self.bytes += (input.numel() - own) * input.element_size()
            self.calls += 1
            return self._orig(output, input, output_split_sizes, input_split_sizes, group=group,
                              async_op=async_op)

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
SPLIT = [(12, 20), (12, 20)]  # split into row blocks of 4: one on Shard(1), one on Shard(0)
VECS = [(5,), (33,)]


def _ident_run(rank, world, *, placement_fn, strategy, ns_dtype, plain=False, nan=True, mesh=None,
               steps=K, bucket_numel=None, group_extra=None, no_host_reads=False, param_dtype=None, **extra):
    """Distributed vs single-process fastortho.Muon on identical full gradients; returns a result dict."""
    import fastortho
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor, init_device_mesh

    torch.manual_seed(0)
    full_m = [0.1 * torch.randn(s) for s in MATS]
    full_s = [0.1 * torch.randn(s) for s in SPLIT]
    full_v = [0.1 * torch.randn(s) for s in VECS]
    if param_dtype is not None:
        full_m, full_s, full_v = ([t.to(param_dtype) for t in ts] for ts in (full_m, full_s, full_v))
    mesh = mesh or init_device_mesh("cpu", (world,))

    def groups(ps_m, ps_s, ps_v):
        return [dict(params=ps_m, algorithm="muon", **(group_extra or {})),
                dict(params=ps_s, algorithm="muon", split_sizes=(4, 4, 4)),
                dict(params=ps_v, algorithm="adamw")]

    kw = dict(lr=LR, weight_decay=0.1, ns_dtype=ns_dtype, **extra)
    dkw = {} if bucket_numel is None else dict(dist_bucket_numel=bucket_numel)  # pipelined: NS overlaps exchange
    ref_p = [nn.Parameter(t.clone()) for t in full_m + full_s + full_v]
    nm, ns_ = len(full_m), len(full_s)
    ref = fastortho.Muon(groups(ref_p[:nm], ref_p[nm:nm + ns_], ref_p[nm + ns_:]), **kw)
    if plain:
        dp = [nn.Parameter(t.clone()) for t in full_m + full_s + full_v]
        opt = fastortho.Muon(groups(dp[:nm], dp[nm:nm + ns_], dp[nm + ns_:]), **kw,
                             process_group=dist.group.WORLD, strategy=strategy, **dkw)
    else:
        dp = [nn.Parameter(distribute_tensor(t.clone(), mesh, placement_fn(i, t), src_data_rank=None))
              for i, t in enumerate(full_m + full_s + full_v)]
        opt = fastortho.Muon(groups(dp[:nm], dp[nm:nm + ns_], dp[nm + ns_:]), **kw, strategy=strategy, **dkw)
    assert bucket_numel is None or opt._dist_engine.bucket_numel == bucket_numel
    shapes = [tuple(p.shape) for p in ref_p]
    res = {"bytes": [], "ideal": [], "measured": [], "collectives": [], "stages": []}
    for step in range(steps):
        gs = _grads(shapes, step)
        if param_dtype is not None:  # rank-1 matrices: the storage dtype's rounding is all the rest
            gs = [(g[..., :, :1] * g[..., :1, :] if g.ndim >= 2 else g).to(param_dtype) for g in gs]
        if nan and step == 1:
            gs[0][0, 0] = float("nan")  # row 0: on rank 0 under Shard(0); the whole matrix is skipped
        for p, g in zip(ref_p, gs):
            p.grad = g.clone()
        ref.step()
        for p, g, i in zip(dp, gs, range(len(gs))):
            p.grad = g.clone() if plain else distribute_tensor(g.clone(), p.device_mesh, p.placements,
                                                               src_data_rank=None)
        # after the first (warm-up) step, a capturable step must not read a tensor on the host
        with A2ACounter() as c, (refuse_host_reads() if no_host_reads and step else contextlib.nullcontext()):
            opt.step()
        st = opt.comm_stats
        res["bytes"].append(dict(st["bytes"]))
        res["ideal"].append(dict(st["ideal"]))
        res["measured"].append(c.bytes)
        res["collectives"].append(dict(st["collectives"]))
        res["stages"].append(st["stages"])
    full = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in dp]
    diffs = [(a.double() - b.double()).abs().max().item() if a.numel() else 0.0
             for a, b in zip(full, [p.detach() for p in ref_p])]
    res["equal"] = all(torch.equal(a, b) for a, b in zip(full, [p.detach() for p in ref_p]))
    # NorMuon's row moments are replicated: every rank's must be the one process's
    vs = [(opt.state[a]["normuon_v"], ref.state[b]["normuon_v"]) for a, b in zip(dp, ref_p)
          if "normuon_v" in ref.state[b]]
    res["v_count"] = len(vs)
    res["v_equal"] = all(torch.equal(a, b) for a, b in vs)
    res["v_max_diff"] = max([(a.double() - b.double()).abs().max().item() for a, b in vs], default=0.0)
    res["equal"] = res["equal"] and res["v_equal"]
    res["max_diff"] = max(diffs)
    res["nonfinite"] = (opt.nonfinite_count, ref.nonfinite_count)
    res["strategies"] = sorted(opt.comm_stats["numel"])
    sd = opt.state_dict()
    res["state_keys"] = sorted((k, tuple(sorted(v))) for k, v in sd["state"].items())
    res["ok"] = res["equal"] and res["nonfinite"][0] == res["nonfinite"][1] == int(nan)
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


def sc_ident_a2a_bf16_pipe(rank, world):
    # one matrix (or split block) per stage: the most exchanges in flight while NS runs
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="a2a", ns_dtype=torch.bfloat16,
                      bucket_numel=1)


def sc_ident_owner_pipe(rank, world):
    return _ident_run(rank, world, placement_fn=None, strategy="auto", ns_dtype=torch.bfloat16, plain=True,
                      bucket_numel=600)


def sc_ident_svd_bf16(rank, world):
    # bf16 parameters with an SVD orthogonalizer: the rank cut follows bf16 (the storage dtype) on the
    # owner as in one process; with the fp32 cut the engine kept directions one process drops
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="auto", ns_dtype=None,
                      param_dtype=torch.bfloat16, orthogonalizer="svd")


def sc_ident_gather(rank, world):
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="gather", ns_dtype=None)


def sc_ident_owner(rank, world):
    return _ident_run(rank, world, placement_fn=None, strategy="auto", ns_dtype=torch.bfloat16, plain=True)


def sc_ident_local(rank, world):
    return _ident_run(rank, world, placement_fn=_replicate, strategy="auto", ns_dtype=None)


def sc_ident_after_ortho(rank, world):
    # momentum on the orthogonalized gradients (seed 001's ablation), "sum" convention, no Nesterov
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="auto", ns_dtype=None, nan=False,
                      momentum_placement="after_ortho", momentum_convention="sum", nesterov=False)


def sc_divergent_grads(rank, world):
    """One rank lacks a gradient: every rank raises a clear error at the plan check (no hang)."""
    import fastortho
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    ps = [nn.Parameter(distribute_tensor(torch.randn(s), mesh, [Shard(0)], src_data_rank=None))
          for s in [(8, 4), (8, 4), (6, 6)]]
    out = {}
    for when in ("first_step", "later_step"):
        opt = fastortho.Muon(ps, lr=LR)
        opt._dist_engine.check_every_step = when == "later_step"  # = FASTORTHO_DIST_CHECK=1
        for p in ps:
            p.grad = distribute_tensor(torch.randn(p.shape), mesh, [Shard(0)], src_data_rank=None)
        if when == "later_step":
            opt.step()  # consistent: fine
        if rank == world - 1:
            ps[1].grad = None
        try:
            opt.step()
            out[when] = "no error"
        except RuntimeError as e:
            out[when] = str(e)
    out["ok"] = all("disagree" in out[w] for w in ("first_step", "later_step"))
    return out


def _fsdp_rows(i, t):
    from torch.distributed.tensor import Shard

    # FSDP2's Shard(0) on matrices and flattened kernels; 3-D stacks on their rows (Shard(0) of a stack is
    # whole matrices per rank, which NorMuon's replicated moments do not support)
    return [Shard(1)] if t.ndim == 3 else [Shard(0)]


def _tp_cols(i, t):
    from torch.distributed.tensor import Shard

    # a RowwiseParallel-like layout: matrix columns (Shard(1); Shard(2) of a stack), vectors on Shard(0)
    return [Shard(0)] if t.ndim == 1 else [Shard(2)] if t.ndim == 3 else [Shard(1)]


def sc_ident_normuon_fsdp(rank, world):
    return _ident_run(rank, world, placement_fn=_fsdp_rows, strategy="auto", ns_dtype=None, variant="normuon")


def sc_ident_normuon_tp(rank, world):
    # bf16 NS: the normalized slices travel in float32 (normuon_'s dtype), as one process applies them
    return _ident_run(rank, world, placement_fn=_tp_cols, strategy="auto", ns_dtype=torch.bfloat16,
                      variant="normuon", beta2=0.9)


def sc_ident_normuon_owner(rank, world):
    return _ident_run(rank, world, placement_fn=None, strategy="auto", ns_dtype=torch.bfloat16, plain=True,
                      variant="normuon", bucket_numel=600)


def sc_ident_normuon_gather(rank, world):
    return _ident_run(rank, world, placement_fn=_fsdp_rows, strategy="gather", ns_dtype=None, variant="normuon")


def sc_ident_capturable(rank, world):
    # device-scalar lr/momentum/weight decay and AdamW step counts (on the CPU here), every strategy of
    # _cycle_shard (a2a rows/columns, stack-sharded local)
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="auto", ns_dtype=None, capturable=True,
                      no_host_reads=True)


def sc_ident_capturable_normuon(rank, world):
    # NorMuon's moments sent by the owners, and the gather strategy (DTensor full_tensor / distribute_tensor)
    return _ident_run(rank, world, placement_fn=_fsdp_rows, strategy="auto", ns_dtype=None, capturable=True,
                      variant="normuon", no_host_reads=True)


def sc_ident_capturable_gather(rank, world):
    return _ident_run(rank, world, placement_fn=_fsdp_rows, strategy="gather", ns_dtype=None, capturable=True,
                      no_host_reads=True)


def sc_host_read_guard(rank, world):
    """The guard sees a host read inside the engine's step: a non-capturable CPU tensor lr is read with
    ``item()`` (so the capturable scenarios' silence means something)."""
    import fastortho
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    p = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)], src_data_rank=None))
    opt = fastortho.Muon([p], lr=torch.tensor(LR))
    p.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)], src_data_rank=None)
    opt.step()
    try:
        with refuse_host_reads():
            opt.step()
        out = "no error"
    except AssertionError as e:
        out = str(e)
    return dict(ok="host read" in out, caught=out)


def sc_ident_fan_in_first(rank, world):
    # (fan_in, fan_out) storage: s(n, m) under an asymmetric rule, on a2a (rows and columns) and local
    return _ident_run(rank, world, placement_fn=_cycle_shard, strategy="auto", ns_dtype=None, lr_scale="spectral",
                      group_extra=dict(fan_in_first=True))


def sc_normuon_unsupported(rank, world):
    """NorMuon on a stack sharded on its stack dim, and with after_ortho momentum: clear errors."""
    import fastortho
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    p = nn.Parameter(distribute_tensor(torch.randn(2 * world, 4, 6), mesh, [Shard(0)], src_data_rank=None))
    opt = fastortho.Muon([p], lr=LR, variant="normuon")
    p.grad = distribute_tensor(torch.randn(p.shape), mesh, [Shard(0)], src_data_rank=None)
    try:
        opt.step()
        out["stack"] = "no error"
    except NotImplementedError as e:
        out["stack"] = str(e)
    try:
        fastortho.Muon([p], lr=LR, variant="normuon", momentum_placement="after_ortho")
        out["after_ortho"] = "no error"
    except NotImplementedError as e:
        out["after_ortho"] = str(e)
    out["ok"] = "stack dim" in out["stack"] and "after_ortho" in out["after_ortho"]
    return out


def sc_sumsq_reuse(rank, world):
    """What the step hands Newton–Schulz on this rank: per ``orthogonalize`` call, the ``(B, m, n)`` input,
    whether a Σu² came with it, and its largest relative distance to the float64 Σ of the input's
    matrices. a2a on rows and on columns, a flattened conv kernel gathered (Shard(3)), a 3-D stack (a2a)."""
    import fastortho
    from fastortho.optim import functional as F
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(3)
    shapes, pls = [(33, 16), (16, 40), (8, 3, 3, 3), (3, 6, 10)], [Shard(0), Shard(1), Shard(3), Shard(1)]
    ps = [nn.Parameter(distribute_tensor(0.1 * torch.randn(s), mesh, [pl], src_data_rank=None))
          for s, pl in zip(shapes, pls)]
    opt = fastortho.Muon(ps, lr=LR)
    calls, real = [], F.orthogonalize

    def spy(X, cfg, sumsq=None):
        rel = None if sumsq is None else ((sumsq - X.double().square().sum((-2, -1))).abs() / sumsq).max().item()
        calls.append((tuple(X.shape), rel))
        return real(X, cfg, sumsq)

    F.orthogonalize = spy
    try:
        for step in range(2):
            for p, g in zip(ps, _grads(shapes, step)):
                p.grad = distribute_tensor(g, mesh, p.placements, src_data_rank=None)
            calls.clear()
            opt.step()
    finally:
        F.orthogonalize = real
    return dict(ok=True, calls=calls, strategies=sorted(opt.comm_stats["numel"]),
                flags=opt.comm_stats["bytes"].get("flags", 0), flag_calls=opt.comm_stats["collectives"].get("flags", 0))


SCENARIOS = {
    "ident_normuon_fsdp": sc_ident_normuon_fsdp,
    "ident_normuon_tp": sc_ident_normuon_tp,
    "ident_normuon_owner": sc_ident_normuon_owner,
    "ident_normuon_gather": sc_ident_normuon_gather,
    "ident_capturable": sc_ident_capturable,
    "ident_capturable_normuon": sc_ident_capturable_normuon,
    "ident_capturable_gather": sc_ident_capturable_gather,
    "ident_fan_in_first": sc_ident_fan_in_first,
    "host_read_guard": sc_host_read_guard,
    "normuon_unsupported": sc_normuon_unsupported,
    "divergent_grads": sc_divergent_grads,
    "ident_after_ortho": sc_ident_after_ortho,
    "ident_a2a": sc_ident_a2a,
    "ident_svd_bf16": sc_ident_svd_bf16,
    "ident_a2a_bf16": sc_ident_a2a_bf16,
    "ident_a2a_bf16_pipe": sc_ident_a2a_bf16_pipe,
    "ident_owner_pipe": sc_ident_owner_pipe,
    "ident_gather": sc_ident_gather,
    "ident_owner": sc_ident_owner,
    "ident_local": sc_ident_local,
    "sumsq_reuse": sc_sumsq_reuse,
}


# ------------------------------------------------------------------------------------------------
# bytes against the closed form (every shard the same size, so the owner's share is numel/W)
# ------------------------------------------------------------------------------------------------
EVEN = [(64, 32), (32, 64), (48, 48), (48, 48), (48, 48), (16, 16), (32, 32)]


def sc_bytes_even(rank, world):
    """a2a (Shard(0)/Shard(1), bf16) and owner (plain, bf16): bytes per Muon parameter, mean over ranks."""
    import fastortho
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    full = [0.1 * torch.randn(s) for s in EVEN]
    P = sum(t.numel() for t in full)
    out = {"P": P}
    for mode in ("a2a", "owner"):
        if mode == "a2a":
            ps = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(i % 2)], src_data_rank=None))
                  for i, t in enumerate(full)]
            opt = fastortho.Muon(ps, lr=LR, ns_dtype=torch.bfloat16)
        else:
            ps = [nn.Parameter(t.clone()) for t in full]
            opt = fastortho.Muon(ps, lr=LR, ns_dtype=torch.bfloat16, process_group=dist.group.WORLD)
        for step in range(2):
            gs = _grads(EVEN, step)
            for p, g in zip(ps, gs):
                p.grad = distribute_tensor(g, mesh, p.placements, src_data_rank=None) if mode == "a2a" else g
            with A2ACounter() as c:
                opt.step()
        st = opt.comm_stats
        out[mode] = dict(bytes=st["bytes"][mode], measured=c.bytes, ideal=st["ideal"][mode],
                         calls=st["collectives"][mode], ns_flops=st["ns_flops"],
                         mean_per_param=_sum_all(st["bytes"][mode]) / world / P,
                         max_flops=_max_all(st["ns_flops"]), mean_flops=_sum_all(st["ns_flops"]) / world)
    out["ok"] = True
    return out


def _max_all(x):
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ------------------------------------------------------------------------------------------------
# end to end: FSDP2, DDP, HSDP, TP, FSDP x TP on a small MLP
# ------------------------------------------------------------------------------------------------
PER = 4  # samples per rank per step
E2E_STEPS = 3


def _mlp(tp=False):
    torch.manual_seed(0)
    if tp:  # TP needs divisible feature dims
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                             nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 4))
    # 33 rows: uneven shards; the 1x24 head: an empty shard at W >= 2
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 33), nn.ReLU(),
                         nn.Linear(33, 24), nn.ReLU(), nn.Linear(24, 1))


def _data(step, n):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 16, generator=g)
    return x, torch.randn(n, 1, generator=g)


def _loss(model, x, y):
    out = model(x)
    return ((out - y[:, :1]) ** 2).mean() if out.shape[1] == 1 else ((out - y) ** 2).mean()


def _opt(params, **kw):
    import fastortho

    return fastortho.Muon(params, lr=LR, weight_decay=0.1, adamw_lr=1e-3, **kw)


def _reference(micro, n_total, steps=E2E_STEPS, tp=False):
    """Single process: each step splits n_total samples into ``micro`` micro-batches, loss/micro each."""
    model = _mlp(tp)
    opt = _opt(model.parameters())
    for step in range(steps):
        x, y = _data(step, n_total)
        if tp:
            y = y.expand(-1, 4).contiguous()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (_loss(model, xs, ys) / micro).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def _bytes_ok(opt):
    """The last step's a2a/owner bytes equal the analytic count from the shapes (0 == 0 when unused)."""
    st = opt.comm_stats
    return all(st["bytes"].get(k, 0) == st["ideal"].get(k, 0) for k in ("a2a", "owner"))


def _compare(model, ref):
    from torch.distributed.tensor import DTensor

    got = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
    equal = all(torch.equal(a, b) for a, b in zip(got, ref))
    diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(got, ref))
    return equal, diff


def _train(model, opt, rank_slice, n_total, steps=E2E_STEPS, tp=False, ns_counter=None):
    between = 0
    for step in range(steps):
        x, y = _data(step, n_total)
        if tp:
            y = y.expand(-1, 4).contiguous()
        _loss(model, x[rank_slice], y[rank_slice]).backward()
        if ns_counter is not None:
            between += ns_counter[0]  # NS calls made outside step() (must stay 0)
        opt.step()
        if ns_counter is not None:
            ns_counter[0] = 0
        opt.zero_grad()
    return between


@contextlib.contextmanager
def _counting_ns(counter):
    """Count the optimizer's orthogonalizer calls (``functional.orthogonalize``, which the engine calls
    through the module) in ``counter[0]``; the calls run unchanged (the momentum's Σu² included, so the
    result stays the one process's)."""
    from fastortho.optim import functional as F

    real = F.orthogonalize

    def counted(*args, **kwargs):
        counter[0] += 1
        return real(*args, **kwargs)

    F.orthogonalize = counted
    try:
        yield
    finally:
        F.orthogonalize = real


def _fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sc_e2e_fsdp(rank, world):
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = _fsdp_model(mesh)
    counter = [0]
    opt = _opt(model.parameters())
    with _counting_ns(counter):
        outside = _train(model, opt, slice(rank * PER, (rank + 1) * PER), world * PER, ns_counter=counter)
    equal, diff = _compare(model, _reference(world, world * PER))
    placements = sorted({str(p.placements) for p in model.parameters()})
    return dict(ok=True, equal=equal, max_diff=diff, ns_outside_step=outside,
                strategies=sorted(opt.comm_stats["numel"]), bytes_ok=_bytes_ok(opt), placements=placements,
                full_batch_diff=_compare(model, _reference(1, world * PER))[1])


def sc_e2e_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _mlp()
    ddp = DDP(model)
    opt = _opt(ddp.parameters(), process_group=ddp.process_group)
    n = world * PER
    for step in range(E2E_STEPS):
        x, y = _data(step, n)
        sl = slice(rank * PER, (rank + 1) * PER)
        out = ddp(x[sl])
        ((out - y[sl]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    equal, diff = _compare(model, _reference(world, n))
    return dict(ok=True, equal=equal, max_diff=diff, strategies=sorted(opt.comm_stats["numel"]),
                bytes_ok=_bytes_ok(opt))


def sc_e2e_tp(rank, world):
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    model = _mlp(tp=True)
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel(),
                                     "4": ColwiseParallel(), "6": RowwiseParallel()})
    opt = _opt(model.parameters())
    _train(model, opt, slice(None), PER, tp=True)  # every TP rank sees the whole batch
    equal, diff = _compare(model, _reference(1, PER, tp=True))
    return dict(ok=True, equal=equal, max_diff=diff, strategies=sorted(opt.comm_stats["numel"]),
                bytes_ok=_bytes_ok(opt),
                placements=sorted({str(p.placements) for p in model.parameters()}))


def sc_e2e_hsdp(rank, world):
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = _fsdp_model(mesh)
    opt = _opt(model.parameters())
    _train(model, opt, slice(rank * PER, (rank + 1) * PER), world * PER)
    equal, diff = _compare(model, _reference(world, world * PER))
    return dict(ok=True, equal=equal, max_diff=diff, strategies=sorted(opt.comm_stats["numel"]),
                bytes_ok=_bytes_ok(opt),
                placements=sorted({str(p.placements) for p in model.parameters()}))


def sc_e2e_fsdp_tp(rank, world):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    model = _mlp(tp=True)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel(),
                                           "4": ColwiseParallel(), "6": RowwiseParallel()})
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = _opt(model.parameters())
    dp = mesh.get_local_rank("dp")
    _train(model, opt, slice(dp * PER, (dp + 1) * PER), 2 * PER, tp=True)
    equal, diff = _compare(model, _reference(2, 2 * PER, tp=True))
    return dict(ok=True, equal=equal, max_diff=diff, strategies=sorted(opt.comm_stats["numel"]),
                bytes_ok=_bytes_ok(opt),
                placements=sorted({str(p.placements) for p in model.parameters()}))


def sc_dcp(rank, world):
    """FSDP2: 2 steps, DCP save, 2 more steps; a fresh model+optimizer loads and takes the same 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    n = world * PER
    sl = slice(rank * PER, (rank + 1) * PER)

    def steps(model, opt, start, count):
        for step in range(start, start + count):
            x, y = _data(step, n)
            _loss(model, x[sl], y[sl]).backward()
            opt.step()
            opt.zero_grad()

    model = _fsdp_model(mesh)
    opt = _opt(model.parameters())
    keys0 = sorted(map(str, opt.state_dict()["state"].keys()))  # eager state: before any step
    steps(model, opt, 0, 2)
    path = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path[0])
    all_keys = [None] * world
    dist.all_gather_object(all_keys, (keys0, sorted(osd["state"].keys())))
    steps(model, opt, 2, 2)
    a = [p.full_tensor() for p in model.parameters()]

    model2 = _fsdp_model(mesh)
    opt2 = _opt(model2.parameters())
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path[0])
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    steps(model2, opt2, 2, 2)
    b = [p.full_tensor() for p in model2.parameters()]
    same_keys = all(k == all_keys[0] for k in all_keys)
    equal = all(torch.equal(x, y) for x, y in zip(a, b))
    return dict(ok=equal and same_keys, equal=equal, same_keys=same_keys)


def sc_dcp_normuon(rank, world):
    """NorMuon's replicated row moments (plain tensors beside DTensor momenta) through a sharded DCP
    save/load under FSDP2: the loaded ``normuon_v`` and the next step equal the uninterrupted run's."""
    import fastortho
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 33, bias=False), nn.Linear(33, 8, bias=False))
        fully_shard(m, mesh=mesh)
        return m, fastortho.Muon(m.parameters(), lr=LR, variant="normuon")

    def step(m, opt, k):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(k))
        m(x).square().sum().backward()
        opt.step()
        opt.zero_grad()

    m, opt = build()
    for k in range(2):
        step(m, opt, k)
    path = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(path)
    dcp.save({"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}, checkpoint_id=path[0])
    m2, opt2 = build()
    st = {"model": get_model_state_dict(m2), "optim": get_optimizer_state_dict(m2, opt2)}
    dcp.load(st, checkpoint_id=path[0])
    set_model_state_dict(m2, st["model"])
    set_optimizer_state_dict(m2, opt2, st["optim"])
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0], ignore_errors=True)
    v_equal = all(torch.equal(opt.state[a]["normuon_v"], opt2.state[b]["normuon_v"])
                  for a, b in zip(m.parameters(), m2.parameters()))
    step(m, opt, 2)
    step(m2, opt2, 2)
    equal = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(m.parameters(), m2.parameters()))
    return dict(ok=v_equal and equal, v_equal=v_equal, equal=equal)


SCENARIOS.update({
    "dcp_normuon": sc_dcp_normuon,
    "bytes_even": sc_bytes_even,
    "e2e_fsdp": sc_e2e_fsdp,
    "e2e_ddp": sc_e2e_ddp,
    "e2e_tp": sc_e2e_tp,
    "e2e_hsdp": sc_e2e_hsdp,
    "e2e_fsdp_tp": sc_e2e_fsdp_tp,
    "dcp": sc_dcp,
})
