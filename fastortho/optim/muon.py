r"""``fastortho.Muon``: a drop-in superset of ``torch.optim.Muon`` with an auxiliary AdamW."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastortho.optim import functional as F
from fastortho.optim.adamw import adamw_step_

__all__ = ["Muon"]

_KELLER = (3.4445, -4.7750, 2.0315)
_NONFINITE = ("skip", "raise", "ignore")

#: Keys every Muon group carries, with their defaults: torch.optim.Muon's keys first, with torch's
#: values (so a fastortho state dict loads into torch.optim.Muon and steps there). ``__setstate__``
#: fills missing ones so checkpoints written by older versions (or by torch.optim.Muon) load.
_TORCH_NS_STEPS = 5
_MUON_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=_KELLER, eps=1e-7,
    ns_steps=_TORCH_NS_STEPS, adjust_lr_fn=None,
    coefficients=None, normalize="fro", lr_scale=None, momentum_convention="ema",
    momentum_placement="before_ortho", orthogonalizer="newton_schulz", ns_dtype=None, backend="auto",
    flatten=None, split_sizes=None, nonfinite="skip", algorithm="muon",
)


def _resolve_ns_steps(ns_steps: int | None, coefficients: Any) -> int:
    """The step count a group stores: ``ns_steps`` if given, else torch's 5 for ``ns_coefficients`` or
    the native length of ``coefficients``."""
    if ns_steps is not None:
        return int(ns_steps)
    if coefficients is None:
        return _TORCH_NS_STEPS
    from fastortho.coefficients import get_schedule

    return len(get_schedule(coefficients)[0])


class Muon(Optimizer):
    r"""Muon (MomentUm Orthogonalized by Newton–Schulz) for matrices, AdamW for everything else.

    .. math::
       \begin{aligned}
       &\textbf{input: } \eta\ (\text{lr}),\ \lambda\ (\text{weight\_decay}),\ \beta\ (\text{momentum}),
         \ \text{nesterov},\ \mathrm{Orth}\ (\text{orthogonalizer}),\ s(m,n)\ (\text{lr\_scale}) \\
       &\textbf{for each matrix } \theta \in \mathbb{R}^{m\times n}\ (\text{after flattening / splitting}): \\
       &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \\
       &\quad B_t \leftarrow \beta B_{t-1} + (1-\beta)\, g_t \quad (\text{"ema"};\ \text{"sum"}: \beta B_{t-1} + g_t) \\
       &\quad u_t \leftarrow (1-\beta) g_t + \beta B_t\ \text{if nesterov else } B_t
            \quad (\text{"sum"}: g_t + \beta B_t) \\
       &\quad O_t \leftarrow \mathrm{Orth}(u_t) \approx U V^\top,\quad u_t = U \Sigma V^\top \\
       &\quad \theta_t \leftarrow \theta_{t-1}(1 - \eta\lambda) - \eta\, s(m, n)\, O_t
       \end{aligned}

    With ``momentum_placement="after_ortho"`` the momentum averages orthogonalized gradients instead,
    :math:`B_t \leftarrow \beta B_{t-1} + (1-\beta)\mathrm{Orth}(g_t)`, update :math:`B_t` (or its Nesterov
    blend). Seed 001 argues for the default (accumulate first, then orthogonalize); the other order is
    kept for ablations. With :math:`\mathrm{Orth}` the 5-step Newton–Schulz iteration with Keller Jordan's
    triple :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`,
    :math:`X_0 = u / \max(\|u\|_F, \varepsilon)`, :math:`X \leftarrow aX + (bA + cA^2)X`,
    :math:`A = XX^\top`, this is exactly ``torch.optim.Muon``'s update.

    **Learning-rate scale** :math:`s(m, n)` (``lr_scale``; :math:`m` = fan_out = rows, :math:`n` = fan_in =
    columns of the matrix *as orthogonalized*):

    * ``"original"`` (default): :math:`\sqrt{\max(1, m/n)}`. Keller Jordan; torch's ``adjust_lr_fn="original"``.
    * ``"rms_match"``: :math:`0.2\sqrt{\max(m, n)}`, so the update RMS is ≈ 0.2 like AdamW's and AdamW's lr
      and weight decay carry over (Moonlight; torch's ``"match_rms_adamw"``).
    * ``"spectral"``: :math:`\sqrt{m/n}` = :math:`\sqrt{\text{fan\_out}/\text{fan\_in}}`, the steepest-descent
      step under the RMS→RMS operator norm (Bernstein, "Deriving Muon", seed 004; torch's
      ``"spectral_unclamped"``). Below 1 for wide matrices, unlike ``"original"``.
    * ``"none"``: :math:`1`.

    Peers use conflicting names for these (EO's "spectral" is :math:`\sqrt{\max(m,n)}`; dion's
    "spectral_norm" is our ``"spectral"``; pytorch_optimizer's ``use_adjusted_lr`` is inverted): the
    formulas above are the contract. A conv kernel ``(out, in, kh, kw)`` is the matrix
    ``(out, in·kh·kw)`` and its scale comes from that shape (KellerJordan/Muon's snapshot, flash-muon and
    muon_fsdp2 read ``kh/kw`` instead).

    **Shapes.** 2-D parameters are matrices. ``flatten=True`` (group key) views ``(out, ...)`` as
    ``(out, prod(...))`` (conv kernels); ``flatten=False`` treats ``(..., m, n)`` as a stack of matrices
    orthogonalized independently (MoE experts); the default (None) stacks 3-D and flattens ≥ 4-D.
    ``split_sizes`` (group key) orthogonalizes row blocks separately (fused QKV: ``(d, d, d)``; per head:
    ``(d_head,) * n_heads``), each block with its own scale. Matrices of equal shape, dtype, device and
    orthogonalizer settings, across all parameters and groups, are orthogonalized in one batched call
    (:meth:`_orthogonalize_bucket`).

    **Which optimizer a parameter gets.** A group's ``algorithm`` is ``"muon"`` or ``"adamw"``. A group
    without it is split: parameters with ``ndim >= 2`` go to Muon, the rest to AdamW. Embeddings and
    output heads are 2-D but should use AdamW: build groups with :func:`fastortho.muon_param_groups`,
    which routes by module type and shape. AdamW groups use ``adamw_lr``, ``betas``,
    ``adamw_eps``, ``adamw_weight_decay``, ``bias_correction`` and ``zero_init`` (seed 003; see
    :mod:`fastortho.optim.adamw`); a group can override each (``lr`` and ``weight_decay`` for AdamW groups
    are the AdamW values).

    **Non-finite updates** (``nonfinite``), detected per parameter from the fused momentum kernel's
    :math:`\sum u^2` at no extra pass: ``"skip"`` (default) zeroes that parameter's orthogonalized update
    (decoupled weight decay still applies), resets its momentum buffer to zero (its old value is gone
    after the in-place update, and a NaN kept there would poison every later step), and adds one to
    :attr:`nonfinite_count`, all on the device without a host sync; ``"raise"`` raises
    ``FloatingPointError`` (one host sync per step); ``"ignore"`` does no check (torch's behaviour).

    Args:
        params: parameters or param groups.
        lr: :math:`\eta` for Muon groups (default 1e-3, torch's). A float or a 0-dim tensor.
        weight_decay: decoupled :math:`\lambda` for Muon groups, applied as :math:`\theta(1-\eta\lambda)`
            with the *unscaled* lr, as torch does (default 0.1, torch's).
        momentum: :math:`\beta` (default 0.95).
        nesterov: Nesterov blend as the orthogonalizer input (default True).
        ns_coefficients: one :math:`(a, b, c)` triple used ``ns_steps`` times when ``coefficients`` is None
            (torch's argument; default Keller's triple).
        eps: :math:`\varepsilon` in :math:`X_0 = u/\max(\text{safety}\cdot\|u\|_F, \varepsilon)` (default 1e-7).
        ns_steps: Newton–Schulz steps. None (default) = 5 with ``ns_coefficients`` (torch's default) or
            the schedule's native length with ``coefficients``; the resolved count is what the group
            stores (an int, as torch's). More steps than a list has: see
            :func:`fastortho.coefficients.get_schedule`.
        adjust_lr_fn: torch's name for the scale rule: None/"original", "match_rms_adamw"
            (= ``"rms_match"``), "spectral_unclamped" (= ``"spectral"``). Must agree with ``lr_scale``.
            Bad values of torch's arguments raise torch's exception with torch's message.
        coefficients: a schedule name (``"keller"``, ``"you"``, ``"polar_express"``,
            ``"polar_express_paper"``, ``"cubic"``), a sequence of triples or a
            :class:`fastortho.Schedule`; overrides ``ns_coefficients`` and brings its own safety factor.
        normalize: ``"fro"`` (:math:`\|u\|_F`, torch's) or ``"spectral"`` (see :func:`fastortho.newton_schulz`).
        lr_scale: ``"original"``, ``"rms_match"``, ``"spectral"`` or ``"none"`` (see above);
            None = from ``adjust_lr_fn``.
        momentum_convention: ``"ema"`` (torch, Keller) or ``"sum"`` (Moonlight, dion). At constant
            :math:`\beta` they differ by the factor :math:`1-\beta`, which the normalization removes.
        momentum_placement: ``"before_ortho"`` (default, seed 001) or ``"after_ortho"``.
        orthogonalizer: ``"newton_schulz"`` (default), ``"polar"`` (Higham iteration, accurate) or
            ``"svd"`` (exact, float64: for ablations).
        ns_dtype: orthogonalizer compute dtype. None (default): bf16 on CUDA, fp32 on CPU. torch.optim.Muon
            always uses bf16; pass ``torch.bfloat16`` to reproduce it on CPU.
        backend: Newton–Schulz backend, ``"auto"``, ``"torch"`` or ``"triton"``; the fused momentum/apply
            kernels of ``fastortho._C`` are used whenever built.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see above).
        adamw_lr: AdamW lr (default None: ``lr``).
        adamw_betas: AdamW :math:`(\beta_1, \beta_2)` (default (0.9, 0.999), torch.optim.AdamW's).
        adamw_eps: AdamW :math:`\epsilon` (default 1e-8).
        adamw_weight_decay: AdamW decoupled weight decay (default 0.0: biases, gains and embeddings are
            usually not decayed).
        bias_correction: AdamW bias correction (default True).
        zero_init: AdamW moments start at zero (default True) or at :math:`g_1, g_1^2`.
        telemetry: record, each step, the per-matrix update RMS :math:`\eta\, s\, \|O\|_F/\sqrt{mn}` and the
            singular-value band :math:`[\sigma_{\min}, \sigma_{\max}]` of :math:`O` (one batched ``svdvals``
            per bucket: opt-in). Read with :meth:`telemetry_report`. Not recorded in distributed mode.
        process_group: the data-parallel group of plain (DDP-replicated) parameters: each matrix is then
            orthogonalized by one rank and the results are exchanged (``"owner"``). DTensor parameters
            (FSDP2, TP, HSDP) need nothing: their mesh and placements decide. See
            :mod:`fastortho.distributed`.
        strategy: ``"auto"`` (default), or force ``"local"``, ``"owner"``, ``"a2a"`` or ``"gather"`` for the
            parameters that need communication (also a param-group key). :attr:`comm_stats` reports the
            bytes each step sends.

    Differences from torch.optim.Muon, all opt-out: on CPU the orthogonalizer runs in fp32 rather than
    bf16; non-finite updates are skipped rather than applied; non-2-D parameters are accepted (routed
    to AdamW or orthogonalized as stacks/flattened kernels) instead of raising; state is created for
    every parameter at construction (so checkpoints of every rank have the same keys); ``momentum``
    must be below 1 and ``ns_steps`` at least 0 (torch accepts both and then never updates the buffer /
    runs no step); ``ns_steps`` ≥ 100 and a wrong-length ``ns_coefficients`` raise at construction, with
    torch's message, where torch raises at the first step. Finite momenta of any magnitude get their
    update: torch's bf16 Frobenius norm overflows to inf for :math:`\|u\|_F \gtrsim 3\cdot 10^{38}`
    and its update then collapses to zero (weight decay only).

    Example (migrating from torch.optim.Muon)::

        # before: two optimizers, 2-D params only
        # muon = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
        opt = fastortho.Muon(fastortho.muon_param_groups(model), lr=0.02, adamw_lr=3e-4)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = _KELLER,
        eps: float = 1e-7,
        ns_steps: int | None = None,
        adjust_lr_fn: str | None = None,
        *,
        coefficients: str | Sequence[Sequence[float]] | Any | None = None,
        normalize: str = "fro",
        lr_scale: str | None = None,
        momentum_convention: str = "ema",
        momentum_placement: str = "before_ortho",
        orthogonalizer: str = "newton_schulz",
        ns_dtype: torch.dtype | None = None,
        backend: str = "auto",
        nonfinite: str = "skip",
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        bias_correction: bool = True,
        zero_init: bool = True,
        telemetry: bool = False,
        process_group: Any = None,
        strategy: str = "auto",
    ) -> None:
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
        F.resolve_lr_scale(lr_scale, adjust_lr_fn)  # validates both names and their agreement
        # torch raises these two at the first step (same type and message); here at construction
        if ns_steps is not None and ns_steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        if ns_steps is not None and ns_steps < 0:
            raise ValueError(f"ns_steps should be >= 0 but is: {ns_steps}")
        if len(tuple(ns_coefficients)) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        ns_steps = _resolve_ns_steps(ns_steps, coefficients)
        self._check_choice("momentum_convention", momentum_convention, ("ema", "sum"))
        self._check_choice("momentum_placement", momentum_placement, ("before_ortho", "after_ortho"))
        self._check_choice("orthogonalizer", orthogonalizer, ("newton_schulz", "polar", "svd"))
        self._check_choice("normalize", normalize, ("fro", "spectral"))
        self._check_choice("nonfinite", nonfinite, _NONFINITE)
        b1, b2 = adamw_betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"adamw_betas must be in [0, 1), got {adamw_betas}")
        defaults = dict(
            _MUON_DEFAULTS, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            coefficients=coefficients, normalize=normalize, lr_scale=lr_scale,
            momentum_convention=momentum_convention, momentum_placement=momentum_placement,
            orthogonalizer=orthogonalizer, ns_dtype=ns_dtype, backend=backend, nonfinite=nonfinite,
            algorithm=None,
        )
        self._adamw_defaults = dict(
            lr=lr if adamw_lr is None else adamw_lr, weight_decay=adamw_weight_decay, betas=tuple(adamw_betas),
            adamw_eps=adamw_eps, bias_correction=bias_correction, zero_init=zero_init,
        )
        self.telemetry = bool(telemetry)
        self._telemetry: list[dict[str, Any]] = []
        self._nonfinite_count: Tensor | None = None
        super().__init__(params, defaults)
        from fastortho import distributed  # DTensor params or a process group: see fastortho.distributed

        self._dist_engine = distributed.make_engine(self, process_group, strategy)

    # ------------------------------------------------------------------------------------------
    # groups and state
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; one without ``algorithm`` is split into a Muon part (ndim ≥ 2) and an AdamW part."""
        if isinstance(param_group.get("params"), Tensor):
            param_group = dict(param_group, params=[param_group["params"]])
        algo = param_group.get("algorithm", None)
        if algo is None:
            params = list(param_group["params"])
            # entries are tensors or (name, tensor) pairs (torch's named parameters)
            mats = [p for p in params if (p[1] if isinstance(p, tuple) else p).ndim >= 2]
            rest = [p for p in params if (p[1] if isinstance(p, tuple) else p).ndim < 2]
            # the AdamW half takes the AdamW defaults, not the group's Muon lr/weight decay
            muon_only = {"lr", "weight_decay"}
            for part, name in ((mats, "muon"), (rest, "adamw")):
                if part or (name == "muon" and not rest):
                    extra = {k: v for k, v in param_group.items()
                             if k != "params" and not (name == "adamw" and k in muon_only)}
                    self.add_param_group(dict(extra, params=part, algorithm=name))
            return
        self._check_choice("algorithm", algo, ("muon", "adamw"))
        if algo == "adamw":
            for k, v in self._adamw_defaults.items():
                param_group.setdefault(k, v)
        # a group's own schedule runs its native length, not the optimizer's default count
        own_schedule = "coefficients" in param_group and "ns_steps" not in param_group
        super().add_param_group(param_group)  # fills the missing keys from the defaults, in place
        group = self.param_groups[-1]
        if algo == "muon":
            F.resolve_lr_scale(group["lr_scale"], group["adjust_lr_fn"])
            if own_schedule:
                group["ns_steps"] = _resolve_ns_steps(None, group["coefficients"])
            # complex parameters raise at step() (RuntimeError, torch's message and timing)
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon group got a {p.ndim}-D parameter of shape {tuple(p.shape)}; "
                                     "route it to an AdamW group (algorithm='adamw')")
                bsz, m, n = F.matrix_shape(p.shape, group["flatten"])
                if group["split_sizes"] and (bsz != 1 or sum(group["split_sizes"]) != m):
                    raise ValueError(f"split_sizes {tuple(group['split_sizes'])} must sum to the {m} rows "
                                     f"of parameter of shape {tuple(p.shape)}")
        # eager state: every rank / every checkpoint has the same keys, even for params without grads
        for p in group["params"]:
            self._init_state(p, group)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        if group["algorithm"] == "muon":
            if "momentum_buffer" not in state:
                # zeros_like: a DTensor parameter gets a DTensor buffer with its placements (sharded state)
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)  # CPU, as torch.optim.AdamW (not capturable)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("telemetry", False)
        self.__dict__.setdefault("_telemetry", [])
        self.__dict__.setdefault("_nonfinite_count", None)
        self.__dict__.setdefault("_dist_engine", None)
        adamw = self.__dict__.setdefault("_adamw_defaults", dict(
            lr=self.defaults.get("lr", 1e-3), weight_decay=0.0, betas=(0.9, 0.999), adamw_eps=1e-8,
            bias_correction=True, zero_init=True))
        for group in self.param_groups:
            # a checkpoint of torch.optim.Muon (or an older fastortho) has no "algorithm": it is Muon
            group.setdefault("algorithm", "muon")
            if group["algorithm"] == "adamw":
                for k, v in adamw.items():
                    group.setdefault(k, v)
            for k, v in _MUON_DEFAULTS.items():
                group.setdefault(k, self.defaults.get(k, v) if k != "algorithm" else v)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self._nonfinite_count is not None:
            sd["nonfinite_count"] = self._nonfinite_count.detach().clone()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        count = state_dict.pop("nonfinite_count", None)
        super().load_state_dict(state_dict)
        self._nonfinite_count = None if count is None else count.clone()

    @property
    def nonfinite_count(self) -> int:
        """How many parameter updates were skipped as non-finite (reading it syncs with the device)."""
        return 0 if self._nonfinite_count is None else int(self._nonfinite_count)

    @property
    def comm_stats(self) -> dict[str, Any]:
        """Communication of the last step (see :mod:`fastortho.distributed`): ``bytes`` and ``collectives``
        per kind (``a2a``, ``owner``, ``gather``, ``flags``) sent by this rank, the analytic ``ideal`` bytes
        per strategy, ``numel`` of the Muon matrices per strategy, ``ns_flops`` run by this rank.
        Empty in single-process mode."""
        return {} if self._dist_engine is None else self._dist_engine.stats

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------
    def _orthogonalize_bucket(self, stacked: Tensor, group: dict[str, Any]) -> Tensor:
        """Orthogonalize a ``(B, m, n)`` stack of same-shape matrices with ``group``'s settings.

        The single entry point of the orthogonalization phase: a distributed subclass overrides it to
        shard the batch across ranks (every rank sees the same buckets in the same order).
        """
        return F.orthogonalize(stacked, F.OrthoConfig.from_group(group))

    def _apply_group(self, group: dict[str, Any], units: Sequence[F.MatrixUnit]) -> None:
        """Decoupled weight decay and the scaled update of one group; counts skipped non-finite updates."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device.type == "cpu" and not torch.compiler.is_compiling():
            # torch.optim.Muon reads a tensor lr as a Python float (float64 arithmetic): a CPU tensor
            # costs no device sync, and this keeps fp32 parameters bit-identical to torch's
            lr = lr.item()
        finite = F.apply_phase(
            units, lr=lr, weight_decay=group["weight_decay"], momentum=group["momentum"],
            nesterov=group["nesterov"], convention=group["momentum_convention"],
            placement=group["momentum_placement"], nonfinite=group["nonfinite"],
        )
        if finite is not None and group["nonfinite"] == "skip":
            self._count_nonfinite(finite)

    def _count_nonfinite(self, finite: Tensor) -> None:
        bad = (~finite).sum()
        if self._nonfinite_count is None:
            self._nonfinite_count = torch.zeros((), dtype=torch.int64, device=finite.device)
        self._nonfinite_count += bad.to(self._nonfinite_count.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (``closure`` re-evaluates the loss, under grad mode)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._dist_engine is not None:
            self._dist_engine.step()
            return loss

        muon_groups: list[tuple[int, dict[str, Any], list[F.MatrixUnit], F.contiguous_params]] = []
        all_units: list[F.MatrixUnit] = []
        for gi, group in enumerate(self.param_groups):
            # params without a grad are skipped, never zero-filled (their momentum is left alone)
            idx = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            params = [group["params"][i] for i in idx]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["algorithm"] == "adamw":
                states = [self._init_state(p, group) for p in params]
                adamw_step_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                            [s["step"] for s in states], lr=group["lr"], betas=group["betas"],
                            eps=group["adamw_eps"], weight_decay=group["weight_decay"],
                            bias_correction=group["bias_correction"], zero_init=group["zero_init"])
                continue
            bufs = [self._init_state(p, group)["momentum_buffer"] for p in params]
            work = F.contiguous_params(params)
            units, finite = F.momentum_phase(
                work.work, grads, bufs, momentum=group["momentum"], nesterov=group["nesterov"],
                convention=group["momentum_convention"], placement=group["momentum_placement"],
                lr_scale=F.resolve_lr_scale(group["lr_scale"], group["adjust_lr_fn"]),
                flatten=group["flatten"], split_sizes=group["split_sizes"],
                ns_dtype=F.resolve_ns_dtype(group["ns_dtype"], params[0].device),
                nonfinite=group["nonfinite"], group_index=gi,
                names=[f"{gi}.{i}" for i in idx],
            )
            if finite is not None and group["nonfinite"] == "skip":
                self._count_nonfinite(finite)
            muon_groups.append((gi, group, units, work))
            all_units.extend(units)

        if all_units:
            configs = {gi: F.OrthoConfig.from_group(g) for gi, g, _, _ in muon_groups}
            cfg_list = [configs.get(i) for i in range(len(self.param_groups))]
            F.orthogonalize_units(all_units, cfg_list,
                                  lambda x, gi: self._orthogonalize_bucket(x, self.param_groups[gi]))
        if self.telemetry:
            self._telemetry = []
        for gi, group, units, work in muon_groups:
            self._apply_group(group, units)
            work.__exit__()
            if self.telemetry:
                self._record_telemetry(group, units)
        return loss

    # ------------------------------------------------------------------------------------------
    # telemetry
    # ------------------------------------------------------------------------------------------
    def _record_telemetry(self, group: dict[str, Any], units: Sequence[F.MatrixUnit]) -> None:
        lr = group["lr"]
        for u in units:
            o = u.out.float()
            m, n = o.shape[-2:]
            sv = torch.linalg.svdvals(o)  # (B, min(m, n)); opt-in, costs an SVD per matrix
            self._telemetry.append(dict(
                name=u.name, shape=(m, n), batch=o.shape[0],
                update_rms=lr * u.scale * torch.linalg.matrix_norm(o) / math.sqrt(m * n),
                sigma_min=sv.amin(-1), sigma_max=sv.amax(-1),
            ))

    def telemetry_report(self) -> list[dict[str, Any]]:
        r"""Per matrix unit of the last step: ``name`` ("group.index", "[k]" for split blocks), ``shape``,
        ``update_rms`` (:math:`\eta\,s\,\|O\|_F/\sqrt{mn}`, the RMS of the applied step, comparable with
        AdamW's :math:`\eta\,\|\hat m/(\sqrt{\hat v}+\epsilon)\|_{RMS}`, typically 0.2η) and the
        orthogonality band ``sigma_min``/``sigma_max`` of :math:`O`, as Python floats (lists for stacks).
        Empty unless ``telemetry=True``. Reading it syncs with the device.
        """
        def py(t: Tensor) -> float | list[float]:
            v = t.tolist()
            return v[0] if len(v) == 1 else v

        return [dict(name=r["name"], shape=r["shape"], update_rms=py(r["update_rms"]),
                     sigma_min=py(r["sigma_min"]), sigma_max=py(r["sigma_max"])) for r in self._telemetry]
