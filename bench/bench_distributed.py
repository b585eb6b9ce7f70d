"""Distributed Muon on CPU/gloo: bytes and time per optimizer step, per strategy, vs the ideal and vs
``torch.optim.Muon`` on the same DTensor (FSDP2-style Shard(0)) parameters.

Usage::

    python bench/bench_distributed.py                    # W = 2 and 4, a 2-layer transformer's matrices
    python bench/bench_distributed.py --overlap --world 4 --dim 384 --mats 16   # exposed communication
    python bench/bench_distributed.py --world 2 --dim 64 --layers 1 --reps 3   # CI-sized
    python bench/bench_distributed.py --csv bench/distributed.csv

Rows (one per world size and strategy):

* ``local``: plain tensors, no process group: every rank orthogonalizes everything (0 bytes).
* ``owner``: plain tensors, ``process_group=WORLD`` (DDP): LPT owners, results exchanged.
* ``a2a``: DTensor ``Shard(0)`` on a 1-D mesh (what ``fully_shard`` produces): shards to owners and back.
* ``gather``: the same DTensors with ``strategy="gather"``: every rank gathers and orthogonalizes all.
* ``torch.optim.Muon``: the same DTensors; DTensor inserts its own collectives inside Newton–Schulz.

Bytes are counted two ways: ``comm_stats`` (what fastortho handed to its collectives) and an
independent dispatch-mode counter that sees every collective op (c10d and DTensor's functional
collectives) with its tensors, converted to ring-equivalent bytes sent per rank: all-gather (W−1)·in,
all-reduce 2(W−1)/W·in, reduce-scatter (W−1)/W·in, all-to-all = the bytes sent to other ranks (exact
from the split sizes), broadcast (W−1)/W·in. ``ideal`` is the closed form per strategy for the element
size used; ``B/param`` is bytes per rank per step divided by the number of Muon matrix elements, mean
over ranks: ``B/param`` from the independent counter (everything), ``payload`` from ``comm_stats``
without ``flags`` (the per-parameter non-finite flags all-reduce of sharded strategies). Times are
the median over ``--reps`` steps of the slowest rank (CPU, 1 thread per rank,
gloo over loopback: the NS flops dominate, so this shows the load balance more than the network).

``--overlap``: ``--mats`` matrices d×d on FSDP2-style Shard(0) (``a2a``), fp32 NS, one step per rep in
five modes: ``one stage`` (``bucket_numel=inf``: every shard travels, then all NS, then every result
travels back), ``pipelined`` (``bucket_numel=d²``: one matrix per stage, stage s+1's exchange in
flight during stage s's NS), and ``comm only`` (one stage, the orthogonalizer replaced by a copy: the
exchange's own time). *Exposed communication* is ``comm_stats["wait_s"]`` (time blocked in
``work.wait()``) on the rank with the most NS time in that step (the critical path; other ranks
also wait for it, which is load imbalance, not communication); hidden = 1 − exposed(pipelined) /
exposed(one stage). ``--link-mbs B`` slows every all-to-all by (bytes this rank sends)/B MB/s, a
sleeping thread after the real collective (a link whose transfer does not use the CPU; loopback gloo
on an oversubscribed CPU otherwise measures scheduling more than communication).
"""
from __future__ import annotations

import argparse
import os
import pickle
import socket
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_string, write_csv  # noqa: E402


def _shapes(dim: int, layers: int) -> list[tuple[int, int]]:
    """A transformer block's matrices: q, k, v, o (d×d), MLP up (4d×d) and down (d×4d)."""
    return [s for _ in range(layers) for s in [(dim, dim)] * 4 + [(4 * dim, dim), (dim, 4 * dim)]]


