r"""Diagnostics: how orthogonal an update is, what momentum costs, how biased Muon is.

Each function states the formula it computes and the property it measures.

* :func:`orthogonality_error`, :func:`singular_band`, :func:`polar_error`: quality of an update
  O ≈ U Vᵀ.
* :func:`momentum_bias`, :func:`momentum_variance`, :func:`momentum_mse`, :func:`warmup_length`:
  the exact bias / variance / MSE of an EMA momentum started at zero, and the warm-up length T*
  after which momentum beats the raw gradient.
* :func:`direction_bias`, :func:`ortho_bias_estimate`, :func:`ema_weights`: second-order bias of
  "orthogonalize the sum" (MsignThenAcc) vs "sum the orthogonalized" (AccThenMsign) as estimators of
  msign(g): averaging before msign divides the second-order bias by the effective sample size,
  averaging after it does not; :func:`ortho_bias_monte_carlo` measures it.
* :func:`riemannian_variance`, :class:`CurvatureMonitor`: the Fréchet mean and the Riemannian
  variance σ_R of a window of SPD curvature estimates under the affine-invariant metric
  (invariant under every congruence H ↦ AHAᵀ), with a rolling monitor to log next to
  ``Muon(telemetry=True)``.

Everything runs in float64 on the input's device; none of it is meant for an optimizer's hot loop.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .reference import polar_error, polar_svd, singular_band

__all__ = [
    "orthogonality_error",
    "singular_band",
    "polar_error",
    "momentum_bias",
    "momentum_variance",
    "momentum_mse",
    "warmup_length",
    "ema_weights",
    "direction_bias",
    "ortho_bias_estimate",
    "ortho_bias_monte_carlo",
    "riemannian_variance",
    "spd_log",
    "CurvatureMonitor",
]

Number = float | Tensor


# ----------------------------------------------------------------------------------------------
# orthogonality of an update
# ----------------------------------------------------------------------------------------------
def orthogonality_error(X: Tensor) -> Tensor:
    r"""‖X_s X_sᵀ − I_k‖_F / √k per matrix, with X_s the short side of X (k = min(m, n)).

    Zero exactly when X has orthonormal rows (m ≤ n) or columns (m ≥ n), i.e. when X = U Vᵀ for
    some full-rank G = U S Vᵀ; unlike :func:`polar_error` it needs no reference G. It is the RMS of
    σ_i² − 1 over the k singular values of X, so a band [σ_min, σ_max] = [1−δ, 1+δ] gives ≲ 2δ.
    Returns float64 of shape ``X.shape[:-2]``.
    """
    if X.ndim < 2 or X.shape[-1] == 0 or X.shape[-2] == 0:
        raise ValueError(f"orthogonality_error needs non-empty (..., m, n) matrices, got {tuple(X.shape)}")
    X64 = X.detach().to(torch.float64)
    if X64.shape[-2] > X64.shape[-1]:
        X64 = X64.mT
    k = X64.shape[-2]
    eye = torch.eye(k, dtype=torch.float64, device=X64.device)
    return torch.linalg.matrix_norm(X64 @ X64.mT - eye) / math.sqrt(k)


# ----------------------------------------------------------------------------------------------
# momentum: bias, variance and MSE of an EMA started at zero
# ----------------------------------------------------------------------------------------------
def _check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")


def momentum_bias(mu: Number, gamma: float, t: int | Tensor) -> Number:
    r"""Bias of the EMA momentum m_t = γ m_{t−1} + (1−γ) g_t, m_0 = 0, for g_t i.i.d. with mean μ.

    .. math:: \mathbb E[m_t] - \mu = -\mu\,\gamma^{t}

    Elementwise in ``mu``; ``t`` may be a tensor of step counts.
    """
    _check_gamma(gamma)
    return -mu * gamma ** t


def momentum_variance(sigma2: Number, gamma: float, t: int | Tensor) -> Number:
    r"""Variance of the EMA momentum after t steps, per coordinate of variance σ²:

    .. math:: \operatorname{Var}(m_t) = (1-\gamma)^2\sigma^2\sum_{i=0}^{t-1}\gamma^{2i}
              = \sigma^2\,\frac{1-\gamma}{1+\gamma}\,(1-\gamma^{2t})

    Pass tr Σ for the total variance of a vector/matrix gradient.
    """
    _check_gamma(gamma)
    return sigma2 * (1.0 - gamma) / (1.0 + gamma) * (1.0 - gamma ** (2 * t))


def momentum_mse(mu: Number, sigma2: Number, gamma: float, t: int | Tensor) -> Number:
    r"""Mean squared error of the EMA momentum as an estimator of μ (bias² + variance):

    .. math:: \mathrm{MSE}(m_t) = \mu^2\gamma^{2t} + \sigma^2\frac{1-\gamma}{1+\gamma}(1-\gamma^{2t}).

    For vectors pass μ² → ‖μ‖² as ``mu`` = ‖μ‖ and σ² → tr Σ.
    """
    return momentum_bias(mu, gamma, t) ** 2 + momentum_variance(sigma2, gamma, t)


def warmup_length(snr: float, gamma: float) -> float:
    r"""Warm-up length T*: momentum's MSE is below the raw gradient's (σ²) exactly when t > T*.

    With r = μ²/σ² (``snr``; ‖μ‖²/tr Σ for vectors), MSE(m_t) < σ² reads
    r γ^{2t} + c(1 − γ^{2t}) < 1 with c = (1−γ)/(1+γ), so

    .. math:: T^* = \frac{\ln\!\big[\,2\gamma \,/\, ((1+\gamma)\,r - (1-\gamma))\big]}{2\ln\gamma}.

    Returns 0.0 when momentum wins from the start (r ≤ 1, which includes the case
    r ≤ (1−γ)/(1+γ) where the inequality holds for every t), and 0.0 for γ = 0 (m_t = g_t).
    """
    _check_gamma(gamma)
    if snr < 0:
        raise ValueError(f"snr must be >= 0, got {snr}")
    if gamma == 0.0 or snr <= 1.0:
        return 0.0
    return max(0.0, math.log(2.0 * gamma / ((1.0 + gamma) * snr - (1.0 - gamma))) / (2.0 * math.log(gamma)))


# ----------------------------------------------------------------------------------------------
# ortho-of-sum vs sum-of-ortho: the second-order bias of the two momentum orders
# ----------------------------------------------------------------------------------------------
def ema_weights(gamma: float, t: int, normalized: bool = True) -> Tensor:
    r"""EMA weights w_s = (1−γ)γ^{t−1−s}, s = 0..t−1 (oldest first), of m_t = Σ_s w_s g_s (m_0 = 0).

    ``normalized`` rescales them to sum to 1 (as msign is scale-invariant, this does not change
    msign(Σ w_s g_s)). With normalized weights Σ w_s² → (1−γ)/(1+γ) = 1/n_eff as t → ∞.
    """
    _check_gamma(gamma)
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}")
    w = (1.0 - gamma) * gamma ** torch.arange(t - 1, -1, -1, dtype=torch.float64)  # 0**0 = 1
    return w / w.sum() if normalized else w


def direction_bias(g: Tensor, Sigma: Tensor, gamma: float | None = None) -> tuple[Tensor, Tensor]:
    r"""Second-order bias of the two momentum orders for a *vector* gradient.

    With y_s = g + ε_s, Cov ε_s = Σ, u = g/ρ, ρ = ‖g‖, P⊥ = I − uuᵀ and stationary EMA weights
    (Σ w = 1, Σ w² = (1−γ)/(1+γ)):

    .. math::
       \mathrm{Bias}_{\text{post}} = \mathbb E\Big[\tfrac{\sum w_s y_s}{\|\sum w_s y_s\|}\Big] - u
           \approx -\frac{\operatorname{tr}(P_\perp\Sigma)}{2\rho^2}\,\frac{1-\gamma}{1+\gamma}\,u,
       \qquad
       \mathrm{Bias}_{\text{pre}} = \mathbb E\Big[\sum w_s \tfrac{y_s}{\|y_s\|}\Big] - u
           \approx -\frac{\operatorname{tr}(P_\perp\Sigma)}{2\rho^2}\,u.

    "post" is MsignThenAcc (``momentum_placement="before_ortho"``: accumulate, then normalize), "pre"
    is AccThenMsign (``"after_ortho"``). The first shrinks with n_eff = (1+γ)/(1−γ), the second
    does not. ``gamma=None`` gives the single-sample bias (both coincide). Returns (post, pre).
    Valid to O(‖Σ‖²/ρ⁴); for matrices see :func:`ortho_bias_estimate`.
    """
    g64 = g.detach().to(torch.float64).reshape(-1)
    S = Sigma.detach().to(device=g64.device, dtype=torch.float64)
    if S.ndim == 0:
        S = S * torch.eye(g64.numel(), dtype=torch.float64, device=g64.device)
    rho2 = g64 @ g64
    if rho2 <= 0:
        raise ValueError("direction_bias needs a nonzero mean gradient g")
    u = g64 / rho2.sqrt()
    tr_perp = torch.trace(S) - u @ S @ u
    pre = -tr_perp / (2 * rho2) * u
    shrink = 1.0 if gamma is None else (1.0 - gamma) / (1.0 + gamma)
    return (shrink * pre).reshape(g.shape), pre.reshape(g.shape)


def _laplacian_msign(G: Tensor, noise_std: float | Tensor, h: float) -> Tensor:
    """E[D²msign(G)[E, E]] for E with independent entries of std ``noise_std`` (scalar or G-shaped),
    by central second differences along each coordinate (m·n batched SVDs)."""
    m, n = G.shape
    std = torch.as_tensor(noise_std, dtype=torch.float64, device=G.device).expand(m, n).reshape(-1)
    step = h * torch.linalg.matrix_norm(G, ord=2)
    eye = torch.eye(m * n, dtype=torch.float64, device=G.device).reshape(m * n, m, n) * step
    f0 = polar_svd(G)
    fp, fm = polar_svd(G + eye), polar_svd(G - eye)
    second = (fp + fm - 2 * f0) / step**2  # (mn, m, n): D²f[e_k, e_k]
    return (std.square().reshape(-1, 1, 1) * second).sum(0)


def ortho_bias_estimate(
    G: Tensor, noise_std: float | Tensor, gamma: float | None = None, t: int | None = None, h: float = 1e-3
) -> tuple[Tensor, Tensor]:
    r"""Delta-method bias of MsignThenAcc vs AccThenMsign for a *matrix* gradient.

    For noisy gradients G_s = G + E_s with independent entries of std ``noise_std`` (a scalar, or a
    tensor of G's shape for anisotropic noise) and EMA weights w (Σ w = 1), a second-order
    expansion of msign at G gives

    .. math::
       \mathbb E\big[\mathrm{msign}(\textstyle\sum_s w_s G_s)\big] - \mathrm{msign}(G)
          \approx \tfrac12 \big(\textstyle\sum_s w_s^2\big)\, \mathcal L,\qquad
       \mathbb E\big[\textstyle\sum_s w_s\,\mathrm{msign}(G_s)\big] - \mathrm{msign}(G)
          \approx \tfrac12\, \mathcal L,

    where :math:`\mathcal L = \mathbb E\,D^2\mathrm{msign}(G)[E, E]
    = \sum_{ij}\mathrm{std}_{ij}^2\,\partial_{ij}^2\,\mathrm{msign}(G)` (the
    ½ Tr(J H Σ) term of a second-order expansion). Ortho-of-sum's bias carries the factor Σ w² = 1/n_eff (→ (1−γ)/(1+γ)), i.e.
    it is the bias of one step on a batch n_eff times larger, while sum-of-ortho keeps the
    one-sample bias whatever the averaging: a factor-k gap for k equally averaged gradients.
    The Laplacian is computed by central differences (step h·σ_max; m·n SVDs in float64), so keep
    G small (≲ 32×32). ``gamma=None`` uses Σ w² = 1 (a single sample); with ``t`` the finite-t
    normalized weights of :func:`ema_weights`, else the stationary (1−γ)/(1+γ).

    The estimate is the bias w.r.t. msign(G) = (GGᵀ)^{-1/2}G, the update Muon would take with the
    noise-free gradient. Returns (bias_post, bias_pre), float64 matrices of G's shape.
    """
    if G.ndim != 2:
        raise ValueError(f"ortho_bias_estimate needs one (m, n) matrix, got shape {tuple(G.shape)}")
    G64 = G.detach().to(torch.float64)
    lap = _laplacian_msign(G64, noise_std, h)
    if gamma is None:
        sw2 = 1.0
    elif t is None:
        _check_gamma(gamma)
        sw2 = (1.0 - gamma) / (1.0 + gamma)
    else:
        sw2 = float(ema_weights(gamma, t).square().sum())
    return 0.5 * sw2 * lap, 0.5 * lap


def ortho_bias_monte_carlo(
    G: Tensor,
    sample_noise: Callable[[int, torch.Generator], Tensor],
    weights: Tensor,
    n_trials: int,
    generator: torch.Generator,
    orthogonalize: Callable[[Tensor], Tensor] = polar_svd,
) -> dict[str, Tensor]:
    r"""Monte Carlo bias of MsignThenAcc and AccThenMsign around msign(G).

    ``sample_noise(k, generator)`` returns k noise matrices (k, m, n); each trial draws one window of
    len(weights) gradients G_s = G + E_s and forms post = Orth(Σ w_s G_s) and pre = Σ w_s Orth(G_s)
    (weights normalized to sum 1). ``orthogonalize`` defaults to the exact SVD polar factor; pass
    ``fastortho.newton_schulz`` to include its approximation error. Returns float64 tensors:
    ``bias_post``/``bias_pre`` (E[·] − msign(G), matrices), ``se_post``/``se_pre`` (entrywise
    standard errors of those means) and ``mse_post``/``mse_pre`` (E‖· − msign(G)‖_F²).
    """
    w = weights.to(torch.float64)
    w = w / w.sum()
    T = w.numel()
    target = polar_svd(G)
    G64 = G.detach().to(torch.float64)
    noise = sample_noise(n_trials * T, generator).to(torch.float64).reshape(n_trials, T, *G.shape)
    Gs = G64 + noise
    post = orthogonalize((w.reshape(1, T, 1, 1) * Gs).sum(1)).to(torch.float64)
    each = orthogonalize(Gs.reshape(-1, *G.shape)).to(torch.float64).reshape(Gs.shape)
    pre = (w.reshape(1, T, 1, 1) * each).sum(1)
    out: dict[str, Tensor] = {}
    for name, est in (("post", post), ("pre", pre)):
        d = est - target
        out[f"bias_{name}"] = d.mean(0)
        out[f"se_{name}"] = d.std(0) / math.sqrt(n_trials)
        out[f"mse_{name}"] = d.square().sum((-2, -1)).mean()
    return out


# ----------------------------------------------------------------------------------------------
# Riemannian variance of SPD curvature estimates (affine-invariant metric)
# ----------------------------------------------------------------------------------------------
def _sym_fn(A: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    evals, evecs = torch.linalg.eigh(A)
    return (evecs * fn(evals).unsqueeze(-2)) @ evecs.mT


def spd_log(A: Tensor) -> Tensor:
    """Matrix logarithm of symmetric positive-definite A (..., d, d) through its eigendecomposition."""
    return _sym_fn(A, torch.log)


def riemannian_variance(
    H: Tensor | Sequence[Tensor], max_iter: int = 50, tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    r"""Riemannian variance σ_R² and Fréchet mean H̄ of SPD matrices H_1..H_k.

    Under the affine-invariant metric, d²(A, B) = ‖log(B^{-1/2} A B^{-1/2})‖_F², and

    .. math:: \bar H = \arg\min_X \tfrac1k\sum_i d^2(H_i, X),\qquad
              \sigma_R^2 = \tfrac1k\sum_i \big\|\log(\bar H^{-1/2} H_i \bar H^{-1/2})\big\|_F^2.

    H̄ is found by the Karcher fixed point H̄ ← H̄^{1/2} exp(mean_i log(H̄^{-1/2} H_i H̄^{-1/2})) H̄^{1/2},
    started at the log-Euclidean mean, until the mean log's norm is ≤ ``tol``. σ_R² is invariant under
    every congruence H_i → A H_i Aᵀ (A invertible), so it measures how much the curvature's *shape*
    moves, not its scale or basis; for commuting H_i it is the variance of log H_i. Returns
    (σ_R² as a float64 scalar, H̄ float64). Small σ_R: a single whitening (Muon's global
    preconditioner) fits the whole window; a spike: the curvature is changing.
    """
    Hs = torch.stack(list(H)) if not isinstance(H, Tensor) else H
    if Hs.ndim != 3 or Hs.shape[-1] != Hs.shape[-2] or Hs.shape[0] < 1:
        raise ValueError(f"riemannian_variance needs (k, d, d) SPD matrices, got shape {tuple(Hs.shape)}")
    Hs = Hs.detach().to(torch.float64)
    Hs = 0.5 * (Hs + Hs.mT)
    mean = _sym_fn(spd_log(Hs).mean(0), torch.exp)
    for _ in range(max_iter):
        root = _sym_fn(mean, torch.sqrt)
        iroot = _sym_fn(mean, torch.rsqrt)
        L = spd_log(iroot @ Hs @ iroot)
        step = L.mean(0)
        mean = root @ _sym_fn(step, torch.exp) @ root
        mean = 0.5 * (mean + mean.mT)
        if torch.linalg.matrix_norm(step) <= tol:
            break
    iroot = _sym_fn(mean, torch.rsqrt)
    d2 = torch.linalg.matrix_norm(spd_log(iroot @ Hs @ iroot)).square()
    return d2.mean(), mean


class CurvatureMonitor:
    r"""Rolling σ_R of a parameter's one-sided curvature estimates, for logging.

    Muon whitens the gradient on the left by M^{-1/2}, M ≈ G Gᵀ (msign(G) = (GGᵀ)^{-1/2}G). Each :meth:`update` stores
    the SPD estimate C_t = (Ĉ_t + δI)/(1 + δ), Ĉ_t = G_tG_tᵀ / (tr(G_tG_tᵀ)/m) (G's short side, m rows;
    unit mean eigenvalue; δ = ``ridge`` keeps it invertible for rank-deficient G) and :attr:`sigma_r`
    returns σ_R of the last ``window`` of them via :func:`riemannian_variance`. Use next to the optimizer's telemetry, e.g. every 100 steps::

        mon = {name: CurvatureMonitor(window=8) for name, p in model.named_parameters() if p.ndim == 2}
        opt = fastortho.Muon(groups, lr=0.02, telemetry=True)
        ...
        loss.backward()
        if step % 100 == 0:   # costs eigh's of (d, d); keep it off the hot path
            for name, p in model.named_parameters():
                if name in mon:
                    mon[name].update(p.grad)
        opt.step()
        log(opt.telemetry_report(), {n: m.sigma_r for n, m in mon.items()})

    Reading it: a small, steady σ_R means the curvature is stable and one global
    whitening per layer works; a spike means the layer's curvature is moving (e.g. after a lr or
    data change) and a richer preconditioner, or a fresher momentum, may help. Each estimate is
    trace-normalized, so a decaying gradient norm alone does not move σ_R (σ_R² itself is only
    invariant under a common congruence H_i → A H_i Aᵀ, not under per-sample rescaling).
    """

    def __init__(self, window: int = 8, ridge: float = 1e-3) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.window = window
        self.ridge = ridge
        self._buf: deque[Tensor] = deque(maxlen=window)

    def update(self, G: Tensor) -> None:
        """Store the curvature estimate of gradient G (2-D; higher-D is flattened to (G.shape[0], -1))."""
        G64 = G.detach().to(torch.float64).reshape(G.shape[0], -1)
        if G64.shape[0] > G64.shape[1]:
            G64 = G64.mT
        m, n = G64.shape
        C = G64 @ G64.mT / n
        scale = torch.trace(C) / m
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        # unit mean eigenvalue: σ_R then sees the shape of the curvature, not the gradient's size
        eye = torch.eye(m, dtype=torch.float64, device=C.device)
        self._buf.append((C / scale + self.ridge * eye) / (1.0 + self.ridge))

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def sigma_r(self) -> float:
        """σ_R (not squared) of the stored window; NaN until two estimates are stored."""
        if len(self._buf) < 2:
            return float("nan")
        var, _ = riemannian_variance(torch.stack(list(self._buf)))
        return float(var.sqrt())
