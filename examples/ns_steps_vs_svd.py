"""Newton–Schulz steps 1..8 vs exact SVD orthogonalization in Muon, on digits (a thesis' Figure 5.1, small scale).

An MLP 64-128-128-128-10 on scikit-learn's digits (1437 train / 360 test). The two hidden 128×128 matrices
are trained by ``fastortho.Muon``; the input and output layers and the biases by its auxiliary AdamW
(the usual split). For ns_steps = 1..8 (Keller Jordan's triple, repeated) and for
``orthogonalizer="svd"`` (exact U Vᵀ in float64), we train with many seeds and report the final test
accuracy with a 95% confidence interval (Student t over seeds), as the thesis' Figure 5.1 does for the
CIFAR-10 speedrun with 20 seeds. The orthogonality error of the update (diagnostics) shows how far each
step count is from exact.

Run: ``python examples/ns_steps_vs_svd.py [--quick]`` (≈ 2 min on one core).
"""
from __future__ import annotations

import math
import time

import _study as S
import matplotlib.pyplot as plt
import torch
from scipy import stats

import fastortho
from fastortho import diagnostics




def make_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )


def train(data, steps_ns: int | None, seed: int, epochs: int, lr: float = 0.02) -> float:
    Xtr, ytr, Xte, yte = data
    model = make_model(seed)
    hidden = [model[2].weight, model[4].weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    kw = dict(orthogonalizer="svd") if steps_ns is None else dict(ns_steps=steps_ns)
    opt = fastortho.Muon([{"params": hidden, "algorithm": "muon"}, {"params": rest, "algorithm": "adamw"}],
                         lr=lr, weight_decay=0.0, adamw_lr=3e-3, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 128):
            idx = perm[i:i + 128]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float((model(Xte).argmax(1) == yte).float().mean())


def update_quality(steps_ns: int) -> tuple[float, float, float]:
    """Orthogonality error and σ band of NS(G) for a gradient-like 128×128 G (rank-decaying spectrum)."""
    g = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))
    G = ((U * torch.logspace(0, -3, 128, dtype=torch.float64)) @ V.T).float()
    X = fastortho.newton_schulz(G, steps=steps_ns, coefficients="keller")
    lo, hi = diagnostics.singular_band(X)
    return float(diagnostics.orthogonality_error(X)), float(lo), float(hi)


def main() -> None:
    args = S.setup(__doc__.splitlines()[0])
    t0 = time.time()
    seeds, epochs = (4, 4) if args.quick else (8, 6)
    data = S.digits()
    configs: list[int | None] = list(range(1, 9)) + [None]
    res = {}
    for c in configs:
        acc = torch.tensor([train(data, c, s, epochs) for s in range(seeds)], dtype=torch.float64)
        m, sd = float(acc.mean()), float(acc.std())
        half = float(stats.t.ppf(0.975, seeds - 1)) * sd / math.sqrt(seeds)
        res[c] = (m, half, sd)
        print(f"ns_steps={c if c else 'svd'}: {100 * m:.2f}% ± {100 * half:.2f}  [{time.time() - t0:.0f}s]")
    quality = {c: update_quality(c) for c in range(1, 9)}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(1, 9))
    axes[0].errorbar(xs, [100 * res[c][0] for c in xs], yerr=[100 * res[c][1] for c in xs], fmt="o-", capsize=3,
                     label="Newton–Schulz (Keller)")
    m, h, _ = res[None]
    axes[0].axhspan(100 * (m - h), 100 * (m + h), color="C1", alpha=0.3, label="exact SVD (95% CI)")
    axes[0].axhline(100 * m, color="C1")
    axes[0].set_xlabel("Newton–Schulz steps")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title(f"digits MLP, {seeds} seeds, 95% CI")
    axes[0].legend()
    axes[1].semilogy(xs, [quality[c][0] for c in xs], "o-")
    axes[1].set_xlabel("Newton–Schulz steps")
    axes[1].set_ylabel(r"$\|XX^\top - I\|_F/\sqrt{n}$")
    axes[1].set_title("orthogonality error of NS(G), κ(G) = 1e3")
    fig.tight_layout()
    S.save_figure(fig, "ns_steps_vs_svd.png")
    plt.close(fig)

    rows = [[c if c else "SVD (exact)", f"{100 * res[c][0]:.2f} ± {100 * res[c][1]:.2f}",
             f"{quality[c][0]:.3g}" if c else "0", f"[{quality[c][1]:.2f}, {quality[c][2]:.2f}]" if c else "[1, 1]"]
            for c in configs]
    table = S.md_table(["NS steps", "test acc. % (95% CI)", "orth. error", "σ band of NS(G)"], rows)
    svd_lo = res[None][0] - res[None][1]
    within = [c for c in xs if res[c][0] + res[c][1] >= svd_lo and res[c][0] - res[c][1] <= res[None][0] + res[None][1]]
    below = [c for c in xs if res[c][0] + res[c][1] < svd_lo]
    md = f"""### Newton–Schulz steps vs exact SVD orthogonalization (a thesis notebook's Figure 5.1, small scale) (`python examples/ns_steps_vs_svd.py`)

**Claim.** The thesis ablates the number of Newton–Schulz steps in Muon against an exact SVD
orthogonalization (CIFAR-10 speedrun, 20 seeds, 95% CIs), asking whether the cheap approximation costs
accuracy.

**Observed** ({'quick run' if args.quick else 'full run'}, {time.time() - t0:.0f} s on one CPU thread; MLP on
digits, {seeds} seeds × {epochs} epochs, Muon lr 0.02 on the two hidden matrices). Exact SVD reaches
{100 * res[None][0]:.2f}% ± {100 * res[None][1]:.2f}. Step counts whose CI overlaps the SVD's:
{within or 'none'}; clearly below it: {below or 'none'}. Keller's coefficients do not converge to U Vᵀ: on a
128×128 G with κ = 1e3 the σ band after 5 steps is [{quality[5][1]:.2f}, {quality[5][2]:.2f}] and after 8 steps
[{quality[8][1]:.2f}, {quality[8][2]:.2f}] (orthogonality error {quality[8][0]:.2f}), so more steps stop improving the
update well before it is exact; at this small scale the test accuracy is {'insensitive to' if not below else 'sensitive only at the low end of'} the
step count.

![NS steps](figures/ns_steps_vs_svd.png)

{table}
"""
    print(table)
    S.update_results("ns_steps_vs_svd", md)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
