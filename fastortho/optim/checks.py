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
from fastortho.optim.shapes import matrix_shape, resolve_lr_scale, split_blocks
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


def check_muon_group(group: dict[str, Any]) -> None:
    """A Muon group's keys after the defaults are filled in (``add_param_group``)."""
    resolve_lr_scale(group["lr_scale"], group["adjust_lr_fn"])
    check_coefficients(group["coefficients"])
    check_orthogonalizer(group)
    check_backend(group["backend"], group["params"])
    choice("variant", group["variant"], ("muon", "normuon"))
    number("beta2", group["beta2"], tensor_ok=True)
    if not isinstance(group["beta2"], Tensor) and not 0.0 <= group["beta2"] < 1.0:
        raise ValueError(f"beta2 (NorMuon's second-moment EMA weight) must be in [0, 1), got {group['beta2']}")
    if group["fan_in_first"] and group["split_sizes"]:
        raise ValueError("fan_in_first=True (a (fan_in, fan_out) weight such as Hugging Face's Conv1D) cannot be "
                         "combined with split_sizes, which splits rows = fan_out of an (out, in) matrix")
    # complex parameters raise at step() (RuntimeError, torch's message and timing)
    for p in group["params"]:
        if p.ndim < 2:
            raise ValueError(f"Muon group got a {p.ndim}-D parameter of shape {tuple(p.shape)}; "
                             "route it to an AdamW group (algorithm='adamw')")
        bsz, m, _ = matrix_shape(p.shape, group["flatten"])
        split_blocks(m, bsz, group["split_sizes"], p.shape)  # raises on a bad split


def check_capturable(group: dict[str, Any]) -> None:
    """``capturable=True`` needs a step without host reads: no ``nonfinite="raise"`` (it reads the flags)."""
    if group.get("capturable") and group.get("nonfinite") == "raise":
        raise ValueError("capturable=True cannot raise on non-finite updates (that reads a flag on the host); "
                         "use nonfinite='skip' (zeroes the update on the device) or 'ignore'")


def restore_orthogonalizers(groups: Sequence[dict[str, Any]], live: Sequence[Any], default: Any) -> None:
    """After loading a state dict, put back the callable orthogonalizers it stored as :data:`CUSTOM`: the
    loading optimizer's own (``live``, per group) or its default."""
    for i, group in enumerate(groups):
        if group.get("orthogonalizer") == CUSTOM:
            fn = live[i] if i < len(live) and callable(live[i]) else default
            if not callable(fn):
                raise ValueError(f"param group {i} of this checkpoint used a callable orthogonalizer, which a "
                                 "state dict cannot hold: construct the optimizer with orthogonalizer=<that "
                                 "callable> before load_state_dict")
            group["orthogonalizer"] = fn


def check_extras(*, adamw_betas: Any, qk_clip: Any) -> None:
    b1, b2 = adamw_betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"adamw_betas must be in [0, 1), got {adamw_betas}")
    if qk_clip is not None and not callable(getattr(qk_clip, "apply", None)):
        raise TypeError(f"qk_clip must have an apply() method (e.g. fastortho.optim.qk_clip.QKClip), "
                        f"got {type(qk_clip).__name__}")


def check_single_process(engine: Any, groups: Sequence[dict[str, Any]]) -> None:
    """What the distributed engine cannot run. NorMuon normalizes the whole orthogonalized matrix where it
    was orthogonalized (the owner), before its slices leave; with ``momentum_placement="after_ortho"`` the
    normalization acts on the momentum of O, whose buffer is sharded across ranks, so no rank holds it
    whole. (Stacks sharded on their stack dim raise at the first step: see the distributed plan.)"""
    if engine is None:
        return
    for g in groups:
        if g.get("variant") == "normuon" and g.get("momentum_placement") == "after_ortho":
            raise NotImplementedError(
                "variant='normuon' with momentum_placement='after_ortho' runs in a single process only: the "
                "row normalization would act on the momentum of O, which the distributed step keeps sharded; "
                "use momentum_placement='before_ortho' (the default) with DTensor parameters or a process_group")
