r"""Stateless phases of a Muon step, shared by :class:`fastortho.Muon`, its distributed engine and
:func:`muon`.

A Muon step on a list of matrix parameters runs in three phases:

1. **momentum** (:func:`momentum_phase`, per group, fused, :func:`fastortho.ops.muon_momentum_`):
   :math:`B \leftarrow \beta B + (1-\beta) g` (``"ema"``) or :math:`B \leftarrow \beta B + g` (``"sum"``),
   and the orthogonalizer input :math:`u` (Nesterov blend or :math:`B`), with a per-tensor
   :math:`\sum u^2` that doubles as the non-finite check; :func:`matrix_units` then views each
   parameter as *matrix units* (a 2-D parameter, a flattened conv kernel, a row block of a split
   parameter, or the matrices of a stacked 3-D parameter) of shape ``(B, m, n)``;
2. **orthogonalize** (:func:`orthogonalize_units`, across groups): units of equal ``(m, n, dtype,
   device)`` and equal :class:`OrthoConfig` (for the polar methods this includes the dtype the
   parameter and momentum are stored in, :meth:`OrthoConfig.for_data`) are concatenated and
   orthogonalized in one batched call, :math:`O \approx U V^\top`;
3. **apply** (:func:`apply_phase`, per group, fused, :func:`fastortho.ops.muon_apply_`):
   :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta\, s(m, n)\, O` with the learning-rate scale
   :math:`s` of :func:`lr_scale_factor`, computed from the matrix shape *after* flattening/splitting.

Parameters routed to AdamW take :func:`adamw_phase`. The phases take keyword-only arguments without
defaults (as ``torch.optim``'s functional API); :func:`momentum_args`, :func:`unit_args`,
:func:`apply_args` and :func:`adamw_args` read them from a param group, once for every caller.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastortho.coefficients import schedule_precondition
from fastortho.newton_schulz import newton_schulz
from fastortho.ops import muon_apply_, muon_momentum_
from fastortho.optim.adamw import adamw_step_
from fastortho.optim.ortho import POLAR_METHODS, OrthoConfig, Orthogonalizer, coarsest_dtype
from fastortho.optim.variants import momentum_tensor_, normuon_, normuon_state
from fastortho.optim.defaults import KELLER, MUON_DEFAULTS, ORTHOGONALIZERS, enforce_nonfinite
from fastortho.optim.shapes import (
    LR_SCALES, TORCH_ADJUST_LR_FN, lr_scale_factor, matrix_shape, resolve_lr_scale, resolve_ns_dtype, split_blocks,
)
from fastortho.polar import polar
from fastortho.reference import default_rtol

__all__ = [
    "LR_SCALES", "TORCH_ADJUST_LR_FN", "lr_scale_factor", "resolve_lr_scale", "matrix_shape",
    "resolve_ns_dtype", "Orthogonalizer", "OrthoConfig", "orthogonalize", "MatrixUnit", "init_state",
    "momentum_phase", "split_blocks", "matrix_units", "orthogonalize_units", "apply_phase", "adamw_phase",
    "momentum_args", "unit_args", "apply_args", "adamw_args", "telemetry_records", "contiguous_params", "muon",
]

def orthogonalize(X: Tensor, cfg: OrthoConfig, sumsq: Tensor | None = None) -> Tensor:
    r"""Orthogonalize a ``(B, m, n)`` stack, :math:`X_b \mapsto O_b \approx U_b V_b^\top`, in ``cfg.dtype``.

    ``"newton_schulz"`` runs :func:`fastortho.newton_schulz` (quintic steps of ``cfg.coefficients``,
    input scaled by :math:`\max(\text{safety}\cdot\|X\|_F, \varepsilon)`); ``"qdwh"``, ``"higham"``
    and ``"svd"`` run that method of :func:`fastortho.polar` with the rank cut
    ``rtol = default_rtol(m, n, d)`` (:math:`\sigma \le \text{rtol}\cdot\sigma_{\max}` maps to 0),
    :math:`d` the coarsest of ``cfg.data_dtype``, ``X.dtype`` and the dtypes the method computes in
    (``cfg.dtype``, then float32 or float64, for "qdwh"/"higham"; float64 for "svd"): the cut
    follows the precision the matrix was stored in, not that of the copy handed over. A callable is
    called on ``X`` as is and its result used as returned (same shape required).

    ``sumsq``: ``(B,)`` :math:`\|X_b\|_F^2` at hand (the momentum kernel's :math:`\sum u^2`): the scale of
    Newton–Schulz with ``normalize="fro"`` (not AOL), no pass over ``X``; other methods ignore it.
    """
    fn = cfg.orthogonalizer
    if callable(fn):
        out = fn(X)
        if not isinstance(out, Tensor) or out.shape != X.shape:
            raise ValueError(f"orthogonalizer {fn!r} must return a tensor of the input's shape {tuple(X.shape)}, "
                             f"got {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out
    dtype = resolve_ns_dtype(cfg.dtype, X.device)
    if fn == "newton_schulz":
        coeffs = list(cfg.coefficients) if isinstance(cfg.coefficients, tuple) else cfg.coefficients
        if sumsq is not None and (cfg.normalize != "fro" or schedule_precondition(coeffs) is not None):
            sumsq = None
        return newton_schulz(X, cfg.steps, coeffs, normalize=cfg.normalize, eps=cfg.eps, dtype=dtype,
                             backend=cfg.backend, sumsq=sumsq)
    if fn in POLAR_METHODS:
        m, n = X.shape[-2:]
        stored = (X.dtype,) if cfg.data_dtype is None else (X.dtype, cfg.data_dtype)
        if fn == "svd":  # float64 SVD of X as given
            return polar(X, method="svd", rtol=default_rtol(m, n, coarsest_dtype(*stored))).to(dtype)
        # polar's working dtype for an input of this dtype: float64 stays, everything else float32
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return polar(X.to(dtype), method=fn, rtol=default_rtol(m, n, coarsest_dtype(*stored, dtype, work))).to(dtype)
    raise ValueError(f"orthogonalizer must be one of {list(ORTHOGONALIZERS)} or a callable, got {fn!r}")


@dataclass
class MatrixUnit:
    """One matrix (or stack of same-shape matrices) that receives one orthogonalized update.

    ``param``/``buf`` are contiguous views of the parameter and its momentum buffer (a row block for
    split parameters); ``ns_input`` is the ``(B, m, n)`` orthogonalizer input, ``out`` its result;
    ``sumsq``: ``(B,)`` float64 ‖u_b‖_F² of ``ns_input`` when the momentum kernel's per-tensor
    sum is that of this unit (a whole 2-D or flattened parameter), else None.
    """

    param: Tensor
    buf: Tensor
    ns_input: Tensor
    scale: float
    group_index: int = 0
    name: str = ""
    out: Tensor | None = field(default=None, repr=False)
    v: Tensor | None = field(default=None, repr=False)  # NorMuon's (B, m) row second moment
    sumsq: Tensor | None = field(default=None, repr=False)


def init_state(state: dict[str, Any], p: Tensor, algorithm: str, group: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create ``p``'s optimizer state in ``state`` if missing: the momentum buffer (Muon; NorMuon adds
    ``normuon_v``, the per-row second moment, shape ``(m,)`` or ``(B, m)`` for a stack) or the step count
    and moments (AdamW; the count on ``p``'s device when the group is ``capturable``). ``zeros_like``: a
    DTensor parameter gets DTensor state of its placements."""
    group = group or {}
    if algorithm == "muon":
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if group.get("variant") == "normuon" and "normuon_v" not in state:
            bsz, m, _ = matrix_shape(p.shape, group.get("flatten"))
            state["normuon_v"] = normuon_state(p, bsz, m)
    elif "exp_avg" not in state:
        # CPU, as torch.optim.AdamW when not capturable: the bias corrections are host arithmetic
        state["step"] = torch.tensor(0.0, device=p.device if group.get("capturable") else None)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    return state


def _check_grad(p: Tensor, g: Tensor) -> None:
    if g.is_sparse:
        raise RuntimeError("Muon does not support sparse gradients (route this parameter to AdamW or "
                           "use a dense embedding)")
    if torch.is_complex(g) or torch.is_complex(p):
        raise RuntimeError("Muon does not support complex parameters or gradients")


def momentum_phase(
    params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor], *, momentum: float,
    nesterov: bool, convention: str, placement: str, ns_dtype: torch.dtype, nonfinite: str,
    names: Sequence[str], backend: str, reduce_sumsq: Callable[[Tensor], Tensor] | None,
) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    r"""Phase 1 for one group: momentum (``before_ortho``) and the orthogonalizer inputs :math:`u`.

    Returns ``u`` per parameter (in ``ns_dtype``), a boolean ``(len(params),)`` tensor, True where
    the update is finite (None with ``nonfinite="ignore"`` or ``placement="after_ortho"``, where the
    check runs in :func:`apply_phase`), and the float64 :math:`\sum u^2` per parameter, computed from
    :math:`u` before its rounding to ``ns_dtype`` (0 where ``"skip"`` zeroed :math:`u`; None after
    ``"after_ortho"``), which :func:`orthogonalize` uses as the Frobenius norm. ``reduce_sumsq`` makes
    sharded parameters' shard sums whole-tensor sums across ranks (None: already whole), so the check
    is global. A non-finite :math:`u` (its :math:`\sum u^2` is NaN/Inf) is replaced by zeros, which the orthogonalizer
    maps to a zero update, and its momentum buffer is reset to zero: the old buffer cannot be
    recovered after the in-place update, and a NaN kept there would poison every later step. No host
    sync unless ``nonfinite="raise"``. A tensor ``momentum`` is read on the device
    (:func:`~fastortho.optim.variants.momentum_tensor_`, the capturable step).
    """
    for p, g in zip(params, grads):
        _check_grad(p, g)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    finite = sumsq = None
    if placement == "before_ortho":
        us, sumsq = _momentum(grads, bufs, momentum=momentum, nesterov=nesterov, convention=convention,
                              out_dtype=ns_dtype, backend=backend)
        if reduce_sumsq is not None and len(us):
            sumsq = reduce_sumsq(sumsq)
        if nonfinite != "ignore" and len(us):
            finite = torch.isfinite(sumsq)
            enforce_nonfinite(finite, list(zip(us, bufs)), policy=nonfinite, names=names,
                              what="momentum/update for parameter(s)")
            if nonfinite == "skip":  # the zeroed u has norm 0 (a NaN sum would give a NaN update)
                sumsq = torch.where(finite, sumsq, 0.0)
    elif placement == "after_ortho":
        us = [g.to(ns_dtype) for g in grads]  # a copy when the dtype differs; never written otherwise
    else:
        raise ValueError(f"momentum_placement must be 'before_ortho' or 'after_ortho', got {placement!r}")
    return us, finite, sumsq


