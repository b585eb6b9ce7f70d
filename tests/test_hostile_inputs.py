"""Every bad input × every entry point, with its tested outcome: the table of docs/hostile-inputs.md.

``OUTCOMES`` is the table. Each cell is a short outcome code, checked by ``test_cell`` and rendered
into docs/hostile-inputs.md by ``render_table`` (``test_docs_table_is_this_table`` keeps the two
identical: after changing a cell, paste the printed table into the doc).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastortho
from fastortho.optim import Muon
from fastortho.optim.param_groups import describe_param_groups

SHAPE = (6, 10)
INPUTS = {
    # name: description in the table
    "nan": "NaN entry",
    "inf": "±Inf entry",
    "zero": "zero matrix",
    "empty": "empty (0×10)",
    "1-D": "1-D vector",
    "0-d": "0-d scalar",
    "complex": "complex64",
    "int": "int64",
    "sparse": "sparse COO",
    "stride0": "stride 0 (`expand`)",
    "noncontig": "non-contiguous (`.t()` view)",
    "1e30": "scale 1e30",
    "1e-30": "scale 1e-30",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "meta": "meta device",
}
ENTRIES = ["newton_schulz", "polar qdwh", "polar higham", "polar svd", "polar newton_schulz",
           "Muon.step", "muon_param_groups"]

# Outcome codes → the text of the table.
TEXT = {
    "ns": "≈ UVᵀ (σ in [0.5, 1.3]), G's dtype",
    "polar": "UVᵀ (σ = 1), fp32/fp64",
    "svd": "UVᵀ (σ = 1), fp64",
    "nan": "all-NaN result, no sync; `check_finite=True`: `ValueError`",
    "ValueError-finite": "`ValueError` (NaN or Inf)",
    "zeros": "zeros",
    "empty": "empty result",
    "unit": "g/‖g‖",
    "tiny": "≈ G/eps ≈ 0 (eps floor, as torch.optim.Muon)",
    "meta": "meta result (shapes and dtypes)",
    "ValueError-0d": "`ValueError` (0-dim)",
    "TypeError-complex": "`TypeError` (complex)",
    "TypeError-int": "`TypeError` (not floating)",
    "TypeError-sparse": "`TypeError` (sparse: `.to_dense()`)",
    "applied": "update applied",
    "skipped": "update skipped and counted, momentum reset; `nonfinite='raise'`: `FloatingPointError`",
    "wd-only": "weight decay only (zero update)",
    "noop": "no-op",
    "adamw-step": "AdamW update",
    "RuntimeError-complex": "`RuntimeError` (complex, torch's message)",
    "TypeError-int-step": "`TypeError` at `step()` (dtype)",
    "RuntimeError-sparse": "`RuntimeError` (sparse gradient, torch's message)",
    "muon-route": "Muon (routes by shape; values never read)",
    "adamw-route": "AdamW (ndim < 2)",
}

_FN = ["newton_schulz", "polar qdwh", "polar higham", "polar svd", "polar newton_schulz"]


def _row(ns: str, qdwh: str, higham: str, svd: str, pns: str, step: str, groups: str) -> dict[str, str]:
    return dict(zip(ENTRIES, (ns, qdwh, higham, svd, pns, step, groups)))


OUTCOMES: dict[str, dict[str, str]] = {
    "nan": _row("nan", *["ValueError-finite"] * 3, "nan", "skipped", "muon-route"),
    "inf": _row("nan", *["ValueError-finite"] * 3, "nan", "skipped", "muon-route"),
    "zero": _row("zeros", "zeros", "zeros", "zeros", "zeros", "wd-only", "muon-route"),
    "empty": _row("empty", "empty", "empty", "empty", "empty", "noop", "muon-route"),
    "1-D": _row("unit", "unit", "unit", "unit", "unit", "adamw-step", "adamw-route"),
    "0-d": _row(*["ValueError-0d"] * 5, "adamw-step", "adamw-route"),
    "complex": _row(*["TypeError-complex"] * 5, "RuntimeError-complex", "muon-route"),
    "int": _row(*["TypeError-int"] * 5, "TypeError-int-step", "muon-route"),
    "sparse": _row(*["TypeError-sparse"] * 5, "RuntimeError-sparse", "muon-route"),
    "stride0": _row("ns", "polar", "polar", "svd", "ns", "applied", "muon-route"),
    "noncontig": _row("ns", "polar", "polar", "svd", "ns", "applied", "muon-route"),
    "1e30": _row("ns", "polar", "polar", "svd", "ns", "applied", "muon-route"),
    "1e-30": _row("tiny", "polar", "polar", "svd", "tiny", "wd-only", "muon-route"),
    "fp16": _row("ns", "polar", "polar", "svd", "ns", "applied", "muon-route"),
    "bf16": _row("ns", "polar", "polar", "svd", "ns", "applied", "muon-route"),
    "fp64": _row("ns", "polar", "polar", "svd", "ns", "applied", "muon-route"),
    "meta": _row(*["meta"] * 5, "meta", "muon-route"),
}

# Rows where the outcome depends on a fix made elsewhere at the same time: (input, entry) → reason.
PENDING: dict[tuple[str, str], str] = {}


def make(name: str, gen: torch.Generator) -> torch.Tensor:
    """The hostile input as a G of shape SHAPE (or the shape the name says)."""
    R = torch.randn(SHAPE, generator=gen)
    if name in ("nan", "inf"):
        R[1, 2] = float("nan") if name == "nan" else float("-inf")
        return R
    return {
        "zero": lambda: torch.zeros(SHAPE),
        "empty": lambda: torch.zeros(0, SHAPE[1]),
        "1-D": lambda: R[0].clone(),
        "0-d": lambda: R[0, 0].clone(),
        "complex": lambda: torch.complex(R, R.flip(0)),
        "int": lambda: (R * 10).to(torch.int64),
        "sparse": lambda: R.to_sparse(),
        "stride0": lambda: _stride0(gen),
        "noncontig": lambda: torch.randn(SHAPE[::-1], generator=gen).t(),
        "1e30": lambda: R * 1e30,
        "1e-30": lambda: R * 1e-30,
        "fp16": lambda: R.half(),
        "bf16": lambda: R.bfloat16(),
        "fp64": lambda: R.double(),
        "meta": lambda: torch.empty(SHAPE, device="meta"),
    }[name]()


def _stride0(gen):
    """One row repeated by ``expand`` (rank 1, row stride 0): no copy is ever made of it."""
    G = torch.randn(1, SHAPE[1], generator=gen).expand(SHAPE)
    assert G.stride(0) == 0
    return G


def call(entry: str, G: torch.Tensor, **kw):
    if entry == "newton_schulz":
        return fastortho.newton_schulz(G, **kw)
    return fastortho.polar(G, method=entry.split()[1], **kw)


def check_function(entry: str, name: str, code: str, G: torch.Tensor) -> None:
    if code.startswith(("ValueError", "TypeError")):
        exc = ValueError if code.startswith("ValueError") else TypeError
        fn = "newton_schulz" if entry == "newton_schulz" else "polar"
        with pytest.raises(exc, match=fn):
            call(entry, G)
        return
    G0 = G.clone()
    X = call(entry, G)
    assert X.shape == G.shape
    if code == "meta":
        assert X.is_meta
        return
    if code == "nan":
        assert torch.isnan(X).all() and torch.equal(G.isnan(), G0.isnan())
        with pytest.raises(ValueError, match="NaN or Inf"):
            call(entry, G, check_finite=True)  # polar(method="newton_schulz") passes it through
        # the other matrices of a batch are untouched by one matrix's NaN
        Xb = call(entry, torch.stack([G, torch.randn(SHAPE)]))
        assert torch.isnan(Xb[0]).all() and torch.isfinite(Xb[1]).all()
        return
    assert torch.equal(G, G0), "the input was modified"
    if code == "zeros":
        assert torch.equal(X, torch.zeros_like(X))
        return
    if code == "empty":
        assert X.numel() == 0
        return
    if code == "unit":
        torch.testing.assert_close(X.double(), G.double() / G.double().norm(), atol=1e-6, rtol=0)
        return
    if code == "tiny":
        assert torch.isfinite(X).all() and X.double().norm().item() < 1e-12
        return
    assert torch.isfinite(X).all()
    S = torch.linalg.svdvals(X.double())
    rank = int(torch.linalg.matrix_rank(G.double()))
    if code == "ns":
        assert X.dtype == G.dtype
        assert 0.5 <= S[rank - 1].item() and S[0].item() <= 1.3, S
    elif code in ("polar", "svd"):
        want = torch.float64 if code == "svd" or G.dtype == torch.float64 else torch.float32
        assert X.dtype == want
        # rank-r input (the stride-0 one is rank 1): r unit singular values, the rest 0
        assert (S[:rank] - 1).abs().max().item() < 1e-5
        assert rank == len(S) or S[rank:].max().item() < 1e-5
    else:
        raise AssertionError(f"unknown outcome {code}")


def check_step(name: str, code: str, gen: torch.Generator) -> None:
    lr, wd = 0.1, 0.1
    G = make(name, gen)
    if code == "TypeError-int-step":
        p = torch.ones(SHAPE, dtype=torch.int64)
        with pytest.raises(TypeError, match="dtype"):
            opt = Muon([p], lr=lr)
            p.grad = torch.ones_like(p)
            opt.step()
        return
    if code == "RuntimeError-complex":
        p = nn.Parameter(G)
        with pytest.raises(RuntimeError, match="complex"):
            opt = Muon([p], lr=lr)
            p.grad = torch.ones_like(p)
            opt.step()
        return
    if name == "sparse":
        p = nn.Parameter(torch.randn(SHAPE, generator=gen))
        opt = Muon([p], lr=lr)
        p.grad = G
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        return
    if name == "noncontig":
        p = nn.Parameter(torch.randn(SHAPE[::-1], generator=gen).t())
        grad = G
    elif name in ("fp16", "bf16", "fp64"):
        p = nn.Parameter(torch.randn(SHAPE, generator=gen).to(G.dtype))
        grad = torch.randn(SHAPE, generator=gen).to(G.dtype)
    elif name in ("empty", "1-D", "0-d", "meta"):
        p = nn.Parameter(torch.randn_like(G) if name != "meta" else torch.empty_like(G))
        grad = torch.ones_like(G) if name != "meta" else torch.empty_like(G)
    else:
        p = nn.Parameter(torch.randn(SHAPE, generator=gen))
        grad = G.clone() if name != "stride0" else G
    before = p.detach().clone()
    opt = Muon([p], lr=lr, weight_decay=wd)
    p.grad = grad
    opt.step()
    if code == "meta":
        assert p.is_meta
        return
    after = p.detach()
    assert torch.isfinite(after).all()
    decayed = before * (1 - lr * wd)
    if code == "noop":
        assert after.numel() == 0
    elif code in ("wd-only", "skipped"):
        torch.testing.assert_close(after, decayed, atol=1e-12, rtol=1e-6)
        assert opt.nonfinite_count == (1 if code == "skipped" else 0)
        if code == "skipped":
            assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))
            q = nn.Parameter(before.clone())
            strict = Muon([q], lr=lr, nonfinite="raise")
            q.grad = grad
            with pytest.raises(FloatingPointError):
                strict.step()
    elif code in ("applied", "adamw-step"):
        assert after.dtype == before.dtype
        delta = (after.double() - decayed.double()).norm().item()
        assert delta > 1e-3, delta  # a real update beyond weight decay
    else:
        raise AssertionError(f"unknown outcome {code}")


def check_groups(name: str, code: str, gen: torch.Generator) -> None:
    G = make(name, gen)
    m = nn.Module()
    m.w = nn.Parameter(G, requires_grad=G.is_floating_point() or G.is_complex())
    m.body = nn.Linear(4, 4)  # the second matrix: nothing is guessed about w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-head warning is tested in test_param_groups.py
        rows = {r.name: r for r in describe_param_groups(m)}
    want = "muon" if code == "muon-route" else "adamw"
    assert rows["w"].group == want and rows["w"].shape == tuple(G.shape)


CELLS = [(i, e) for i in INPUTS for e in ENTRIES]


@pytest.mark.parametrize("name, entry", [
    pytest.param(i, e, marks=pytest.mark.xfail(strict=True, reason=PENDING[i, e]))
    if (i, e) in PENDING else (i, e)
    for i, e in CELLS], ids=lambda x: x.replace(" ", "-"))
def test_cell(name, entry):
    gen = torch.Generator().manual_seed(0)
    code = OUTCOMES[name][entry]
    if entry in _FN:
        G = make(name, gen)
        check_function(entry, name, code, G)
    elif entry == "Muon.step":
        check_step(name, code, gen)
    else:
        check_groups(name, code, gen)


def test_list_of_parameters_to_muon_param_groups_is_a_type_error():
    with pytest.raises(TypeError, match="expected the nn.Module"):
        fastortho.muon_param_groups([nn.Parameter(torch.randn(3, 3))])


def render_table() -> str:
    head = "| input | " + " | ".join(f"`{e}`" for e in ENTRIES) + " |"
    sep = "|" + "---|" * (len(ENTRIES) + 1)
    lines = [head, sep]
    for i, desc in INPUTS.items():
        lines.append(f"| {desc} | " + " | ".join(TEXT[OUTCOMES[i][e]] for e in ENTRIES) + " |")
    return "\n".join(lines)


def test_docs_table_is_this_table():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "hostile-inputs.md").read_text()
    assert render_table() in doc, "docs/hostile-inputs.md is out of date; paste:\n" + render_table()
