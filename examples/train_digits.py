"""fastortho.Muon vs AdamW vs torch.optim.Muon: an MLP on scikit-learn's digits, on CPU, in about a minute.

Protocol (the same for every optimizer, equal step budgets):

1. AdamW: sweep its lr over a grid; keep the best by validation loss at the last step.
2. Muon variants: the hidden matrices get Muon, every other parameter (biases, the output layer) an
   AdamW at AdamW's tuned lr (how Muon is meant to be used: ``fastortho.muon_param_groups`` routes it;
   for torch.optim.Muon the same split, with a separate torch.optim.AdamW). Sweep the Muon lr.
3. Re-run each optimizer at its best lr with ``--seeds`` seeds; report mean ± std.

``fastortho.Muon`` runs its Newton–Schulz in fp32 on CPU (its default); ``torch.optim.Muon`` always
runs it in bf16. Both use Keller's 5-step triple and the "original" lr scale.

Run: ``python examples/train_digits.py`` (needs scikit-learn and matplotlib; about 15 min on one CPU
thread, most of it torch.optim.Muon's bf16 Newton–Schulz). It prints a Markdown table and writes the
loss plot to a new temporary folder (``--out DIR`` to choose one); ``--write-results`` regenerates
the committed ``examples/digits_loss.png`` instead. ``--quick`` runs one lr per optimizer for a few
steps, a smoke test of a few seconds.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _study  # noqa: E402

from fastortho import Muon, muon_param_groups  # noqa: E402  (the public API)

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = ("AdamW", "fastortho.Muon", "torch.optim.Muon")


class Both:
    """Step/zero_grad two optimizers as one (torch.optim.Muon needs a separate AdamW)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)


def make_optimizer(name: str, model: nn.Module, lr: float, adamw_lr: float, adamw_wd: float = 0.01,
                   muon_wd: float = 0.1) -> Both:
    """One of OPTIMIZERS; ``lr`` is the Muon lr for Muon variants, the AdamW lr for AdamW."""
    if name == "AdamW":
        return Both(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=adamw_wd))
    # split_qkv=False: torch.optim.Muon cannot split a fused QKV, and the comparison is of equal updates
    groups = muon_param_groups(model, split_qkv=False)
    muon_ps = [p for g in groups if g["algorithm"] == "muon" for p in g["params"]]
    adam_ps = [p for g in groups if g["algorithm"] == "adamw" for p in g["params"]]
    if name == "fastortho.Muon":
        return Both(Muon([dict(params=muon_ps, algorithm="muon"), dict(params=adam_ps, algorithm="adamw")],
                         lr=lr, weight_decay=muon_wd, adamw_lr=adamw_lr, adamw_weight_decay=adamw_wd))
    if name == "torch.optim.Muon":
        return Both(torch.optim.Muon(muon_ps, lr=lr, weight_decay=muon_wd),
                    torch.optim.AdamW(adam_ps, lr=adamw_lr, weight_decay=adamw_wd))
    raise ValueError(name)


def sweep_and_rerun(train: Callable[[str, float, float, int], dict], grids: dict[str, list[float]],
                    seeds: int, adamw_lr: float | None = None) -> dict[str, dict]:
    """Tune AdamW, then the Muon lrs (aux AdamW at AdamW's best lr); re-run the best with ``seeds`` seeds.

    Optimizers missing from ``grids`` are skipped; without AdamW in ``grids`` the Muon variants' aux
    AdamW uses ``adamw_lr``.

    ``train(name, lr, adamw_lr, seed)`` returns a dict with at least ``val_loss`` (final) and ``curve``."""
    best: dict[str, dict] = {}
    if "AdamW" not in grids and adamw_lr is None and len(grids):
        raise ValueError("Muon variants without AdamW in the sweep need adamw_lr")
    for name in [n for n in OPTIMIZERS if n in grids]:
        results = []
        for lr in grids[name]:
            r = train(name, lr, adamw_lr if adamw_lr is not None else lr, 0)
            print(f"  sweep {name:18s} lr={lr:<8g} val_loss={r['val_loss']:.4f}  ({r['seconds']:.1f} s)",
                  flush=True)
            results.append((r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf, lr))
        lr = min(results)[1]
        if name == "AdamW":
            adamw_lr = lr
        runs = [train(name, lr, adamw_lr, s) for s in range(seeds)]
        best[name] = dict(lr=lr, adamw_lr=adamw_lr, runs=runs, sweep=sorted(results, key=lambda t: t[1]))
    return best


def summarize(best: dict[str, dict], metrics: list[str]) -> str:
    def ms(xs):
        return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"

    head = "| optimizer | lr (Muon / AdamW) | " + " | ".join(metrics) + " | s per run |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    for name, b in best.items():
        lrs = f"{b['lr']:g}" if name == "AdamW" else f"{b['lr']:g} / {b['adamw_lr']:g}"
        cells = [ms([r[m] for r in b["runs"]]) for m in metrics]
        sec = statistics.mean(r["seconds"] for r in b["runs"])
        lines.append(f"| {name} | {lrs} | " + " | ".join(cells) + f" | {sec:.1f} |")
    sweeps = ["", "Sweeps (seed 0, final validation loss):", ""]
    for name, b in best.items():
        sweeps.append(f"- {name}: " + ", ".join(f"lr {lr:g} → {v:.4f}" for v, lr in b["sweep"]))
    return "\n".join(lines + sweeps)


