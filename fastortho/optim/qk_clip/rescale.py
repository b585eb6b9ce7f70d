"""The rescale: per-head clip factors and the in-place row scaling of a (possibly ``DTensor``) weight.

Every factor belongs to one output row, so the rescale is local to each shard of a ``DTensor``: the
factor vector is laid out like the weight's output axis and each rank multiplies its own block."""
from __future__ import annotations

import torch
from torch import Tensor

def clip_factors(max_logits: Tensor, tau: float, n_kv_heads: int | None = None) -> tuple[Tensor, Tensor]:
    r"""The QK-clip factors :math:`(f_q, f_k)` for per-query-head maxima ``max_logits`` (``(H,)``).

    :math:`\gamma_h = \tau/S_h` where :math:`S_h > \tau`, else 1 (NaN or :math:`-\infty` maxima: 1);
    :math:`f_k[g] = \sqrt{\min_{h\in g}\gamma_h}` per key head, :math:`f_q[h] = \min(1, \gamma_h/f_k[g(h)])`.
    Head :math:`h`'s logits are multiplied by :math:`f_q[h]\,f_k[g(h)]`.
    """
    H = max_logits.numel()
    Hk = H if n_kv_heads is None else int(n_kv_heads)
    s = max_logits.reshape(H)
    gamma = torch.where(s > tau, tau / s, torch.ones_like(s))
    fk = gamma.reshape(Hk, H // Hk).amin(dim=1).sqrt()
    fq = torch.clamp(gamma / fk.repeat_interleave(H // Hk), max=1.0)
    return fq, fk


def local_factor(p: Tensor, factor: Tensor, axis: int) -> Tensor:
    """``factor`` (one entry per index of ``p``'s ``axis``) shaped to broadcast against ``p``'s local data."""
    shape = [1] * p.ndim
    shape[axis] = -1
    f = factor.reshape(shape)
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if not isinstance(p, DTensor):
        return f.to(device=p.device, dtype=p.dtype)
    # the same split along the output axis as p (every rank holds the full factor: no communication),
    # replicated over the mesh dims that shard p elsewhere or hold partial sums
    placements = [pl if pl.is_shard() and pl.dim % p.ndim == axis else Replicate() for pl in p.placements]
    f = f.to(device=p.to_local().device, dtype=p.dtype)
    return distribute_tensor(f, p.device_mesh, placements, src_data_rank=None).to_local()


def mul_local_(p: Tensor, factor: Tensor, axis: int) -> None:
    from torch.distributed.tensor import DTensor

    local = p.to_local() if isinstance(p, DTensor) else p
    local.mul_(local_factor(p, factor, axis))
