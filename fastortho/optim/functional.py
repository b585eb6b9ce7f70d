r"""Stateless pieces of a Muon step, shared by :class:`fastortho.Muon` and usable on their own.

A Muon step on a list of matrix parameters runs in three phases:

1. **momentum** (per parameter group, fused, :func:`fastortho.muon_step.muon_momentum_`):
   :math:`B \leftarrow \beta B + (1-\beta) g` (``"ema"``) or :math:`B \leftarrow \beta B + g` (``"sum"``),
   and the orthogonalizer input :math:`u` (Nesterov blend or :math:`B`), with a per-tensor
   :math:`\sum u^2` that doubles as the non-finite check;
2. **orthogonalize** (across groups): every *matrix unit* (a 2-D parameter, a flattened conv kernel, a
   row block of a split parameter, or each matrix of a stacked 3-D parameter) is viewed as
   ``(B, m, n)``; units of equal ``(m, n, dtype, device)`` and equal orthogonalizer settings are
   concatenated and orthogonalized in one batched call, :math:`O \approx U V^\top`;
3. **apply** (per group, fused, :func:`fastortho.muon_step.muon_apply_`):
   :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta\, s(m, n)\, O` with the learning-rate scale
   :math:`s` of :func:`lr_scale_factor`, computed from the matrix shape *after* flattening/splitting.

:func:`muon` runs the three phases for one list of parameters (one group); the optimizer class runs
phase 1 and 3 per group and phase 2 over all groups at once, so same-shape matrices of different
groups still share one batched call.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastortho.muon_step import muon_apply_, muon_momentum_

__all__ = [
    "LR_SCALES",
    "TORCH_ADJUST_LR_FN",
    "lr_scale_factor",
    "resolve_lr_scale",
    "matrix_shape",
    "resolve_ns_dtype",
    "orthogonalize",
    "OrthoConfig",
    "MatrixUnit",
    "momentum_phase",
    "contiguous_params",
    "orthogonalize_units",
    "apply_phase",
    "muon",
]

#: The learning-rate scale rules, :math:`m` = rows = fan_out, :math:`n` = cols = fan_in of the matrix
#: *as orthogonalized* (after conv flattening and row splitting).
LR_SCALES: dict[str, Callable[[int, int], float]] = {
    # Keller Jordan / torch.optim.Muon "original": only tall matrices are scaled up.
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),
    # Moonlight / torch "match_rms_adamw": update RMS ≈ 0.2, AdamW's typical RMS, so AdamW's lr transfers.
    "rms_match": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    # Bernstein, "Deriving Muon" (seed 004): the RMS→RMS operator-norm step, √(fan_out/fan_in), unclamped.
    "spectral": lambda m, n: math.sqrt(m / n),
    "none": lambda m, n: 1.0,
}
#: torch.optim.Muon's ``adjust_lr_fn`` names and the rule each one is.
TORCH_ADJUST_LR_FN: dict[str | None, str] = {
    None: "original",
    "original": "original",
    "match_rms_adamw": "rms_match",
    "spectral_unclamped": "spectral",
}


def lr_scale_factor(m: int, n: int, rule: str) -> float:
    r"""The per-matrix learning-rate multiplier :math:`s(m, n)` for an :math:`m \times n` update.

    ===============  ======================================  ===========================================
    rule             :math:`s(m, n)`                         who
    ===============  ======================================  ===========================================
    ``"original"``   :math:`\sqrt{\max(1, m/n)}`             KellerJordan/Muon, torch ``"original"``
    ``"rms_match"``  :math:`0.2\,\sqrt{\max(m, n)}`          Moonlight, torch ``"match_rms_adamw"``,
                                                             dion ``"rms_norm"``
    ``"spectral"``   :math:`\sqrt{m/n}`                      Bernstein (seed 004), torch
                                                             ``"spectral_unclamped"``, dion
                                                             ``"spectral_norm"``
    ``"none"``       :math:`1`
    ===============  ======================================  ===========================================

    :math:`m` is fan_out (rows) and :math:`n` fan_in (columns) of the matrix that is orthogonalized:
    a conv kernel ``(out, in, kh, kw)`` has :math:`m = out,\ n = in\cdot kh\cdot kw`.
    """
    try:
        return LR_SCALES[rule](m, n)
    except KeyError:
        raise ValueError(f"lr_scale must be one of {sorted(LR_SCALES)}, got {rule!r}") from None


def resolve_lr_scale(lr_scale: str | None, adjust_lr_fn: str | None) -> str:
    """One rule from fastortho's ``lr_scale`` and torch.optim.Muon's ``adjust_lr_fn``; they must agree."""
    if adjust_lr_fn not in TORCH_ADJUST_LR_FN:
        # torch.optim.Muon's message first (its tests match it), then the choices
        raise ValueError(
            f"Adjust learning rate function {adjust_lr_fn} is not supported: adjust_lr_fn must be one of "
            f"{sorted(k for k in TORCH_ADJUST_LR_FN if k)} or None"
        )
    from_torch = TORCH_ADJUST_LR_FN[adjust_lr_fn]
    if lr_scale is None:
        return from_torch
    if lr_scale not in LR_SCALES:
        raise ValueError(f"lr_scale must be one of {sorted(LR_SCALES)}, got {lr_scale!r}")
    if adjust_lr_fn is not None and from_torch != lr_scale:
        raise ValueError(
            f"lr_scale={lr_scale!r} contradicts adjust_lr_fn={adjust_lr_fn!r} (= {from_torch!r}); pass one"
        )
    return lr_scale


def matrix_shape(shape: Sequence[int], flatten: bool | None) -> tuple[int, int, int]:
    r"""``(batch, m, n)``: how a parameter of ``shape`` is seen as a stack of matrices.

    * 2-D: one :math:`m \times n` matrix.
    * ``flatten=True`` (conv kernels ``(out, in, k...)``): one ``(shape[0], prod(shape[1:]))`` matrix.
    * ``flatten=False`` (stacked matrices, e.g. MoE experts ``(E, m, n)``): ``prod(shape[:-2])`` matrices
      of ``shape[-2:]``.
    * ``flatten=None`` (auto): 3-D is stacked, 4-D and more is flattened (a conv2d/3d kernel). A conv1d
      kernel is 3-D, so give its group ``flatten=True`` (``muon_param_groups`` does).
    """
    nd = len(shape)
    if nd < 2:
        raise ValueError(f"Muon needs a parameter with at least 2 dimensions, got shape {tuple(shape)}")
    if nd == 2:
        return 1, int(shape[0]), int(shape[1])
    if flatten is None:
        flatten = nd >= 4
    if flatten:
        return 1, int(shape[0]), int(math.prod(shape[1:]))
    return int(math.prod(shape[:-2])), int(shape[-2]), int(shape[-1])


def resolve_ns_dtype(ns_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means bf16 on CUDA (tensor cores) and fp32 elsewhere (a CPU bf16 matmul is ~100× slower)."""
    if ns_dtype is not None:
        return ns_dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class OrthoConfig:
    """Everything that decides the orthogonalizer's output; units with equal configs share a batched call."""

    orthogonalizer: str = "newton_schulz"
    coefficients: Hashable = None  # a schedule name, a tuple of (a, b, c) triples or a Schedule
    steps: int | None = 5
    normalize: str = "fro"
    eps: float = 1e-7
    dtype: torch.dtype | None = None
    backend: str = "auto"

    @staticmethod
    def from_group(group: dict[str, Any]) -> "OrthoConfig":
        """The config of a param group (``coefficients=None``: torch's one triple, ``ns_steps`` times)."""
        from fastortho.coefficients import Schedule

        coeffs, steps = group.get("coefficients"), group.get("ns_steps")
        if coeffs is None:
            steps = 5 if steps is None else int(steps)
            coeffs = (tuple(float(c) for c in group["ns_coefficients"]),) * steps
        elif not isinstance(coeffs, (str, Schedule)):
            coeffs = tuple(tuple(float(c) for c in t) for t in coeffs)  # hashable, for bucketing
        return OrthoConfig(
            orthogonalizer=group["orthogonalizer"],
            coefficients=coeffs,
            steps=steps,
            normalize=group["normalize"],
            eps=float(group["eps"]),
            dtype=group["ns_dtype"],
            backend=group["backend"],
        )