def coinciding(best: dict[str, dict], rtol: float = 0.1) -> list[tuple[str, str, float]]:
    """Pairs of optimizers whose mean curves agree at every step within ``rtol`` (relative), with the
    largest relative gap: such curves lie on top of each other in a log plot."""
    names = list(best)
    means = {n: torch.tensor([r["curve"] for r in best[n]["runs"]]).mean(0) for n in names}
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if len(means[a]) == len(means[b]):
                rel = ((means[a] - means[b]).abs() / means[b].abs().clamp_min(1e-12)).max().item()
                if rel <= rtol:
                    out.append((a, b, rel))
    return out


def plot(best: dict[str, dict], path: str, title: str, ylabel: str = "training loss") -> None:
    """Mean loss curve per optimizer (band: min–max over seeds), log y axis.

    Each optimizer gets its own line style and markers, so curves that lie on top of each other stay
    visible, and coinciding pairs are named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    styles = [dict(ls="-", marker="o"), dict(ls="--", marker="s"), dict(ls=":", marker="^", lw=2.2)]
    same = coinciding(best)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (name, b) in enumerate(best.items()):
        curves = torch.tensor([r["curve"] for r in b["runs"]])
        mean = curves.mean(0)
        x = torch.arange(1, len(mean) + 1)
        twins = [a if a != name else c for a, c, _ in same if name in (a, c)]
        label = f"{name} (lr {b['lr']:g})" + (f", coincides with {', '.join(twins)}" if twins else "")
        st = styles[k % len(styles)]
        every = max(1, len(mean) // 12)  # staggered markers: coinciding curves show every style
        ax.plot(x, mean, label=label, markevery=(k * every // len(best), every),
                markerfacecolor="none", markersize=6, **st)
        if len(curves) > 1:
            ax.fill_between(x, curves.min(0).values, curves.max(0).values, alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.2, 0.5, 1, 2 ...
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    if same:
        title += "\n" + "; ".join(f"{a} and {c} lie on top of each other (largest gap {100 * g:.1f}%)"
                                   for a, c, g in same)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_val = len(X) // 5
    va, tr = perm[:n_val], perm[n_val:]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-3
    return (X[tr] - mu) / sd, y[tr], (X[va] - mu) / sd, y[va]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    ap.add_argument("--batch", type=int, default=64, help="minibatch size (default 64)")
    ap.add_argument("--hidden", type=int, default=128, help="width of the three hidden layers (default 128)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the re-runs at the best lr (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="one lr per optimizer, 20 steps, 1 seed: a smoke test")
    _study.add_output_args(ap)
    args = ap.parse_args()
    grids = {
        "AdamW": [1e-3, 3e-3, 1e-2],
        "fastortho.Muon": [1e-3, 3e-3, 1e-2],
        "torch.optim.Muon": [1e-3, 3e-3, 1e-2],
    }
    if args.quick:
        args.steps, args.seeds = 20, 1
        grids = {k: [3e-3] for k in grids}
    out = _study.output_dir(args, "train_digits")
    torch.set_num_threads(args.threads)
    Xtr, ytr, Xva, yva = load_digits_tensors()

    def train(name: str, lr: float, adamw_lr: float, seed: int) -> dict:
        torch.manual_seed(seed)
        h = args.hidden
        model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h),
                              nn.ReLU(), nn.Linear(h, 10))
        opt = make_optimizer(name, model, lr, adamw_lr)
        g = torch.Generator().manual_seed(1000 + seed)
        curve = []
        t0 = time.perf_counter()
        for _ in range(args.steps):
            idx = torch.randint(0, len(Xtr), (args.batch,), generator=g)
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        secs = time.perf_counter() - t0
        with torch.no_grad():
            logits = model(Xva)
            val = nn.functional.cross_entropy(logits, yva).item()
            acc = (logits.argmax(1) == yva).float().mean().item()
        # smooth the curve for plotting (window 10)
        sm = [statistics.mean(curve[max(0, i - 9): i + 1]) for i in range(len(curve))]
        return dict(val_loss=val, val_acc=acc, train_loss=statistics.mean(curve[-20:]), curve=sm, seconds=secs)

    print(f"digits: {len(Xtr)} train / {len(Xva)} validation, MLP 64-{args.hidden}-{args.hidden}-"
          f"{args.hidden}-10, {args.steps} steps of batch {args.batch}, {args.threads} thread(s)")
    best = sweep_and_rerun(train, grids, args.seeds)
    print()
    table = summarize(best, ["train_loss", "val_loss", "val_acc"])
    print(table)
    if not args.write_results:
        (out / "digits.md").write_text(table + "\n")
        print(f"wrote {out / 'digits.md'}")
    plot(best, os.path.join(out, "digits_loss.png"),
         f"digits MLP, {args.steps} steps, mean of {args.seeds} seed(s) (band: min–max)")


if __name__ == "__main__":
    main()
