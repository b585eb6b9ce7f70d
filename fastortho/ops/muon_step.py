r"""Fused element-wise parts of a Muon step, over lists of tensors.

A Muon step is ``momentum -> Newton-Schulz -> scaled update``. The two element-wise ends are pure
memory traffic, so they are fused into one pass each over a whole parameter list:

``muon_momentum_`` (before NS), per tensor :math:`i`, element-wise in fp32 (``g``: grad, ``B``: buffer,
:math:`\beta`: momentum):

=================  ===============================================  =========================================
convention         buffer update                                    NS input :math:`u` (nesterov / not)
=================  ===============================================  =========================================
``"ema"``          :math:`B \leftarrow \beta B + (1-\beta) g`        :math:`u = (1-\beta) g + \beta B` / :math:`u = B`
                   torch: ``B.lerp_(g, 1-β)``                        torch: ``g.lerp(B, β)``
``"sum"``          :math:`B \leftarrow \beta B + g`                  :math:`u = g + \beta B` / :math:`u = B`
                   torch: ``B.mul_(β).add_(g)``                      torch: ``g.add(B, alpha=β)``
=================  ===============================================  =========================================

Who uses which (the formulas above are exactly theirs, operation for operation):

* ``"ema"``: ``torch.optim.Muon`` (``buf.lerp_(grad, 1 - momentum)``; ``grad.lerp(buf, momentum)``) and
  KellerJordan/Muon (same, but it overwrites ``grad`` in place for the Nesterov blend: we never write
  the grad). ``lerp`` is evaluated as torch does: for weight :math:`w`,
  ``fma(w, e - s, s)`` if :math:`|w| < 0.5` else ``fma(w - 1, e - s, e)``.
* ``"sum"``: Moonlight (``buf.mul_(momentum).add_(g)``; ``g.add(buf, alpha=momentum)``, i.e.
  ``fma(β, B, g)``) and microsoft/dion (``_foreach_mul_(M, mu); _foreach_add_(M, G)``, then
  ``U = M*mu; U += G``). dion's Nesterov rounds ``β·B`` before the add; we follow Moonlight's single
  rounding, so dion's and ours differ by at most half an ulp of ``β·B`` per element.

``muon_apply_`` (after NS), per tensor: :math:`p \leftarrow p\,(1 - \eta\lambda) - \eta\, s_i\, O_i`, in fp32
and rounded once to ``p``'s dtype (torch.optim.Muon rounds twice for bf16 params:
``p.mul_(1-lr*wd); p.add_(O, alpha=-lr*s)``; in fp32 the two agree bit for bit).

Backends: ``"c"`` is ``torch.ops.fastortho`` from the compiled ``fastortho._C`` (one launch over a whole
list; CPU and CUDA kernels share their per-element math; a list mixing dtype combinations is split
into one call per combination and the per-tensor results scattered back, which copies a small index
to the device: for CUDA-graph capture pass one dtype combination per call); ``"foreach"`` is plain
PyTorch ``_foreach`` ops (:mod:`fastortho.ops._foreach`), the reference and the fallback; ``"auto"`` takes ``"c"`` when it has a kernel for the device and
the dtypes. Both backends give bit-identical fp32 buffers and NS inputs (see ``tests/test_csrc.py`` for
the cases where they do not, and the bounds there).

Dtypes: the kernels take fp32, bf16 and fp16 tensors (math in fp32, one rounding to the storage
dtype). float64 tensors (grads, buffers, NS inputs, params, updates) take the ``_foreach`` path with
the math in float64, exactly torch.optim.Muon's float64 operations.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from . import _load
from ._foreach import apply_foreach, momentum_foreach

__all__ = ["muon_momentum_", "muon_apply_", "check_capture_scalars"]

Backend = Literal["auto", "c", "foreach"]

#: dtypes the compiled kernels handle (math in fp32); float64 is served by the ``_foreach`` path
_C_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_GRAD_DTYPES = _BUF_DTYPES = _OUT_DTYPES = _PARAM_DTYPES = _UPDATE_DTYPES = _FLOAT_DTYPES


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_lists(
    name_a: str, a: Sequence[Tensor], name_b: str, b: Sequence[Tensor],
    dtypes_a: tuple[torch.dtype, ...], dtypes_b: tuple[torch.dtype, ...],
) -> torch.device | None:
    """Validate two parallel tensor lists; return their common device (None for empty lists)."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")
    device = None
    for i, (x, y) in enumerate(zip(a, b)):
        for name, t, ok in ((name_a, x, dtypes_a), (name_b, y, dtypes_b)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
            if t.layout != torch.strided:
                raise ValueError(f"{name}[{i}] has layout {t.layout}; only dense (strided) tensors are supported")
            if t.dtype not in ok:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; supported: {', '.join(map(str, ok))}")
            if not t.is_contiguous():
                raise ValueError(
                    f"{name}[{i}] is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                    "pass t.contiguous() (the kernels walk memory linearly)"
                )
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but the first tensor is on {device}; "
                                 "all tensors of one call must share a device")
        if x.shape != y.shape:
            raise ValueError(f"{name_a}[{i}] has shape {tuple(x.shape)} but {name_b}[{i}] has {tuple(y.shape)}")
    return device


