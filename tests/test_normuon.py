"""NorMuon (``variant="normuon"``) against float64 references written from the paper and the authors' code.

"NorMuon: Making Muon more efficient and scalable" (arXiv 2510.05491), Algorithm 1, per matrix W (m × n):
M ← β₁M + (1 − β₁)G; O = Orth(M); v ← β₂v + (1 − β₂)·mean_j(O²); Ô = O / (√v + ε);
W ← W − ηλW − η̂·Ô with η̂ = 0.2·η·√(mn)/‖Ô‖_F. The authors' code instead rescales Ô to ‖O‖_F and then
applies Muon's own lr scale (Nesterov input by default). The references below use the exact polar factor
(SVD, float64) and do not call fastortho.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fastortho import Muon

EPS = 1e-10


def polar64(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def reference(ws, grads_seq, *, lr, wd, beta1, beta2, nesterov, rescale):
    """Float64 NorMuon on a list of 2-D (or (B, m, n) stacked) weights; ``rescale``: ``"paper"``
    (0.2·√(mn)/‖Ô‖_F) or ``"code"`` (‖O‖_F/‖Ô‖_F, then √max(1, m/n))."""
    ws = [w.clone() for w in ws]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros(w.shape[:-1], dtype=torch.float64) for w in ws]
    for grads in grads_seq:
        for i, (w, g) in enumerate(zip(ws, grads)):
            ms[i] = beta1 * ms[i] + (1 - beta1) * g
            u = (1 - beta1) * g + beta1 * ms[i] if nesterov else ms[i]
            o = polar64(u)
            m, n = o.shape[-2:]
            vs[i] = beta2 * vs[i] + (1 - beta2) * (o * o).mean(-1)
            hat = o / (vs[i].sqrt() + EPS).unsqueeze(-1)
            hn = torch.linalg.vector_norm(hat, dim=(-2, -1), keepdim=True)
            if rescale == "paper":
                step = 0.2 * math.sqrt(m * n) / hn * hat
            else:
                on = torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True)
                step = hat * on / (hn + EPS) * math.sqrt(max(1.0, m / n))
            ws[i] = w - lr * wd * w - lr * step
    return ws, vs


def run_fastortho(ws, grads_seq, **kw):
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = Muon(ps, orthogonalizer="svd", ns_dtype=torch.float64, variant="normuon", **kw)
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def data(seed=0, steps=4):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (5, 12), (2, 4, 6)]  # tall, wide, a stack of two matrices
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    # rows of very different scale: the row normalization has something to equalize
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64)
              * torch.logspace(-2, 1, s[-2], dtype=torch.float64).unsqueeze(-1) for s in shapes]
             for _ in range(steps)]
    return ws, grads


@pytest.mark.parametrize("beta2", [0.95, 0.5])
def test_matches_paper_algorithm(beta2):
    ws, grads = data()
    ref, ref_v = reference(ws, grads, lr=0.05, wd=0.1, beta1=0.9, beta2=beta2, nesterov=False, rescale="paper")
    ps, opt = run_fastortho(ws, grads, lr=0.05, weight_decay=0.1, momentum=0.9, beta2=beta2, nesterov=False,
                            lr_scale="rms_match")
    for p, r in zip(ps, ref):
        # float64 throughout. The polar factor of an input with condition number κ is accurate to ~κ·eps and
        # these rows span 10³ in scale: measured max |diff|/max|W| = 4.0e-13 (beta2=0.5), 1.6e-13 (0.95)
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-11 * r.abs().max())
    for p, v in zip(ps, ref_v):
        got = opt.state[p]["normuon_v"]
        assert got.shape == v.shape  # (m,) per matrix, (B, m) per stack
        torch.testing.assert_close(got, v, rtol=1e-12, atol=0)


def test_matches_authors_code_convention():
    """Norm-preserving rescale, then Muon's "original" scale, Nesterov input (the authors' code)."""
    ws, grads = data(seed=1)
    ref, _ = reference(ws, grads, lr=0.02, wd=0.0, beta1=0.95, beta2=0.95, nesterov=True, rescale="code")
    ps, _ = run_fastortho(ws, grads, lr=0.02, weight_decay=0.0, momentum=0.95)
    for p, r in zip(ps, ref):  # measured max |diff|/max|W| = 7.5e-16
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-11 * r.abs().max())


def test_normuon_differs_from_muon_and_equalizes_rows():
    """Not a no-op: with rows of gradients at different scales the row RMS of the update is flatter."""
    ws, grads = data(seed=2, steps=1)
    ws, grads = ws[:1], [g[:1] for g in grads]
    outs = {}
    for variant in ("muon", "normuon"):
        p = torch.nn.Parameter(ws[0].clone())
        opt = Muon([p], lr=1.0, weight_decay=0.0, orthogonalizer="svd", ns_dtype=torch.float64, variant=variant)
        p.grad = grads[0][0].clone()
        opt.step()
        outs[variant] = (ws[0] - p.detach())
    rms = {k: v.square().mean(-1).sqrt() for k, v in outs.items()}
    spread = {k: (r.max() / r.min()).item() for k, r in rms.items()}
    assert spread["normuon"] < spread["muon"]
    # the Frobenius norm of the step is Muon's (norm-preserving rescale), up to its ε = 1e-10 in
    # ‖O‖/(‖Ô‖ + ε): measured relative difference 3.5e-12
    torch.testing.assert_close(outs["normuon"].norm(), outs["muon"].norm(), rtol=1e-10, atol=0)


def test_split_blocks_conv_and_state_dict_round_trip():
    torch.manual_seed(0)
    qkv = torch.nn.Parameter(torch.randn(12, 4))
    conv = torch.nn.Parameter(torch.randn(6, 2, 3, 3))
    opt = Muon([dict(params=[qkv], split_sizes=(4, 4, 4)), dict(params=[conv])], variant="normuon", beta2=0.9)
    assert opt.state[qkv]["normuon_v"].shape == (12,)  # one entry per row, blocks included
    assert opt.state[conv]["normuon_v"].shape == (6,)  # flattened kernel: rows = out channels
    for _ in range(2):
        qkv.grad, conv.grad = torch.randn_like(qkv), torch.randn_like(conv)
        opt.step()
    assert (opt.state[qkv]["normuon_v"] > 0).all()
    sd = copy.deepcopy(opt.state_dict())  # a checkpoint, not the live tensors (load_state_dict aliases them)
    assert sd["param_groups"][0]["variant"] == "normuon" and sd["param_groups"][0]["beta2"] == 0.9
    q2, c2 = (torch.nn.Parameter(t.detach().clone()) for t in (qkv, conv))
    opt2 = Muon([dict(params=[q2], split_sizes=(4, 4, 4)), dict(params=[c2])], variant="normuon", beta2=0.9)
    opt2.load_state_dict(sd)
    g1, g2 = torch.randn_like(qkv), torch.randn_like(conv)
    for o, (a, b) in ((opt, (qkv, conv)), (opt2, (q2, c2))):
        a.grad, b.grad = g1.clone(), g2.clone()
        o.step()
    assert torch.equal(qkv, q2) and torch.equal(conv, c2)


def test_group_key_and_bad_values():
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([dict(params=[a], variant="normuon"), dict(params=[b])])
    assert "normuon_v" in opt.state[a] and "normuon_v" not in opt.state[b]
    with pytest.raises(ValueError, match="variant must be one of"):
        Muon([a], variant="normuon2")
    with pytest.raises(ValueError, match="beta2"):
        Muon([a], variant="normuon", beta2=1.0)
