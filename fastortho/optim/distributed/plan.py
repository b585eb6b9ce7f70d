"""The distributed plan: how each parameter is laid out (:class:`Layout`), the orthogonalization tasks of
its matrix units (:class:`Task`), shard extents, and the owner of each task (LPT on the NS flop cost).

Everything here is a pure function of global shapes, placements and param-group order, so every rank
computes the same plan without communicating.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor

from fastortho.optim import functional as F

__all__ = ["STRATEGIES", "Layout", "Task", "ns_flops", "shard_extents", "lpt_owners", "param_layout",
           "plan_units", "assign_owners", "group_ranks", "is_dtensor", "local"]

STRATEGIES = ("auto", "local", "owner", "a2a", "gather")


def is_dtensor(t: Tensor) -> bool:
    # a DTensor can only exist once torch.distributed.tensor is imported: do not pay that import
    # (seconds) in single-process runs
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if is_dtensor(t) else t


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


def lpt_owners(costs: list[int], world: int, loads: Sequence[int] | None = None) -> list[int]:
    """Longest-processing-time assignment: costs in decreasing order (ties: first index first), each to
    the least-loaded rank (ties: lowest rank), starting from ``loads`` (default zeros). Deterministic, so
    every rank computes the same owners."""
    owners = [0] * len(costs)
    load = list(loads) if loads is not None else [0] * world
    if len(load) != world:
        raise ValueError(f"loads has {len(load)} entries for a world of {world}")
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


@dataclass(frozen=True)
class Layout:
    """How one parameter is distributed and which strategy orthogonalizes it.

    ``group``/``world``/``rank``: the process group that exchanges it (``owner``, ``a2a``), its size and
    this rank in it; ``axis``: the sharded axis of the ``(B, m, n)`` view (``a2a``: 1 rows, 2 columns);
    ``extents``: each rank's ``(start, length)`` along that axis; ``reduce_groups``: the groups whose
    non-finite flags are AND-ed; ``mesh``/``placements``: the DTensor's (``gather``); ``world`` for
    ``gather`` is the product of the sharded mesh dims.
    """

    strategy: str
    group: Any = None
    world: int = 1
    rank: int = 0
    axis: int = 0
    extents: tuple[tuple[int, int], ...] = ()
    reduce_groups: tuple[Any, ...] = ()
    mesh: Any = None
    placements: tuple[Any, ...] = ()


def param_layout(p: Tensor, flatten: bool | None, process_group: Any, forced: str) -> Layout:
    """The :class:`Layout` of parameter ``p`` (``forced``: the group's strategy, ``"auto"`` to choose)."""
    if not is_dtensor(p):
        multi = process_group is not None and dist.is_initialized()
        ws = dist.get_world_size(process_group) if multi else 1
        strategy = forced if forced != "auto" else ("owner" if ws > 1 else "local")
        if strategy not in ("local", "owner"):
            raise ValueError(f"strategy={strategy!r} needs DTensor parameters; a plain tensor supports "
                             "'local' or 'owner' (with process_group=)")
        if strategy == "owner" and ws <= 1:
            strategy = "local"
        if strategy == "local":
            return Layout("local")
        return Layout("owner", group=process_group, world=ws, rank=dist.get_rank(process_group))
    from torch.distributed.tensor.placement_types import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    sharded = [(md, pl) for md, pl in enumerate(placements) if not pl.is_replicate() and mesh.size(md) > 1]
    nd = p.ndim
    flat = nd >= 3 and (nd >= 4 if flatten is None else bool(flatten))
    # a Shard on a stack dim (whole matrices per rank, e.g. MoE experts on an expert-parallel dim) needs no
    # exchange; the other sharded dims cut matrices
    stack = [(md, pl) for md, pl in sharded if type(pl) is Shard and not flat and pl.dim % nd < nd - 2]
    matrix = [(md, pl) for md, pl in sharded if (md, pl) not in stack]
    # every sharded dim holds part of the parameter: their non-finite flags are AND-ed (one int32 each)
    flags = tuple(mesh.get_group(md) for md, _ in sharded)
    auto, axis, factor = "gather", 0, 1
    if not matrix:
        auto = "local"
    elif len(matrix) == 1 and type(matrix[0][1]) is Shard:
        d = matrix[0][1].dim % nd
        if nd == 2:
            auto, axis = "a2a", 1 + d
        elif flat:
            if d in (0, 1):
                auto, axis = "a2a", 1 + d
                factor = math.prod(p.shape[2:]) if d == 1 else 1
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
    if strategy == "local":
        return Layout("local", mesh=mesh, placements=placements, reduce_groups=flags)
    if strategy == "gather":
        return Layout("gather", world=math.prod(mesh.size(md) for md, _ in sharded), mesh=mesh,
                      placements=placements, reduce_groups=flags)
    # a2a over the one mesh dim that cuts a matrix dim, on this rank's own stack of matrices
    md, pl = matrix[0]
    pg = mesh.get_group(md)
    world, rank = mesh.size(md), mesh.get_local_rank(md)
    d = pl.dim % nd
    ext = tuple((s * factor, n_ * factor) for s, n_ in shard_extents(p.shape[d], world))
    if p.to_local().shape[d] * factor != ext[rank][1]:
        raise RuntimeError(f"local shard of shape {tuple(p.to_local().shape)} of a {tuple(p.shape)} parameter "
                           f"does not follow torch's chunking on dim {d} (rank {rank} of {world})")
    return Layout("a2a", group=pg, world=world, rank=rank, axis=axis, extents=ext, reduce_groups=flags,
                  mesh=mesh, placements=placements)


@dataclass
class Task:
    """One matrix unit (a matrix, a stack, or a row block of one) and how its NS result is obtained."""

    gi: int
    pi: int  # index of the parameter in its group
    lay: Layout
    shape: tuple[int, int, int]  # global (B, m, n) of the NS input
    cfg: F.OrthoConfig
    cost: int
    # a2a: per group rank, (start, length) of its piece along ``lay.axis`` of the unit
    pieces: list[tuple[int, int]] = field(default_factory=list)
    owner: int = 0  # group rank that orthogonalizes it
    # gather: the DTensor parameter, the local NS input and the group's split_sizes
    param: Tensor | None = None
    u_local: Tensor | None = None
    split: tuple[int, ...] | None = None
    # NorMuon: the (B, rows) second moment of the whole unit (every row, whoever holds which shard) and
    # its EMA weight; the owner updates it and sends it to the other ranks of the group
    v: Tensor | None = None
    beta2: Any = None
    # one whole matrix (any strategy): its (1,) float64 ‖u‖_F², the momentum kernel's sum over the whole
    # tensor (sharded: the all-reduced shard sums), so NS skips its norm pass
    sumsq: Tensor | None = None

    @property
    def strategy(self) -> str:
        return self.lay.strategy

    def numel(self) -> int:
        b, m, n = self.shape
        return b * m * n

    def piece_numel(self, r: int) -> int:
        b, m, n = self.shape
        return b * (n if self.lay.axis == 1 else m) * self.pieces[r][1]

    def piece_shape(self, r: int) -> tuple[int, int, int]:
        b, m, n = self.shape
        return (b, self.pieces[r][1], n) if self.lay.axis == 1 else (b, m, self.pieces[r][1])


def plan_units(
    gi: int, idx: Sequence[int], params: Sequence[Tensor], lays: Sequence[Layout], work: Sequence[Tensor],
    bufs: Sequence[Tensor], us: Sequence[Tensor], group: dict[str, Any],
    vs: Sequence[Tensor | None] | None = None, sumsqs: Tensor | None = None,
) -> tuple[list[F.MatrixUnit], list[Task]]:
    """The matrix units of one group's local shards (``work``, ``bufs``, ``us``) and their tasks.

    Shapes and scales come from the *global* parameter (``fan_in_first``: a ``(fan_in, fan_out)``
    weight, scale :math:`s(n, m)`, as :func:`~fastortho.optim.functional.matrix_units`); an ``a2a`` unit
    with rows sharded is this rank's rows of the block (possibly empty); a ``gather`` unit is the whole
    local shard (its blocks are split after the gather). ``vs``: NorMuon's replicated ``(m,)``/``(B, m)``
    row moments per parameter, attached to the tasks (the unit's rows in full). ``sumsqs``: the per-parameter
    Σu² of the whole tensors (sharded ones all-reduced by the engine), attached to the tasks that are one
    whole matrix (global batch 1, not split), of any strategy: NS takes it as the norm instead of a pass
    over the matrix. Stacks and row blocks keep the pass (one sum covers several matrices).

    Bit-identity with one process: the single process sums u² in its kernel's order, the engine sums
    shard sums (each in its kernel's order) across ranks, all in float64, where every u² of an fp32 u
    is exact. The two sums differ by float64 rounding only (relative ≤ (N−1)·2⁻⁵³ for N terms, in
    practice ~√N·2⁻⁵³), and the scale s = 1/(safety·√sumsq) is rounded once to fp32 (spacing
    2⁻²³ relative): s, hence the update, changes only when it lies that close (~1e-13 relative at
    N = 1e6) to an fp32 rounding midpoint, a chance of order 1e-6 per matrix and step."""
    rule = F.resolve_lr_scale(group["lr_scale"], group["adjust_lr_fn"])
    fan_in_first = bool(group.get("fan_in_first"))

    def scale_of(rows: int, cols: int) -> float:
        return F.lr_scale_factor(cols, rows, rule) if fan_in_first else F.lr_scale_factor(rows, cols, rule)

    cfg = F.OrthoConfig.from_group(group)
    steps = cfg.steps or 5
    split = group["split_sizes"]
    units: list[F.MatrixUnit] = []
    tasks: list[Task] = []
    for j, (i, p, lay, pw, bw, uw, v) in enumerate(zip(idx, params, lays, work, bufs, us, vs or [None] * len(idx))):
        bsz, m, n = F.matrix_shape(p.shape, group["flatten"])  # global shape (DTensor.shape)
        name = f"{gi}.{i}"
        pcfg = cfg.for_data(pw, bw)  # polar methods cut at the storage dtype's precision, as one process
        v = None if v is None else v.view(bsz, m)
        if lay.strategy == "gather":
            scales = {scale_of(s, n) for s in (split or [m])}
            if len(scales) > 1:
                raise NotImplementedError("split_sizes with unequal blocks on a parameter that needs the "
                                          "'gather' strategy is not supported")
            units.append(F.MatrixUnit(param=pw, buf=bw, ns_input=uw, scale=scales.pop(), group_index=gi, name=name))
            tasks.append(Task(gi, i, lay, (bsz, m, n), pcfg, ns_flops(bsz, m, n, steps), param=p, u_local=uw,
                              split=tuple(split) if split else None, v=v, beta2=group.get("beta2"),
                              sumsq=sumsqs[j : j + 1] if sumsqs is not None and bsz == 1 and not split else None))
            continue
        views = [t.view(*F.matrix_shape(pw.shape, group["flatten"])) for t in (pw, bw, uw)]
        # local and a2a work on this rank's own stack (a stack dim sharded over an expert-parallel mesh
        # dim holds only this rank's matrices): their batch, and their flops, are the local ones
        lb = views[0].shape[0]
        if v is not None and lb != bsz:
            raise NotImplementedError(
                f"variant='normuon' on a {tuple(p.shape)} stack sharded on its stack dim ({lay.placements}): each "
                "rank would update only its matrices' row moments of the replicated state 'normuon_v'; use "
                "variant='muon' for this group, or shard the stack on a matrix dim")
        for kb, (r0, r1) in enumerate(F.split_blocks(m, bsz, split, p.shape)):
            t = Task(gi, i, lay, (lb, r1 - r0, n), pcfg, ns_flops(lb, r1 - r0, n, steps),
                     v=None if v is None else v.narrow(1, r0, r1 - r0), beta2=group.get("beta2"))
            if lay.strategy == "a2a" and lay.axis == 1:
                # rows sharded: intersect each rank's rows with the block's rows ((0, 0): no overlap)
                for s0, ln in lay.extents:
                    a, b = max(r0, s0), min(r1, s0 + ln)
                    t.pieces.append((a - r0, b - a) if b > a else (0, 0))
                a, ln = t.pieces[lay.rank]
                vb = [v.narrow(1, a + r0 - lay.extents[lay.rank][0] if ln else 0, ln) for v in views]
            else:
                # the block's rows are all here (a local row range would not be: see the branch above)
                vb = [v.narrow(1, r0, r1 - r0) for v in views] if split else views
                t.pieces = list(lay.extents) if lay.strategy == "a2a" else []
            if sumsqs is not None and bsz == lb == 1 and not split:  # whole here; 0 on the rest of a stack dim
                t.sumsq = sumsqs[j : j + 1]
            units.append(F.MatrixUnit(param=vb[0], buf=vb[1], ns_input=vb[2], group_index=gi,
                                      scale=scale_of(r1 - r0, n), name=f"{name}[{kb}]" if split else name))
            tasks.append(t)
    return units, tasks


def group_ranks(group: Any, world: int) -> tuple[int, ...]:
    """Global ranks of ``group`` in group-rank order (``range(world)`` without an initialized default group)."""
    if group is None or not dist.is_initialized():
        return tuple(range(world))
    return tuple(dist.get_process_group_ranks(group))


def assign_owners(tasks: Sequence[Task]) -> None:
    """LPT owners per process group, over the ``owner`` and ``a2a`` tasks in task order.

    Groups are assigned in order of first appearance, each starting from the loads (NS flops) already
    given to its members by earlier groups that contain the whole group: every member of such a group
    plans it too, so the starting loads, hence the owners, are the same on every rank. Starting each
    group from zero would send every group's largest task to its rank 0 (dense and expert work piled on
    the same ranks)."""
    by_group: dict[Any, list[Task]] = {}
    for t in tasks:
        if t.strategy in ("owner", "a2a"):
            by_group.setdefault(t.lay.group, []).append(t)
    done: list[tuple[frozenset[int], dict[int, int]]] = []  # (members, load per global rank) per group
    for ts in by_group.values():
        ranks = group_ranks(ts[0].lay.group, ts[0].lay.world)
        members = frozenset(ranks)
        start = [sum(ld[g] for m, ld in done if members <= m) for g in ranks]
        owners = lpt_owners([t.cost for t in ts], len(ranks), start)
        added = dict.fromkeys(ranks, 0)
        for t, o in zip(ts, owners):
            t.owner = o
            added[ranks[o]] += t.cost
        done.append((members, added))
