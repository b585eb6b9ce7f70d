r"""Distributed :class:`fastortho.Muon`: one owner orthogonalizes each whole matrix.

Gradient synchronization is the framework's (DDP's all-reduce, FSDP2's reduce-scatter, TP): this module
only moves the Newton–Schulz (NS) input :math:`u` and its result :math:`O`. Momentum, weight decay and
the update run on each rank's local shard, element by element, exactly as in one process; every matrix
is orthogonalized whole, by one rank (or by every rank, for ``local``/``gather``), so with identical
gradients the parameters are bit-identical to single-process :class:`fastortho.Muon` (the
communication is in the NS dtypes, hence lossless, and NS on this backend does not depend on what a
matrix is batched with: the distributed tests check both).

**Strategies**, chosen per parameter (``strategy="auto"``) or forced (constructor or group key):

===========  =====================================================  ==================================
strategy     when (auto)                                            bytes sent per rank per step
===========  =====================================================  ==================================
``local``    plain tensor and no ``process_group``; DTensor with no  0 (every rank runs all the NS)
             sharded matrix dim (Replicate; 3-D experts on Shard(0))
``owner``    plain tensor, ``process_group`` of size W > 1 (DDP)    :math:`b_O (W-1)/W` per element
``a2a``      DTensor with exactly one ``Shard(d)``, d a matrix dim  :math:`(b_u + b_O)(W-1)/W^2`
             (FSDP2 Shard(0), TP Shard(0)/Shard(1), HSDP's shard    per element (bf16: 4(W−1)/W²,
             sub-mesh), other Shards only on stack dims (EP×FSDP    0.44 at W = 8)
             experts: over the matrix dim's group, local experts)
``gather``   any other sharding (FSDP×TP, ``_StridedShard``)         :math:`b_u (W-1)/W` per element
                                                                    (model; DTensor's all-gather)
===========  =====================================================  ==================================

* ``owner``: matrices are assigned to ranks by LPT on the NS flop cost (largest first, to the least
  loaded rank, ties to the lowest rank; each group starts from the loads that earlier groups
  containing all its members gave them), the owner orthogonalizes its share, and one
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
checks at every step. Sharded parameters combine the momentum kernel's per-shard float64 :math:`\sum u^2`
with one small ``all_reduce`` (SUM, one float64 per parameter): the whole tensor's sum is the
non-finite check (``nonfinite="skip"|"raise"``: every rank skips the same matrices as one process
would) and the Frobenius norm NS takes for a whole matrix instead of its own pass over it (the
update is one process's unless the float64 sums' order moves the fp32 scale across a rounding
midpoint; see :func:`.plan.plan_units`).

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
* Shard sums of squares are all-reduced. That is the only way a NaN in one shard can skip the whole
  matrix on every rank, and it hands the owner the norm of the matrix it assembles, for the cost of
  the int32 flag this replaced plus 4 bytes per parameter.
* NorMuon (:mod:`.rowmoments`) normalizes the whole :math:`O` where it was orthogonalized and keeps
  the row moments replicated (the single-process state on every rank); the owner sends them with the
  slices.
* The plan check runs at the first step only. A check triggered by a local change would be a
  collective that only some ranks join.
"""
from __future__ import annotations

from fastortho.optim.distributed.engine import CommStats, DistributedMuonEngine, make_engine
from fastortho.optim.distributed.plan import STRATEGIES, Layout, lpt_owners, ns_flops, shard_extents

__all__ = ["STRATEGIES", "CommStats", "DistributedMuonEngine", "Layout", "make_engine", "ns_flops",
           "shard_extents", "lpt_owners"]
