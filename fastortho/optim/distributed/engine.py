"""The distributed Muon step: the phases of :mod:`fastortho.optim.functional` on each rank's shards,
with the orthogonalization routed by the plan (:mod:`.plan`) through the exchanges (:mod:`.exchange`)."""
from __future__ import annotations

import functools
import hashlib
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import Tensor

from fastortho.optim import functional as F
from fastortho.optim.distributed.exchange import AllToAll, all_reduce_sum, gather_full, nbytes, scatter_local
from fastortho.optim.distributed.plan import (
    STRATEGIES, Layout, Task, assign_owners, is_dtensor, local, param_layout, plan_units,
)
from fastortho.optim.distributed.rowmoments import ideal_bytes, normalize_results, result_dtype, send_v, take_v

__all__ = ["CommStats", "DistributedMuonEngine", "make_engine"]


class CommStats(TypedDict):
    """:attr:`fastortho.Muon.comm_stats`: what the last step sent from this rank."""

    bytes: dict[str, int]  # per kind ("a2a", "owner", "gather", "flags": the Σu² all-reduce), not to itself
    ideal: dict[str, int]  # analytic bytes per strategy
    collectives: dict[str, int]  # collective calls per kind
    numel: dict[str, int]  # elements of the Muon matrices per strategy
    ns_flops: int  # Newton–Schulz flops run by this rank
    ns_calls: int  # batched orthogonalizer calls on this rank
    stages: int  # pipeline stages of the exchanged matrices (see ``DistributedMuonEngine.bucket_numel``)
    # host seconds (CPU/gloo: the time itself; CUDA/NCCL: launches and stream waits only)
    wait_s: float  # blocked waiting for exchanges: the communication NS did not hide
    ns_s: float  # in the orthogonalizer


