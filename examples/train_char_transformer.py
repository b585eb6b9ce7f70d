"""fastortho.Muon vs AdamW vs torch.optim.Muon: a tiny character-level transformer on Python's own source.

The text is the concatenated source of a few standard-library modules (it ships with every Python);
the last 10 % is held out. Model: 2 pre-norm blocks, d = 64, 4 heads, context 64, learned positions,
untied head. ``fastortho.muon_param_groups`` routes the embedding, the head (by vocabulary size),
LayerNorm gains and biases to AdamW and the attention/MLP matrices to Muon (the fused QKV as one
matrix here, because torch.optim.Muon cannot split it and the comparison is of equal updates);
torch.optim.Muon gets the same matrices plus a separate AdamW. Protocol as in ``train_digits.py``: tune AdamW's lr, then the Muon lrs with the
auxiliary AdamW at AdamW's lr, equal step budgets, best lr re-run with ``--seeds`` seeds.

Run: ``python examples/train_char_transformer.py`` (about 30 min on 1 CPU thread; torch.optim.Muon's
bf16 Newton–Schulz dominates its time on CPU). It prints a Markdown table and writes the loss plot to a
new temporary folder (``--out DIR`` to choose one); ``--write-results`` regenerates the committed
``examples/char_transformer_loss.png`` instead. ``--quick``: one lr per optimizer, a few steps.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _study  # noqa: E402
from train_digits import OPTIMIZERS, make_optimizer, plot, summarize, sweep_and_rerun  # noqa: E402

MODULES = ("functools.py", "collections/__init__.py", "typing.py", "argparse.py", "dataclasses.py")


def load_text() -> str:
    root = os.path.dirname(os.__file__)
    return "\n".join(open(os.path.join(root, m), encoding="utf-8").read() for m in MODULES)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.proj(nn.functional.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2, ctx: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((ctx, ctx), float("-inf")), 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T))
        for b in self.blocks:
            x = b(x, self.mask[:T, :T])
        return self.head(self.ln(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per minibatch (default 32)")
    ap.add_argument("--ctx", type=int, default=64, help="context length in characters (default 64)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds for the re-runs at the best lr (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--adamw-grid", default="1e-3,3e-3,1e-2", help="comma-separated AdamW lrs")
    ap.add_argument("--muon-grid", default="1e-2,3e-2,1e-1", help="comma-separated Muon lrs")
    ap.add_argument("--only", default=",".join(OPTIMIZERS), help="comma-separated subset of optimizers; "
                    "without AdamW, the Muon variants' aux AdamW lr is the first of --adamw-grid")
    ap.add_argument("--quick", action="store_true",
                    help="one lr per optimizer (the first of each grid), 10 steps of 8 sequences, 1 seed: a smoke test")
    _study.add_output_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.seeds = 10, 8, 1
        args.adamw_grid, args.muon_grid = args.adamw_grid.split(",")[0], args.muon_grid.split(",")[0]
    out = _study.output_dir(args, "train_char_transformer")
    torch.set_num_threads(args.threads)
    text = load_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    n_tr = int(0.9 * len(data))
    train_data, val_data = data[:n_tr], data[n_tr:]
    vg = torch.Generator().manual_seed(123)
    val_idx = torch.randint(0, len(val_data) - args.ctx - 1, (64,), generator=vg)
    val_x = torch.stack([val_data[i: i + args.ctx] for i in val_idx])
    val_y = torch.stack([val_data[i + 1: i + 1 + args.ctx] for i in val_idx])

    def train(name: str, lr: float, adamw_lr: float, seed: int) -> dict:
        torch.manual_seed(seed)
        model = CharLM(len(chars), ctx=args.ctx)
        opt = make_optimizer(name, model, lr, adamw_lr)
        g = torch.Generator().manual_seed(1000 + seed)
        curve = []
        t0 = time.perf_counter()
        for _ in range(args.steps):
            ix = torch.randint(0, len(train_data) - args.ctx - 1, (args.batch,), generator=g)
            x = torch.stack([train_data[i: i + args.ctx] for i in ix])
            y = torch.stack([train_data[i + 1: i + 1 + args.ctx] for i in ix])
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        secs = time.perf_counter() - t0
        with torch.no_grad():
            val = nn.functional.cross_entropy(model(val_x).flatten(0, 1), val_y.flatten()).item()
        sm = [statistics.mean(curve[max(0, i - 19): i + 1]) for i in range(len(curve))]
        return dict(val_loss=val, val_bpc=val / math.log(2), train_loss=statistics.mean(curve[-20:]),
                    curve=sm, seconds=secs)

    adamw_grid = [float(x) for x in args.adamw_grid.split(",")]
    muon_grid = [float(x) for x in args.muon_grid.split(",")]
    grids = {n: adamw_grid if n == "AdamW" else muon_grid for n in args.only.split(",")}
    print(f"text: {len(text)} chars of stdlib source ({', '.join(MODULES)}), vocab {len(chars)}; "
          f"{args.steps} steps of {args.batch}x{args.ctx}, {args.threads} thread(s)")
    best = sweep_and_rerun(train, grids, args.seeds, adamw_lr=adamw_grid[0])
    print()
    table = summarize(best, ["train_loss", "val_loss", "val_bpc"])
    print(table)
    if not args.write_results:
        (out / "char_transformer.md").write_text(table + "\n")
        print(f"wrote {out / 'char_transformer.md'}")
    plot(best, os.path.join(out, "char_transformer_loss.png"),
         f"char transformer, {args.steps} steps, mean of {args.seeds} seed(s) (band: min–max)")


if __name__ == "__main__":
    main()
