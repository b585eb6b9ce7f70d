"""Shared inputs and baselines of the interpreter tests."""
from __future__ import annotations

import torch

from fastortho.coefficients import get_schedule
from fastortho.ops.newton_schulz import newton_schulz_triton


def ns_triton(G, name="polar_express", steps=None, *, cdt=torch.float32, out=None, **kw):
    co, safety = get_schedule(name, steps)
    kw.setdefault("normalize", "fro")
    return newton_schulz_triton(G, co, safety=safety, eps=1e-7, compute_dtype=cdt,
                                out_dtype=out or cdt, **kw)


def plain_loop(G, name="polar_express", steps=None, *, dtype=torch.float64, normalize="fro"):
    """The plain PyTorch loop with the same coefficients, every op in ``dtype`` (eager rounding):
    X = G/(safety·ν); A = X@Xᵀ; B = b*A + c*(A@A); X = a*X + B@X, on the short side."""
    co, safety = get_schedule(name, steps)
    tall = G.shape[-2] > G.shape[-1]
    X = (G.mT if tall else G).double()
    if normalize == "fro":
        nu = torch.linalg.matrix_norm(X, keepdim=True)
    else:
        nu = torch.linalg.matrix_norm(X @ X.mT, keepdim=True).sqrt()
    X = (X / (safety * nu).clamp_min(1e-7)).to(dtype)
    for a, b, c in co:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def rel(X, R):
    """‖X − R‖_F / ‖R‖_F per matrix, float64."""
    X, R = X.double(), R.double()
    return torch.linalg.matrix_norm(X - R) / torch.linalg.matrix_norm(R)


def haar(n, gen):
    Q, R = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def anchor_matrices(m, seed=0):
    """The anchors' three test matrices (shared/research/ns_accuracy.py) at size m."""
    gen = torch.Generator().manual_seed(seed)
    mats = {"gauss_square": torch.randn(1, m, m, dtype=torch.float64, generator=gen),
            "gauss_wide": torch.randn(1, m, 4 * m, dtype=torch.float64, generator=gen)}
    U, V = haar(m, gen), haar(m, gen)
    sig = torch.logspace(0, -3, m, dtype=torch.float64)
    mats["kappa1e3"] = ((U * sig[None, :]) @ V.mT)[None]
    return mats


def gen(shape, seed=0, dtype=torch.float32):
    """Seeded Gaussian test matrix, independent of the global RNG."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_batch_invariant(shape, gram):
    """A matrix gives bit-identical output alone or anywhere inside any batch. Two standard steps, four
    Gram-space steps (restart before step 3) exercise every kernel and the norm reduction."""
    G = gen(shape, seed=2)
    kw = dict(steps=4 if gram else 2, cdt=torch.bfloat16, gram=gram)
    batched = ns_triton(G, **kw)
    for i in (0, shape[0] - 1):
        assert torch.equal(ns_triton(G[i:i + 1], **kw)[0], batched[i])
    perm = torch.tensor([2, 0, 1])
    bigger = torch.cat([G[perm], gen((2,) + shape[1:], seed=3)])
    assert torch.equal(ns_triton(bigger, **kw)[: shape[0]], batched[perm])
