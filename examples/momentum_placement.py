"""Momentum before vs after orthogonalization (``momentum_placement``).

MsignThenAcc = msign(Σ_s w_s G_s)  (``momentum_placement="before_ortho"``, accumulate then orthogonalize)
AccThenMsign = Σ_s w_s msign(G_s)  (``"after_ortho"``)
as estimators of the true preconditioned update msign(E G) = (ggᵀ)^{-1/2} g.

1. Measured bias. On the streaming matrix regression at a frozen W (so minibatch gradients are
   i.i.d. around g = W − W*), we measure E[estimator] − msign(g) by Monte Carlo for EMA windows of
   n_eff = (1+γ)/(1−γ) samples, and set it next to the second-order estimate of
   ``fastortho.diagnostics.ortho_bias_estimate`` (with the measured per-entry noise variance; it
   ignores correlations between entries).
2. In training: ``fastortho.Muon`` with both placements on the same streaming regression (recording, at
   every step, the cosine between Muon's actual update and msign of the true gradient) and on the thesis notebook's
   three problems (multi-output linear regression, matrix quadratic, logistic regression), each at its
   best lr.

Run: ``python examples/momentum_placement.py [--quick]`` (≈ 2 min on one core).
"""
from __future__ import annotations

import math
import time

import _study as S
import matplotlib.pyplot as plt
import torch
from simple_problems import PROBLEMS

import fastortho
from fastortho import diagnostics

NO, NI, B = 8, 16, 32  # training runs
NO_B, NI_B, B_B = 4, 8, 1024  # bias study: a large batch keeps the noise in the delta method's range


def batch_grad(Delta: torch.Tensor, k: int, gen: torch.Generator, batch: int = B) -> torch.Tensor:
    """k independent batch gradients (k, m, n) at Δ = W − W*, isotropic Gaussian inputs."""
    m, n = Delta.shape
    xin = torch.randn(k, batch, n, generator=gen, dtype=torch.float64)
    xout = torch.randn(k, batch, m, generator=gen, dtype=torch.float64)
    z = ((xout @ Delta) * xin).sum(-1)
    return (xout * z[..., None]).mT @ xin / batch


def sample_noise(k: int, gen: torch.Generator) -> torch.Tensor:
    """k minibatch-noise matrices G − g at the frozen Δ, generated in chunks to bound memory."""
    Delta = frozen_delta()
    return torch.cat([batch_grad(Delta, min(2048, k - i), gen, B_B) - Delta for i in range(0, k, 2048)])


def frozen_delta() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(NO_B, NI_B, generator=g, dtype=torch.float64) / math.sqrt(NI_B)