def matrix_units(
    params: Sequence[Tensor], bufs: Sequence[Tensor], us: Sequence[Tensor], *, lr_scale: str,
    flatten: bool | None, split_sizes: Sequence[int] | None, fan_in_first: bool, group_index: int,
    names: Sequence[str], vs: Sequence[Tensor | None] | None = None, sumsqs: Tensor | None = None,
) -> list[MatrixUnit]:
    """The matrix units of one group's contiguous ``params``, momentum ``bufs`` and inputs ``us`` (and
    NorMuon's row moments ``vs``). ``fan_in_first``: the parameter is stored ``(fan_in, fan_out)`` (Hugging
    Face's ``Conv1D``), so its lr scale is :math:`s(n, m)`; the polar factor of the transpose is the
    transpose of the polar factor, so nothing else changes. ``sumsqs``: :func:`momentum_phase`'s per-parameter
    Σu², attached to the units that are a whole single matrix (:attr:`MatrixUnit.sumsq`)."""
    units: list[MatrixUnit] = []
    for i, (p, b, u, name) in enumerate(zip(params, bufs, us, names)):
        bsz, m, n = matrix_shape(p.shape, flatten)
        views = [t.view(bsz, m, n) for t in (p, b, u)]  # p, b, u are contiguous (see contiguous_params)
        v = None if vs is None or vs[i] is None else vs[i].view(bsz, m)
        blocks = split_blocks(m, bsz, split_sizes, p.shape)
        for k, (r0, r1) in enumerate(blocks):
            # (1, s_k, n) row blocks of a contiguous (1, m, n) tensor are contiguous views
            pb, bb, ub = (t.narrow(1, r0, r1 - r0) for t in views) if split_sizes else views
            scale = lr_scale_factor(n, r1 - r0, lr_scale) if fan_in_first else lr_scale_factor(r1 - r0, n, lr_scale)
            whole = sumsqs is not None and bsz == 1 and len(blocks) == 1
            units.append(MatrixUnit(param=pb, buf=bb, ns_input=ub, group_index=group_index, scale=scale,
                                    name=f"{name}[{k}]" if split_sizes else name,
                                    v=None if v is None else v.narrow(1, r0, r1 - r0),
                                    sumsq=sumsqs[i : i + 1] if whole else None))
    return units


