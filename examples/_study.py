"""Shared plumbing of the studies in examples/: command line, output folder, and RESULTS.md sections.

By default a study writes its figures and its RESULTS.md section to a new temporary folder (or to
``--out DIR``) and prints where; nothing in the repository changes. ``--write-results`` regenerates
the committed results instead: ``examples/figures/`` and the study's block of ``examples/RESULTS.md``.

The studies own the part of a RESULTS.md between ``<!-- studies:begin -->`` and
``<!-- studies:end -->``; inside it each study owns ``<!-- <name>:begin -->`` … ``<!-- <name>:end -->``.
Everything outside those markers belongs to other scripts and is left byte-for-byte alone.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

try:
    import matplotlib

    matplotlib.use("Agg")  # headless: the studies only write PNGs
except ImportError:  # the command line and output folder work without it (tests/test_bench.py)
    pass

HERE = Path(__file__).resolve().parent
OUTER_BEGIN, OUTER_END = "<!-- studies:begin -->", "<!-- studies:end -->"
ORDER = ["linear_regression", "simple_problems", "ns_steps_vs_svd", "momentum_placement", "lr_transfer"]

# Where this run writes: RESULTS.md and figures/ under one folder (so the Markdown's relative image links
# work there too). Set by setup(); nothing is written before it is called.
_out: Path | None = None


def add_output_args(ap: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--write-results``, shared by every script in examples/."""
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="folder for this run's figures and tables (default: a new temporary folder, printed)")
    ap.add_argument("--write-results", action="store_true",
                    help="regenerate the committed results in examples/ (RESULTS.md, figures) instead of "
                         "writing to --out")


def output_dir(args: argparse.Namespace, name: str) -> Path:
    """The folder this run writes to: examples/ with --write-results, else --out or a new temp folder."""
    if args.write_results and args.out is not None:
        sys.exit("--write-results writes the committed results in examples/; drop --out or drop --write-results")
    if args.write_results and getattr(args, "quick", False):
        sys.exit("--write-results regenerates the committed (full-size) results; run it without --quick")
    if args.write_results:
        out = HERE
    elif args.out is not None:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = Path(tempfile.mkdtemp(prefix=f"fastortho-{name}-"))
    print(f"outputs go to {out}" + (" (the committed results)" if args.write_results else ""), flush=True)
    return out


def setup(description: str) -> argparse.Namespace:
    """Parse ``--quick``, ``--out`` and ``--write-results``; pin torch to one thread (the studies are
    small; one thread is faster than contending for shared cores); choose the output folder."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test (about 30 s)")
    add_output_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("FASTORTHO_EXAMPLE_THREADS", "1")))
    global _out
    _out = output_dir(args, Path(sys.argv[0]).stem)
    (_out / "figures").mkdir(exist_ok=True)
    return args


def _require_setup() -> Path:
    if _out is None:
        raise RuntimeError("call _study.setup() first: it chooses where this run writes")
    return _out


def figure_path(name: str) -> Path:
    return _require_setup() / "figures" / name


def update_results(key: str, markdown: str) -> None:
    """Replace this study's block inside the studies section of the output folder's RESULTS.md (re-read
    right before writing) and say where it went."""
    results = _require_setup() / "RESULTS.md"
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = results.read_text() if results.exists() else "# fastortho examples: results\n"
    if OUTER_BEGIN not in text:
        text = text.rstrip("\n") + (
            f"\n\n{OUTER_BEGIN}\n## Studies\n\nWritten by the study scripts in `examples/` with `--write-results` (one "
            "command each; `--quick` for a smoke run). Each block says what the source claims and what we observed.\n"
            f"{OUTER_END}\n"
        )
    head, rest = text.split(OUTER_BEGIN, 1)
    inner, tail = rest.split(OUTER_END, 1)
    blocks = {m.group(1): m.group(0)
              for m in re.finditer(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", inner, flags=re.S)}
    preamble = re.split(r"<!-- \w+:begin -->", inner, maxsplit=1)[0].rstrip("\n")
    blocks[key] = block
    keys = [k for k in ORDER if k in blocks] + sorted(k for k in blocks if k not in ORDER)
    inner = preamble + "\n\n" + "\n\n".join(blocks[k] for k in keys) + "\n"
    results.write_text(head + OUTER_BEGIN + inner + OUTER_END + tail)
    print(f"wrote {results} (section {key!r}) and figures in {_out / 'figures'}")


def _coincide(y1, y2, rtol: float = 0.01) -> bool:
    import numpy as np

    y1, y2 = np.asarray(y1, dtype=float), np.asarray(y2, dtype=float)
    if y1.shape != y2.shape or y1.size == 0:
        return False
    scale = np.maximum(np.abs(y2), 1e-300)
    return bool(np.all(np.abs(y1 - y2) <= rtol * scale))


def save_figure(fig, name: str, dpi: int = 110) -> Path:
    """Finish and save a figure: coinciding curves made visible and named, readable log axes.

    * Lines of one axes whose data agree within 1% would hide each other: the later ones get dashes
      and open markers, and their legend entry says which curve they coincide with.
    * Log axes get labelled ticks at every integer multiple within one decade, at 1, 2 and 5 per decade
      up to three decades, at 1 and 3 up to five, so a short log range never shows one or two ticks only.
    * Every figure needs a title: a figure whose axes have none raises.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in fig.axes:
        lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        changed = False
        for j, ln in enumerate(lines):
            twin = next((o for o in lines[:j] if _coincide(ln.get_xdata(), o.get_xdata())
                         and _coincide(ln.get_ydata(), o.get_ydata())), None)
            if twin is not None:
                ln.set_linestyle((0, (4, 3)))
                ln.set_marker("o")
                ln.set_markerfacecolor("none")
                n = len(ln.get_xdata())
                ln.set_markevery((n // 24, max(1, n // 12)))
                ln.set_label(f"{ln.get_label()} (coincides with {twin.get_label().split(' (')[0]})")
                changed = True
        legend = ax.get_legend()
        if changed and legend is not None:
            texts = legend.get_texts()
            ax.legend(fontsize=texts[0].get_fontsize() if texts else None)
        for axis, scale in ((ax.yaxis, ax.get_yscale()), (ax.xaxis, ax.get_xscale())):
            if scale != "log":
                continue
            lo, hi = (ax.get_ylim() if axis is ax.yaxis else ax.get_xlim())
            if lo > 0 and hi / lo <= 1e5:
                span = hi / lo
                subs = tuple(range(1, 10)) if span <= 10 else (1.0, 2.0, 5.0) if span <= 1e3 else (1.0, 3.0)
                axis.set_major_locator(LogLocator(base=10, subs=subs))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.2, 0.5, 1, 2 ...
                axis.set_minor_formatter(NullFormatter())
        if not ax.get_title():
            if not (fig._suptitle and fig._suptitle.get_text()):
                raise ValueError(f"figure {name}: every axes needs a title (or the figure a suptitle)")
    path = figure_path(name)
    fig.savefig(path, dpi=dpi)
    return path


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (X_train, y_train, X_test, y_test): pixels / 16, a fixed shuffle,
    1437 train / 360 test; the split every digits study uses."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    return X[tr], y[tr], X[te], y[te]
