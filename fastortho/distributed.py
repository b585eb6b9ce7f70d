r"""Distributed :class:`fastortho.Muon`: one owner orthogonalizes each whole matrix.

Gradient synchronization is the framework's (DDP's all-reduce, FSDP2's reduce-scatter, TP): this module
only moves the Newton–Schulz (NS) input :math:`u` and its result :math:`O`. Momentum, weight decay and
the update run on each rank's local shard, element by element, exactly as in one process; every matrix
is orthogonalized whole, by one rank (or by every rank, for ``local``/``gather``), so with identical
gradients the parameters are bit-identical to single-process :class:`fastortho.Muon` (the
communication is in the NS dtypes, hence lossless, and NS on this backend does not depend on what a
matrix is batched with: ``tests/test_distributed.py`` checks both).

**Strategies**, chosen per parameter (``strategy="auto"``) or forced (constructor or group key):

===========  =====================================================  ==================================
strategy     when (auto)                                            bytes sent per rank per step
===========  =====================================================  ==================================
``local``    plain tensor and no ``process_group``; DTensor with no  0 (every rank runs all the NS)
             sharded matrix dim (Replicate; 3-D experts on Shard(0))
``owner``    plain tensor, ``process_group`` of size W > 1 (DDP)    :math:`b_O (W-1)/W` per element
``a2a``      DTensor with exactly one ``Shard(d)``, d a matrix dim  :math:`(b_u + b_O)(W-1)/W^2`
             (FSDP2 Shard(0), TP Shard(0)/Shard(1), HSDP's shard    per element (bf16: 4(W−1)/W²,
             sub-mesh)                                              0.44 at W = 8)
``gather``   any other sharding (FSDP×TP, ``_StridedShard``)         :math:`b_u (W-1)/W` per element
                                                                    (model; DTensor's all-gather)
===========  =====================================================  ==================================

* ``owner``: matrices are assigned to ranks by LPT on the NS flop cost (largest first, to the least
  loaded rank, ties to the lowest rank), the owner orthogonalizes its share, and one
  ``all_to_all_single`` with per-rank split sizes delivers each owner's results to every other rank
  (an all-gather without padding: gloo's all-gather needs equal sizes).
* ``a2a``: per process group, one ``all_to_all_single`` sends every shard of :math:`u` to the
  matrix's owner (LPT, as above), which concatenates the pieces along the sharded dim (no padding:
  the NS input is the single-process matrix, so the orientation is decided from the true shape), runs
  NS batched with its other matrices of the same shape, and one ``all_to_all_single`` returns each
  rank's slice of :math:`O`. Shard extents follow torch's chunking (:math:`\lceil R/W\rceil` per rank,
  trailing ranks short or empty) and are checked against the local shapes.
* ``gather``: ``DTensor.full_tensor()`` of :math:`u` on every rank, NS on every rank, and the local
  slice of :math:`O` is taken without communication.

Owners and buckets depend only on the global shapes and the param-group order, so every rank computes
the same plan; it is rebuilt only when the set of parameters with gradients changes. Every rank must
have gradients for the same parameters: the first step checks it across ranks (one
``all_gather_object`` per group), and ``FASTORTHO_DIST_CHECK=1`` (or ``engine.check_every_step``)
checks at every step. Non-finite detection (``nonfinite="skip"|"raise"``) on sharded parameters combines the
per-shard flags with one small ``all_reduce`` (MIN of an int32 per parameter), so every rank skips the
same matrices as one process would.

:attr:`Muon.comm_stats` describes the last step (bytes handed to the collectives by this rank,
excluding what a rank sends itself; the analytic ideal; collective counts; NS flops).

Decisions (and why):

* No padding anywhere. Zero-padding a stack to a multiple of W cost 14.9 B/param against an ideal
  of 1.5 in a peer. Padding rows can also flip NS's transpose decision (15×16 padded to 17×16 changed
  the result by 0.043). Uneven and empty shards therefore travel with exact split sizes.
* ``all_to_all_single`` for everything this module sends. It is the only gloo collective that takes
  unequal sizes, and DTensor's Shard→Shard redistribute falls back to all-gather on CPU. For
  ``owner``, that costs a send buffer of (W−1)× this rank's results; it does not cost bytes on the
  wire.
* Owners come from LPT on NS flops, not from round robin by count. Owner order is a pure function of
  global shapes and param-group order.
* Non-finite flags are all-reduced. That is the only way a NaN in one shard can skip the whole matrix
  on every rank.
* The plan check runs at the first step only. A check triggered by a local change would be a
  collective that only some ranks join.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastortho.muon_step import muon_momentum_
from fastortho.optim import functional as F
from fastortho.optim.adamw import adamw_step_

__all__ = ["STRATEGIES", "DistributedMuonEngine", "make_engine", "ns_flops", "shard_extents", "lpt_owners"]

STRATEGIES = ("auto", "local", "owner", "a2a", "gather")


def _dtensor_cls():
    # a DTensor can only exist once torch.distributed.tensor is imported: do not pay that import
    # (seconds) in single-process runs
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def ns_flops(bsz: int, m: int, n: int, steps: int = 5) -> int:
    r"""Flops of ``steps`` quintic NS steps on ``bsz`` matrices :math:`m\times n` (s = short, l = long side):
    per step :math:`XX^\top` (:math:`2s^2l`), :math:`A^2` (:math:`2s^3`), :math:`BX` (:math:`2s^2l`)."""
    s, l = min(m, n), max(m, n)
    return bsz * steps * (4 * s * s * l + 2 * s ** 3)


def shard_extents(size: int, world: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each rank's chunk of a dim of ``size`` split by torch's rule
    (``torch.chunk``/DTensor ``Shard``/FSDP2): ⌈size/W⌉ per rank, trailing ranks short or empty."""
    c = -(-size // world) if size else 0
    out = []
    for r in range(world):
        start = min(r * c, size)
        out.append((start, max(0, min(c, size - start))))
    return out


def lpt_owners(costs: list[int], world: int) -> list[int]:
    """Longest-processing-time assignment: costs in decreasing order (ties: first index first), each to
    the least-loaded rank (ties: lowest rank). Deterministic, so every rank computes the same owners."""
    owners = [0] * len(costs)
    load = [0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def _nbytes(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------------
@dataclass
class _Task:
    """One apply unit (a matrix, a stack, or a row block of one) and how its NS result is obtained."""

    gi: int
    pi: int  # index of the parameter in its group
    strategy: str
    shape: tuple[int, int, int]  # global (B, m, n) of the NS input
    cfg: F.OrthoConfig
    cost: int
    group: Any = None  # process group (owner / a2a)
    world: int = 1
    rank: int = 0  # this rank in ``group``
    axis: int = 0  # a2a: 1 = rows, 2 = columns of the (B, m, n) view
    # a2a: per group rank, (start, length) of its piece along ``axis`` of the unit
    pieces: list[tuple[int, int]] = field(default_factory=list)
    owner: int = 0  # group rank that orthogonalizes it
    # gather: the layout, the DTensor parameter, the local NS input and the group's split_sizes
    lay: dict | None = None
    param: Tensor | None = None
    u_local: Tensor | None = None
    split: tuple[int, ...] | None = None

    def numel(self) -> int:
        b, m, n = self.shape
        return b * m * n

    def piece_numel(self, r: int) -> int:
        b, m, n = self.shape
        return b * (n if self.axis == 1 else m) * self.pieces[r][1]


def _param_layout(p: Tensor, group: dict, process_group, forced: str) -> dict:
    """How parameter ``p`` is distributed: strategy, process group and sharded axis of its matrix view."""
    flatten = group["flatten"]
    if not _is_dtensor(p):
        multi = process_group is not None and dist.is_initialized()
        ws = dist.get_world_size(process_group) if multi else 1
        strategy = forced if forced != "auto" else ("owner" if ws > 1 else "local")
        if strategy not in ("local", "owner"):
            raise ValueError(f"strategy={strategy!r} needs DTensor parameters; a plain tensor supports "
                             "'local' or 'owner' (with process_group=)")
        if strategy == "owner" and ws <= 1:
            strategy = "local"
        return dict(strategy=strategy, group=process_group if strategy == "owner" else None, reduce_groups=[])
    from torch.distributed.tensor.placement_types import Shard

    mesh, placements = p.device_mesh, p.placements
    sharded = [(md, pl) for md, pl in enumerate(placements) if not pl.is_replicate() and mesh.size(md) > 1]
    nd = p.ndim
    flat = nd >= 3 and (nd >= 4 if flatten is None else bool(flatten))
    auto, axis, factor = "gather", 0, 1
    if not sharded:
        auto = "local"
    elif len(sharded) == 1 and type(sharded[0][1]) is Shard:
        d = sharded[0][1].dim % nd
        if nd == 2:
            auto, axis = "a2a", 1 + d
        elif flat:
            if d in (0, 1):
                auto, axis = "a2a", 1 + d
                factor = math.prod(p.shape[2:]) if d == 1 else 1
        elif d < nd - 2:
            auto = "local"  # whole matrices on each rank (MoE experts on Shard(0))
        else:
            auto, axis = "a2a", 1 + d - (nd - 2)
    # a forced strategy applies to parameters that need communication; whole-matrix shards stay local
    strategy = auto if forced == "auto" or (auto == "local" and forced != "local") else forced
    if strategy == "owner":
        raise ValueError("strategy='owner' is for plain (DDP-replicated) tensors; DTensors use 'a2a' or "
                         "'gather'")
    if strategy == "local" and auto != "local":
        raise ValueError(f"strategy='local' on a parameter sharded on a matrix dim ({placements}) would "
                         "orthogonalize shards; use 'a2a' or 'gather'")
    if strategy == "a2a" and auto != "a2a":
        raise ValueError(f"strategy='a2a' needs one Shard on a matrix dim, got {placements}")
    out = dict(strategy=strategy, mesh=mesh, placements=placements)
    if strategy == "a2a":
        md, pl = sharded[0]
        pg = mesh.get_group(md)
        world, rank = mesh.size(md), mesh.get_local_rank(md)
        d = pl.dim % nd
        ext = [(s * factor, n_ * factor) for s, n_ in shard_extents(p.shape[d], world)]
        if p.to_local().shape[d] * factor != ext[rank][1]:
            raise RuntimeError(f"local shard of shape {tuple(p.to_local().shape)} of a {tuple(p.shape)} "
                               "parameter "
                               f"does not follow torch's chunking on dim {d} (rank {rank} of {world})")
        out.update(group=pg, world=world, rank=rank, axis=axis, extents=ext)
    if strategy == "gather":
        out.update(reduce_groups=[mesh.get_group(md) for md, _ in sharded],
                   world=math.prod(mesh.size(md) for md, _ in sharded))
    elif strategy == "a2a":
        out.update(reduce_groups=[out["group"]])
    else:
        out.update(reduce_groups=[])
    return out


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------
class DistributedMuonEngine:
    """Runs :meth:`fastortho.Muon.step` when parameters are DTensors or a process group is given."""

    def __init__(self, opt, process_group=None, strategy: str = "auto") -> None:
        self.opt = opt
        self.process_group = process_group
        self.strategy = strategy
        self._plan_key = None
        self._checked = False
        #: compare the set of stepped parameters across ranks at every step (one ``all_gather_object``
        #: per group); default: only at the first step. ``FASTORTHO_DIST_CHECK=1`` turns it on.
        self.check_every_step = os.environ.get("FASTORTHO_DIST_CHECK", "0") == "1"
        self._layouts: dict[tuple[int, int], dict] = {}
        self.stats: dict[str, Any] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def _forced(self, group: dict) -> str:
        s = group.get("strategy", self.strategy)
        if s not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {s!r}")
        return s

    def _layout(self, gi: int, pi: int, p: Tensor, group: dict) -> dict:
        key = (gi, pi)
        lay = self._layouts.get(key)
        if lay is None or lay["_id"] != (id(p), getattr(p, "placements", None)):
            lay = _param_layout(p, group, self.process_group, self._forced(group))
            lay["_id"] = (id(p), getattr(p, "placements", None))
            self._layouts[key] = lay
        return lay

    def _count(self, kind: str, nbytes: int, calls: int = 1) -> None:
        s = self.stats
        s["bytes"][kind] = s["bytes"].get(kind, 0) + int(nbytes)
        s["collectives"][kind] = s["collectives"].get(kind, 0) + calls

    # -- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        opt = self.opt
        self.stats = dict(bytes={}, ideal={}, collectives={}, numel={}, ns_flops=0, ns_calls=0)
        groups_work = []  # (gi, group, units, tasks, work)
        tasks_all: list[_Task] = []
        selected = [(gi, [i for i, p in enumerate(g["params"]) if p.grad is not None])
                    for gi, g in enumerate(opt.param_groups)]
        key = tuple((gi, tuple(idx)) for gi, idx in selected)
        new_plan = key != self._plan_key
        # before any other collective, so that a rank-divergent set of gradients raises instead of
        # hanging. Only at the first step (which every rank takes) unless ``check_every_step``: a check
        # triggered by a local change would itself be a collective that only some ranks join
        if self.check_every_step or not self._checked:
            self._check_same_params(selected)
            self._checked = True
        for gi, idx in selected:
            group = opt.param_groups[gi]
            if not idx:
                continue
            params = [group["params"][i] for i in idx]
            if group["algorithm"] == "adamw":
                states = [opt._init_state(p, group) for p in params]
                adamw_step_([_local(p) for p in params], [_local(p.grad) for p in params],
                            [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states],
                            [s["step"] for s in states], lr=group["lr"], betas=group["betas"],
                            eps=group["adamw_eps"], weight_decay=group["weight_decay"],
                            bias_correction=group["bias_correction"], zero_init=group["zero_init"])
                continue
            units, tasks, work = self._momentum_group(gi, group, idx, params)
            groups_work.append((gi, group, units, tasks, work))
            tasks_all.extend(tasks)

        self._plan_key = key
        if tasks_all:
            if new_plan:
                self._assign_owners(tasks_all)
                self._owners = [t.owner for t in tasks_all]
            else:
                for t, o in zip(tasks_all, self._owners):
                    t.owner = o
            units_all = [u for _, _, us, _, _ in groups_work for u in us]
            self._orthogonalize(tasks_all, units_all)

        for gi, group, units, tasks, work in groups_work:
            opt._apply_group(group, units)
            work.__exit__()

    # -- phase 1 ---------------------------------------------------------------------------------
    def _momentum_group(self, gi, group, idx, params):
        opt = self.opt
        lays = [self._layout(gi, i, p, group) for i, p in zip(idx, params)]
        plocal = [_local(p) for p in params]
        bufs = [_local(opt._init_state(p, group)["momentum_buffer"]) for p in params]
        grads = [_local(p.grad) for p in params]
        for p, g in zip(plocal, grads):
            F._check_grad(p, g)
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        work = F.contiguous_params(plocal)
        ns_dtype = F.resolve_ns_dtype(group["ns_dtype"], plocal[0].device)
        nonfinite, placement = group["nonfinite"], group["momentum_placement"]
        if placement == "before_ortho":
            us, sumsq = muon_momentum_(grads, bufs, momentum=group["momentum"], nesterov=group["nesterov"],
                                       convention=group["momentum_convention"], out_dtype=ns_dtype)
            if nonfinite != "ignore" and us:
                finite = self._global_finite(torch.isfinite(sumsq), lays)
                if nonfinite == "raise":
                    if not bool(finite.all()):
                        bad = [f"{gi}.{idx[i]}" for i in (~finite).nonzero().flatten().tolist()]
                        raise FloatingPointError(f"Muon: non-finite momentum/update for parameter(s) {bad}")
                else:
                    for i, (u, b) in enumerate(zip(us, bufs)):
                        u.masked_fill_(~finite[i], 0.0)
                        b.masked_fill_(~finite[i], 0.0)
                    opt._count_nonfinite(finite)
        elif placement == "after_ortho":
            us = [g.to(ns_dtype) for g in grads]
        else:
            raise ValueError(f"momentum_placement must be 'before_ortho' or 'after_ortho', got {placement!r}")

        rule = F.resolve_lr_scale(group["lr_scale"], group["adjust_lr_fn"])
        cfg = F.OrthoConfig.from_group(group)
        steps = cfg.steps or 5
        split = group["split_sizes"]
        units, tasks = [], []
        for k, (i, p, lay) in enumerate(zip(idx, params, lays)):
            bsz, m, n = F.matrix_shape(p.shape, group["flatten"])  # global shape (DTensor.shape)
            pw, bw, uw = work.work[k], bufs[k], us[k]
            name = f"{gi}.{i}"
            strat = lay["strategy"]
            if strat == "gather":
                scales = {F.lr_scale_factor(s, n, rule) for s in (split or [m])}
                if len(scales) > 1:
                    raise NotImplementedError("split_sizes with unequal blocks on a parameter that needs the "
                                              "'gather' strategy is not supported")
                units.append(F.MatrixUnit(param=pw, buf=bw, ns_input=uw, scale=scales.pop(), group_index=gi,
                                          name=name))
                tasks.append(_Task(gi, i, "gather", (bsz, m, n), cfg, ns_flops(bsz, m, n, steps),
                                   world=lay["world"], lay=lay, param=p, u_local=uw,
                                   split=tuple(split) if split else None))
                continue
            lb, lm, ln = F.matrix_shape(pw.shape, group["flatten"])
            views = [t.view(lb, lm, ln) for t in (pw, bw, uw)]
            blocks = [(0, m)]
            if split:
                if bsz != 1 or sum(split) != m:
                    raise ValueError(f"split_sizes {tuple(split)} must sum to the {m} rows of a 2-D "
                                     f"(or flattened) parameter of shape {tuple(p.shape)}")
                offs = [0]
                for s in split:
                    offs.append(offs[-1] + s)
                blocks = list(zip(offs[:-1], offs[1:]))
            for kb, (r0, r1) in enumerate(blocks):
                t = _Task(gi, i, strat, (bsz, r1 - r0, n), cfg, ns_flops(bsz, r1 - r0, n, steps))
                vb = views
                if strat == "a2a":
                    t.group, t.world, t.rank, t.axis = lay["group"], lay["world"], lay["rank"], lay["axis"]
                    if t.axis == 1:  # rows sharded: intersect each rank's rows with the block's rows
                        t.pieces = []
                        for s0, ln_ in lay["extents"]:
                            a, b = max(r0, s0), min(r1, s0 + ln_)
                            t.pieces.append((a - r0, b - a) if b > a else (0, 0))  # (0, 0): no overlap
                        me0 = lay["extents"][t.rank][0]
                        a, ln_ = t.pieces[t.rank]
                        vb = [v.narrow(1, a + r0 - me0 if ln_ else 0, ln_) for v in views]
                    else:
                        t.pieces = list(lay["extents"])
                        vb = [v.narrow(1, r0, r1 - r0) for v in views] if split else views
                else:
                    if strat == "owner":
                        t.group = lay["group"]
                        t.world, t.rank = dist.get_world_size(t.group), dist.get_rank(t.group)
                    vb = [v.narrow(1, r0, r1 - r0) for v in views] if split else views
                units.append(F.MatrixUnit(param=vb[0], buf=vb[1], ns_input=vb[2], group_index=gi,
                                          scale=F.lr_scale_factor(r1 - r0, n, rule),
                                          name=f"{name}[{kb}]" if split else name))
                tasks.append(t)
        return units, tasks, work

    def _global_finite(self, finite: Tensor, lays: list[dict]) -> Tensor:
        """AND of the per-shard finite flags over each sharded parameter's groups (one MIN all-reduce per
        distinct group), so every rank skips the same matrices."""
        by_groups: dict[tuple, list[int]] = {}
        for i, lay in enumerate(lays):
            if lay["reduce_groups"]:
                by_groups.setdefault(tuple(lay["reduce_groups"]), []).append(i)
        if not by_groups:
            return finite
        finite = finite.clone()
        for groups, ids in by_groups.items():
            f = finite[ids].to(torch.int32)
            for g in groups:
                dist.all_reduce(f, op=dist.ReduceOp.MIN, group=g)
                self._count("flags", _nbytes(f.numel(), f.dtype) * 2 * (dist.get_world_size(g) - 1)
                            // dist.get_world_size(g))
            finite[ids] = f.bool()
        return finite

    # -- ownership -------------------------------------------------------------------------------
    def _assign_owners(self, tasks: list[_Task]) -> None:
        by_group: dict[Any, list[_Task]] = {}
        for t in tasks:
            if t.strategy in ("owner", "a2a"):
                by_group.setdefault(t.group, []).append(t)
        for g, ts in by_group.items():
            for t, o in zip(ts, lpt_owners([t.cost for t in ts], ts[0].world)):
                t.owner = o

    def _check_same_params(self, selected: list[tuple[int, list[int]]]) -> None:
        """Every rank of a group must step the same Muon parameters in the same order (else the exchange
        hangs or mixes matrices): compare a digest per communication group, once per plan."""
        by_group: dict[Any, list[tuple]] = {}
        for gi, idx in selected:
            group = self.opt.param_groups[gi]
            if group["algorithm"] != "muon":
                continue
            for i in idx:
                p = group["params"][i]
                lay = self._layout(gi, i, p, group)
                # ordered (not a set): every rank must visit its groups in the same order
                for g in dict.fromkeys([lay.get("group"), *lay["reduce_groups"]]):
                    if g is not None:
                        by_group.setdefault(g, []).append((gi, i, tuple(p.shape), lay["strategy"]))
        for g, entries in by_group.items():
            digest = hashlib.sha1(repr(entries).encode()).hexdigest()
            got = [None] * dist.get_world_size(g)
            dist.all_gather_object(got, digest, group=g)
            if len(set(got)) != 1:
                raise RuntimeError("fastortho.Muon: ranks disagree on the distributed plan (parameters with "
                                   "gradients, shapes or order differ across ranks)")

    # -- phase 2 ---------------------------------------------------------------------------------
    def _orthogonalize(self, tasks: list[_Task], units: list[F.MatrixUnit]) -> None:
        st = self.stats
        for t in tasks:
            st["numel"][t.strategy] = st["numel"].get(t.strategy, 0) + t.numel()
        ns_items: list[tuple[_Task, Tensor, Any]] = []  # (task, full (B, m, n) input, sink)
        results: dict[int, Tensor] = {}  # task index -> full output (owned / local / gather)

        # forward: a2a shards to owners, gather full inputs
        a2a_batches: dict[tuple, list[int]] = {}
        for k, t in enumerate(tasks):
            if t.strategy == "a2a":
                a2a_batches.setdefault((t.group, units[k].ns_input.dtype), []).append(k)
        pending = []
        for (g, dtype), ks in a2a_batches.items():
            W, me = tasks[ks[0]].world, tasks[ks[0]].rank
            send_parts = [[] for _ in range(W)]
            recv_sizes = [0] * W
            for k in ks:
                t = tasks[k]
                if t.owner != me:
                    if t.pieces[me][1]:
                        send_parts[t.owner].append(units[k].ns_input.reshape(-1))
                else:
                    for r in range(W):
                        if r != me:
                            recv_sizes[r] += t.piece_numel(r)
            in_splits = [sum(x.numel() for x in parts) for parts in send_parts]
            flat_in = [x for parts in send_parts for x in parts]
            inp = torch.cat(flat_in) if flat_in else units[ks[0]].ns_input.new_empty(0)
            out = inp.new_empty(sum(recv_sizes))
            work = dist.all_to_all_single(out, inp, recv_sizes, in_splits, group=g, async_op=True)
            self._count("a2a", _nbytes(inp.numel(), dtype))
            pending.append((work, g, dtype, ks, out, recv_sizes, W, me))

        for k, t in enumerate(tasks):
            if t.strategy == "local" or (t.strategy == "owner" and t.owner == t.rank):
                ns_items.append((t, units[k].ns_input, k))
            elif t.strategy == "gather":
                ns_items.extend(self._gather_inputs(k, t))

        for work, g, dtype, ks, out, recv_sizes, W, me in pending:
            work.wait()
            chunks = list(torch.split(out, recv_sizes))
            offs = [0] * W
            for k in ks:
                t = tasks[k]
                if t.owner != me:
                    continue
                parts = []
                for r in range(W):
                    b, m, n = t.shape
                    shp = (b, t.pieces[r][1], n) if t.axis == 1 else (b, m, t.pieces[r][1])
                    if r == me:
                        parts.append(units[k].ns_input)
                    else:
                        nel = t.piece_numel(r)
                        parts.append(chunks[r][offs[r]:offs[r] + nel].view(shp))
                        offs[r] += nel
                ns_items.append((t, torch.cat(parts, dim=t.axis), k))

        # NS: one batched call per (config, m, n, dtype), in task order (as single-process buckets)
        buckets: dict[tuple, list[tuple[_Task, Tensor, Any]]] = {}
        for item in ns_items:
            t, x, _ = item
            buckets.setdefault((t.cfg, x.shape[-2], x.shape[-1], x.dtype, x.device), []).append(item)
        gather_out: dict[int, list[Tensor]] = {}
        for items in buckets.values():
            xs = [x for _, x, _ in items]
            stacked = xs[0] if len(xs) == 1 else torch.cat(xs)
            o = self.opt._orthogonalize_bucket(stacked, self.opt.param_groups[items[0][0].gi]).contiguous()
            st["ns_calls"] += 1
            st["ns_flops"] += sum(t.cost for t, _, _ in items)
            for (t, x, sink), oo in zip(items, torch.split(o, [x.shape[0] for x in xs])):
                if isinstance(sink, tuple):  # gather: (task index, block index)
                    gather_out.setdefault(sink[0], {})[sink[1]] = oo
                else:
                    results[sink] = oo

        # backward: a2a slices back to their ranks, owner results to everyone, gather slices locally
        pending = []
        for (g, _), ks in a2a_batches.items():
            W, me = tasks[ks[0]].world, tasks[ks[0]].rank
            send_parts = [[] for _ in range(W)]
            recv_sizes = [0] * W
            odtype = units[ks[0]].ns_input.dtype  # u is in the NS dtype; every rank agrees on it
            for k in ks:
                t = tasks[k]
                if t.owner == me:
                    o = results[k].to(odtype)
                    for r in range(W):
                        s0, ln_ = t.pieces[r]
                        if r == me:
                            units[k].out = o.narrow(t.axis, s0, ln_).contiguous()
                        elif ln_:
                            send_parts[r].append(o.narrow(t.axis, s0, ln_).reshape(-1))
                elif t.pieces[me][1]:
                    recv_sizes[t.owner] += t.piece_numel(me)
            in_splits = [sum(x.numel() for x in parts) for parts in send_parts]
            flat_in = [x for parts in send_parts for x in parts]
            inp = torch.cat(flat_in) if flat_in else units[ks[0]].ns_input.new_empty(0, dtype=odtype)
            out = inp.new_empty(sum(recv_sizes))
            work = dist.all_to_all_single(out, inp, recv_sizes, in_splits, group=g, async_op=True)
            self._count("a2a", _nbytes(inp.numel(), inp.dtype), 1)
            pending.append((work, ks, out, recv_sizes, W, me))

        owner_batches: dict[tuple, list[int]] = {}
        for k, t in enumerate(tasks):
            if t.strategy == "owner":
                owner_batches.setdefault((t.group, units[k].ns_input.dtype), []).append(k)
        for (g, _), ks in owner_batches.items():
            W, me = tasks[ks[0]].world, tasks[ks[0]].rank
            odtype = units[ks[0]].ns_input.dtype
            mine = [results[k].to(odtype).reshape(-1) for k in ks if tasks[k].owner == me]
            sizes = [0] * W
            for k in ks:
                sizes[tasks[k].owner] += tasks[k].numel()
            flat = torch.cat(mine) if mine else units[ks[0]].ns_input.new_empty(0, dtype=odtype)
            in_splits = [0 if r == me else flat.numel() for r in range(W)]
            recv = [0 if r == me else sizes[r] for r in range(W)]
            inp = flat.repeat(W - 1)
            out = flat.new_empty(sum(recv))
            work = dist.all_to_all_single(out, inp, recv, in_splits, group=g, async_op=True)
            self._count("owner", _nbytes(inp.numel(), inp.dtype))
            pending.append((work, ks, out, recv, W, me))

        for k, t in enumerate(tasks):
            if t.strategy == "local":
                units[k].out = results[k]
            elif t.strategy == "gather":
                units[k].out = self._gather_output(t, gather_out[k])

        for work, ks, out, recv_sizes, W, me in pending:
            work.wait()
            chunks = list(torch.split(out, recv_sizes))
            offs = [0] * W
            for k in ks:
                t, u = tasks[k], units[k]
                if t.strategy == "owner":
                    if t.owner == me:
                        u.out = results[k]
                        continue
                    nel = t.numel()
                else:
                    if t.owner == me:
                        continue
                    nel = t.piece_numel(me)
                    if nel == 0:
                        u.out = u.ns_input.new_empty(u.ns_input.shape,
                                                     dtype=out.dtype)
                        continue
                r = t.owner
                u.out = chunks[r][offs[r]:offs[r] + nel].view(u.ns_input.shape)
                offs[r] += nel
        self._ideal(tasks, units)

    def _gather_inputs(self, k: int, t: _Task):
        from torch.distributed.tensor import DTensor

        p, lay, u = t.param, t.lay, t.u_local
        full = DTensor.from_local(u, lay["mesh"], lay["placements"], run_check=False, shape=p.shape,
                                  stride=p.stride()).full_tensor()
        W = t.world
        self._count("gather", _nbytes(full.numel(), full.dtype) * (W - 1) // W)
        b, m, n = t.shape
        x = full.reshape(b, m, n)
        if not t.split:
            return [(t, x, (k, 0))]
        out, r0 = [], 0
        for j, s in enumerate(t.split):
            out.append((t, x.narrow(1, r0, s).contiguous(), (k, j)))
            r0 += s
        return out

    def _gather_output(self, t: _Task, blocks: dict[int, Tensor]) -> Tensor:
        from torch.distributed.tensor import distribute_tensor

        o = blocks[0] if len(blocks) == 1 else torch.cat([blocks[j] for j in range(len(blocks))], dim=1)
        lay = t.lay
        full = o.reshape(t.param.shape)
        local = distribute_tensor(full, lay["mesh"], lay["placements"], src_data_rank=None).to_local()
        return local.contiguous()

    def _ideal(self, tasks: list[_Task], units: list[F.MatrixUnit]) -> None:
        """Analytic bytes for this rank: a2a sends its off-owner shards of u and, as owner, the other
        ranks' slices of O; owner sends its results to W−1 ranks; gather receives (W−1)/W of u."""
        ideal: dict[str, int] = {}
        for t, u in zip(tasks, units):
            if t.strategy == "a2a":
                bi = u.ns_input.element_size()
                bo = u.out.element_size()
                v = t.piece_numel(t.rank) * bi if t.owner != t.rank else \
                    (t.numel() - t.piece_numel(t.rank)) * bo
            elif t.strategy == "owner":
                v = t.numel() * u.out.element_size() * (t.world - 1) if t.owner == t.rank else 0
            elif t.strategy == "gather":
                W = t.world
                v = t.numel() * u.ns_input.element_size() * (W - 1) // W
            else:
                v = 0
            ideal[t.strategy] = ideal.get(t.strategy, 0) + v
        self.stats["ideal"] = ideal


def make_engine(opt, process_group=None, strategy: str = "auto") -> DistributedMuonEngine | None:
    """The engine when any parameter is a DTensor or ``process_group`` spans more than one rank (or a
    non-"auto" strategy is forced on a group); None keeps the single-process step untouched."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        mesh = process_group  # a 1-D DeviceMesh
        if getattr(mesh, "ndim", None) != 1:
            raise ValueError("process_group must be a ProcessGroup or a 1-D DeviceMesh")
        process_group = mesh.get_group(0)
    any_dt = any(_is_dtensor(p) for g in opt.param_groups for p in g["params"])
    multi = process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1
    if not (any_dt or multi):
        return None
    if getattr(opt, "telemetry", False):
        warnings.warn("fastortho.Muon: telemetry is not recorded in distributed mode", stacklevel=3)
    return DistributedMuonEngine(opt, process_group, strategy)