def bias_study(quick: bool) -> tuple[str, dict]:
    Delta = frozen_delta()
    gen = torch.Generator().manual_seed(1)
    true_noise = sample_noise(4096 if quick else 8192, gen)  # real minibatch noise at the frozen W
    noise_std = true_noise.std(0)  # per-entry std, for the delta-method estimate
    # Window Monte Carlo draws the noise from a Gaussian with the measured covariance (at B = 1024 the
    # minibatch noise is Gaussian to CLT accuracy, and real minibatches cost 10k normals each); the
    # single-sample row below is checked against real minibatches.
    flat = true_noise.reshape(len(true_noise), -1)
    chol = torch.linalg.cholesky(torch.cov(flat.T))

    def gauss_noise(k: int, g: torch.Generator) -> torch.Tensor:
        return (torch.randn(k, flat.shape[1], generator=g, dtype=torch.float64) @ chol.T).reshape(k, *Delta.shape)

    target = fastortho.polar(Delta, method="svd")
    real1 = fastortho.polar(Delta + true_noise, method="svd") - target
    real_bias, real_se = float(real1.mean(0).norm()), float((real1.std(0) / math.sqrt(len(real1))).norm())
    gammas = [0.0, 0.5, 0.8, 0.9] if quick else [0.0, 0.5, 0.8, 0.9, 0.95]
    trials = 300 if quick else 600
    res = {}
    for gamma in gammas:
        T = 1 if gamma == 0 else math.ceil(math.log(1e-3) / math.log(gamma))
        w = diagnostics.ema_weights(gamma, T)
        mc = diagnostics.ortho_bias_monte_carlo(Delta, gauss_noise, w, trials, torch.Generator().manual_seed(2))
        post_th, pre_th = diagnostics.ortho_bias_estimate(Delta, noise_std, gamma, t=T)
        res[gamma] = dict(
            n_eff=1.0 / float(w.square().sum()),
            post=float(mc["bias_post"].norm()), pre=float(mc["bias_pre"].norm()),
            se_post=float(mc["se_post"].norm()), se_pre=float(mc["se_pre"].norm()),
            post_th=float(post_th.norm()), pre_th=float(pre_th.norm()),
            rmse_post=float(mc["mse_post"].sqrt()), rmse_pre=float(mc["mse_pre"].sqrt()),
        )
    res["real_single"] = (real_bias, real_se, len(real1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ne = [res[g]["n_eff"] for g in gammas]
    ax.errorbar([1.0], [real_bias], yerr=[2 * real_se], fmt="k^", label="real minibatches, one sample")
    for key, mk, lab in (("post", "o-", "msign(EMA) [before_ortho]"), ("pre", "s-", "EMA(msign) [after_ortho]")):
        ax.errorbar(ne, [res[g][key] for g in gammas], yerr=[2 * res[g]["se_" + key] for g in gammas],
                    fmt=mk, capsize=3, label=f"measured {lab}")
        ax.loglog(ne, [res[g][key + "_th"] for g in gammas], mk[0] + "--", alpha=0.6, label=f"2nd-order estimate {key}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$n_\mathrm{eff} = (1+\gamma)/(1-\gamma)$")
    ax.set_ylabel(r"$\|\mathbb{E}[\mathrm{estimator}] - \mathrm{msign}(g)\|_F$")
    ax.set_title(f"bias vs averaging window ({NO_B}×{NI_B}, B = {B_B})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    S.save_figure(fig, "momentum_bias.png")
    plt.close(fig)
    rows = [[g, res[g]["n_eff"], f"{res[g]['post']:.3g} ± {2 * res[g]['se_post']:.1g}", res[g]["post_th"],
             f"{res[g]['pre']:.3g} ± {2 * res[g]['se_pre']:.1g}", res[g]["pre_th"], res[g]["rmse_post"],
             res[g]["rmse_pre"]] for g in gammas]
    hdr = ["γ", "n_eff", "bias before_ortho (±2‖SE‖)", "estimate", "bias after_ortho (±2‖SE‖)", "estimate",
           "RMSE before", "RMSE after"]
    snr = float(Delta.norm() / noise_std.square().sum().sqrt())
    return (f"Frozen Δ ({NO_B}×{NI_B}, σ_min(Δ)/σ_max(Δ) = "
            f"{float(torch.linalg.svdvals(Delta)[-1] / torch.linalg.svdvals(Delta)[0]):.2f}), minibatch B = {B_B}, "
            f"‖g‖_F / √(tr Σ) = {snr:.2f}; {trials} Monte Carlo windows per γ with Gaussian noise of the measured "
            f"covariance; one-sample bias with {len(real1)} real minibatches: {real_bias:.3g} ± {2 * real_se:.1g} (2SE); ‖·‖ = Frobenius norm of the "
            f"bias matrix (‖msign(g)‖_F = {math.sqrt(NO_B):.0f}).\n\n" + S.md_table(hdr, rows)), res


# ------------------------------------------------------------------------------------------------
def stream_train(placement: str, lr: float, seed: int, steps: int) -> tuple[list[float], float, float]:
    """fastortho.Muon on the streaming regression; returns (risk curve, mean cos(update, msign(g)),
    mean ‖update‖_F/√min(m, n): 1 for an orthogonal step, below 1 when averaged msigns disagree)."""
    gen = torch.Generator().manual_seed(seed)
    Wstar = torch.randn(NO, NI, generator=gen, dtype=torch.float64) / math.sqrt(NI)
    W = torch.nn.Parameter(torch.zeros(NO, NI))
    opt = fastortho.Muon([W], lr=lr, weight_decay=0.0, momentum=0.95, momentum_placement=placement,
                         lr_scale="none")
    risks, cosines, norms = [], [], []
    for _ in range(steps):
        Delta = W.detach().double() - Wstar
        W.grad = batch_grad(Delta, 1, gen)[0].float()
        before = W.detach().double()
        opt.step()
        step_dir = -(W.detach().double() - before) / lr
        norms.append(float(step_dir.norm()) / math.sqrt(min(NO, NI)))
        cosines.append(float(torch.nn.functional.cosine_similarity(
            step_dir.flatten(), fastortho.polar(Delta, method="svd").flatten(), dim=0)))
        risks.append(0.5 * float((W.detach().double() - Wstar).square().sum()))
    return risks, sum(cosines) / len(cosines), sum(norms) / len(norms)


def training_study(quick: bool) -> tuple[str, dict]:
    steps, seeds = (100, 1) if quick else (200, 2)
    grid = torch.logspace(-2.5, 0, 6).tolist()
    res: dict = {}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    # streaming regression
    for placement in ("before_ortho", "after_ortho"):
        best = None
        for lr in grid:
            runs = [stream_train(placement, lr, s, steps) for s in range(seeds)]
            curve = torch.tensor([r[0] for r in runs]).mean(0)
            final = float(curve[-20:].mean())
            if math.isfinite(final) and (best is None or final < best[1]):
                best = (lr, final, curve, sum(r[1] for r in runs) / seeds, sum(r[2] for r in runs) / seeds)
        res[("streaming regression", placement)] = best
        axes[0].semilogy(best[2], label=f"{placement} (lr {best[0]:.2g}, cos {best[3]:.2f}, |step| {best[4]:.2f})")
    axes[0].set_title(f"streaming matrix regression {NO}×{NI}, B = {B}")
    # the simple problems of examples/simple_problems.py
    for ax, problem in zip(axes[1:], PROBLEMS):
        for placement in ("before_ortho", "after_ortho"):
            best = None
            for lr in grid:
                curves = []
                for s in range(seeds):
                    params, loss_fn, full = PROBLEMS[problem](s)
                    opt = fastortho.Muon(params, lr=lr, weight_decay=0.0, momentum=0.95, momentum_placement=placement)
                    c = [full()]
                    for t in range(steps):
                        opt.zero_grad(set_to_none=True)
                        loss_fn(t).backward()
                        opt.step()
                        if (t + 1) % 10 == 0:
                            c.append(full())
                    curves.append(c)
                curve = torch.tensor(curves).mean(0)
                final = float(curve[-1])
                if math.isfinite(final) and (best is None or final < best[1]):
                    best = (lr, final, curve, float("nan"), float("nan"))
            res[(problem, placement)] = best
            ax.semilogy(torch.arange(len(best[2])) * 10, best[2], label=f"{placement} (lr {best[0]:.2g})")
        ax.set_title(problem)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    S.save_figure(fig, "momentum_training.png")
    plt.close(fig)
    problems = ["streaming regression"] + list(PROBLEMS)
    rows = [[p] + [f"{res[(p, pl)][1]:.3g} (lr {res[(p, pl)][0]:.2g})" for pl in ("before_ortho", "after_ortho")]
            for p in problems]
    return (f"fastortho.Muon, momentum 0.95 (Nesterov), {steps} steps, {seeds} seeds, best lr of {len(grid)}; "
            "cell = final loss.\n\n" + S.md_table(["problem", "before_ortho", "after_ortho"], rows)), res


def main() -> None:
    args = S.setup(__doc__.splitlines()[0])
    t0 = time.time()
    t1, rb = bias_study(args.quick)
    print(t1, f"\n[bias {time.time() - t0:.0f}s]")
    t2, rt = training_study(args.quick)
    print(t2, f"\n[training {time.time() - t0:.0f}s]")
    gs = sorted(k for k in rb if k != "real_single")
    g_hi = gs[-1]
    post_ratio = rb[0.0]["post"] / rb[g_hi]["post"]
    pre_ratio = rb[0.0]["pre"] / rb[g_hi]["pre"]
    problems = ["streaming regression"] + list(PROBLEMS)
    wins = [p for p in problems if rt[(p, "before_ortho")][1] < rt[(p, "after_ortho")][1]]
    cos_b, cos_a = rt[("streaming regression", "before_ortho")][3], rt[("streaming regression", "after_ortho")][3]
    nrm_b, nrm_a = rt[("streaming regression", "before_ortho")][4], rt[("streaming regression", "after_ortho")][4]
    if len(wins) < len(problems) / 2:
        why = (f" after_ortho wins in training even though it is the worse estimator: its step is an average of "
               f"unit-spectrum matrices, whose size shrinks when successive msigns disagree (mean ‖step‖_F/√8 "
               f"{nrm_a:.2f} vs {nrm_b:.2f} for before_ortho on the streaming regression), an automatic lr decay that "
               "a constant-lr comparison rewards. So the post's estimator claim holds and its 'empirically better' "
               "claim is not reproduced at constant lr on these problems; a decaying lr schedule would be the fair "
               "test, not run here.")
    else:
        why = f" (mean ‖step‖_F/√8: {nrm_b:.2f} before_ortho, {nrm_a:.2f} after_ortho on the streaming regression.)"
    md = f"""### Momentum before vs after orthogonalization (after "The M in Muon") (`python examples/momentum_placement.py`)

**Claim.** Accumulating momentum first and then orthogonalizing (MsignThenAcc, our default
`momentum_placement="before_ortho"`) is the better estimator of the true preconditioned update
msign(g): its second-order bias shrinks as 1/n_eff = (1−γ)/(1+γ), while orthogonalizing each gradient and
then averaging (AccThenMsign, `"after_ortho"`) keeps the one-sample bias whatever the window, with larger
variance constants.

**Observed** ({'quick run' if args.quick else 'full run'}, {time.time() - t0:.0f} s on one CPU thread). From γ = 0 to γ = {g_hi}
(n_eff 1 → {rb[g_hi]['n_eff']:.0f}) the measured bias of before_ortho falls by ×{post_ratio:.1f} and that of
after_ortho by ×{pre_ratio:.1f}; at γ = {g_hi} the biases are {rb[g_hi]['post']:.3g} vs {rb[g_hi]['pre']:.3g} and the RMSEs
{rb[g_hi]['rmse_post']:.3g} vs {rb[g_hi]['rmse_pre']:.3g}. The second-order estimate (diagonal noise covariance) gives
{rb[0.0]['pre_th']:.3g} for one sample against {rb[0.0]['pre']:.3g} measured: {'the same order' if 0.3 < rb[0.0]['pre_th'] / rb[0.0]['pre'] < 3 else 'not the same order; the noise here is too large or too correlated for the expansion'}.
In training, the mean cosine between Muon's actual update and msign(true gradient) on the streaming
regression is {cos_b:.3f} (before_ortho) vs {cos_a:.3f} (after_ortho); before_ortho reaches the lower final loss
on {len(wins)} of {len(problems)} problems ({', '.join(wins) or 'none'}).{why}

![bias](figures/momentum_bias.png)
![training](figures/momentum_training.png)

**Bias against the true preconditioned update**

{t1}

**Training**

{t2}
"""
    S.update_results("momentum_placement", md)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