def orthogonalize(X: Tensor, cfg: OrthoConfig) -> Tensor:
    r"""Orthogonalize a ``(B, m, n)`` stack, :math:`X_b \mapsto O_b \approx U_b V_b^\top`, in ``cfg.dtype``.

    ``"newton_schulz"`` calls :func:`fastortho.newton_schulz` (quintic steps of ``cfg.coefficients``,
    input scaled by :math:`\max(\text{safety}\cdot\|X\|_F, \varepsilon)`); ``"polar"`` is the Higham
    iteration of :func:`fastortho.polar` (seed 000), ``"svd"`` the exact polar factor.
    """
    import fastortho  # late: fastortho/__init__ imports this module

    dtype = resolve_ns_dtype(cfg.dtype, X.device)
    if cfg.orthogonalizer == "newton_schulz":
        coeffs = list(cfg.coefficients) if isinstance(cfg.coefficients, tuple) else cfg.coefficients
        steps = cfg.steps
        return fastortho.newton_schulz(
            X, steps, coeffs, normalize=cfg.normalize, eps=cfg.eps, dtype=dtype, backend=cfg.backend
        )
    if cfg.orthogonalizer == "polar":
        return fastortho.polar(X.to(dtype), method="higham").to(dtype)
    if cfg.orthogonalizer == "svd":
        return fastortho.polar(X, method="svd").to(dtype)
    raise ValueError(f"orthogonalizer must be 'newton_schulz', 'polar' or 'svd', got {cfg.orthogonalizer!r}")


