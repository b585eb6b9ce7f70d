"""Every collective the distributed Muon step runs: one :class:`AllToAll` for the three exchanges
(shards of u to their owner, slices of O back, owner results to everyone), the DTensor gather and
scatter of the ``gather`` strategy, and the all-reduce of the per-shard sums of squares (the
non-finite flags and the Frobenius norms of the sharded matrices).

``all_to_all_single`` with exact split sizes is the only gloo collective that takes unequal sizes, so
nothing is ever padded (padding costs bytes and can flip Newton–Schulz's transpose decision).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["AllToAll", "nbytes", "gather_full", "scatter_local", "all_reduce_sum"]


def nbytes(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


class AllToAll:
    """One ``all_to_all_single`` over ``group`` (``world`` ranks, this one ``rank``) of flat ``dtype`` pieces.

    :meth:`send` queues tensors for a rank and :meth:`expect` announces how many elements a rank sends
    here, both in the order the receiver consumes them; :meth:`start` launches the collective
    asynchronously and returns the bytes this rank hands to it; after :meth:`wait`, :meth:`take`
    returns the next piece received from a rank, viewed as ``shape``.
    """

    def __init__(self, group: Any, world: int, rank: int, like: Tensor, dtype: torch.dtype) -> None:
        self.group, self.world, self.rank = group, world, rank
        self.like, self.dtype = like, dtype
        self.parts: list[list[Tensor]] = [[] for _ in range(world)]
        self.recv_sizes = [0] * world

    def send(self, r: int, t: Tensor) -> None:
        self.parts[r].append(t.reshape(-1))

    def expect(self, r: int, numel: int) -> None:
        self.recv_sizes[r] += numel

    def start(self) -> int:
        in_splits = [sum(x.numel() for x in parts) for parts in self.parts]
        flat = [x for parts in self.parts for x in parts]
        inp = torch.cat(flat) if flat else self.like.new_empty(0, dtype=self.dtype)
        self.out = inp.new_empty(sum(self.recv_sizes))
        self.work = dist.all_to_all_single(self.out, inp, self.recv_sizes, in_splits, group=self.group,
                                           async_op=True)
        return nbytes(inp.numel(), inp.dtype)

    def wait(self) -> None:
        self.work.wait()
        self.chunks = list(torch.split(self.out, self.recv_sizes))
        self.offs = [0] * self.world

    def take(self, r: int, shape: tuple[int, ...]) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        piece = self.chunks[r][self.offs[r]:self.offs[r] + numel].view(shape)
        self.offs[r] += numel
        return piece


def gather_full(u: Tensor, param: Tensor, mesh: Any, placements: Any) -> Tensor:
    """The full tensor of which ``u`` is this rank's shard, laid out as the DTensor ``param``
    (``DTensor.full_tensor``: an all-gather over each sharded mesh dim)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(u, mesh, placements, run_check=False, shape=param.shape,
                              stride=param.stride()).full_tensor()


def scatter_local(full: Tensor, mesh: Any, placements: Any) -> Tensor:
    """This rank's shard of ``full`` under ``placements`` (every rank holds ``full``: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local().contiguous()


def all_reduce_sum(x: Tensor, group: Any) -> int:
    """SUM all-reduce of ``x`` over ``group``, in place; returns the bytes a ring sends per rank."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    w = dist.get_world_size(group)
    return nbytes(x.numel(), x.dtype) * 2 * (w - 1) // w