def orthogonalize_units(units: Sequence[MatrixUnit], configs: Sequence[OrthoConfig | None]) -> None:
    """Phase 2: bucket units by (config, m, n, dtype, device) in order of appearance, one
    :func:`orthogonalize` call per bucket; ``configs[g]`` is group ``g``'s config, specialised per unit
    to the dtype of its parameter and momentum (:meth:`OrthoConfig.for_data`). Fills ``unit.out``."""
    buckets: dict[tuple, list[MatrixUnit]] = {}
    for u in units:
        x = u.ns_input
        cfg = configs[u.group_index].for_data(u.param, u.buf)
        buckets.setdefault((cfg, x.shape[-2], x.shape[-1], x.dtype, x.device), []).append(u)
    for (cfg, *_), bucket in buckets.items():
        stacked = bucket[0].ns_input if len(bucket) == 1 else torch.cat([u.ns_input for u in bucket])
        # tall inputs come back as transposed views; the fused apply walks memory linearly
        out = orthogonalize(stacked, cfg, bucket_sumsq(bucket)).contiguous()
        for u, o in zip(bucket, torch.split(out, [u.ns_input.shape[0] for u in bucket])):
            u.out = o


#: Hand the momentum kernel's Σu² to Newton–Schulz as the Frobenius norm (no norm pass) wherever it is
#: one whole matrix's (distributed: after the all-reduce of the shard sums). False: NS takes its own
#: norm everywhere (a scale that can differ from the sum's in its last fp32 bit).
REUSE_SUMSQ = True