@dataclass
class MatrixUnit:
    """One matrix (or stack of same-shape matrices) that receives one orthogonalized update.

    ``param``/``buf`` are contiguous views of the parameter and its momentum buffer (a row block for
    split parameters); ``ns_input`` is the ``(B, m, n)`` orthogonalizer input, ``out`` its result.
    """

    param: Tensor
    buf: Tensor
    ns_input: Tensor
    scale: float
    group_index: int = 0
    name: str = ""
    out: Tensor | None = field(default=None, repr=False)


def _check_grad(p: Tensor, g: Tensor) -> None:
    if g.is_sparse:
        raise RuntimeError("Muon does not support sparse gradients (route this parameter to AdamW or "
                           "use a dense embedding)")
    if torch.is_complex(g) or torch.is_complex(p):
        raise RuntimeError("Muon does not support complex parameters or gradients")


def momentum_phase(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor],
    *,
    momentum: float,
    nesterov: bool,
    convention: str,
    placement: str,
    lr_scale: str,
    flatten: bool | None,
    split_sizes: Sequence[int] | None,
    ns_dtype: torch.dtype,
    nonfinite: str,
    group_index: int = 0,
    names: Sequence[str] | None = None,
    backend: str = "auto",
) -> tuple[list[MatrixUnit], Tensor | None]:
    r"""Phase 1 for one group: momentum (``before_ortho``) and the matrix units to orthogonalize.

    Returns the units and a boolean ``(len(params),)`` tensor, True where the parameter's update is
    finite (None with ``nonfinite="ignore"`` or ``placement="after_ortho"``, where the check runs in
    :func:`apply_phase`). A non-finite :math:`u` (its fused :math:`\sum u^2` is NaN/Inf) is replaced by
    zeros, which the orthogonalizer maps to a zero update, and its momentum buffer is reset to zero:
    the old buffer cannot be recovered after the in-place update, and a NaN kept there would poison
    every later step. No host sync unless ``nonfinite="raise"``.
    """
    for p, g in zip(params, grads):
        _check_grad(p, g)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    finite = None
    if placement == "before_ortho":
        us, sumsq = muon_momentum_(grads, bufs, momentum=momentum, nesterov=nesterov,
                                   convention=convention, out_dtype=ns_dtype, backend=backend)
        if nonfinite != "ignore" and len(us):
            finite = torch.isfinite(sumsq)
            if nonfinite == "raise":
                if not bool(finite.all()):  # the one documented host sync
                    bad = [names[i] if names else str(i) for i in (~finite).nonzero().flatten().tolist()]
                    raise FloatingPointError(f"Muon: non-finite momentum/update for parameter(s) {bad}")
            else:
                for i, (u, b) in enumerate(zip(us, bufs)):
                    bad = ~finite[i]
                    u.masked_fill_(bad, 0.0)
                    b.masked_fill_(bad, 0.0)
    elif placement == "after_ortho":
        us = [g.to(ns_dtype) for g in grads]  # a copy when the dtype differs; never written otherwise
    else:
        raise ValueError(f"momentum_placement must be 'before_ortho' or 'after_ortho', got {placement!r}")

    units: list[MatrixUnit] = []
    for i, (p, b, u) in enumerate(zip(params, bufs, us)):
        bsz, m, n = matrix_shape(p.shape, flatten)
        views = [t.view(bsz, m, n) for t in (p, b, u)]  # p, b, u are contiguous (see contiguous_params)
        name = names[i] if names else str(i)
        if split_sizes:
            if bsz != 1 or sum(split_sizes) != m:
                raise ValueError(f"split_sizes {tuple(split_sizes)} must sum to the {m} rows of a 2-D "
                                 f"(or flattened) parameter of shape {tuple(p.shape)}")
            # (1, s_k, n) row blocks of a contiguous (1, m, n) tensor are contiguous views
            blocks = zip(*(torch.split(v, list(split_sizes), dim=1) for v in views))
        else:
            blocks = [views]
        for k, (pb, bb, ub) in enumerate(blocks):
            units.append(MatrixUnit(
                param=pb, buf=bb, ns_input=ub, group_index=group_index,
                scale=lr_scale_factor(ub.shape[-2], ub.shape[-1], lr_scale),
                name=f"{name}[{k}]" if split_sizes else name,
            ))
    return units, finite