def _counter_cls():
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    def group_size(args, kwargs, name_pos):
        from torch.distributed.distributed_c10d import _resolve_process_group

        name = args[name_pos] if len(args) > name_pos else None
        try:
            return _resolve_process_group(name).size()
        except Exception:
            return dist.get_world_size()

    class ByteCounter(CommDebugMode):
        """CommDebugMode that also adds up the bytes each collective sends from this rank."""

        def __enter__(self):
            self.bytes = 0.0
            self.ops: dict[str, int] = {}
            return super().__enter__()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not isinstance(func, torch._ops.HigherOrderOperator) and not any(t == DTensor for t in types):
                self._record(str(func._overloadpacket), args, kwargs or {})
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _record(self, name, args, kwargs):
            short = name.split(".")[-1]
            nb = None
            if name.startswith("_c10d_functional.") or name.startswith("c10d_functional."):
                x = args[0]
                if short in ("all_gather_into_tensor", "all_gather_into_tensor_out"):
                    W = args[1]
                    nb = (W - 1) * x.numel() * x.element_size()
                elif short in ("all_reduce", "all_reduce_"):
                    W = group_size(args, kwargs, 2)
                    nb = 2 * (W - 1) / W * x.numel() * x.element_size()
                elif short == "reduce_scatter_tensor":
                    W = args[2]
                    nb = (W - 1) / W * x.numel() * x.element_size()
                elif short == "all_to_all_single":
                    W = group_size(args, kwargs, 3)
                    nb = (W - 1) / W * x.numel() * x.element_size()
                elif short == "broadcast":
                    W = group_size(args, kwargs, 2)
                    nb = (W - 1) / W * x.numel() * x.element_size()
            elif name.startswith("c10d.") and short == "alltoall_base_":
                out, inp, pg, osz, isz = args[:5]
                me, W = dist.get_rank(), dist.get_world_size()  # the bench's groups span the world
                nb = (inp.numel() - (isz[me] if isz else inp.numel() // W)) * inp.element_size()
            elif name.startswith("c10d.") and short in ("allreduce_",):
                ts, W = args[0], dist.get_world_size()
                nb = sum(2 * (W - 1) / W * t.numel() * t.element_size() for t in ts)
            if nb is not None:
                self.bytes += nb
                self.ops[short] = self.ops.get(short, 0) + 1

    return ByteCounter


def _run(rank: int, world: int, port: int, outfile: str, cfg: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastortho
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    shapes = _shapes(cfg["dim"], cfg["layers"])
    P = sum(m * n for m, n in shapes)
    ns_dtype = getattr(torch, cfg["ns_dtype"])
    esize = torch.empty((), dtype=ns_dtype).element_size()
    torch.manual_seed(0)
    full = [0.02 * torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    Counter = _counter_cls()
    rows = []
    W = world
    ideal = {"local": 0.0, "owner": esize * (W - 1) / W, "a2a": 2 * esize * (W - 1) / W**2,
             "gather": esize * (W - 1) / W, "torch.optim.Muon": float("nan")}
    for name in ("local", "owner", "a2a", "gather", "torch.optim.Muon"):
        dt = name in ("a2a", "gather", "torch.optim.Muon")
        if dt:
            ps = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)], src_data_rank=None))
                  for t in full]
            for p, g in zip(ps, grads):
                p.grad = distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None)
        else:
            ps = [nn.Parameter(t.clone()) for t in full]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        if name == "torch.optim.Muon":
            opt = torch.optim.Muon(ps, lr=0.02)  # bf16 NS always
        else:
            opt = fastortho.Muon(ps, lr=0.02, ns_dtype=ns_dtype,
                                 process_group=dist.group.WORLD if name == "owner" else None,
                                 strategy="gather" if name == "gather" else "auto")
        try:
            opt.step()  # warm-up (and the one-off plan check)
        except Exception as e:  # torch.optim.Muon on DTensors may not run at all
            rows.append(dict(strategy=name, error=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        with Counter() as c:
            opt.step()
        counted = opt.comm_stats.get("bytes", {}) if hasattr(opt, "comm_stats") else {}
        times = []
        for _ in range(cfg["reps"]):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        flops = opt.comm_stats.get("ns_flops", float("nan")) if hasattr(opt, "comm_stats") else float("nan")
        payload = sum(v for k, v in counted.items() if k != "flags")
        agg = torch.tensor([c.bytes, float(payload), sorted(times)[len(times) // 2],
                            float(flops) if flops == flops else 0.0, float(counted.get("flags", 0))],
                           dtype=torch.float64)
        mx = agg.clone()
        dist.all_reduce(agg)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        rows.append(dict(strategy=name, world=W, P=P, ns_dtype=cfg["ns_dtype"],
                         bytes_per_param=agg[0].item() / W / P, counted_per_param=agg[1].item() / W / P,
                         flags_per_param=agg[4].item() / W / P,
                         ideal_per_param=ideal[name], step_ms=mx[2].item() * 1e3,
                         flops_max_over_mean=(mx[3] / (agg[3] / W)).item() if agg[3] > 0 else float("nan"),
                         collectives=sum(c.ops.values()), ops=dict(c.ops)))
    if rank == 0:
        with open(outfile, "wb") as f:
            pickle.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


class _SlowWork:
    """An async collective that completes ``delay`` seconds after the real one: a link of finite
    bandwidth whose transfer, like a NIC's or NVLink's DMA, does not use the CPU (a sleeping thread)."""

    def __init__(self, work, delay: float) -> None:
        self.thread = threading.Thread(target=lambda: (work.wait(), time.sleep(delay)))
        self.thread.start()

    def wait(self) -> bool:
        self.thread.join()
        return True


_LINK = {"mbs": 0.0}  # 0: the link as is


def _slow_link() -> None:
    """Make ``dist.all_to_all_single`` take an extra (bytes this rank sends) / ``_LINK["mbs"]`` MB/s."""
    real = dist.all_to_all_single

    def slow(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        work = real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=True)
        if _LINK["mbs"]:
            me = dist.get_rank(group)
            own = input_split_sizes[me] if input_split_sizes else 0
            work = _SlowWork(work, (input.numel() - own) * input.element_size() / (_LINK["mbs"] * 1e6))
        return work if async_op else work.wait()

    dist.all_to_all_single = slow


def _run_overlap(rank: int, world: int, port: int, outfile: str, cfg: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _slow_link()
    import fastortho
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    d = cfg["dim"]
    torch.manual_seed(0)
    full = [0.02 * torch.randn(d, d) for _ in range(cfg["mats"])]
    rows = []
    slow = cfg["link_mbs"]
    modes = [("one stage", float("inf"), None, slow), ("pipelined", d * d, None, slow),
             ("one stage", float("inf"), None, 0.0), ("pipelined", d * d, None, 0.0),
             ("comm only", float("inf"), lambda x: x.clone(), slow)]
    for name, bucket, ortho, mbs in modes:
        _LINK["mbs"] = mbs
        ps = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)], src_data_rank=None)) for t in full]
        for p in ps:
            p.grad = distribute_tensor(torch.randn(d, d), mesh, [Shard(0)], src_data_rank=None)
        kw = dict(orthogonalizer=ortho) if ortho is not None else {}
        opt = fastortho.Muon(ps, lr=0.02, ns_dtype=torch.float32, **kw)
        opt._dist_engine.bucket_numel = bucket
        opt.step()  # warm-up and plan check
        per = []
        for _ in range(cfg["reps"]):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            st = opt.comm_stats
            v = torch.tensor([[dt, st["ns_s"], st["wait_s"]]], dtype=torch.float64)
            allv = [torch.empty_like(v) for _ in range(world)]
            dist.all_gather(allv, v)
            allv = torch.cat(allv)
            crit = int(allv[:, 1].argmax())
            per.append((allv[:, 0].max().item(), allv[crit, 1].item(), allv[crit, 2].item()))
        per.sort()
        step, ns, wait = per[len(per) // 2]
        rows.append(dict(mode=name, link_mbs=mbs, world=world, dim=d, mats=cfg["mats"], stages=opt.comm_stats["stages"],
                         bytes=opt.comm_stats["bytes"].get("a2a", 0), step_ms=step * 1e3, ns_ms=ns * 1e3,
                         wait_ms=wait * 1e3))
    if rank == 0:
        with open(outfile, "wb") as f:
            pickle.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def _spawn_rows(fn, world: int, cfg: dict, method: str) -> list[dict]:
    """Run ``fn(rank, world, port, path, cfg)`` on ``world`` gloo processes; rank 0 pickles its rows to path."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.pkl")
        mp.start_processes(fn, args=(world, _free_port(), path, cfg), nprocs=world, join=True, start_method=method)
        with open(path, "rb") as f:
            return pickle.load(f)


def _overlap_main(args, method: str, dev: str) -> list[dict]:
    cfg = dict(dim=args.dim, mats=args.mats, reps=args.reps, link_mbs=args.link_mbs)
    link = f"link slowed to {args.link_mbs:g} MB/s per rank" if args.link_mbs else "loopback link"
    print(f"# {dev} | gloo, {link} | overlap: {args.mats} matrices {args.dim}x{args.dim} on Shard(0), "
          f"fp32 NS, median of {args.reps} steps")
    print(f"{'W':>2} {'mode':<10} {'link MB/s':>9} {'stages':>6} {'a2a B/rank':>10} {'step ms':>8} {'NS ms':>8} "
          f"{'wait ms':>8}")
    out = []
    for W in args.world:
        rows = _spawn_rows(_run_overlap, W, cfg, method)
        for r in rows:
            link = f"{r['link_mbs']:g}" if r["link_mbs"] else "as is"
            print(f"{W:>2} {r['mode']:<10} {link:>9} {r['stages']:>6} {r['bytes']:>10} {r['step_ms']:8.1f} "
                  f"{r['ns_ms']:8.1f} {r['wait_ms']:8.1f}")
            r["device"] = dev
        # exposed communication: the critical rank's blocked time; the step-time difference (slowed
        # link minus link as is) is printed too, but on a loaded, oversubscribed CPU it is mostly noise
        one, pipe = rows[0]["step_ms"] - rows[2]["step_ms"], rows[1]["step_ms"] - rows[3]["step_ms"]
        print(f"# W={W}: exposed communication (critical rank's wait) {rows[0]['wait_ms']:.1f} ms one stage, "
              f"{rows[1]['wait_ms']:.1f} ms pipelined: {100 * (1 - rows[1]['wait_ms'] / rows[0]['wait_ms']):.0f}% "
              f"hidden; link as is: {rows[2]['wait_ms']:.1f} / {rows[3]['wait_ms']:.1f} ms. Step-time cost of the "
              f"slowed link: {one:.1f} ms one stage, {pipe:.1f} ms pipelined (noisy); comm-only step "
              f"{rows[4]['step_ms']:.1f} ms")
        out += rows
    if args.csv:
        write_csv(args.csv, out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4],
                    help="world sizes to spawn on gloo, one run each (default: 2 4)")
    ap.add_argument("--dim", type=int, default=128, help="model width d (matrices d×d, 4d×d, d×4d; --overlap: d×d)")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers of the benchmark model")
    ap.add_argument("--reps", type=int, default=5, help="timed optimizer steps per case (median reported)")
    ap.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="Newton–Schulz compute dtype (also the exchange dtype)")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    ap.add_argument("--overlap", action="store_true",
                    help="measure exposed communication with and without the pipelined exchange")
    ap.add_argument("--mats", type=int, default=16, help="--overlap: number of d×d matrices")
    ap.add_argument("--link-mbs", type=float, default=0.0,
                    help="--overlap: add (bytes sent)/(this many MB/s) to every all-to-all (0: as is)")
    args = ap.parse_args(argv)
    cfg = dict(dim=args.dim, layers=args.layers, reps=args.reps, ns_dtype=args.ns_dtype)
    import fastortho  # noqa: F401  (imported before fork: workers inherit it)
    import torch.distributed.tensor  # noqa: F401

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    dev = device_string("cpu")
    if args.overlap:
        return _overlap_main(args, method, dev)
    print(f"# {dev} | gloo | {len(_shapes(args.dim, args.layers))} matrices, d={args.dim}, "
          f"NS dtype {args.ns_dtype} (torch.optim.Muon: bf16)")
    print(f"{'W':>2} {'strategy':<17} {'B/param':>8} {'payload':>8} {'ideal':>7} {'flags':>7} {'colls':>6} "
          f"{'step ms':>8} {'NS max/mean':>11}")
    all_rows = []
    for W in args.world:
        rows = _spawn_rows(_run, W, cfg, method)
        for r in rows:
            if "error" in r:
                print(f"{W:>2} {r['strategy']:<17} error: {r['error']}")
                continue
            print(f"{W:>2} {r['strategy']:<17} {r['bytes_per_param']:8.3f} {r['counted_per_param']:8.3f} "
                  f"{r['ideal_per_param']:7.3f} {r['flags_per_param']:7.4f} {r['collectives']:6d} "
                  f"{r['step_ms']:8.1f} {r['flops_max_over_mean']:11.2f}")
            r["device"] = dev
            all_rows.append(r)
    if args.csv:
        write_csv(args.csv, [{k: v for k, v in r.items() if k != "ops"} for r in all_rows])
    return all_rows


if __name__ == "__main__":
    main()