def bucket_sumsq(bucket: Sequence[MatrixUnit]) -> Tensor | None:
    """The ``(B,)`` sums of a bucket's stacked inputs when :data:`REUSE_SUMSQ` is on and every unit has its own."""
    if not REUSE_SUMSQ or not bucket or any(u.sumsq is None for u in bucket):
        return None
    return bucket[0].sumsq if len(bucket) == 1 else torch.cat([u.sumsq for u in bucket])


def apply_phase(
    units: Sequence[MatrixUnit], *, lr: float | Tensor, weight_decay: float | Tensor, momentum: float | Tensor,
    nesterov: bool, convention: str, placement: str, nonfinite: str, backend: str, variant: str,
    beta2: float | Tensor,
) -> Tensor | None:
    r"""Phase 3 for one group: :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta\,s\,O`, fused.

    With ``placement="after_ortho"`` the momentum runs here, on the orthogonalized gradients
    (:math:`B \leftarrow \beta B + (1-\beta)\,O(g)`, the update is :math:`B` or its Nesterov blend), and
    the non-finite check happens on it; returns that per-unit finite mask (else None). With
    ``variant="normuon"`` the update is first row-normalized (:func:`~fastortho.optim.variants.normuon_`,
    which needs each unit's ``v``: every row of the matrix on this process).
    """
    if not units:
        return None
    outs = [u.out for u in units]  # (B, m, n), contiguous: slices along dim 0 of a batched result
    finite = None
    if placement == "after_ortho":
        outs, sumsq = _momentum(outs, [u.buf for u in units], momentum=momentum, nesterov=nesterov,
                                convention=convention, out_dtype=torch.float32, backend=backend)
        if nonfinite != "ignore":
            finite = torch.isfinite(sumsq)
            enforce_nonfinite(finite, [(o, u.buf) for o, u in zip(outs, units)], policy=nonfinite,
                              names=[u.name for u in units], what="orthogonalized momentum for")
    if variant == "normuon":
        if any(u.v is None for u in units):
            raise NotImplementedError("variant='normuon' needs the per-row second moment of every matrix unit "
                                      "(state 'normuon_v'); this caller did not attach it (distributed engine)")
        outs = normuon_(outs, [u.v for u in units], beta2=beta2)
    muon_apply_([u.param for u in units], outs, lr=lr, weight_decay=weight_decay,
                scales=[u.scale for u in units], backend=backend)
    return finite