class DistributedMuonEngine:
    """Runs :meth:`fastortho.Muon.step` when parameters are DTensors or a process group is given."""

    #: default pipeline stage size (elements of exchanged matrices per owner and process group); overridden by
    #: ``FASTORTHO_DIST_BUCKET_NUMEL``
    BUCKET_NUMEL = 1 << 24

    def __init__(self, process_group: Any = None, strategy: str = "auto", *, bucket_numel: int | None = None) -> None:
        self.process_group = process_group
        self.strategy = strategy
        self._plan_key: Any = None
        self._checked = False
        self._owners: list[int] = []
        self._index: dict[tuple, Tensor] = {}
        #: compare the set of stepped parameters across ranks at every step (one ``all_gather_object``
        #: per group); default: only at the first step. ``FASTORTHO_DIST_CHECK=1`` turns it on.
        self.check_every_step = os.environ.get("FASTORTHO_DIST_CHECK", "0") == "1"
        self._layouts: dict[tuple[int, int], tuple[Any, Layout]] = {}
        self.stats: CommStats | dict = {}
        #: elements of exchanged matrices each owner orthogonalizes per pipeline stage (per process
        #: group): stage s+1's exchange overlaps stage s's NS. ``math.inf``: one stage (no overlap).
        #: Must be equal on every rank.
        self.bucket_numel: float = (bucket_numel if bucket_numel is not None else
                                    int(os.environ.get("FASTORTHO_DIST_BUCKET_NUMEL", self.BUCKET_NUMEL)))
        if not self.bucket_numel >= 1:
            raise ValueError(f"bucket_numel must be >= 1 (elements per pipeline stage), got {self.bucket_numel}")

    def _layout(self, gi: int, pi: int, p: Tensor, group: dict) -> Layout:
        ident = (id(p), getattr(p, "placements", None))
        cached = self._layouts.get((gi, pi))
        if cached is None or cached[0] != ident:
            forced = group.get("strategy", self.strategy)
            if forced not in STRATEGIES:
                raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {forced!r}")
            cached = (ident, param_layout(p, group["flatten"], self.process_group, forced))
            self._layouts[(gi, pi)] = cached
        return cached[1]

    def _count(self, kind: str, nbytes_: int, calls: int = 1) -> None:
        self.stats["bytes"][kind] = self.stats["bytes"].get(kind, 0) + int(nbytes_)
        self.stats["collectives"][kind] = self.stats["collectives"].get(kind, 0) + calls

    # -- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, param_groups: Sequence[dict[str, Any]], state: Any) -> list[Tensor]:
        """One step over ``param_groups`` with optimizer ``state``; returns the finite masks of the groups
        with ``nonfinite="skip"`` (for the optimizer's count)."""
        self.stats = CommStats(bytes={}, ideal={}, collectives={}, numel={}, ns_flops=0, ns_calls=0, stages=0,
                               wait_s=0.0, ns_s=0.0)
        selected = [(gi, [i for i, p in enumerate(g["params"]) if p.grad is not None])
                    for gi, g in enumerate(param_groups)]
        key = tuple((gi, tuple(idx)) for gi, idx in selected)
        # before any other collective, so that a rank-divergent set of gradients raises instead of
        # hanging. Only at the first step (which every rank takes) unless ``check_every_step``: a check
        # triggered by a local change would itself be a collective that only some ranks join
        if self.check_every_step or not self._checked:
            self._check_same_params(param_groups, selected)
            self._checked = True
        muon_groups, tasks, units, skipped = [], [], [], []
        for gi, idx in selected:
            group = param_groups[gi]
            if not idx:
                continue
            params = [group["params"][i] for i in idx]
            states = [F.init_state(state[p], p, group["algorithm"], group) for p in params]
            if group["algorithm"] == "adamw":
                F.adamw_phase([local(p) for p in params], [local(p.grad) for p in params],
                              [{k: local(v) for k, v in s.items()} for s in states], **F.adamw_args(group))
                continue
            lays = [self._layout(gi, i, p, group) for i, p in zip(idx, params)]
            plocal = [local(p) for p in params]
            bufs = [local(s["momentum_buffer"]) for s in states]
            work = F.contiguous_params(plocal)
            us, finite, sumsq = F.momentum_phase(
                work.work, [local(p.grad) for p in params], bufs, **F.momentum_args(group, plocal[0].device),
                names=[f"{gi}.{i}" for i in idx], reduce_sumsq=functools.partial(self._global_sumsq, lays=lays))
            if finite is not None and group["nonfinite"] == "skip":
                skipped.append(finite)
            g_units, g_tasks = plan_units(gi, idx, params, lays, work.work, bufs, us, group,
                                          [s.get("normuon_v") for s in states], sumsqs=sumsq)
            muon_groups.append((group, g_units, work))
            units += g_units
            tasks += g_tasks
        if tasks:
            if key != self._plan_key:
                assign_owners(tasks)
                self._owners = [t.owner for t in tasks]
            else:
                for t, o in zip(tasks, self._owners):
                    t.owner = o
            self._orthogonalize(tasks, units)
        self._plan_key = key
        for group, g_units, work in muon_groups:
            # NorMuon ran where the whole O was (see .rowmoments)
            finite = F.apply_phase(g_units, **dict(F.apply_args(group), variant="muon"))
            if finite is not None and group["nonfinite"] == "skip":
                skipped.append(finite)
            work.__exit__()
        return skipped

    def _global_sumsq(self, sumsq: Tensor, lays: list[Layout]) -> Tensor:
        """Each sharded parameter's whole Σu²: SUM all-reduce of the float64 shard sums over each group that
        shards it. Every rank gets the norm NS needs (see plan_units) and the same non-finite verdict."""
        by_groups: dict[tuple, list[int]] = {}
        for i, lay in enumerate(lays):
            if lay.reduce_groups:
                by_groups.setdefault(lay.reduce_groups, []).append(i)
        if not by_groups:
            return sumsq
        sumsq = sumsq.clone()
        for groups, ids in by_groups.items():
            # device index tensors made once (at a warm-up step, not inside a CUDA-graph capture)
            idx = self._index.get((tuple(ids), sumsq.device))
            if idx is None:
                idx = self._index[(tuple(ids), sumsq.device)] = torch.tensor(ids, device=sumsq.device)
            q = sumsq.index_select(0, idx)
            for g in groups:
                self._count("flags", all_reduce_sum(q, g))
            sumsq.index_copy_(0, idx, q)
        return sumsq

    def _check_same_params(self, param_groups: Sequence[dict], selected: list[tuple[int, list[int]]]) -> None:
        """Every rank of a group must step the same Muon parameters in the same order (else the exchange
        hangs or mixes matrices): compare a digest per communication group, once per plan."""
        by_group: dict[Any, list[tuple]] = {}
        for gi, idx in selected:
            group = param_groups[gi]
            if group["algorithm"] != "muon":
                continue
            for i in idx:
                p = group["params"][i]
                lay = self._layout(gi, i, p, group)
                # ordered (not a set): every rank must visit its groups in the same order
                for g in dict.fromkeys([lay.group, *lay.reduce_groups]):
                    if g is not None:
                        by_group.setdefault(g, []).append((gi, i, tuple(p.shape), lay.strategy))
        for g, entries in by_group.items():
            digest = hashlib.sha1(repr(entries).encode()).hexdigest()
            got = [None] * dist.get_world_size(g)
            dist.all_gather_object(got, digest, group=g)
            if len(set(got)) != 1:
                raise RuntimeError("fastortho.Muon: ranks disagree on the distributed plan (parameters with "
                                   "gradients, shapes or order differ across ranks)")

    # -- phase 2 ---------------------------------------------------------------------------------
    def _batches(self, tasks: list[Task], units: list[F.MatrixUnit], strategy: str,
                 ks: Sequence[int], back: bool = False) -> list[tuple[list[int], AllToAll]]:
        """Task indices ``ks`` of ``strategy`` per (process group, dtype), each with its (unstarted) exchange
        (``back``: of the results, in :func:`.rowmoments.result_dtype`)."""
        by: dict[tuple, list[int]] = {}
        for k in ks:
            t = tasks[k]
            if t.strategy == strategy:
                dt = result_dtype(t, units[k]) if back else units[k].ns_input.dtype
                by.setdefault((t.lay.group, dt), []).append(k)
        return [(ks_, AllToAll(g, tasks[ks_[0]].lay.world, tasks[ks_[0]].lay.rank, units[ks_[0]].ns_input, dt))
                for (g, dt), ks_ in by.items()]

    def _stages(self, tasks: list[Task]) -> list[list[int]]:
        """The exchanged tasks (``a2a``, ``owner``) in pipeline stages. Per process group and owner, the
        owner's tasks in task order are cut into chunks of ``bucket_numel`` elements (at least one task
        each); stage s holds every owner's s-th chunk, so every rank has NS work in every stage (a stage
        of one owner's matrices would serialize the ranks' NS). Owners are part of the plan, so every
        member of a group cuts the same stages."""
        per_owner: dict[tuple[Any, int], list[list[int]]] = {}
        fill: dict[tuple[Any, int], int] = {}
        for k, t in enumerate(tasks):
            if t.strategy not in ("a2a", "owner"):
                continue
            key = (t.lay.group, t.owner)
            chunks = per_owner.setdefault(key, [[]])
            if chunks[-1] and fill[key] + t.numel() > self.bucket_numel:
                chunks.append([])
                fill[key] = 0
            chunks[-1].append(k)
            fill[key] = fill.get(key, 0) + t.numel()
        n = max((len(c) for c in per_owner.values()), default=0)
        return [sorted(k for c in per_owner.values() if s < len(c) for k in c[s]) for s in range(n)]

    def _wait(self, ex: AllToAll) -> None:
        t0 = time.perf_counter()
        ex.wait()
        self.stats["wait_s"] += time.perf_counter() - t0

    def _orthogonalize(self, tasks: list[Task], units: list[F.MatrixUnit]) -> None:
        """NS of every task, pipelined over stages: stage s+1's shards travel while stage s is
        orthogonalized, and stage s's results travel back while stage s+1 is. At most three stages hold
        exchange buffers at once (s−1 returning, s in NS, s+1 arriving)."""
        st = self.stats
        for t in tasks:
            st["numel"][t.strategy] = st["numel"].get(t.strategy, 0) + t.numel()
        stages = self._stages(tasks)
        st["stages"] = len(stages)
        results: dict[Any, Tensor] = {}  # task index (or (task index, block)) -> full output
        fwd = self._start_forward(tasks, units, stages[0]) if stages else []
        # no exchange: NS while the first stage's shards travel
        items: list[tuple[Task, Tensor, Any]] = []
        for k, t in enumerate(tasks):
            if t.strategy == "local":
                items.append((t, units[k].ns_input, k))
            elif t.strategy == "gather":
                items.extend(self._gather_inputs(k, t))
        results.update(self._run_ns(items))
        for k, t in enumerate(tasks):
            if t.strategy == "local":
                units[k].out = results[k]
            elif t.strategy == "gather":
                units[k].out = self._gather_output(t, [results[(k, j)] for j in range(len(t.split or (0,)))])
        back_prev: list[tuple[list[int], AllToAll]] = []
        for s, ks in enumerate(stages):
            nxt = self._start_forward(tasks, units, stages[s + 1]) if s + 1 < len(stages) else []
            res = self._run_ns(self._finish_forward(tasks, units, ks, fwd))
            back = self._start_backward(tasks, units, ks, res)
            self._finish_backward(tasks, units, back_prev, res_prev if back_prev else {})
            back_prev, res_prev, fwd = back, res, nxt
        if back_prev:
            self._finish_backward(tasks, units, back_prev, res_prev)
        st["ideal"] = ideal_bytes(tasks, units)

    def _start_forward(self, tasks: list[Task], units: list[F.MatrixUnit],
                       ks: Sequence[int]) -> list[tuple[list[int], AllToAll]]:
        """Send the a2a shards of tasks ``ks`` to their owners (asynchronous)."""
        forward = self._batches(tasks, units, "a2a", ks)
        for ks_, ex in forward:
            for k in ks_:
                t, me = tasks[k], ex.rank
                if t.owner != me and t.pieces[me][1]:
                    ex.send(t.owner, units[k].ns_input)
                elif t.owner == me:
                    for r in range(ex.world):
                        if r != me:
                            ex.expect(r, t.piece_numel(r))
            self._count("a2a", ex.start())
        return forward

    def _finish_forward(self, tasks: list[Task], units: list[F.MatrixUnit], ks: Sequence[int],
                        forward: list[tuple[list[int], AllToAll]]) -> list[tuple[Task, Tensor, Any]]:
        """The full NS inputs this rank owns in stage ``ks``: its ``owner`` tasks and its assembled ``a2a``
        tasks (after the forward exchange)."""
        items = [(tasks[k], units[k].ns_input, k) for k in ks
                 if tasks[k].strategy == "owner" and tasks[k].owner == tasks[k].lay.rank]
        for ks_, ex in forward:
            self._wait(ex)
            for k in ks_:
                t = tasks[k]
                if t.owner == ex.rank:
                    parts = [units[k].ns_input if r == ex.rank else ex.take(r, t.piece_shape(r))
                             for r in range(ex.world)]
                    items.append((t, torch.cat(parts, dim=t.lay.axis), k))
        return items

    def _start_backward(self, tasks: list[Task], units: list[F.MatrixUnit], ks: Sequence[int],
                        results: dict[Any, Tensor]) -> list[tuple[list[int], AllToAll]]:
        """Send a2a slices of O back to their ranks and owner results to everyone (asynchronous)."""
        backward = self._batches(tasks, units, "a2a", ks, True) + self._batches(tasks, units, "owner", ks, True)
        for ks_, ex in backward:
            vbytes = 0
            for k in ks_:
                t, me = tasks[k], ex.rank
                if t.strategy == "owner":
                    if t.owner == me:
                        for r in range(ex.world):
                            if r != me:
                                ex.send(r, results[k].to(ex.dtype))
                        vbytes += send_v(ex, t)
                    else:
                        ex.expect(t.owner, t.numel())
                        take_v(ex, t, receive=False)
                elif t.owner == me:
                    o = results[k].to(ex.dtype)
                    for r in range(ex.world):
                        s0, ln = t.pieces[r]
                        if r == me:
                            units[k].out = o.narrow(t.lay.axis, s0, ln).contiguous()
                        elif ln:
                            ex.send(r, o.narrow(t.lay.axis, s0, ln))
                    vbytes += send_v(ex, t)
                else:
                    if t.pieces[me][1]:
                        ex.expect(t.owner, t.piece_numel(me))
                    take_v(ex, t, receive=False)
            self._count(tasks[ks_[0]].strategy, ex.start() - vbytes)
            if vbytes:
                self._count("normuon_v", vbytes, 0)
        return backward

    def _finish_backward(self, tasks: list[Task], units: list[F.MatrixUnit],
                         backward: list[tuple[list[int], AllToAll]], results: dict[Any, Tensor]) -> None:
        for ks_, ex in backward:
            self._wait(ex)
            for k in ks_:
                t, u = tasks[k], units[k]
                if t.owner == ex.rank:
                    if t.strategy == "owner":
                        u.out = results[k]
                    continue
                if t.strategy == "a2a" and not t.piece_numel(ex.rank):
                    u.out = u.ns_input.new_empty(u.ns_input.shape, dtype=ex.dtype)
                else:
                    u.out = ex.take(t.owner, tuple(u.ns_input.shape))
                take_v(ex, t, receive=True)

    def _run_ns(self, items: list[tuple[Task, Tensor, Any]]) -> dict[Any, Tensor]:
        """One batched :func:`~fastortho.optim.functional.orthogonalize` per (config, m, n, dtype, device),
        in task order (as the single-process buckets)."""
        t0 = time.perf_counter()
        buckets: dict[tuple, list[tuple[Task, Tensor, Any]]] = {}
        for item in items:
            t, x, _ = item
            buckets.setdefault((t.cfg, x.shape[-2], x.shape[-1], x.dtype, x.device), []).append(item)
        results: dict[Any, Tensor] = {}
        for (cfg, *_), bucket in buckets.items():
            xs, qs = [x for _, x, _ in bucket], [t.sumsq for t, _, _ in bucket]
            q = None if not F.REUSE_SUMSQ or any(v is None for v in qs) else torch.cat(qs)
            o = F.orthogonalize(xs[0] if len(xs) == 1 else torch.cat(xs), cfg, q).contiguous()
            self.stats["ns_calls"] += 1
            self.stats["ns_flops"] += sum(t.cost for t, _, _ in bucket)
            for (_, _, sink), oo in zip(bucket, torch.split(o, [x.shape[0] for x in xs])):
                results[sink] = oo
        normalize_results(items, results)
        self.stats["ns_s"] += time.perf_counter() - t0
        return results

    def _gather_inputs(self, k: int, t: Task) -> list[tuple[Task, Tensor, Any]]:
        full = gather_full(t.u_local, t.param, t.lay.mesh, t.lay.placements)
        self._count("gather", nbytes(full.numel(), full.dtype) * (t.lay.world - 1) // t.lay.world)
        x = full.reshape(t.shape)
        if not t.split:
            return [(t, x, (k, 0))]
        out, r0 = [], 0
        for j, s in enumerate(t.split):
            out.append((t, x.narrow(1, r0, s).contiguous(), (k, j)))
            r0 += s
        return out

    def _gather_output(self, t: Task, blocks: list[Tensor]) -> Tensor:
        o = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return scatter_local(o.reshape(t.param.shape), t.lay.mesh, t.lay.placements)


def make_engine(param_groups: Sequence[dict[str, Any]], process_group: Any = None, strategy: str = "auto", *,
                telemetry: bool = False, bucket_numel: int | None = None) -> DistributedMuonEngine | None:
    """The engine when any parameter is a DTensor or ``process_group`` spans more than one rank; None
    keeps the single-process step untouched. ``process_group`` may be a 1-D DeviceMesh; ``bucket_numel``:
    see :attr:`DistributedMuonEngine.bucket_numel`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        mesh = process_group  # a 1-D DeviceMesh
        if getattr(mesh, "ndim", None) != 1:
            raise ValueError("process_group must be a ProcessGroup or a 1-D DeviceMesh")
        process_group = mesh.get_group(0)
    any_dt = any(is_dtensor(p) for g in param_groups for p in g["params"])
    multi = process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1
    if not (any_dt or multi):
        return None
    if telemetry:
        warnings.warn("fastortho.Muon: telemetry is not recorded in distributed mode", stacklevel=3)
    return DistributedMuonEngine(process_group, strategy, bucket_numel=bucket_numel)
