r"""Muon variants that act on the orthogonalized update, and the device-scalar (capturable) momentum.

**NorMuon** ("NorMuon: Making Muon more efficient and scalable", Li et al., arXiv 2510.05491). For an
orthogonalized update :math:`O \in \mathbb{R}^{m\times n}` (per matrix of a stack, per row block of a
split parameter), with a per-row (per output neuron) second moment :math:`v \in \mathbb{R}^m`:

.. math::
    v_i \leftarrow \beta_2 v_i + (1-\beta_2)\,\tfrac1n \textstyle\sum_j O_{ij}^2, \qquad
    \hat O_{ij} = O_{ij} / (\sqrt{v_i} + \epsilon), \qquad
    \tilde O = \hat O \cdot \|O\|_F / (\|\hat O\|_F + \epsilon)

with :math:`\epsilon = 10^{-10}` and no bias correction, as the authors' reference code. The last
factor keeps the Frobenius norm (hence the RMS) of the orthogonal update, as the authors' code, dion
and modded-nanogpt do; the group's lr scale :math:`s(m, n)` then applies as for Muon. With
``lr_scale="rms_match"`` (:math:`0.2\sqrt{\max(m, n)}`) and an exact polar factor
(:math:`\|O\|_F = \sqrt{\min(m, n)}`) this is the paper's Algorithm 1, whose step is
:math:`0.2\,\eta\sqrt{mn}\,\hat O / \|\hat O\|_F`.

The row statistic of row :math:`i` needs only row :math:`i` of :math:`O`; the norm-preserving factor needs
the whole matrix.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["VARIANTS", "NORMUON_EPS", "normuon_", "normuon_state", "momentum_tensor_", "prepare_capturable"]

#: ``variant=``: plain Muon, or NorMuon's row normalization of the orthogonalized update.
VARIANTS = ("muon", "normuon")
#: ε of NorMuon's row normalization and of its norm-preserving factor (the authors' value).
NORMUON_EPS = 1e-10


def normuon_state(p: Tensor, bsz: int, m: int) -> Tensor:
    """NorMuon's per-row second moment for a parameter seen as ``bsz`` matrices of ``m`` rows: zeros of
    shape ``(m,)`` (one matrix) or ``(bsz, m)`` (a stack), on ``p``'s device, float64 for a float64
    parameter and float32 otherwise."""
    shape = (m,) if bsz == 1 else (bsz, m)
    return torch.zeros(shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32, device=p.device)


def normuon_(outs: Sequence[Tensor], vs: Sequence[Tensor], *, beta2: float | Tensor) -> list[Tensor]:
    r"""NorMuon on ``(B, m, n)`` orthogonalized updates ``outs`` with second moments ``vs`` (``(B, m)``
    views, updated in place); returns the normalized updates in float32 (see the module docstring).

    Every operation runs on the device with no host read, so it is CUDA-graph capturable.
    """
    res = []
    for o, v in zip(outs, vs):
        wide = torch.float64 if torch.float64 in (o.dtype, v.dtype) else torch.float32
        o32 = o.to(wide)
        v32 = v if v.dtype == wide else v.to(wide)  # a loaded state may have the param's dtype
        v32.lerp_(o32.square().mean(dim=-1), 1 - beta2)
        if v32 is not v:
            v.copy_(v32)
        norm = torch.linalg.vector_norm(o32, dim=(-2, -1), keepdim=True)
        hat = o32 / (v32.sqrt() + NORMUON_EPS).unsqueeze(-1)
        hat_norm = torch.linalg.vector_norm(hat, dim=(-2, -1), keepdim=True)
        res.append(hat.mul_(norm / (hat_norm + NORMUON_EPS)))
    return res


def momentum_tensor_(
    grads: Sequence[Tensor], bufs: Sequence[Tensor], *, momentum: Tensor, nesterov: bool, convention: str,
    out_dtype: torch.dtype,
) -> tuple[list[Tensor], Tensor]:
    r""":func:`fastortho.ops.muon_momentum_` with :math:`\beta` a 0-dim device tensor (read on the device, so
    a scheduler can change it between CUDA-graph replays): the same update, in float32, returning the
    inputs :math:`u` in ``out_dtype`` and the float64 :math:`\sum u^2` per tensor.

    ``"ema"``: :math:`B \leftarrow B + (1-\beta)(g - B)`, :math:`u = g + \beta(B - g)` (Nesterov) or
    :math:`B`. ``"sum"``: :math:`B \leftarrow \beta B + g`, :math:`u = g + \beta B` or :math:`B`. The
    weights :math:`1-\beta` and :math:`\beta` are float32 device values (the host kernels round
    :math:`1-\beta` from float64), so results agree with the kernels to a few float32 ulps, not bitwise.
    """
    beta = momentum.to(torch.float32)
    us, sums = [], []
    for g, b in zip(grads, bufs):
        g32 = g.float()
        b32 = b if b.dtype == torch.float32 else b.float()
        if convention == "ema":
            b32.lerp_(g32, 1 - beta)
            u = g32.lerp(b32, beta) if nesterov else b32
        else:
            b32.mul_(beta).add_(g32)
            u = g32 + beta * b32 if nesterov else b32
        if b32 is not b:
            b.copy_(b32)
        sums.append(u.double().square().sum())
        us.append(u.to(out_dtype, copy=True))
    return us, (torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64))


def device_scalar(value: Any, device: torch.device) -> Tensor:
    """A hyperparameter as a 0-dim float32 tensor on ``device`` (an existing tensor is moved, not copied
    when it already is one)."""
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def prepare_capturable(group: dict[str, Any], state: Any) -> None:
    """A ``capturable`` group keeps lr, weight decay (and momentum, for Muon) as 0-dim float32 tensors on
    its parameters' device, updated in place (``fill_``, as torch's schedulers do for a tensor lr), and
    its AdamW step counts there. Idempotent: the same tensors are kept, so a captured graph stays valid."""
    if not group.get("capturable") or not group["params"]:
        return
    dev = group["params"][0].device
    for k in ("lr", "weight_decay") + (("momentum",) if group["algorithm"] == "muon" else ()):
        v = group[k]
        if not (isinstance(v, Tensor) and v.device == dev and v.dtype == torch.float32 and v.ndim == 0):
            group[k] = device_scalar(v, dev)
    for p in group["params"]:
        st = state.get(p, {})
        if isinstance(st.get("step"), Tensor) and st["step"].device != dev:
            st["step"] = st["step"].to(dev)
