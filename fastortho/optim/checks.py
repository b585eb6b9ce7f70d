"""Checks of :class:`fastortho.Muon`'s arguments and group keys, run at construction: each message names
the argument and says what to pass instead."""
from __future__ import annotations

import difflib
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fastortho.coefficients import SCHEDULES, get_schedule
from fastortho.optim.shapes import resolve_lr_scale
from fastortho.optim.defaults import ORTHOGONALIZER_ALIASES, ORTHOGONALIZERS, TORCH_NS_STEPS

__all__ = ["CUSTOM", "choice", "number", "check_ns_dtype", "check_coefficients", "check_orthogonalizer",
           "check_backend", "resolve_ns_steps", "torch_checks"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "torch", "triton")
#: what ``state_dict`` writes in place of a callable orthogonalizer (a function is not checkpoint data)
CUSTOM = "custom"


def resolve_ns_steps(ns_steps: int | None, coefficients: Any) -> int:
    """The step count a group stores: ``ns_steps`` if given, else torch's 5 for ``ns_coefficients`` or
    the native length of ``coefficients``."""
    if ns_steps is not None:
        return int(ns_steps)
    return TORCH_NS_STEPS if coefficients is None else len(get_schedule(coefficients)[0])


def choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def number(name: str, value: object, tensor_ok: bool = False) -> None:
    """Hyperparameters are real numbers (a 1-element tensor where allowed), never strings."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) or tensor_ok and isinstance(value, Tensor):
        return
    example = {"str": f"{name}={value}"}.get(type(value).__name__, f"{name}=1e-3")
    raise TypeError(f"{name} must be a number{' or a 1-element tensor' if tensor_ok else ''}, got "
                    f"{type(value).__name__} {value!r}; pass e.g. {example} (no quotes)")


def check_coefficients(coefficients: Any) -> None:
    if isinstance(coefficients, str) and coefficients not in SCHEDULES:
        close = difflib.get_close_matches(coefficients, list(SCHEDULES), n=1)
        hint = f"did you mean coefficients={close[0]!r}? " if close else ""
        raise ValueError(f"coefficients={coefficients!r} is not a schedule name; {hint}"
                         f"choose one of {sorted(SCHEDULES)} or pass a sequence of (a, b, c) triples")
    if coefficients is not None:
        get_schedule(coefficients)  # validates sequences and Schedules (its message names the problem)


def check_orthogonalizer(group: dict[str, Any]) -> None:
    orth = group["orthogonalizer"]
    if callable(orth) or orth == CUSTOM or orth in ORTHOGONALIZERS:
        return
    if orth in ORTHOGONALIZER_ALIASES:
        warnings.warn(f"orthogonalizer={orth!r} is deprecated: it runs Higham's method, write "
                      f"orthogonalizer={ORTHOGONALIZER_ALIASES[orth]!r}", DeprecationWarning, stacklevel=3)
        group["orthogonalizer"] = ORTHOGONALIZER_ALIASES[orth]
        return
    raise ValueError(f"orthogonalizer must be one of {list(ORTHOGONALIZERS)} or a callable "
                     f"(Tensor[B, m, n]) -> Tensor, got {orth!r}")


def check_backend(backend: object, params: Sequence[Tensor]) -> None:
    choice("backend", backend, BACKENDS)
    if backend != "triton":
        return
    from fastortho.kernels import HAS_TRITON, interpreter_enabled

    if not HAS_TRITON:
        raise ValueError("backend='triton' needs Triton (pip install triton); use backend='auto' or 'torch'")
    cpu = [tuple(p.shape) for p in params if p.device.type != "cuda"]
    if cpu and not interpreter_enabled():
        raise ValueError(f"backend='triton' runs on CUDA tensors, but parameters of shapes {cpu} are on "
                         f"{params[0].device.type}; use backend='auto' (Triton on CUDA, torch elsewhere) or "
                         "'torch' (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")


def check_ns_dtype(ns_dtype: Any) -> None:
    if ns_dtype is not None and ns_dtype not in _FLOATS:
        raise TypeError(f"ns_dtype must be None (bf16 on CUDA, fp32 elsewhere) or a floating dtype "
                        f"{[str(d) for d in _FLOATS]}, got {ns_dtype!r}; e.g. ns_dtype=torch.bfloat16")


def torch_checks(*, lr: Any, momentum: Any, weight_decay: Any, ns_steps: Any, ns_coefficients: Any,
                 lr_scale: Any, adjust_lr_fn: Any) -> None:
    """torch.optim.Muon's checks, with its exception types and messages, in its order (plus momentum < 1)."""
    # torch.optim.Muon's checks and messages, in its order
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not 0.0 <= momentum:
        raise ValueError(f"momentum should be >= 0 but is: {momentum}")
    if not momentum < 1.0:
        raise ValueError(f"momentum should be < 1 but is: {momentum} (the EMA weight 1 - momentum "
                         "would be <= 0: the buffer would never follow the gradient)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
    resolve_lr_scale(lr_scale, adjust_lr_fn)  # validates both names and their agreement
    # torch raises these two at the first step (same type and message); here at construction
    if ns_steps is not None and ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if ns_steps is not None and ns_steps < 0:
        raise ValueError(f"ns_steps should be >= 0 but is: {ns_steps}")
    if len(tuple(ns_coefficients)) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
