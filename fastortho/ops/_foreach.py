"""The ``_foreach`` fallback of the fused Muon step ops: torch.optim.Muon's (``"ema"``) and Moonlight's
(``"sum"``) own tensor formulas on fp32 copies (float64 tensors in float64). It is the reference the
compiled kernels are tested against bit for bit (``tests/test_csrc.py``) and the path taken where they
have no kernel (float64, a device without kernels, ``backend="foreach"``)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["momentum_foreach", "apply_foreach"]


def momentum_foreach(grads, bufs, outs, sumsq, momentum, nesterov, convention) -> None:
    """Reference: the peers' own torch formulas on fp32 copies (fp32 tensors are used as they are);
    tensors whose grad or buffer is float64 run the same formulas in float64."""
    wide = [i for i, (g, b) in enumerate(zip(grads, bufs)) if torch.float64 in (g.dtype, b.dtype)]
    if wide:
        narrow = [i for i in range(len(grads)) if i not in set(wide)]
        parts = torch.empty(len(grads), dtype=torch.float64, device=sumsq.device)
        for idx, fn in ((narrow, _momentum_foreach_fp32), (wide, _momentum_foreach_fp64)):
            if idx:
                part = torch.empty(len(idx), dtype=torch.float64, device=sumsq.device)
                fn([grads[i] for i in idx], [bufs[i] for i in idx], [outs[i] for i in idx], part,
                   momentum, nesterov, convention)
                parts[idx] = part
        sumsq.copy_(parts)
        return
    _momentum_foreach_fp32(grads, bufs, outs, sumsq, momentum, nesterov, convention)


def _momentum_formulas(g, b, momentum, nesterov, convention):
    """torch.optim.Muon's (ema) or Moonlight's (sum) buffer update in place on ``b``; returns the NS inputs."""
    if convention == "ema":
        torch._foreach_lerp_(b, g, 1.0 - momentum)
        return torch._foreach_lerp(g, b, momentum) if nesterov else b
    torch._foreach_mul_(b, momentum)
    torch._foreach_add_(b, g)
    return torch._foreach_add(g, b, alpha=momentum) if nesterov else b


def _write_back(bufs, outs, b_work, u_work) -> None:
    narrowed = [(b, b_new) for b, b_new in zip(bufs, b_work) if b is not b_new]
    if narrowed:
        torch._foreach_copy_([b for b, _ in narrowed], [b_new for _, b_new in narrowed])
    torch._foreach_copy_(outs, u_work)


def _momentum_foreach_fp32(grads, bufs, outs, sumsq, momentum, nesterov, convention) -> None:
    g32 = [g.float() for g in grads]  # .float() of an fp32 tensor is the tensor itself: never written
    b32 = [b if b.dtype == torch.float32 else b.float() for b in bufs]
    u32 = _momentum_formulas(g32, b32, momentum, nesterov, convention)
    # sum of squares of the fp32 u, before rounding to out_dtype. The norm is taken in float64: an fp32
    # norm of one 64M-element tensor on the CPU is off by 1% (measured), and it overflows for
    # |u| >~ 1e19, where float64 (u^2 < 2^256 for finite fp32 u) cannot.
    norms = torch._foreach_norm(u32, 2, dtype=torch.float64)
    sumsq.copy_(torch.stack(norms).square_())
    _write_back(bufs, outs, b32, u32)


def _momentum_foreach_fp64(grads, bufs, outs, sumsq, momentum, nesterov, convention) -> None:
    g64 = [g.double() for g in grads]
    b64 = [b if b.dtype == torch.float64 else b.double() for b in bufs]
    u64 = _momentum_formulas(g64, b64, momentum, nesterov, convention)
    sumsq.copy_(_scaled_sumsq_fp64(u64))
    _write_back(bufs, outs, b64, u64)


def _scaled_sumsq_fp64(us: list[Tensor]) -> Tensor:
    r""":math:`\sum u^2` of float64 tensors without intermediate overflow: :math:`s^2 \sum (u/s)^2` with
    :math:`s = 2^{\lceil\log_2 \max|u|\rceil}` (exact divisions), saturated at the largest finite
    float64 when every element is finite; NaN when any element is not (an isfinite reduction)."""
    amax = torch.stack([u.abs().amax() if u.numel() else u.new_zeros(()) for u in us])
    finite = torch.stack([u.isfinite().all() for u in us])
    _, e = torch.frexp(torch.where(finite & (amax > 0), amax, torch.ones_like(amax)))
    scale = torch.ldexp(torch.ones_like(amax), e.to(torch.float64))
    scaled = [u / s for u, s in zip(us, scale.unbind(0))]
    s2 = torch.stack(torch._foreach_norm(scaled, 2)).square_()
    big = torch.finfo(torch.float64).max
    # s2 <= numel and s^2 may overflow on its own: multiply in the log domain's safe order
    total = torch.where(s2 > 0, (s2 * scale).clamp(max=big) * scale, s2).clamp(max=big)
    return torch.where(finite, total, torch.full_like(total, float("nan")))


def apply_foreach(params, updates, lr, weight_decay, scales, tensor_scalars, dev_f32) -> None:
    """Reference: ``p.mul_(d); p.add_(O, alpha=-a)`` on fp32 copies, one rounding to p's dtype;
    float64 parameters in float64 with float64 scalars (torch.optim.Muon's float64 operations)."""
    wide = [i for i, p in enumerate(params) if p.dtype == torch.float64]
    if wide:
        # torch.optim.Muon reads a tensor lr as a Python float: the float64 path does the same (a host
        # read, hence a sync for a CUDA tensor; float64 has no fused kernel to keep it on the device)
        lr64, wd64 = float(lr), float(weight_decay)
        sc64 = scales.tolist() if isinstance(scales, Tensor) else [float(x) for x in scales]
        torch._foreach_mul_([params[i] for i in wide], 1.0 - lr64 * wd64)
        for i in wide:
            params[i].add_(updates[i], alpha=-(lr64 * sc64[i]))  # one fma, as torch's add_(alpha=)
        rest = [i for i in range(len(params)) if i not in set(wide)]
        if rest:
            sc = scales[rest] if isinstance(scales, Tensor) else [scales[i] for i in rest]
            apply_foreach([params[i] for i in rest], [updates[i] for i in rest], lr, weight_decay, sc,
                           tensor_scalars, dev_f32)
        return
    p32 = [p if p.dtype == torch.float32 else p.float() for p in params]
    o32 = [o.float() for o in updates]
    if not tensor_scalars:
        d = 1.0 - float(lr) * float(weight_decay)
        torch._foreach_mul_(p32, d)
        # add_(alpha=) is one fma, as in torch.optim.Muon; alpha is per call, so one foreach call per
        # distinct scale (a model has a handful of distinct shapes, hence of scales)
        by_alpha: dict[float, list[int]] = {}
        for i, s in enumerate(scales):
            by_alpha.setdefault(-(float(lr) * float(s)), []).append(i)
        for alpha, idx in by_alpha.items():
            torch._foreach_add_([p32[i] for i in idx], [o32[i] for i in idx], alpha=alpha)
    else:
        lr_t = dev_f32(lr) if isinstance(lr, Tensor) else np.float32(lr)
        wd_t = dev_f32(weight_decay) if isinstance(weight_decay, Tensor) else np.float32(weight_decay)
        lr_t = torch.as_tensor(lr_t, dtype=torch.float32, device=p32[0].device).reshape(())
        wd_t = torch.as_tensor(wd_t, dtype=torch.float32, device=p32[0].device).reshape(())
        d = 1.0 - lr_t * wd_t  # fp32, like the kernel
        sc = dev_f32(scales) if isinstance(scales, Tensor) else torch.tensor(
            [float(s) for s in scales], dtype=torch.float32, device=p32[0].device)
        neg_a = (lr_t * sc).neg_()  # a_i = lr * s_i in fp32
        torch._foreach_mul_(p32, d)
        # one rounding of a*O before the add (the kernel fuses it): see the bound in tests/test_csrc.py
        torch._foreach_add_(p32, torch._foreach_mul(o32, list(neg_a.unbind(0))))
    narrowed = [(p, p_new) for p, p_new in zip(params, p32) if p is not p_new]
    if narrowed:
        torch._foreach_copy_([p for p, _ in narrowed], [p_new for _, p_new in narrowed])
