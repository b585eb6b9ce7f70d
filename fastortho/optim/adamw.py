r"""The auxiliary AdamW that :class:`fastortho.Muon` runs on the parameters Muon should not touch.

Per parameter, with step :math:`t`, gradient :math:`g_t`, learning rate :math:`\eta`, decay :math:`\lambda`:

.. math::
    \begin{aligned}
    \theta &\leftarrow \theta\,(1 - \eta\lambda) \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    \hat m_t &= m_t / (1-\beta_1^t), \qquad \hat v_t = v_t / (1-\beta_2^t)
        \quad\text{(only if bias\_correction, else } \hat m = m,\ \hat v = v\text{)} \\
    \theta &\leftarrow \theta - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)
    \end{aligned}

``zero_init=True`` starts from :math:`m_0 = v_0 = 0` (torch.optim.AdamW). ``zero_init=False`` starts
from :math:`m_0 = g_1,\ v_0 = g_1^2`, so :math:`m_1 = g_1,\ v_1 = g_1^2`. Of the four
(zero_init, bias_correction) pairs the initialization matters more than the correction: e.g.
without zero-init but with bias correction the first step is inflated by
:math:`\sqrt{1-\beta_2}/(1-\beta_1)`. The defaults (True, True) are torch.optim.AdamW, and with them this
function performs torch's ``foreach`` AdamW operation for operation (fp32 results are bit-identical,
see ``tests/test_muon.py``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adamw_step_"]


def _update_moments(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor],
                    beta1: float, beta2: float) -> list[Tensor]:
    """m ← β₁·m + (1 − β₁)·g, v ← β₂·v + (1 − β₂)·g² in place; returns √v (new tensors)."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    return torch._foreach_sqrt(exp_avg_sqs)


def adamw_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
    zero_init: bool = True,
    capturable: bool = False,
) -> None:
    """One AdamW step over lists, in place (``steps`` are 0-dim float tensors, incremented here).

    Not ``capturable``: the step counters live on the CPU (as in torch.optim's non-capturable AdamW),
    so the bias corrections are host arithmetic and the step needs no device sync. ``capturable``: the
    counters, ``lr`` and ``weight_decay`` are device tensors and every quantity, the bias corrections
    included, is computed on the device with no host read and no branch on a device value (CUDA-graph
    capturable); results agree with the host form to float32 rounding.
    """
    if not params:
        return
    if capturable:
        _adamw_capturable(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps), lr=lr,
                          betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                          zero_init=zero_init)
        return
    for p, g in zip(params, grads):
        if g.is_sparse:
            raise RuntimeError("the auxiliary AdamW does not support sparse gradients")
        if torch.is_complex(p):
            raise RuntimeError("the auxiliary AdamW does not support complex parameters")
    if isinstance(lr, Tensor):
        lr = lr.item()  # as torch.optim.AdamW does when not capturable
    beta1, beta2 = betas
    params, grads = list(params), list(grads)
    exp_avgs, exp_avg_sqs = list(exp_avgs), list(exp_avg_sqs)
    torch._foreach_add_(list(steps), 1)
    t = [float(s) for s in steps]  # CPU tensors: no device sync
    if not zero_init:
        for i, ti in enumerate(t):
            if ti == 1.0:  # m_0 = g_1, v_0 = g_1²; the EMA below then keeps m_1 = g_1, v_1 = g_1²
                exp_avgs[i].copy_(grads[i])
                torch.mul(grads[i], grads[i], out=exp_avg_sqs[i])
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    denom = _update_moments(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
    if bias_correction:
        step_size = [-(lr / (1 - beta1**ti)) for ti in t]
        torch._foreach_div_(denom, [(1 - beta2**ti) ** 0.5 for ti in t])
    else:
        step_size = [-lr for _ in t]
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


def _adamw_capturable(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor, betas: tuple[float, float], eps: float,
    weight_decay: float | Tensor, bias_correction: bool, zero_init: bool,
) -> None:
    """:func:`adamw_step_` with device step counters and device (or constant) ``lr``/``weight_decay``."""
    beta1, beta2 = betas
    dev = params[0].device
    lr_t = torch.as_tensor(lr, dtype=torch.float32, device=dev) if not isinstance(lr, Tensor) else lr
    torch._foreach_add_(steps, 1)
    if not zero_init:  # m_0 = g_1, v_0 = g_1² at the first step, chosen on the device
        for m, v, g, t in zip(exp_avgs, exp_avg_sqs, grads, steps):
            first = t == 1
            m.copy_(torch.where(first, g, m))
            v.copy_(torch.where(first, g * g, v))
    if isinstance(weight_decay, Tensor) or weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr_t * weight_decay)
    denom = _update_moments(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
    if bias_correction:
        # step size −lr/(1 − β₁ᵗ) and √(1 − β₂ᵗ), per parameter, as device tensors
        bc1 = torch._foreach_sub(torch._foreach_pow(beta1, steps), 1)  # −(1 − β₁ᵗ)
        bc2 = torch._foreach_sqrt(torch._foreach_neg(torch._foreach_sub(torch._foreach_pow(beta2, steps), 1)))
        torch._foreach_div_(denom, bc2)
        step_size = [lr_t / b for b in bc1]  # −lr/(1 − β₁ᵗ)
    else:
        step_size = [-lr_t for _ in steps]
    torch._foreach_add_(denom, eps)
    # p += (step_size · m) / denom: addcdiv takes no tensor value, so fold the step size into m's quotient
    torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, step_size), denom)