def orthogonalize_units(
    units: Sequence[MatrixUnit],
    configs: Sequence[OrthoConfig],
    orthogonalize_bucket: Callable[[Tensor, int], Tensor],
) -> list[list[MatrixUnit]]:
    """Phase 2: bucket units by (config, m, n, dtype, device) in order of appearance, one call per bucket.

    ``configs[g]`` is the :class:`OrthoConfig` of group ``g``; ``orthogonalize_bucket(stacked, g)``
    orthogonalizes a ``(B, m, n)`` stack with group ``g``'s settings (overridable by subclasses, e.g. a
    distributed strategy). Fills ``unit.out``; returns the buckets.
    """
    buckets: dict[tuple, list[MatrixUnit]] = {}
    for u in units:
        x = u.ns_input
        key = (configs[u.group_index], x.shape[-2], x.shape[-1], x.dtype, x.device)
        buckets.setdefault(key, []).append(u)
    for bucket in buckets.values():
        stacked = bucket[0].ns_input if len(bucket) == 1 else torch.cat([u.ns_input for u in bucket])
        # tall inputs come back as transposed views; the fused apply walks memory linearly
        out = orthogonalize_bucket(stacked, bucket[0].group_index).contiguous()
        for u, o in zip(bucket, torch.split(out, [u.ns_input.shape[0] for u in bucket])):
            u.out = o
    return list(buckets.values())


def apply_phase(
    units: Sequence[MatrixUnit],
    *,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    momentum: float,
    nesterov: bool,
    convention: str,
    placement: str,
    nonfinite: str,
    backend: str = "auto",
) -> Tensor | None:
    r"""Phase 3 for one group: :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta\,s\,O`, fused.

    With ``placement="after_ortho"`` the momentum runs here, on the orthogonalized gradients
    (:math:`B \leftarrow \beta B + (1-\beta)\,O(g)`, the update is :math:`B` or its Nesterov blend), and
    the non-finite check happens on it; returns that per-unit finite mask (else None).
    """
    if not units:
        return None
    outs = [u.out for u in units]  # (B, m, n), contiguous: slices along dim 0 of a batched result
    finite = None
    if placement == "after_ortho":
        outs, sumsq = muon_momentum_(outs, [u.buf for u in units], momentum=momentum, nesterov=nesterov,
                                     convention=convention, out_dtype=torch.float32, backend=backend)
        if nonfinite != "ignore":
            finite = torch.isfinite(sumsq)
            if nonfinite == "raise" and not bool(finite.all()):  # the one documented host sync
                bad = [u.name for u, f in zip(units, finite.tolist()) if not f]
                raise FloatingPointError(f"Muon: non-finite orthogonalized momentum for {bad}")
            if nonfinite == "skip":
                for i, (o, u) in enumerate(zip(outs, units)):
                    o.masked_fill_(~finite[i], 0.0)
                    u.buf.masked_fill_(~finite[i], 0.0)
    muon_apply_([u.param for u in units], outs, lr=lr, weight_decay=weight_decay,
                scales=[u.scale for u in units], backend=backend)
    return finite


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


def muon(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    eps: float = 1e-7,
    ns_steps: int | None = None,
    adjust_lr_fn: str | None = None,
    coefficients: Any = None,
    normalize: str = "fro",
    lr_scale: str | None = None,
    momentum_convention: str = "ema",
    momentum_placement: str = "before_ortho",
    orthogonalizer: str = "newton_schulz",
    ns_dtype: torch.dtype | None = None,
    backend: str = "auto",
    flatten: bool | None = None,
    split_sizes: Sequence[int] | None = None,
    nonfinite: str = "skip",
) -> Tensor | None:
    r"""One Muon step on ``params`` (functional; ``momentum_buffers`` are updated in place).

    Same arguments and meaning as :class:`fastortho.Muon` (one group). Returns the per-parameter
    finite mask (see :func:`momentum_phase`), or None when unchecked.
    """
    if not params:
        return None
    group = dict(ns_coefficients=ns_coefficients, ns_steps=ns_steps, coefficients=coefficients,
                 orthogonalizer=orthogonalizer, normalize=normalize, eps=eps, ns_dtype=ns_dtype,
                 backend=backend)
    cfg = OrthoConfig.from_group(group)
    rule = resolve_lr_scale(lr_scale, adjust_lr_fn)
    dtype = resolve_ns_dtype(ns_dtype, params[0].device)
    with contiguous_params(params) as work:
        units, finite = momentum_phase(
            work, grads, momentum_buffers, momentum=momentum, nesterov=nesterov,
            convention=momentum_convention, placement=momentum_placement, lr_scale=rule, flatten=flatten,
            split_sizes=split_sizes, ns_dtype=dtype, nonfinite=nonfinite, backend=backend,
        )
        orthogonalize_units(units, [cfg], lambda x, _g: orthogonalize(x, cfg))
        f2 = apply_phase(units, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         convention=momentum_convention, placement=momentum_placement,
                         nonfinite=nonfinite, backend=backend)
    return finite if finite is not None else f2
