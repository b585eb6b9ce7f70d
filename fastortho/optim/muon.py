"""``fastortho.Muon``: a drop-in superset of ``torch.optim.Muon`` with an auxiliary AdamW."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastortho.newton_schulz import canonical_normalize
from fastortho.optim import checks as C
from fastortho.optim import functional as F
from fastortho.optim import interop
from fastortho.optim.variants import prepare_capturable
from fastortho.optim.defaults import ADAMW_DEFAULTS, MUON_DEFAULTS, NONFINITE_POLICIES
from fastortho.optim.distributed import make_engine

__all__ = ["Muon"]

_D = MUON_DEFAULTS

class Muon(Optimizer):
    r"""Muon (MomentUm Orthogonalized by Newton–Schulz) for matrices, AdamW for everything else.

    For each matrix θ (m × n, after flattening / splitting), with lr η, weight decay λ, momentum β::

        g  = ∇f(θ)
        B ← β·B + (1 − β)·g                      ("ema";  "sum": β·B + g)
        u  = (1 − β)·g + β·B  if nesterov else B  ("sum": g + β·B)
        O  = Orth(u) ≈ U·Vᵀ                       (u = U·Σ·Vᵀ)
        θ ← θ·(1 − η·λ) − η·s(m, n)·O

    With ``momentum_placement="after_ortho"`` the momentum averages orthogonalized gradients instead
    (B ← β·B + (1 − β)·Orth(g), update B or its Nesterov blend); accumulating first is the default,
    the other order is kept for ablations. With Orth the 5-step Newton–Schulz iteration with Keller
    Jordan's triple (a, b, c) = (3.4445, −4.7750, 2.0315), X₀ = u / max(‖u‖_F, ε),
    X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ, this is exactly ``torch.optim.Muon``'s update.

    **Learning-rate scale** s(m, n) (``lr_scale``, m = fan_out = rows, n = fan_in = columns of the
    matrix *as orthogonalized*; the table with every peer's name is :func:`fastortho.optim.shapes.lr_scale_factor`):
    ``"original"`` (default) √max(1, m/n) (Keller Jordan, torch); ``"rms_match"`` 0.2·√max(m, n), update
    RMS ≈ 0.2 like AdamW's (Moonlight); ``"spectral"`` √(m/n) (Bernstein, "Deriving Muon"); ``"none"``.
    A (fan_in, fan_out) weight (Hugging Face's ``Conv1D``) needs ``fan_in_first=True`` (group key).

    **Shapes.** 2-D parameters are matrices. ``flatten=True`` (group key) views (out, ...) as
    (out, prod(...)) (conv kernels); ``flatten=False`` treats (..., m, n) as a stack of matrices
    orthogonalized independently (MoE experts); the default (None) stacks 3-D and flattens ≥ 4-D.
    ``split_sizes`` (group key) orthogonalizes row blocks separately (fused QKV: (d, d, d); per head:
    (d_head,) * n_heads), each block with its own scale. Matrices of equal shape, dtype, device and
    orthogonalizer settings, across all parameters and groups, are orthogonalized in one batched call.

    **Which optimizer a parameter gets.** A group's ``algorithm`` is ``"muon"`` or ``"adamw"``. A group
    without it is split: parameters with ndim ≥ 2 go to Muon, the rest to AdamW. Embeddings and
    output heads are 2-D but should use AdamW: build groups with :func:`fastortho.muon_param_groups`.
    AdamW groups use ``adamw_lr``, ``betas``, ``adamw_eps``, ``adamw_weight_decay``,
    ``bias_correction`` and ``zero_init`` (see :mod:`fastortho.optim.adamw`); a group can override
    each (``lr`` and ``weight_decay`` of AdamW groups are the AdamW values).

    **Variants** (``variant``, group key): ``"muon"``, or ``"normuon"``: each row of O is divided by the
    root of an EMA (weight ``beta2``) of its mean square, then O is rescaled to its former Frobenius norm
    (NorMuon, see :mod:`fastortho.optim.variants`; state ``normuon_v``). **Capturable** (``capturable``):
    lr, weight decay and momentum are kept as 0-dim tensors on the parameters' device (schedulers
    ``fill_`` them) and ``step()`` reads no device value on the host (CUDA-graph capturable).

    **Non-finite updates** (``nonfinite``), detected per parameter from the fused momentum kernel's
    Σu² at no extra pass: ``"skip"`` (default) zeroes that parameter's orthogonalized update (decoupled
    weight decay still applies), resets its momentum buffer to zero (a NaN kept there would poison
    every later step), and adds one to :attr:`nonfinite_count`, all on the device without a host sync;
    ``"raise"`` raises ``FloatingPointError`` (one host sync per step); ``"ignore"`` does no check
    (torch's behaviour).

    Args:
        params: parameters or param groups (a list, or a generator read once).
        lr: η for Muon groups (default 1e-3, torch's). A float or a 1-element tensor.
        weight_decay: decoupled λ for Muon groups, applied as θ·(1 − η·λ) with the *unscaled* lr, as
            torch does (default 0.1, torch's).
        momentum: β (default 0.95).
        nesterov: Nesterov blend as the orthogonalizer input (default True).
        ns_coefficients: one (a, b, c) triple used ``ns_steps`` times when ``coefficients`` is None
            (torch's argument; default Keller's triple).
        eps: ε in X₀ = u / max(safety·‖u‖_F, ε) (default 1e-7).
        ns_steps: Newton–Schulz steps. None (default) = 5 with ``ns_coefficients`` (torch's default) or
            the schedule's native length with ``coefficients``; the group stores the resolved int.
        adjust_lr_fn: torch's name for the scale rule: None/"original", "match_rms_adamw"
            (= ``"rms_match"``), "spectral_unclamped" (= ``"spectral"``). Must agree with ``lr_scale``.
            Bad values of torch's arguments raise torch's exception with torch's message.
        coefficients: a schedule name (``"keller"``, ``"you"``, ``"polar_express"``,
            ``"polar_express_paper"``, ``"cubic"``), a sequence of triples or a
            :class:`fastortho.Schedule`; overrides ``ns_coefficients`` and brings its own safety factor.
        normalize: ``"fro"`` (‖u‖_F, torch's) or ``"gram"`` (‖uuᵀ‖_F^{1/2} ≥ σ_max; see :func:`fastortho.newton_schulz`).
        lr_scale: ``"original"``, ``"rms_match"``, ``"spectral"`` or ``"none"`` (see above);
            None = from ``adjust_lr_fn``.
        momentum_convention: ``"ema"`` (torch, Keller) or ``"sum"`` (Moonlight, dion). At constant β
            they differ by the factor 1 − β, which the normalization removes.
        momentum_placement: ``"before_ortho"`` (default) or ``"after_ortho"``.
        orthogonalizer: ``"newton_schulz"`` (default), or a method of :func:`fastortho.polar`:
            ``"qdwh"``, ``"higham"`` (accurate iterations) or ``"svd"`` (exact, float64: for
            ablations); ``"polar"`` is a deprecated alias of ``"higham"``. Or a callable mapping a
            ``(B, m, n)`` stack to a tensor of the same shape (bring your own Newton–Schulz); it gets
            the input in ``ns_dtype`` and its result is used as returned. A state dict stores
            ``"custom"`` in its place: give the callable again to the optimizer that loads it.
        ns_dtype: orthogonalizer compute dtype (float32, bfloat16, float16 or float64). None (default):
            bf16 on CUDA, fp32 on CPU. torch.optim.Muon always uses bf16.
        backend: Newton–Schulz backend, ``"auto"``, ``"torch"`` or ``"triton"`` (CUDA parameters); the
            fused momentum/apply kernels of ``fastortho._C`` are used whenever built.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see above).
        adamw_lr: AdamW lr (default None: ``lr``).
        adamw_betas: AdamW (β₁, β₂) (default (0.9, 0.999), torch.optim.AdamW's).
        adamw_eps: AdamW ε (default 1e-8).
        adamw_weight_decay: AdamW decoupled weight decay (default 0.0).
        bias_correction: AdamW bias correction (default True).
        zero_init: AdamW moments start at zero (default True) or at g₁, g₁².
        telemetry: record, each step, the per-matrix update RMS η·s·‖O‖_F/√(mn) and the singular-value
            band [σ_min, σ_max] of O (one batched ``svdvals`` per bucket: opt-in). Read with
            :meth:`telemetry_report`. Not recorded in distributed mode.
        process_group: the data-parallel group of plain (DDP-replicated) parameters: each matrix is then
            orthogonalized by one rank and the results are exchanged. DTensor parameters (FSDP2, TP,
            HSDP) need nothing: their mesh and placements decide. See :mod:`fastortho.optim.distributed`.
        strategy: ``"auto"`` (default), or force ``"local"``, ``"owner"``, ``"a2a"`` or ``"gather"`` for the
            parameters that need communication (also a param-group key). :attr:`comm_stats` reports the
            bytes each step sends. ``dist_bucket_numel``: exchange stage size (elements per owner; 2**24).
        variant: ``"muon"`` or ``"normuon"`` (also a group key); ``beta2``: NorMuon's EMA weight (0.95).
        capturable: device-tensor lr / weight decay / momentum and no host read in ``step()`` (no
            ``nonfinite="raise"``; ``backend="auto"`` Newton–Schulz runs torch matmuls).
        qk_clip: an object with an ``apply()`` method (e.g. :class:`fastortho.optim.qk_clip.QKClip`),
            called at the end of every :meth:`step`, under ``no_grad`` (MuonClip).

    Differences from torch.optim.Muon, all opt-out: on CPU the orthogonalizer runs in fp32 rather than
    bf16; non-finite updates are skipped rather than applied; non-2-D parameters are accepted (routed
    to AdamW or orthogonalized as stacks/flattened kernels) instead of raising; state is created for
    every parameter at construction (so checkpoints of every rank have the same keys); ``momentum``
    must be below 1 and ``ns_steps`` at least 0; ``ns_steps`` ≥ 100, a wrong-length
    ``ns_coefficients`` and every other bad argument raise at construction (torch's two with torch's
    message). Finite momenta of any magnitude get their update: torch's bf16 Frobenius norm overflows
    to inf for ‖u‖_F ≳ 3·10³⁸ and its update then collapses to zero (weight decay only).

    Example (migrating from torch.optim.Muon)::

        # before: two optimizers, 2-D params only
        # muon = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
        opt = fastortho.Muon(fastortho.muon_param_groups(model), lr=0.02, adamw_lr=3e-4)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = _D["lr"],
        weight_decay: float = _D["weight_decay"],
        momentum: float = _D["momentum"],
        nesterov: bool = _D["nesterov"],
        ns_coefficients: tuple[float, float, float] = _D["ns_coefficients"],
        eps: float = _D["eps"],
        ns_steps: int | None = _D["ns_steps"],
        adjust_lr_fn: str | None = _D["adjust_lr_fn"],
        *,
        coefficients: str | Sequence[Sequence[float]] | Any | None = _D["coefficients"],
        normalize: str = _D["normalize"],
        lr_scale: str | None = _D["lr_scale"],
        momentum_convention: str = _D["momentum_convention"],
        momentum_placement: str = _D["momentum_placement"],
        orthogonalizer: str | F.Orthogonalizer = _D["orthogonalizer"],
        ns_dtype: torch.dtype | None = _D["ns_dtype"],
        backend: str = _D["backend"],
        nonfinite: str = _D["nonfinite"],
        adamw_lr: float | Tensor | None = ADAMW_DEFAULTS["lr"],
        adamw_betas: tuple[float, float] = ADAMW_DEFAULTS["betas"],
        adamw_eps: float = ADAMW_DEFAULTS["adamw_eps"],
        adamw_weight_decay: float = ADAMW_DEFAULTS["weight_decay"],
        bias_correction: bool = ADAMW_DEFAULTS["bias_correction"],
        zero_init: bool = ADAMW_DEFAULTS["zero_init"],
        telemetry: bool = False,
        process_group: Any = None,
        strategy: str = "auto", dist_bucket_numel: float | None = None,
        qk_clip: Any = None,
        variant: str = _D["variant"],
        beta2: float = _D["beta2"],
        capturable: bool = _D["capturable"],
    ) -> None:
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum), ("eps", eps),
                            ("adamw_eps", adamw_eps), ("adamw_weight_decay", adamw_weight_decay)):
            C.number(name, value, tensor_ok=name == "lr")
        if adamw_lr is not None:
            C.number("adamw_lr", adamw_lr, tensor_ok=True)
        C.torch_checks(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                       ns_coefficients=ns_coefficients, lr_scale=lr_scale, adjust_lr_fn=adjust_lr_fn)
        C.check_coefficients(coefficients)
        ns_steps = C.resolve_ns_steps(ns_steps, coefficients)
        C.choice("momentum_convention", momentum_convention, ("ema", "sum"))
        C.choice("momentum_placement", momentum_placement, ("before_ortho", "after_ortho"))
        normalize = canonical_normalize(normalize, stacklevel=2)  # "spectral" (old name) warns once, here
        C.choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        C.choice("backend", backend, C.BACKENDS)
        C.check_ns_dtype(ns_dtype)
        C.check_extras(adamw_betas=adamw_betas, qk_clip=qk_clip)
        if isinstance(params, Iterator):
            params = list(params)  # a generator can be read once: say so when it already was
            if not params:
                raise ValueError("optimizer got an empty parameter list: params is an iterator that was "
                                 "already consumed (e.g. model.parameters() passed to another optimizer "
                                 "or to list()); call model.parameters() again or pass a list")
        # the order a peer's state dict numbers the parameters in (see fastortho.optim.interop)
        params = params if isinstance(params, Tensor) else list(params)  # a Tensor: torch's TypeError below
        self._given = ([[g["params"]] if isinstance(g["params"], Tensor) else list(g["params"]) for g in params]
                       if len(params) and isinstance(params[0], dict) else [list(params)])
        defaults = dict(
            MUON_DEFAULTS, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            coefficients=coefficients, normalize=normalize, lr_scale=lr_scale,
            momentum_convention=momentum_convention, momentum_placement=momentum_placement,
            orthogonalizer=orthogonalizer, ns_dtype=ns_dtype, backend=backend, nonfinite=nonfinite,
            algorithm=None, variant=variant, beta2=beta2, capturable=bool(capturable),
        )
        C.check_orthogonalizer(defaults)
        self._adamw_defaults = dict(
            lr=lr if adamw_lr is None else adamw_lr, weight_decay=adamw_weight_decay, betas=tuple(adamw_betas),
            adamw_eps=adamw_eps, bias_correction=bias_correction, zero_init=zero_init, capturable=bool(capturable),
        )
        self.telemetry = bool(telemetry)
        self._telemetry: list[dict[str, Any]] = []
        self._nonfinite_count: Tensor | None = None
        self._qk_clip = qk_clip
        super().__init__(params, defaults)
        self._dist_engine = make_engine(self.param_groups, process_group, strategy, telemetry=self.telemetry,
                                        bucket_numel=dist_bucket_numel)
        C.check_single_process(self._dist_engine, self.param_groups)
        if any(g["capturable"] for g in self.param_groups):  # the skip counter exists before any capture
            self._nonfinite_count = torch.zeros((), dtype=torch.int64, device=self.param_groups[0]["params"][0].device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; one without ``algorithm`` is split into a Muon part (ndim ≥ 2) and an AdamW part."""
        if isinstance(param_group.get("params"), Tensor):
            param_group = dict(param_group, params=[param_group["params"]])
        param_group = interop.algorithm_from_flags(param_group)  # use_muon / use_fallback of the peers
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
        C.choice("algorithm", algo, ("muon", "adamw"))
        if algo == "adamw":
            for k, v in self._adamw_defaults.items():
                param_group.setdefault(k, v)
        # a group's own schedule runs its native length, not the optimizer's default count
        own_schedule = "coefficients" in param_group and "ns_steps" not in param_group
        super().add_param_group(param_group)  # fills the missing keys from the defaults, in place
        group = self.param_groups[-1]
        for k in ("lr", "weight_decay") + (("momentum", "eps") if algo == "muon" else ("adamw_eps",)):
            C.number(k if algo == "muon" or k == "adamw_eps" else f"adamw_{k}", group[k], tensor_ok=k == "lr")
        if algo == "muon":
            C.check_muon_group(group)
            if own_schedule:
                group["ns_steps"] = C.resolve_ns_steps(None, group["coefficients"])
        C.check_capturable(group)
        prepare_capturable(group, self.state)
        # eager state: every rank / every checkpoint has the same keys, even for params without grads
        for p in group["params"]:
            F.init_state(self.state[p], p, group["algorithm"], group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for k, v in (("telemetry", False), ("_telemetry", []), ("_nonfinite_count", None),
                     ("_dist_engine", None), ("_qk_clip", None), ("_given", [list(g["params"]) for g in
                                                                             self.param_groups])):
            self.__dict__.setdefault(k, v)
        adamw = self.__dict__.setdefault(
            "_adamw_defaults", dict(ADAMW_DEFAULTS, lr=self.defaults.get("lr", MUON_DEFAULTS["lr"])))
        for group in self.param_groups:
            # a checkpoint of torch.optim.Muon (or an older fastortho) has no "algorithm": it is Muon
            group.setdefault("algorithm", "muon")
            if group["algorithm"] == "adamw":
                for k, v in adamw.items():
                    group.setdefault(k, v)
            for k, v in MUON_DEFAULTS.items():
                group.setdefault(k, self.defaults.get(k, v) if k != "algorithm" else v)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["param_groups"] = [dict(g, orthogonalizer=C.CUSTOM) if callable(g.get("orthogonalizer")) else g
                              for g in sd["param_groups"]]
        if self._nonfinite_count is not None:
            sd["nonfinite_count"] = self._nonfinite_count.detach().clone()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fastortho state dict, or a peer's (torch.optim.Muon, KellerJordan/Muon's
        ``MuonWithAuxAdam``, timm's ``Muon``) when this optimizer was built with the same param groups
        as the peer (see :mod:`fastortho.optim.interop`): momentum and AdamW moments carry over."""
        state_dict = dict(state_dict)
        if interop.is_peer_state_dict(state_dict):
            state_dict = interop.adopt_peer_state_dict(state_dict, self._given, self.param_groups)
        count = state_dict.pop("nonfinite_count", None)
        live = [g.get("orthogonalizer") for g in self.param_groups]
        super().load_state_dict(state_dict)
        C.restore_orthogonalizers(self.param_groups, live, self.defaults.get("orthogonalizer"))
        for group in self.param_groups:
            prepare_capturable(group, self.state)
        if self._nonfinite_count is not None and count is not None:
            self._nonfinite_count.copy_(count)  # in place: a captured graph keeps counting into it
        elif self._nonfinite_count is not None and any(g["capturable"] for g in self.param_groups):
            self._nonfinite_count.zero_()
        else:
            self._nonfinite_count = None if count is None else count.clone()

    @property
    def nonfinite_count(self) -> int:
        """How many parameter updates were skipped as non-finite (reading it syncs with the device)."""
        return 0 if self._nonfinite_count is None else int(self._nonfinite_count)

    @property
    def comm_stats(self) -> dict[str, Any]:
        """Communication of the last step (see :mod:`fastortho.optim.distributed`): ``bytes`` and
        ``collectives`` per kind (``a2a``, ``owner``, ``gather``, ``flags``) sent by this rank, the analytic
        ``ideal`` bytes per strategy, ``numel`` of the Muon matrices per strategy, ``ns_flops`` run by this
        rank. Empty in single-process mode."""
        return {} if self._dist_engine is None else self._dist_engine.stats

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
        engine = self._dist_engine
        skipped = self._step_local() if engine is None else engine.step(self.param_groups, self.state)
        for finite in skipped:
            self._count_nonfinite(finite)
        if self._qk_clip is not None:
            self._qk_clip.apply()
        return loss

    def _step_local(self) -> list[Tensor]:
        """The three phases over every group (see :mod:`fastortho.optim.functional`); returns the finite
        masks of the groups with ``nonfinite="skip"``."""
        muon_groups: list[tuple[dict[str, Any], list[F.MatrixUnit], F.contiguous_params]] = []
        configs: list[F.OrthoConfig | None] = [None] * len(self.param_groups)
        skipped: list[Tensor] = []
        for gi, group in enumerate(self.param_groups):
            # params without a grad are skipped, never zero-filled (their momentum is left alone)
            idx = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            params = [group["params"][i] for i in idx]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [F.init_state(self.state[p], p, group["algorithm"], group) for p in params]
            if group["algorithm"] == "adamw":
                F.adamw_phase(params, grads, states, **F.adamw_args(group))
                continue
            bufs = [s["momentum_buffer"] for s in states]
            work = F.contiguous_params(params)
            names = [f"{gi}.{i}" for i in idx]
            us, finite, sumsq = F.momentum_phase(work.work, grads, bufs, names=names, reduce_sumsq=None,
                                                 **F.momentum_args(group, params[0].device))
            if finite is not None and group["nonfinite"] == "skip":
                skipped.append(finite)
            units = F.matrix_units(work.work, bufs, us, **F.unit_args(group), group_index=gi, names=names,
                                   vs=[s.get("normuon_v") for s in states], sumsqs=sumsq)
            configs[gi] = F.OrthoConfig.from_group(group)
            muon_groups.append((group, units, work))
        F.orthogonalize_units([u for _, units, _ in muon_groups for u in units], configs)
        if self.telemetry:
            self._telemetry = []
        for group, units, work in muon_groups:
            finite = F.apply_phase(units, **F.apply_args(group))
            if finite is not None and group["nonfinite"] == "skip":
                skipped.append(finite)
            work.__exit__()
            if self.telemetry:
                self._telemetry.extend(F.telemetry_records(units, lr=group["lr"]))
        return skipped

    def telemetry_report(self) -> list[dict[str, Any]]:
        """Per matrix unit of the last step: ``name`` ("group.index", "[k]" for split blocks), ``shape``,
        ``update_rms`` (η·s·‖O‖_F/√(mn), the RMS of the applied step, comparable with AdamW's
        η·‖m̂/(√v̂ + ε)‖_RMS, typically 0.2·η) and the orthogonality band ``sigma_min``/``sigma_max``
        of O, as Python floats (lists for stacks). Empty unless ``telemetry=True``. Reading it syncs
        with the device.
        """
        def py(t: Tensor) -> float | list[float]:
            v = t.tolist()
            return v[0] if len(v) == 1 else v

        return [dict(name=r["name"], shape=r["shape"], update_rms=py(r["update_rms"]),
                     sigma_min=py(r["sigma_min"]), sigma_max=py(r["sigma_max"])) for r in self._telemetry]
