r"""Cost model of distributed ``fastortho.Muon`` from 8 to 1,024 GPUs: bytes, NS work, step time.

Usage::

    python bench/simulate_distributed.py                                  # every model × world × layout
    python bench/simulate_distributed.py --model llama3-70b --world 256
    python bench/simulate_distributed.py --model moe-1t --world 1024 --tokens-per-gpu 8192
    python bench/simulate_distributed.py --model llama3-8b --world 64 --layout fsdp --fsdp 64
    python bench/simulate_distributed.py --png /tmp/overhead.png           # plot path (default: a temp dir)

**What is exact and what is assumed.** The *plan* half of the model is exact and is checked against
the optimizer (``tests/test_simulate_distributed.py``, gloo at W = 2, 4, 8): which strategy each
parameter gets, the owner of every matrix (longest-processing-time (LPT) assignment on the NS flop
count, re-implemented here), each rank's NS flops, and each rank's bytes per collective kind equal
``Muon.comm_stats`` to the byte. The *time* half is a model with stated assumptions:

* NS time = rank's NS flops (the optimizer's count, 5 steps of :math:`4s^2l + 2s^3`) / ``--ns-tflops``.
  Default 790 TF/s: the measured cuBLAS bf16 GEMM rate on H100 SXM (789–798 TF/s at 4096³/8192³,
  80% of the 989.4 TF/s dense peak). **An assumption** until a GPU measures fastortho's NS kernels.
* Elementwise work (momentum, update; AdamW's step) is memory-bound at 90% of 3.35 TB/s HBM:
  Muon 24 B/element of the local shard (g fp32 read, momentum fp32 read+write, bf16 NS input write,
  bf16 NS output read, fp32 parameter read+write), AdamW 28 B/element (g, p, m, v in fp32).
* Links: NVLink 450 GB/s per direction per GPU inside a node of 8 (H100 SXM), InfiniBand 50 GB/s per
  GPU across nodes (NDR400), both × ``--link-eff`` 0.8; latency 2 µs (NVLink) / 5 µs (IB) per ring
  hop, plus 1 µs per peer for an all-to-all. A rank's bytes to peers in its node go over NVLink, the
  rest over IB, concurrently; a ring all-gather that leaves the node runs at the IB rate. Mesh
  ``(replicate, shard, tp)`` is row-major (tp innermost, consecutive ranks share a node); the experts
  mesh is ``(replicate, fsdp-in-EP, EP)``, EP innermost (torchtitan's order).
* Collectives finish when their slowest rank does: a2a step = forward exchange + the busiest rank's
  NS + backward exchange (what the engine does now; ``t_opt``), and ``t_ovl`` = elementwise +
  max(NS, communication), the bound with communication hidden behind NS.
* Forward+backward = 6 · (parameters a token touches) · ``--tokens-per-gpu`` / (``--mfu`` · 989.4 TF/s).
  The framework's own gradient and parameter traffic is the same under Muon and AdamW and is assumed
  hidden behind compute in both, so it cancels in the overhead.

**Overhead** = (Muon optimizer step − AdamW optimizer step) / (forward+backward + AdamW step): the
extra time of a training step, the quantity Moonlight (1–3%) and DMuon (−3.5…+8% of AdamW) report.

**Strategies** (``*`` = not what the optimizer does today; a plan to compare against):

* ``a2a``: one owner per matrix (LPT over the shard group), shards there and back in two
  ``all_to_all_single``; ``owner``: DDP, owners all-gather their results; ``gather``: every rank
  all-gathers and orthogonalizes every matrix; ``local``: whole matrices (replicated, or experts on
  the stack dim) orthogonalized where they are, no bytes.
* ``owner-fsdp*``: DMuon's owner inside FSDP2's collectives (reduce to the owner instead of
  reduce-scatter, broadcast instead of all-gather): LPT owners over the shard group, no optimizer bytes.
* ``a2a*`` under FSDP×TP: a2a over the sharding group where the engine today falls back to
  ``gather`` (two sharded mesh dims).
"""
from __future__ import annotations

import argparse
import heapq
import math
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_presets import PRESETS, MuonParam, Preset, preset  # noqa: E402

__all__ = ["Group", "Task", "Hardware", "Layout", "lpt", "ns_flops", "shard_extents", "rank_prediction",
           "simulate", "build_tasks", "LAYOUTS"]

