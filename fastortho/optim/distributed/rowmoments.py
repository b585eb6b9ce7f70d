r"""NorMuon in the distributed step, and the analytic bytes of a step.

NorMuon's row normalization (:func:`fastortho.optim.variants.normuon_`) needs the whole orthogonalized
matrix :math:`O` (its norm-preserving factor :math:`\|O\|_F/\|\hat O\|_F` is global), and every strategy
has the whole :math:`O` on the rank that orthogonalized it: the owner (``a2a``, ``owner``) or every rank
(``local``, ``gather``). That rank normalizes :math:`O` and updates the row moments :math:`v` there,
before the slices leave; the other ranks receive the normalized slices (in float32, the dtype
``normuon_`` returns, so the step is the single-process one) and the updated :math:`v`.

**Where v lives: replicated.** ``normuon_v`` is a plain ``(m,)`` (or ``(B, m)``) tensor on every rank,
as in one process (:func:`fastortho.optim.functional.init_state`), so each rank's state dict is the
single-process one. The owner sends it to the other ranks of the exchange group in the same
``all_to_all_single`` as the slices of :math:`O`: :math:`4m` bytes per matrix and rank (float32),
counted as ``comm_stats["bytes"]["normuon_v"]``, against :math:`2mn/W` for the slice.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastortho.optim import functional as F
from fastortho.optim.distributed.exchange import AllToAll, nbytes
from fastortho.optim.distributed.plan import Task
from fastortho.optim.variants import normuon_

__all__ = ["result_dtype", "normalize_results", "send_v", "take_v", "ideal_bytes"]


def result_dtype(t: Task, u: F.MatrixUnit) -> torch.dtype:
    """The dtype in which the task's result travels: the NS dtype, or NorMuon's (float64 when the input
    or the moment is float64, else float32)."""
    x = u.ns_input.dtype
    if t.v is None:
        return x
    return torch.float64 if torch.float64 in (x, t.v.dtype) else torch.float32


def normalize_results(items: list[tuple[Task, Tensor, Any]], results: dict[Any, Tensor]) -> None:
    """NorMuon on the whole results of this rank's NS (in place in ``results``; each task's ``v`` updated).
    A ``gather`` task's blocks (sinks ``(k, j)``) use rows ``split[:j]`` onward of its moment."""
    for t, _, sink in items:
        if t.v is None:
            continue
        v = t.v
        if isinstance(sink, tuple) and t.split:
            j = sink[1]
            v = v.narrow(1, sum(t.split[:j]), t.split[j])
        results[sink] = normuon_([results[sink]], [v], beta2=t.beta2)[0]


def send_v(ex: AllToAll, t: Task) -> int:
    """As the owner, queue ``t.v`` for every other rank of the group; returns the bytes queued."""
    if t.v is None:
        return 0
    for r in range(ex.world):
        if r != ex.rank:
            ex.send(r, t.v.to(ex.dtype))
    return nbytes(t.v.numel(), ex.dtype) * (ex.world - 1)


def take_v(ex: AllToAll, t: Task, receive: bool) -> None:
    """``receive=False``: announce the owner's ``t.v`` (before the exchange starts); ``True``: copy it in."""
    if t.v is None:
        return
    if receive:
        t.v.copy_(ex.take(t.owner, tuple(t.v.shape)))
    else:
        ex.expect(t.owner, t.v.numel())


def ideal_bytes(tasks: list[Task], units: list[F.MatrixUnit]) -> dict[str, int]:
    """Analytic bytes for this rank: a2a sends its off-owner shards of u and, as owner, the other
    ranks' slices of O; owner sends its results to W−1 ranks; gather receives (W−1)/W of u. NorMuon's
    moments are not included (``comm_stats["bytes"]["normuon_v"]``)."""
    ideal: dict[str, int] = {}
    for t, u in zip(tasks, units):
        W, me = t.lay.world, t.lay.rank
        if t.strategy == "a2a":
            v = (t.piece_numel(me) * u.ns_input.element_size() if t.owner != me
                 else (t.numel() - t.piece_numel(me)) * u.out.element_size())
        elif t.strategy == "owner":
            v = t.numel() * u.out.element_size() * (W - 1) if t.owner == me else 0
        elif t.strategy == "gather":
            v = t.numel() * u.ns_input.element_size() * (W - 1) // W
        else:
            v = 0
        ideal[t.strategy] = ideal.get(t.strategy, 0) + v
    return ideal
