"""Shared plumbing of the seed studies (examples/seed00*.py): paths, seeding, and RESULTS.md sections.

The seed studies own the part of ``examples/RESULTS.md`` between ``<!-- seeds:begin -->`` and
``<!-- seeds:end -->``; inside it each study owns ``<!-- seedNNN:begin -->`` … ``<!-- seedNNN:end -->``.
Everything outside those markers belongs to other scripts and is left byte-for-byte alone.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the studies only write PNGs

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
RESULTS = HERE / "RESULTS.md"
OUTER_BEGIN, OUTER_END = "<!-- seeds:begin -->", "<!-- seeds:end -->"
ORDER = ["seed002", "seed003", "seed003_ns", "seed001", "seed004"]


def setup(description: str) -> argparse.Namespace:
    """Parse ``--quick`` / ``--no-write``, pin torch to one thread (the studies are small; one thread
    is faster than contending for shared cores) and make the figures folder."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test (~30 s)")
    ap.add_argument("--no-write", action="store_true",
                    help="do not touch examples/RESULTS.md or examples/figures (plots go to a temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("FASTORTHO_EXAMPLE_THREADS", "1")))
    global _figures
    _figures = Path(tempfile.mkdtemp(prefix="fastortho-figures-")) if args.no_write else FIGURES
    _figures.mkdir(exist_ok=True)
    return args


_figures = FIGURES


def figure_path(name: str) -> Path:
    return _figures / name


def update_results(key: str, markdown: str) -> None:
    """Replace this study's block inside the seeds section of RESULTS.md (re-read right before writing)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# fastortho examples: results\n"
    if OUTER_BEGIN not in text:
        text = text.rstrip("\n") + (
            f"\n\n{OUTER_BEGIN}\n## Seed studies\n\nWritten by `examples/seed00*.py` (one command each; "
            "`--quick` for a smoke run). Each block says what the seed claims and what we observed.\n"
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
    RESULTS.write_text(head + OUTER_BEGIN + inner + OUTER_END + tail)


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