PEAK_BF16_TFLOPS = 989.4  # H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet)


# ------------------------------------------------------------------------------------------------
# the plan: exact, mirrors fastortho.optim.distributed (re-implemented so the test is a cross-check)
# ------------------------------------------------------------------------------------------------
def ns_flops(bsz: int, m: int, n: int, steps: int = 5) -> int:
    """Flops the optimizer counts for ``steps`` quintic NS steps on ``bsz`` m×n matrices (s short, l long
    side): per step XXᵀ (2s²l), A² (2s³), BX (2s²l)."""
    s, l = min(m, n), max(m, n)
    return bsz * steps * (4 * s * s * l + 2 * s ** 3)


def shard_extents(size: int, world: int) -> list[tuple[int, int]]:
    """torch's chunking (``Shard``, FSDP2): ⌈size/W⌉ per rank, trailing ranks short or empty."""
    c = -(-size // world) if size else 0
    return [(min(r * c, size), max(0, min(c, size - min(r * c, size)))) for r in range(world)]


def lpt(costs: list[int], world: int, loads: list[int] | None = None) -> list[int]:
    """LPT: costs in decreasing order (ties: lower index first), each to the least-loaded rank (ties: lower
    rank), starting from ``loads`` (default zeros). A heap of (load, rank) pops exactly that rank."""
    owners = [0] * len(costs)
    heap = [(int(loads[r]) if loads is not None else 0, r) for r in range(world)]
    heapq.heapify(heap)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


class Group(NamedTuple):
    """A process group along one mesh dim: ``size`` ranks ``stride`` apart on the global rank line
    (row-major mesh), so global rank g is group rank ``(g // stride) % size``."""

    size: int
    stride: int = 1
    name: str = ""

    def rank_of(self, g):
        return (g // self.stride) % self.size

    def members(self, g: int) -> list[int]:
        """Global ranks of the instance of this group that holds global rank ``g``, in group-rank order."""
        base = g - self.stride * self.rank_of(g)
        return [base + self.stride * i for i in range(self.size)]

    def same(self, a: int, b: int) -> bool:
        """Whether global ranks ``a`` and ``b`` are in the same instance of this group."""
        span = self.stride * self.size
        return a % self.stride == b % self.stride and a // span == b // span


@dataclass(frozen=True)
class Task:
    """One Muon parameter as the engine plans it (global NS shape ``(B, m, n)``)."""

    shape: tuple[int, int, int]
    strategy: str  # "local" | "owner" | "a2a" | "gather" | "owner-fsdp*"
    group: Group | None = None  # owner / a2a / owner-fsdp*: the exchange (and LPT) group
    axis: int = 1  # a2a: 1 = rows, 2 = columns sharded
    stack: tuple[Group, ...] = ()  # local: groups that chunk the stack dim B (mesh-dim order)
    gather: tuple[Group, ...] = ()  # gather: the sharded mesh dims
    flags: tuple[Group, ...] = ()  # groups of the Σu² (non-finite flag) all-reduce (sharded strategies)
    name: str = ""

    @property
    def numel(self) -> int:
        b, m, n = self.shape
        return b * m * n

    def piece(self, r: int) -> int:
        """Elements of group rank ``r``'s shard (a2a)."""
        b, m, n = self.shape
        ext = shard_extents(m if self.axis == 1 else n, self.group.size)[r][1]
        return b * (n if self.axis == 1 else m) * ext

    def pieces(self) -> np.ndarray:
        """Elements of every group rank's shard (a2a), as an array over group ranks."""
        b, m, n = self.shape
        ext = np.array([e for _, e in shard_extents(m if self.axis == 1 else n, self.group.size)], np.float64)
        return b * (n if self.axis == 1 else m) * ext

    def local_batches(self, world: int) -> np.ndarray:
        """:meth:`local_batch` of every global rank ``0..world-1``."""
        g = np.arange(world)
        b = np.full(world, self.shape[0])
        for grp in self.stack:
            c = -(-b // grp.size)
            start = np.minimum(grp.rank_of(g) * c, b)
            b = np.maximum(0, np.minimum(c, b - start))
        return b

    def local_batch(self, g: int) -> int:
        """Experts of a stack on global rank ``g`` (local): nested chunking over ``stack``."""
        b = self.shape[0]
        for grp in self.stack:
            b = shard_extents(b, grp.size)[grp.rank_of(g)][1]
        return b


def _owners(tasks: list[Task], steps: int, world: int) -> list[np.ndarray]:
    """Owner group-rank of every task, per global rank ``0..world-1`` (the owner in that rank's instance
    of the task's group; 0 where none): LPT per exchange group, over tasks in order, groups in order of
    first appearance, each instance starting from the loads that earlier groups containing the whole
    instance gave its members (as the engine's ``assign_owners``)."""
    by: dict[Group, list[int]] = {}
    for k, t in enumerate(tasks):
        if t.strategy in ("owner", "a2a", "owner-fsdp*"):
            by.setdefault(t.group, []).append(k)
    owners = [np.zeros(world, np.int64) for _ in tasks]
    done: list[tuple[Group, np.ndarray]] = []  # (group, load added per global rank)
    for g, ks in by.items():
        costs = [ns_flops(*tasks[k].shape, steps) for k in ks]
        added = np.zeros(world, np.int64)
        for base in range(world):
            if g.rank_of(base):
                continue
            mem = g.members(base)
            start = [sum(int(ld[m]) for h, ld in done if all(h.same(mem[0], x) for x in mem)) for m in mem]
            for k, c, o in zip(ks, costs, lpt(costs, g.size, start)):
                owners[k][mem] = o
                added[mem[o]] += c
        done.append((g, added))
    return owners


def rank_prediction(tasks: list[Task], rank: int, *, nbytes: int = 2, steps: int = 5,
                    flags: bool = True) -> dict:
    """What ``Muon.comm_stats`` reports on global ``rank`` after a step with these tasks (one optimizer
    param group, all with gradients): ``bytes`` per kind, ``ns_flops``, ``owners`` (group ranks, task
    order, 0 for local/gather as in the engine). ``nbytes``: the NS dtype's element size."""
    span = max([1] + [g.size * g.stride for t in tasks for g in (t.group, *t.stack, *t.gather, *t.flags) if g])
    world = span * (rank // span + 1)
    owners = _owners(tasks, steps, world)
    by: dict[str, int] = {}
    fl = 0

    def add(kind, v):
        by[kind] = by.get(kind, 0) + v

    flag_sets: dict[tuple, int] = {}
    for t, o in zip(tasks, owners):
        cost = ns_flops(*t.shape, steps)
        if t.strategy == "local":
            fl += ns_flops(t.local_batch(rank), t.shape[1], t.shape[2], steps)
        elif t.strategy == "gather":
            fl += cost
            W = math.prod(g.size for g in t.gather)
            add("gather", t.numel * nbytes * (W - 1) // W)
        else:
            me, o = t.group.rank_of(rank), int(o[rank])
            if o == me:
                fl += cost
            if t.strategy == "a2a":
                add("a2a", (t.numel - t.piece(me)) * nbytes if o == me else t.piece(me) * nbytes)
            elif t.strategy == "owner":
                add("owner", t.numel * nbytes * (t.group.size - 1) if o == me else 0)
        if t.flags:
            flag_sets[t.flags] = flag_sets.get(t.flags, 0) + 1
    if flags:
        for groups, n in flag_sets.items():
            for g in groups:
                add("flags", 8 * n * 2 * (g.size - 1) // g.size)  # one float64 Σu² per parameter
    return dict(bytes=by, ns_flops=fl, owners=[int(o[rank]) for o in owners])


# ------------------------------------------------------------------------------------------------
# layouts: which tasks a preset becomes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """``replicate`` × ``fsdp`` × ``tp`` = world for dense parameters (HSDP when replicate > 1, DDP when
    fsdp = tp = 1); experts: ``ep`` ranks hold whole experts (Shard(0) on the stack dim) and the
    world/(replicate·ep) ranks of ``expert_fsdp`` shard them further, on the stack dim
    (``expert_dim=0``, whole experts: local) or on a matrix dim (``expert_dim=1``)."""

    name: str
    replicate: int = 1
    fsdp: int = 1
    tp: int = 1
    ep: int = 1
    expert_dim: int = 1
    expert_replicate: bool = False  # experts replicated over the non-EP ranks (EP × DDP)

    @property
    def world(self) -> int:
        return self.replicate * self.fsdp * self.tp


def build_tasks(p: Preset, lay: Layout, strategy: str) -> list[Task] | None:
    """The engine's tasks for ``p`` under ``lay`` with ``strategy`` for the dense matrices (None if that
    strategy does not apply). Expert stacks get what the layout implies (see :class:`Layout`), with
    ``a2a*`` meaning: a2a where the engine today would gather (EP×FSDP experts: the engine's a2a over the
    FSDP-in-EP dim on each rank's own experts)."""
    strategy, _, expert_s = strategy.partition("+experts:")
    R, F, T = lay.replicate, lay.fsdp, lay.tp
    g_rep, g_f, g_t = Group(R, F * T, "replicate"), Group(F, T, "fsdp"), Group(T, 1, "tp")
    out: list[Task] = []
    for i in range(max(q.count for q in p.muon)):
        for q in p.muon:
            if i >= q.count:
                continue
            b, m, n = (1, *q.shape) if len(q.shape) == 2 else q.shape
            if q.expert:
                t = _expert_task(q, (b, m, n), lay, expert_s or "auto")
                if t is None:
                    return None
                out.append(t)
                continue
            sh = (b, m, n)
            if strategy in ("local",):
                if F * T > 1:
                    return None  # sharded matrices cannot be orthogonalized in place
                t = Task(sh, "local", name=q.name)
            elif strategy == "owner":
                if F * T > 1:
                    return None
                t = Task(sh, "owner", group=g_rep, name=q.name)
            elif strategy in ("a2a", "owner-fsdp*"):
                if T > 1 and F > 1:
                    return None  # two sharded dims: see a2a*
                g = g_t if T > 1 else g_f
                if g.size == 1:
                    return None
                # Colwise (Shard(0)) for projections into the wide dim, Rowwise (Shard(1)) out of it
                axis = 2 if (T > 1 and q.name.endswith(("o", "down", "proj"))) else 1
                t = Task(sh, strategy, group=g, axis=axis, flags=(g,) if strategy == "a2a" else (),
                         name=q.name)
            elif strategy == "a2a*":
                if not (T > 1 and F > 1):
                    return None
                t = Task(sh, "a2a", group=Group(F * T, 1, "fsdp*tp"), axis=1,
                         flags=(g_f, g_t), name=q.name)
            elif strategy == "gather":
                shard = tuple(g for g in (g_f, g_t) if g.size > 1)
                if not shard:
                    return None
                t = Task(sh, "gather", gather=shard, flags=shard, name=q.name)
            else:
                raise ValueError(f"unknown strategy {strategy!r}")
            out.append(t)
    return out


def _expert_task(q: MuonParam, sh, lay: Layout, strategy: str) -> Task | None:
    R, W, E = lay.replicate, lay.world, lay.ep
    if E <= 1:  # experts follow the dense layout: FSDP2's Shard(0) is the stack dim: whole experts
        if lay.fsdp * lay.tp > 1:
            g = Group(lay.fsdp * lay.tp, 1, "fsdp")
            return Task(sh, "local", stack=(g,), flags=(g,), name=q.name)
        return Task(sh, "local", name=q.name)
    if (W // R) % E:
        raise ValueError(f"--ep {E} must divide the non-replicated world {W // R}")
    Fe = W // (R * E)
    g_ep, g_fe = Group(E, 1, "ep"), Group(Fe, E, "fsdp_in_ep")
    if lay.expert_replicate or Fe == 1:
        return Task(sh, "local", stack=(g_ep,), flags=(g_ep,), name=q.name)
    if lay.expert_dim == 0:
        return Task(sh, "local", stack=(g_fe, g_ep), flags=(g_fe, g_ep), name=q.name)
    # (Shard(0) on EP, Shard(1) on the FSDP-in-EP dim): the local stack of ⌈B/E⌉ experts is a matrix
    # sharded over Fe: the engine runs a2a over Fe on it (auto), or gathers over E·Fe ranks (forced)
    b_local = -(-sh[0] // E)
    if strategy in ("auto", "a2a", "a2a*", "owner-fsdp*"):
        return Task((b_local, sh[1], sh[2]), "owner-fsdp*" if strategy == "owner-fsdp*" else "a2a",
                    group=g_fe, axis=1, flags=(g_ep, g_fe), name=q.name)
    if strategy == "gather":
        return Task(sh, "gather", gather=(g_ep, g_fe), flags=(g_ep, g_fe), name=q.name)
    raise ValueError(f"unknown expert strategy {strategy!r}")


# ------------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    ns_tflops: float = 790.0  # assumed NS rate on H100 SXM (cuBLAS bf16 GEMM, 80% of peak)
    peak_tflops: float = PEAK_BF16_TFLOPS
    hbm_tbs: float = 3.35
    hbm_eff: float = 0.9
    nvlink_gbs: float = 450.0  # per direction per GPU, H100 SXM
    ib_gbs: float = 50.0  # per GPU, NDR400
    link_eff: float = 0.8
    lat_nvlink_us: float = 2.0
    lat_ib_us: float = 5.0
    lat_peer_us: float = 1.0
    gpus_per_node: int = 8
    nbytes: int = 2  # NS dtype (bf16)
    steps: int = 5
    muon_elem_bytes: int = 24
    adamw_elem_bytes: int = 28


def _peers(g: Group, node: int) -> tuple[int, int]:
    """(peers in the node, peers outside) of a rank in group ``g``."""
    same = 1 if g.stride >= node else min(g.size, max(1, node // g.stride))
    return same - 1, g.size - same


def _p2p_time(nbytes: np.ndarray, g: Group, hw: Hardware) -> float:
    """Seconds for an all-to-all-like exchange where each rank sends ``nbytes`` spread over its peers."""
    if g.size <= 1:
        return 0.0
    intra, inter = _peers(g, hw.gpus_per_node)
    b = float(np.max(nbytes))
    t = max(b * intra / (g.size - 1) / (hw.nvlink_gbs * hw.link_eff * 1e9),
            b * inter / (g.size - 1) / (hw.ib_gbs * hw.link_eff * 1e9))
    lat = (hw.lat_ib_us if inter else hw.lat_nvlink_us) + (g.size - 1) * hw.lat_peer_us
    return t + lat * 1e-6


def _ring_time(nbytes: float, g: Group, hw: Hardware) -> float:
    if g.size <= 1:
        return 0.0
    intra, inter = _peers(g, hw.gpus_per_node)
    bw = (hw.ib_gbs if inter else hw.nvlink_gbs) * hw.link_eff * 1e9
    return nbytes / bw + (g.size - 1) * (hw.lat_ib_us if inter else hw.lat_nvlink_us) * 1e-6


def _tree_time(g: Group, hw: Hardware) -> float:
    intra, inter = _peers(g, hw.gpus_per_node)
    return 2 * math.ceil(math.log2(max(g.size, 2))) * (hw.lat_ib_us if inter else hw.lat_nvlink_us) * 1e-6


@dataclass
class Result:
    model: str
    layout: str
    world: int
    strategy: str
    bytes_per_rank: float  # max over ranks, optimizer collectives only
    bytes_per_param: float  # mean over ranks / Muon parameters
    ns_flops_max: float
    ns_flops_mean: float
    t_ns: float
    t_comm: float
    t_elem: float
    t_opt: float
    t_ovl: float
    t_adamw: float
    t_fb: float
    extra: dict = field(default_factory=dict)

    @property
    def imbalance(self) -> float:
        return self.ns_flops_max / self.ns_flops_mean if self.ns_flops_mean else 1.0

    @property
    def overhead(self) -> float:
        return (self.t_opt - self.t_adamw) / (self.t_fb + self.t_adamw)

    @property
    def overhead_ovl(self) -> float:
        return (self.t_ovl - self.t_adamw) / (self.t_fb + self.t_adamw)


def simulate(p: Preset, lay: Layout, strategy: str, hw: Hardware = Hardware(), *,
             tokens_per_gpu: int = 16384, mfu: float = 0.4) -> Result | None:
    """Predicted optimizer step of ``p`` under ``lay`` with ``strategy`` (None if it does not apply)."""
    tasks = build_tasks(p, lay, strategy)
    if tasks is None:
        return None
    W, steps, nb = lay.world, hw.steps, hw.nbytes
    g_all = np.arange(W)
    owners = _owners(tasks, steps, W)
    flops = np.zeros(W)
    fwd: dict[Group, np.ndarray] = {}
    bwd: dict[Group, np.ndarray] = {}
    own_b: dict[Group, np.ndarray] = {}
    gather_t, n_gather_bytes = 0.0, np.zeros(W)
    flag_sets: dict[tuple, int] = {}
    for t, o in zip(tasks, owners):
        cost = ns_flops(*t.shape, steps)
        if t.strategy == "local":
            if t.stack:
                bs = t.local_batches(W)
                flops += bs * (cost // t.shape[0])
            else:
                flops += cost
        elif t.strategy == "gather":
            flops += cost
            Wg = math.prod(g.size for g in t.gather)
            b = t.numel * nb * (Wg - 1) // Wg
            n_gather_bytes += b
            # DTensor gathers one mesh dim at a time, innermost first; each stage moves its share
            have = t.numel * nb / Wg
            for g in reversed(t.gather):
                gather_t += _ring_time(have * (g.size - 1), g, hw)
                have *= g.size
        else:
            g = t.group
            gr = g.rank_of(g_all)
            flops += np.where(gr == o, cost, 0)
            if t.strategy == "a2a":
                pieces = t.pieces()
                pr = pieces[gr]
                fwd.setdefault(g, np.zeros(W))
                bwd.setdefault(g, np.zeros(W))
                fwd[g] += np.where(gr == o, 0, pr) * nb
                bwd[g] += np.where(gr == o, t.numel - pr, 0) * nb
            elif t.strategy == "owner":
                own_b.setdefault(g, np.zeros(W))
                own_b[g] += np.where(gr == o, t.numel * nb * (g.size - 1), 0)
        if t.flags:
            flag_sets[t.flags] = flag_sets.get(t.flags, 0) + 1
    t_comm = gather_t
    total_bytes = n_gather_bytes.copy()
    for g in fwd:
        t_comm += _p2p_time(fwd[g], g, hw) + _p2p_time(bwd[g], g, hw)
        total_bytes += fwd[g] + bwd[g]
    for g, v in own_b.items():
        t_comm += _p2p_time(v, g, hw)
        total_bytes += v
    for groups in flag_sets:
        for g in groups:
            t_comm += _tree_time(g, hw)
    t_ns = float(flops.max()) / (hw.ns_tflops * 1e12)
    # elementwise on the local shards
    hbm = hw.hbm_tbs * hw.hbm_eff * 1e12
    local_muon = sum(_local_numel(q, lay) * q.count for q in p.muon)
    local_adamw = p.adamw_numel / max(1, lay.fsdp * lay.tp)
    t_adamw_small = local_adamw * hw.adamw_elem_bytes / hbm
    t_elem = local_muon * hw.muon_elem_bytes / hbm + t_adamw_small
    t_opt = t_elem + t_comm + t_ns
    t_ovl = t_elem + max(t_comm, t_ns)
    t_adamw = (local_muon + local_adamw) * hw.adamw_elem_bytes / hbm
    t_fb = 6.0 * p.active_per_token * tokens_per_gpu / (mfu * hw.peak_tflops * 1e12)
    return Result(p.name, lay.name, W, strategy, float(total_bytes.max()),
                  float(total_bytes.mean()) / p.muon_numel, float(flops.max()), float(flops.mean()),
                  t_ns, t_comm, t_elem, t_opt, t_ovl, t_adamw, t_fb)


def _local_numel(q: MuonParam, lay: Layout) -> float:
    if q.expert and lay.ep > 1:
        deg = lay.ep if lay.expert_replicate else lay.world // lay.replicate
    else:
        deg = lay.fsdp * lay.tp
    return q.numel / max(1, deg)


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
def LAYOUTS(p: Preset, W: int, node: int = 8) -> list[tuple[Layout, list[str]]]:
    """The layouts compared for ``p`` at world ``W``, each with its strategies (auto first)."""
    out: list[tuple[Layout, list[str]]] = [(Layout("fsdp", fsdp=W), ["a2a", "gather", "owner-fsdp*"])]
    if W > node:
        out.append((Layout(f"hsdp {W // node}x{node}", replicate=W // node, fsdp=node), ["a2a"]))
        out.append((Layout(f"fsdp{W // node}+tp{node}", fsdp=W // node, tp=node), ["gather", "a2a*"]))
    out.append((Layout("ddp", replicate=W), ["owner", "local"]))
    if p.n_experts:
        E = min(W, 64)
        out = [(lay, s) for lay, s in out if lay.name == "fsdp" or lay.name.startswith("hsdp")]
        if W > E:
            out.append((Layout(f"ep{E}+fsdp{W // E}", fsdp=W, ep=E, expert_dim=1),
                        ["a2a+experts:a2a", "a2a+experts:gather", "owner-fsdp*+experts:owner-fsdp*"]))
        out.append((Layout(f"ep{E}, experts replicated x{W // E}", fsdp=W, ep=E, expert_replicate=True),
                    ["a2a"]))
    return out


def table(models: list[str], worlds: list[int], hw: Hardware, tokens: int, mfu: float,
          only: Layout | None = None) -> list[Result]:
    rows = []
    for name in models:
        p = preset(name)
        for W in worlds:
            every = ["a2a", "gather", "owner", "local", "owner-fsdp*", "a2a*"]
            layouts = [(only, every)] if only else LAYOUTS(p, W)
            for lay, strategies in layouts:
                for s in strategies:
                    r = simulate(p, lay, s, hw, tokens_per_gpu=tokens, mfu=mfu)
                    if r is not None:
                        rows.append(r)
    return rows


def _fmt_rows(rows: list[Result]) -> str:
    head = ("| model | W | layout | strategy | GB/rank | B/param | NS TF/rank | LPT max/mean | NS ms | "
            "comm ms | elem ms | Muon step ms | overlapped ms | AdamW ms | ×AdamW | fwd+bwd s | "
            "overhead % | overlapped % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.world} | {r.layout} | {r.strategy} | {r.bytes_per_rank / 1e9:.3g} | "
            f"{r.bytes_per_param:.3g} | {r.ns_flops_max / 1e12:.4g} | {r.imbalance:.3f} | "
            f"{r.t_ns * 1e3:.4g} | "
            f"{r.t_comm * 1e3:.4g} | {r.t_elem * 1e3:.3g} | {r.t_opt * 1e3:.4g} | {r.t_ovl * 1e3:.4g} | "
            f"{r.t_adamw * 1e3:.3g} | {r.t_opt / r.t_adamw:.3g} | {r.t_fb:.3g} | {100 * r.overhead:.3g} | "
            f"{100 * r.overhead_ovl:.3g} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# plot: matplotlib when installed, else a plain PNG (lines on log axes, no text) written with zlib
# ------------------------------------------------------------------------------------------------
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def plot(series: dict[str, list[tuple[int, float]]], path: str) -> str:
    """Overhead (%) vs world size, one line per series; returns a one-line description."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plain_png(series, path)
        return ("matplotlib missing: plain PNG (x: log2 world 8..1024, y: log10 overhead % 0.01..100, "
                "grey line at 3%; colours in legend order: " + ", ".join(series) + ")")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        ax.plot([w for w, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.axhline(3, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("Muon overhead, % of an AdamW training step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return "matplotlib plot"


def _plain_png(series, path, w=640, h=400):
    img = np.full((h, w, 3), 255, np.uint8)
    x0, x1, y0, y1 = 40, w - 20, h - 30, 20

    def xy(world, v):
        fx = (math.log2(world) - 3) / 7
        fy = (math.log10(min(max(v, 1e-2), 1e2)) + 2) / 4
        return int(x0 + fx * (x1 - x0)), int(y0 - fy * (y0 - y1))

    img[y1:y0, x0] = 0
    img[y0, x0:x1] = 0
    for dec in range(-2, 3):
        _, yy = xy(8, 10.0 ** dec)
        img[yy, x0:x1] = 220
    _, y3 = xy(8, 3.0)
    img[y3, x0:x1] = 128
    for k, (_, pts) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        ps = [xy(wd, v) for wd, v in pts]
        for (ax_, ay), (bx, by) in zip(ps, ps[1:]):
            n = max(abs(bx - ax_), abs(by - ay), 1)
            for i in range(n + 1):
                x, y = ax_ + (bx - ax_) * i // n, ay + (by - ay) * i // n
                img[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = c
        for x, y in ps:
            img[max(0, y - 3):y + 4, max(0, x - 3):x + 4] = c
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag, data):
        return (len(data).to_bytes(4, "big") + tag + data
                + (zlib.crc32(tag + data) & 0xFFFFFFFF).to_bytes(4, "big"))

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


# ------------------------------------------------------------------------------------------------
HW_FLAGS = ("ns_tflops", "nvlink_gbs", "ib_gbs", "link_eff", "lat_nvlink_us", "lat_ib_us", "lat_peer_us",
            "hbm_tbs", "gpus_per_node", "nbytes")


HW_HELP = dict(ns_tflops="Newton–Schulz rate per GPU, TF/s", nvlink_gbs="NVLink GB/s per direction per GPU",
               ib_gbs="InfiniBand GB/s per GPU", link_eff="efficiency factor of both links",
               lat_nvlink_us="NVLink latency, µs", lat_ib_us="InfiniBand latency, µs",
               lat_peer_us="per-peer latency of an all-to-all, µs", hbm_tbs="HBM TB/s",
               gpus_per_node="GPUs per node (NVLink domain)", nbytes="bytes per element of the NS dtype")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PRESETS), help="one model (default: all)")
    ap.add_argument("--world", type=int, help="world size, 8..1024 (default: 8, 64, 256, 1024)")
    ap.add_argument("--layout", help="a custom layout name; with --fsdp/--replicate/--tp/--ep")
    ap.add_argument("--replicate", type=int, default=1, help="--layout: HSDP replicas (data-parallel copies)")
    ap.add_argument("--fsdp", type=int, default=1, help="--layout: FSDP shard group size")
    ap.add_argument("--tp", type=int, default=1, help="--layout: tensor-parallel group size")
    ap.add_argument("--ep", type=int, default=1, help="--layout: expert-parallel group size (MoE)")
    ap.add_argument("--tokens-per-gpu", type=int, default=16384, help="tokens per GPU per optimizer step")
    ap.add_argument("--mfu", type=float, default=0.4, help="model flops utilization of forward+backward")
    hwd = Hardware()
    for f in HW_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=type(getattr(hwd, f)), default=getattr(hwd, f),
                        help=f"hardware: {HW_HELP[f]} (default: {getattr(hwd, f)})")
    ap.add_argument("--png", help="plot path (default: overhead.png in a new temp dir)")
    ap.add_argument("--no-png", action="store_true", help="do not draw the plot")
    a = ap.parse_args(argv)
    hw = Hardware(**{f: getattr(a, f) for f in HW_FLAGS})
    if a.world is not None and not 1 <= a.world <= 1 << 16:
        ap.error(f"--world must be in 1..65536, got {a.world}")
    models = [a.model] if a.model else sorted(PRESETS, key=lambda n: preset(n).total)
    worlds = [a.world] if a.world else [8, 64, 256, 1024]
    only = None
    if a.layout:
        only = Layout(a.layout, replicate=a.replicate, fsdp=a.fsdp, tp=a.tp, ep=a.ep)
        if a.world and only.world != a.world:
            ap.error(f"--replicate·--fsdp·--tp = {only.world} must equal --world {a.world}")
        worlds = [only.world]
    print(f"# assumptions: NS {hw.ns_tflops:g} TF/s/GPU (assumed: H100 SXM cuBLAS bf16 GEMM, not yet "
          f"measured for fastortho), NVLink {hw.nvlink_gbs:g} GB/s, IB {hw.ib_gbs:g} GB/s per GPU "
          f"(×{hw.link_eff:g}), "
          f"HBM {hw.hbm_tbs:g} TB/s ×{hw.hbm_eff:g}, {a.tokens_per_gpu} tokens/GPU/step, MFU {a.mfu:g}, "
          f"NS dtype {hw.nbytes} B, {hw.gpus_per_node} GPUs/node")
    rows = table(models, worlds, hw, a.tokens_per_gpu, a.mfu, only)
    print(_fmt_rows(rows))
    if a.no_png:
        return
    path = a.png or os.path.join(tempfile.mkdtemp(prefix="fastortho_sim_"), "overhead.png")
    pw = [8, 16, 32, 64, 128, 256, 512, 1024]
    series: dict[str, list[tuple[int, float]]] = {}
    for name in models:
        p = preset(name)
        for W in pw:
            cands = [simulate(p, lay, s, hw, tokens_per_gpu=a.tokens_per_gpu, mfu=a.mfu)
                     for lay, ss in LAYOUTS(p, W) for s in ss if not s.endswith("*")]
            cands = [c for c in cands if c is not None]
            best = min(cands, key=lambda r: r.t_opt)
            series.setdefault(f"{name} best", []).append((W, 100 * best.overhead))
    desc = plot(series, path)
    print(f"plot: {path} ({desc})")


if __name__ == "__main__":
    main()