def _pick_backend(backend: str, device: torch.device | None, *lists: Sequence[Tensor]) -> str:
    """``"c"`` or ``"foreach"``; ``"auto"`` takes ``"c"`` for a device with kernels when every tensor's
    dtype has one (float64 has none: it goes to the float64 ``_foreach`` path)."""
    if backend not in ("auto", "c", "foreach"):
        raise ValueError(f"backend must be 'auto', 'c' or 'foreach', got {backend!r}")
    if device is None or backend == "foreach":
        return "foreach"
    c_dtypes = all(t.dtype in _C_DTYPES for lst in lists for t in lst)
    if backend == "c":
        _load.require_c(device.type)
        if not c_dtypes:
            bad = sorted({str(t.dtype) for lst in lists for t in lst if t.dtype not in _C_DTYPES})
            raise TypeError(f"backend='c' has kernels for dtypes {', '.join(map(str, _C_DTYPES))} only, got {bad}; "
                            "use backend='auto' or 'foreach' (float64 runs as _foreach ops in float64)")
        return "c"
    return "c" if device.type in _load.C_DEVICE_TYPES and c_dtypes else "foreach"


def _no_kernel_image(exc: BaseException) -> bool:
    """True for the launch error of a ``_C`` built without SASS or PTX for this GPU (csrc/cuda/bindings.cpp
    words it with "no kernel image", as does the CUDA runtime's own cudaErrorNoKernelImageForDevice)."""
    return isinstance(exc, RuntimeError) and "no kernel image" in str(exc)


def _warn_no_kernel_image(exc: BaseException) -> None:
    import warnings
    warnings.warn(f"{exc}\nFalling back to torch._foreach ops for this call (backend='auto').",
                  RuntimeWarning, stacklevel=3)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_capture_scalars(device: torch.device, capturing: bool, **scalars: object) -> None:
    """Refuse scalars a CUDA graph would freeze: while the current stream is being captured, every
    tensor among ``scalars`` (lr, weight_decay, scales) must live on ``device``.

    A CPU tensor is read on the host when the graph is *recorded*: each replay would reuse that value,
    silently ignoring later ``fill_``/``copy_`` into it (a learning-rate schedule would stop). Python
    numbers are constants by contract and are allowed. Not capturing: anything goes."""
    if not capturing:
        return
    for name, v in scalars.items():
        if isinstance(v, Tensor) and v.device != device:
            raise ValueError(
                f"muon_apply_: {name} is a tensor on {v.device} while a CUDA graph is being captured on {device}; "
                f"its value would be frozen into the graph. Pass {name} as a tensor on {device} "
                f"(the optimizers do this with capturable=True).")


def _groups(*lists: Sequence[Tensor]) -> dict[tuple[torch.dtype, ...], list[int]]:
    """Indices grouped by the dtypes of the i-th tensor of each list (one C launch per group)."""
    out: dict[tuple[torch.dtype, ...], list[int]] = {}
    for i in range(len(lists[0])):
        out.setdefault(tuple(lst[i].dtype for lst in lists), []).append(i)
    return out