def adamw_phase(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Tensor]], *,
    lr: float | Tensor, betas: tuple[float, float], eps: float, weight_decay: float | Tensor, bias_correction: bool,
    zero_init: bool, capturable: bool = False,
) -> None:
    """One AdamW step (:func:`fastortho.optim.adamw.adamw_step_`) on parameters whose ``states`` come from
    :func:`init_state` (local tensors: a distributed caller passes the shards)."""
    adamw_step_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                bias_correction=bias_correction, zero_init=zero_init, capturable=capturable)


def _momentum(grads: Sequence[Tensor], bufs: Sequence[Tensor], *, momentum: float | Tensor, nesterov: bool,
              convention: str, out_dtype: torch.dtype, backend: str) -> tuple[list[Tensor], Tensor]:
    """The fused momentum kernel, or its device-scalar form when ``momentum`` is a tensor."""
    if isinstance(momentum, Tensor):
        return momentum_tensor_(grads, bufs, momentum=momentum, nesterov=nesterov, convention=convention,
                                out_dtype=out_dtype)
    return muon_momentum_(grads, bufs, momentum=momentum, nesterov=nesterov, convention=convention,
                          out_dtype=out_dtype, backend=backend)


def momentum_args(group: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """:func:`momentum_phase`'s settings from a Muon param group (the fused kernels pick their backend)."""
    return dict(momentum=group["momentum"], nesterov=group["nesterov"], convention=group["momentum_convention"],
                placement=group["momentum_placement"], ns_dtype=resolve_ns_dtype(group["ns_dtype"], device),
                nonfinite=group["nonfinite"], backend="auto")


def unit_args(group: dict[str, Any]) -> dict[str, Any]:
    """:func:`matrix_units`' settings from a Muon param group."""
    return dict(lr_scale=resolve_lr_scale(group["lr_scale"], group["adjust_lr_fn"]), flatten=group["flatten"],
                split_sizes=group["split_sizes"], fan_in_first=bool(group.get("fan_in_first")))


def apply_args(group: dict[str, Any]) -> dict[str, Any]:
    """:func:`apply_phase`'s settings from a Muon param group."""
    lr = group["lr"]
    if (isinstance(lr, Tensor) and lr.device.type == "cpu" and not torch.compiler.is_compiling()
            and not group.get("capturable")):
        # torch.optim.Muon reads a tensor lr as a Python float (float64 arithmetic): a CPU tensor
        # costs no device sync, and this keeps fp32 parameters bit-identical to torch's
        lr = lr.item()
    return dict(lr=lr, weight_decay=group["weight_decay"], momentum=group["momentum"],
                nesterov=group["nesterov"], convention=group["momentum_convention"],
                placement=group["momentum_placement"], nonfinite=group["nonfinite"], backend="auto",
                variant=group.get("variant", "muon"), beta2=group.get("beta2", 0.95))


def adamw_args(group: dict[str, Any]) -> dict[str, Any]:
    """:func:`adamw_phase`'s settings from an AdamW param group."""
    return dict(lr=group["lr"], betas=group["betas"], eps=group["adamw_eps"], weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"], zero_init=group["zero_init"],
                capturable=bool(group.get("capturable")))


def telemetry_records(units: Sequence[MatrixUnit], *, lr: float | Tensor) -> list[dict[str, Any]]:
    """Per unit: the update RMS η·s·‖O‖_F/√(mn) and the singular-value band of O (an SVD per matrix)."""
    records = []
    for u in units:
        o = u.out.float()
        m, n = o.shape[-2:]
        sv = torch.linalg.svdvals(o)  # (B, min(m, n))
        records.append(dict(name=u.name, shape=(m, n), batch=o.shape[0],
                            update_rms=lr * u.scale * torch.linalg.matrix_norm(o) / math.sqrt(m * n),
                            sigma_min=sv.amin(-1), sigma_max=sv.amax(-1)))
    return records


class contiguous_params:
    """Context: contiguous stand-ins for non-contiguous parameters (e.g. channels_last conv kernels),
    copied back on exit. The fused kernels walk memory linearly; contiguous parameters pass through."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.work = [p if p.is_contiguous() else p.contiguous() for p in self.params]

    def __enter__(self) -> list[Tensor]:
        return self.work

    def __exit__(self, *exc: object) -> None:
        for p, w in zip(self.params, self.work):
            if w is not p:
                p.copy_(w)


_D = MUON_DEFAULTS


def muon(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
    lr: float | Tensor = _D["lr"], weight_decay: float = _D["weight_decay"], momentum: float = _D["momentum"],
    nesterov: bool = _D["nesterov"], ns_coefficients: tuple[float, float, float] = KELLER,
    eps: float = _D["eps"], ns_steps: int | None = _D["ns_steps"], adjust_lr_fn: str | None = _D["adjust_lr_fn"],
    coefficients: Any = _D["coefficients"], normalize: str = _D["normalize"], lr_scale: str | None = _D["lr_scale"],
    momentum_convention: str = _D["momentum_convention"], momentum_placement: str = _D["momentum_placement"],
    orthogonalizer: str | Orthogonalizer = _D["orthogonalizer"], ns_dtype: torch.dtype | None = _D["ns_dtype"],
    backend: str = _D["backend"], flatten: bool | None = _D["flatten"],
    split_sizes: Sequence[int] | None = _D["split_sizes"], nonfinite: str = _D["nonfinite"],
) -> Tensor | None:
    r"""One Muon step on ``params`` (functional; ``momentum_buffers`` are updated in place).

    Same arguments, defaults and meaning as :class:`fastortho.Muon` (one group). Returns the
    per-parameter finite mask (see :func:`momentum_phase`), or None when unchecked.
    """
    if not params:
        return None
    group = dict(ns_coefficients=ns_coefficients, ns_steps=ns_steps, coefficients=coefficients,
                 orthogonalizer=orthogonalizer, normalize=normalize, eps=eps, ns_dtype=ns_dtype, backend=backend)
    cfg = OrthoConfig.from_group(group)
    names = [str(i) for i in range(len(params))]
    with contiguous_params(params) as work:
        us, finite, sumsq = momentum_phase(
            work, grads, momentum_buffers, momentum=momentum, nesterov=nesterov, convention=momentum_convention,
            placement=momentum_placement, ns_dtype=resolve_ns_dtype(ns_dtype, params[0].device),
            nonfinite=nonfinite, names=names, backend=backend, reduce_sumsq=None,
        )
        units = matrix_units(work, momentum_buffers, us, lr_scale=resolve_lr_scale(lr_scale, adjust_lr_fn),
                             flatten=flatten, split_sizes=split_sizes, fan_in_first=False, group_index=0,
                             names=names, sumsqs=sumsq)
        orthogonalize_units(units, [cfg])
        f2 = apply_phase(units, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         convention=momentum_convention, placement=momentum_placement,
                         nonfinite=nonfinite, backend=backend, variant="muon", beta2=0.0)
    return finite if finite is not None else f2
