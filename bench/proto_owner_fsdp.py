"""Prototype: DMuon's owner inside FSDP2's collectives, against fastortho's ``a2a``, on CPU/gloo.

Both run one training step's communication and optimizer for the matrices of a transformer
(``bench_distributed._shapes``), starting from each rank's own full gradient (one micro-batch each):

* ``a2a`` (what fastortho does under FSDP2): ``reduce_scatter_tensor`` of every gradient (rows, as
  FSDP2's Shard(0)), ``fastortho.Muon`` on the DTensor shards (shards to the LPT owner, NS, slices
  back: two ``all_to_all_single``), ``all_gather_into_tensor`` of every parameter (FSDP2's next
  forward).
* ``owner`` (the prototype): ``reduce`` of every gradient to its LPT owner (same owners), the owner
  runs ``fastortho.Muon`` on its whole matrices (momentum lives only there), ``broadcast`` of every
  parameter from its owner. The optimizer itself sends nothing.

Bytes per rank per step, per element, two conventions: *handed* (what each rank gives the collective:
RS/AG/reduce/broadcast (W−1)/W·N, the a2a's exact pieces, as ``bench_distributed``'s counter) and
*bandwidth-optimal* (what the best known algorithms send: reduce = reduce-scatter + gather to the root,
so a non-root sends N and the root N(W−1)/W; broadcast = scatter + all-gather, the root sends
2N(W−1)/W and the others N(W−1)/W). Time: median over ``--reps`` of the slowest rank, both
variants alternated rep by rep. Parameters after the step are compared across the two (gloo sums in
different orders: not bit-identical).

    python bench/proto_owner_fsdp.py --world 4 --dim 256 --layers 2 --reps 7
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_distributed import _free_port, _shapes  # noqa: E402
from common import device_string  # noqa: E402


def _worker(rank: int, world: int, port: int, outfile: str, cfg: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastortho
    from fastortho.optim.distributed import lpt_owners, ns_flops
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

    W, me = world, rank
    mesh = init_device_mesh("cpu", (W,))
    shapes = _shapes(cfg["dim"], cfg["layers"])
    P = sum(m * n for m, n in shapes)
    torch.manual_seed(0)
    full = [0.02 * torch.randn(s) for s in shapes]
    g = torch.Generator().manual_seed(100 + rank)
    grads = [torch.randn(s, generator=g) for s in shapes]  # this rank's micro-batch gradient
    owners = lpt_owners([ns_flops(1, m, n) for m, n in shapes], W)
    kw = dict(lr=0.02, ns_dtype=torch.float32)

    # a2a: DTensor parameters (Shard(0)), the gradient reduce-scattered into them
    dps = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)], src_data_rank=None)) for t in full]
    opt_a = fastortho.Muon(dps, **kw)
    # owner: plain full parameters; each rank's optimizer holds only the matrices it owns
    pps = [nn.Parameter(t.clone()) for t in full]
    mine = [p for p, o in zip(pps, owners) if o == me]
    opt_o = fastortho.Muon(mine, **kw) if mine else None

    @torch.no_grad()
    def step_a2a():
        shards = [torch.empty(s[0] // W, s[1]) for s in shapes]
        works = [dist.reduce_scatter_tensor(o, x, async_op=True) for o, x in zip(shards, grads)]
        for w in works:
            w.wait()
        for p, s in zip(dps, shards):
            p.grad = DTensor.from_local(s, mesh, [Shard(0)], run_check=False)
        opt_a.step()
        outs = [torch.empty(s) for s in shapes]
        works = [dist.all_gather_into_tensor(o, p.to_local().detach(), async_op=True) for o, p in zip(outs, dps)]
        for w in works:
            w.wait()
        return outs

    @torch.no_grad()
    def step_owner():
        bufs = [x.clone() for x in grads]
        works = [dist.reduce(b, dst=o, async_op=True) for b, o in zip(bufs, owners)]
        for w in works:
            w.wait()
        for p, b, o in zip(pps, bufs, owners):
            p.grad = b if o == me else None
        if opt_o is not None:
            opt_o.step()
        works = [dist.broadcast(p.data, src=o, async_op=True) for p, o in zip(pps, owners)]
        for w in works:
            w.wait()
        return [p.detach() for p in pps]

    out_a, out_o = step_a2a(), step_owner()  # warm-up; the two must agree
    diff = max((a - b).abs().max().item() for a, b in zip(out_a, out_o))
    a2a_bytes = opt_a.comm_stats["bytes"].get("a2a", 0)
    times = {"a2a": [], "owner": []}
    for _ in range(cfg["reps"]):
        for name, fn in (("a2a", step_a2a), ("owner", step_owner)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name].append(t.item())
    # bytes per rank (fp32 gradients and parameters), both conventions
    e = 4
    N = [m * n for m, n in shapes]
    rs_ag = sum(2 * n * e * (W - 1) / W for n in N)
    handed = {"a2a": rs_ag + a2a_bytes, "owner": sum(2 * n * e * (W - 1) / W for n in N)}
    red = sum(n * e * ((W - 1) / W if o == me else 1.0) for n, o in zip(N, owners))
    bc = sum(n * e * (2 * (W - 1) / W if o == me else (W - 1) / W) for n, o in zip(N, owners))
    optimal = {"a2a": rs_ag + a2a_bytes, "owner": red + bc}
    v = torch.tensor([handed["a2a"], handed["owner"], optimal["a2a"], optimal["owner"], a2a_bytes, diff],
                     dtype=torch.float64)
    allv = [torch.empty_like(v) for _ in range(W)]
    dist.all_gather(allv, v)
    if rank == 0:
        allv = torch.stack(allv)
        med = {k: sorted(ts)[len(ts) // 2] for k, ts in times.items()}
        with open(outfile, "wb") as f:
            pickle.dump(dict(world=W, P=P, mean=(allv[:, :5].mean(0) / P).tolist(),
                             max=(allv[:, :5].max(0).values / P).tolist(), diff=allv[:, 5].max().item(),
                             step_ms={k: 1e3 * t for k, t in med.items()},
                             all_ms={k: [round(1e3 * t, 1) for t in ts] for k, ts in times.items()}), f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4, help="gloo processes")
    ap.add_argument("--dim", type=int, default=256, help="model width d (matrices d×d, 4d×d, d×4d)")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks")
    ap.add_argument("--reps", type=int, default=7, help="timed steps per variant (alternated)")
    args = ap.parse_args(argv)
    import fastortho  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.pkl")
        mp.start_processes(_worker, args=(args.world, _free_port(), out, vars(args)), nprocs=args.world,
                           join=True, start_method=method)
        with open(out, "rb") as f:
            r = pickle.load(f)
    print(f"# {device_string('cpu')} | gloo W={r['world']} | {len(_shapes(args.dim, args.layers))} matrices, "
          f"d={args.dim}, fp32 | median of {args.reps} alternated steps (slowest rank)")
    print("variant  B/param handed (mean/max)  B/param bw-optimal (mean/max)  of which optimizer  step ms")
    for i, k in enumerate(("a2a", "owner")):
        opt_b = r["mean"][4] if k == "a2a" else 0.0
        print(f"{k:<7}  {r['mean'][i]:8.3f} / {r['max'][i]:6.3f}        {r['mean'][2 + i]:8.3f} / "
              f"{r['max'][2 + i]:6.3f}            {opt_b:8.3f}        {r['step_ms'][k]:8.1f}")
    print(f"# all steps ms: {r['all_ms']}; max |a2a − owner| after one step: {r['diff']:.2e}")
    return r


if __name__ == "__main__":
    main()