# ----------------------------------------------------------------------------------------------
# momentum
# ----------------------------------------------------------------------------------------------
def muon_momentum_(
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor],
    *,
    momentum: float,
    nesterov: bool,
    convention: Literal["ema", "sum"] = "ema",
    out_dtype: torch.dtype = torch.bfloat16,
    backend: Backend = "auto",
    out: Sequence[Tensor] | None = None,
    sumsq_out: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    r"""Update momentum buffers in place and form the Newton-Schulz inputs, in one pass.

    Per tensor :math:`i` and element, in fp32 (:math:`\beta` = ``momentum``, ``g`` read in its dtype and
    widened, ``B`` the buffer):

    * ``convention="ema"``: :math:`B \leftarrow \beta B + (1-\beta) g` (``B.lerp_(g, 1-β)``);
      ``u = g.lerp(B, β)`` :math:`= (1-\beta) g + \beta B` if ``nesterov`` else :math:`u = B`.
    * ``convention="sum"``: :math:`B \leftarrow \beta B + g` (``B.mul_(β).add_(g)``, two roundings);
      ``u = g.add(B, alpha=β)`` :math:`= g + \beta B` (one fma) if ``nesterov`` else :math:`u = B`.

    The Nesterov blend uses the fp32 value of the new buffer before it is rounded to a bf16 buffer.

    Args:
        grads: gradients (fp32/bf16/fp16/fp64, contiguous). Never written.
        bufs: momentum buffers, same shapes (fp32, bf16, fp16 or fp64; a 16-bit buffer is updated in
            fp32 and rounded once). Updated in place.
        momentum: :math:`\beta`.
        nesterov: use the Nesterov blend as the NS input.
        convention: ``"ema"`` (torch.optim.Muon, KellerJordan) or ``"sum"`` (Moonlight, dion).
        out_dtype: dtype of the returned NS inputs (bf16, fp32, fp16 or fp64).
        backend: ``"c"`` (compiled kernels), ``"foreach"`` (pure torch) or ``"auto"``.
        out: optional preallocated NS inputs (``out_dtype``, the grads' shapes, contiguous, distinct
            from the buffers), e.g. a workspace reused across steps; returned as the first result.
        sumsq_out: optional preallocated float64 (or float32) tensor of shape ``(len(grads),)``.

    Returns:
        ``(ns_inputs, sumsq)``: ``ns_inputs[i]`` is :math:`u_i` rounded to ``out_dtype`` (a new tensor,
        or ``out[i]``; never a buffer); ``sumsq`` is a float64 tensor of shape ``(len(grads),)`` on the
        grads' device with :math:`\sum u_i^2` computed from the fp32 (float64) :math:`u_i` **before**
        rounding to ``out_dtype``, for the Frobenius normalization :math:`\|u_i\|_F = \sqrt{\text{sumsq}_i}`.

        It is the health check, with no extra pass: ``sumsq[i]`` is finite if and only if every
        element of :math:`u_i` is. A finite fp32 :math:`u` has :math:`u^2 < 2^{256}`, so a float64 sum
        of any length below :math:`2^{767}` elements cannot overflow (an fp32 sum would, for
        :math:`|u| \gtrsim 10^{19}`: such momenta are finite and get a normal update). The C kernels sum
        the exact squares in float64 (no rounding but the adds); the foreach fallback squares a float64
        norm (within a few ulps). For float64 :math:`u` the fallback computes :math:`\sum (u/s)^2 \cdot s^2`
        with :math:`s` the power of two at or above :math:`\max|u|`, which overflows only where the true
        sum exceeds float64's range; it is then the largest finite float64 (finite in, finite out) and
        finiteness is decided by an ``isfinite`` reduction of :math:`u`.
        A float32 ``sumsq_out`` gets the same sum rounded to fp32 (it saturates to inf above
        :math:`3.4\cdot 10^{38}`: for the health check pass float64).
    """
    if convention not in ("ema", "sum"):
        raise ValueError(f"convention must be 'ema' or 'sum', got {convention!r}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    momentum = float(momentum)
    nesterov = bool(nesterov)
    device = _check_lists("grads", grads, "bufs", bufs, _GRAD_DTYPES, _BUF_DTYPES)
    be = _pick_backend(backend, device, grads, bufs, [torch.empty(0, dtype=out_dtype)])
    if device is None:
        return [], torch.zeros(0, dtype=torch.float64)
    if out is None:
        outs = [torch.empty(g.shape, dtype=out_dtype, device=device) for g in grads]
    else:
        _check_lists("grads", grads, "out", out, _GRAD_DTYPES, (out_dtype,))
        outs = list(out)
        for i, (o, b) in enumerate(zip(outs, bufs)):
            if o.data_ptr() == b.data_ptr() and o.numel() > 0:
                raise ValueError(f"out[{i}] aliases bufs[{i}]; the NS input needs its own memory")
    if sumsq_out is None:
        sumsq = torch.empty(len(grads), dtype=torch.float64, device=device)
    else:
        if sumsq_out.dtype not in (torch.float64, torch.float32) or sumsq_out.shape != (len(grads),) \
                or sumsq_out.device != device or not sumsq_out.is_contiguous():
            raise ValueError(f"sumsq_out must be a contiguous float64 (or float32) tensor of shape ({len(grads)},) "
                             f"on {device}, got {sumsq_out.dtype} {tuple(sumsq_out.shape)} on {sumsq_out.device}")
        sumsq = sumsq_out
    if be == "c":
        op = torch.ops.fastortho.muon_momentum_
        groups = _groups(grads, bufs)
        try:
            if len(groups) == 1:
                op(list(grads), list(bufs), outs, sumsq, momentum, nesterov, convention == "ema")
            else:
                for idx in groups.values():
                    part = torch.empty(len(idx), dtype=sumsq.dtype, device=device)
                    op([grads[i] for i in idx], [bufs[i] for i in idx], [outs[i] for i in idx], part,
                       momentum, nesterov, convention == "ema")
                    sumsq[idx] = part
            return outs, sumsq
        except RuntimeError as exc:
            # the launch fails before any kernel runs: nothing was written, the fallback starts clean
            if backend != "auto" or not _no_kernel_image(exc):
                raise
            _warn_no_kernel_image(exc)
    momentum_foreach(list(grads), list(bufs), outs, sumsq, momentum, nesterov, convention)
    return outs, sumsq


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------
def muon_apply_(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    scales: Sequence[float] | Tensor,
    backend: Backend = "auto",
) -> None:
    r"""Decoupled weight decay and the scaled orthogonalized update, in one pass.

    Per tensor :math:`i`: :math:`p_i \leftarrow p_i (1 - \eta\lambda) - \eta s_i O_i`, computed in fp32 as
    ``fma(-a_i, O, p * d)`` with :math:`d = 1 - \eta\lambda` and :math:`a_i = \eta s_i`, rounded once to
    ``p``'s dtype.

    Scalars: when ``lr``, ``weight_decay`` and ``scales`` are Python numbers, :math:`d` and :math:`a_i`
    are computed in float64 and rounded to fp32 (exactly what ``p.mul_(1 - lr*wd)`` and
    ``p.add_(O, alpha=-lr*s)`` do, so fp32 params match torch.optim.Muon bit for bit). When any of
    them is a tensor (0-dim ``lr``/``weight_decay``, or ``scales`` of shape ``(n,)``), they are read
    on the device, with no host sync (CUDA-graph friendly), and :math:`d`, :math:`a_i` are computed in
    fp32.

    Args:
        params: parameters (fp32/bf16/fp16/fp64, contiguous), updated in place. float64 parameters are
            updated in float64 (``p.mul_(d); p.add_(O, alpha=-a)`` with float64 scalars, as torch does).
        updates: orthogonalized updates :math:`O_i` (bf16/fp32/fp16/fp64), same shapes. Not written.
        lr: :math:`\eta`, a number or a 0-dim tensor.
        weight_decay: :math:`\lambda`, a number or a 0-dim tensor.
        scales: :math:`s_i`, one per tensor (e.g. :math:`\sqrt{\max(1, m/n)}`), a sequence of numbers
            or a 1-D tensor.
        backend: ``"c"``, ``"foreach"`` or ``"auto"``.
    """
    device = _check_lists("params", params, "updates", updates, _PARAM_DTYPES, _UPDATE_DTYPES)
    n = len(params)
    if isinstance(scales, Tensor):
        if scales.shape != (n,):
            raise ValueError(f"scales must have shape ({n},), got {tuple(scales.shape)}")
    elif len(scales) != n:
        raise ValueError(f"scales has {len(scales)} entries for {n} tensors")
    for name, v in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(v, Tensor) and v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
    be = _pick_backend(backend, device, params, updates)
    if n == 0:
        return
    check_capture_scalars(device, _capturing(device), lr=lr, weight_decay=weight_decay, scales=scales)
    tensor_scalars = any(isinstance(v, Tensor) for v in (lr, weight_decay, scales))

    def dev_f32(v):
        return v.to(device=device, dtype=torch.float32) if isinstance(v, Tensor) else v

    if be == "c":
        try:
            _apply_c(params, updates, lr, weight_decay, scales, tensor_scalars, dev_f32, n)
            return
        except RuntimeError as exc:
            if backend != "auto" or not _no_kernel_image(exc):
                raise
            _warn_no_kernel_image(exc)
    apply_foreach(list(params), list(updates), lr, weight_decay, scales, tensor_scalars, dev_f32)


def _apply_c(params, updates, lr, weight_decay, scales, tensor_scalars, dev_f32, n) -> None:
    """``muon_apply_`` through ``torch.ops.fastortho`` (one launch per dtype combination)."""
    groups = _groups(params, updates).values()
    if not tensor_scalars:
        lr_f, wd_f = float(lr), float(weight_decay)
        for idx in groups:
            torch.ops.fastortho.muon_apply_.default(
                [params[i] for i in idx], [updates[i] for i in idx], lr_f, wd_f, [float(scales[i]) for i in idx])
        return
    # The .tensor overload: a tensor on the params' device is read by the kernel (no host sync); a
    # CPU tensor is read on the host (a Python number becomes one, rounded to fp32 as the kernel would).
    lr_t, wd_t = (v.to(torch.float32).reshape(()) if isinstance(v, Tensor)
                  else torch.tensor(float(v), dtype=torch.float32) for v in (lr, weight_decay))
    sc_t = (dev_f32(scales) if isinstance(scales, Tensor)
            else torch.tensor([float(s) for s in scales], dtype=torch.float32))
    for idx in groups:
        torch.ops.fastortho.muon_apply_.tensor([params[i] for i in idx], [updates[i] for i in idx], lr_t, wd_t,
                                               sc_t[idx] if len(idx) != n else sc_t)
