"""Helpers shared by several test files: matrices with known spectra (accuracy tests) and a guard
that makes every host read of a tensor's value raise (capturable-step tests, one process and gloo)."""
from __future__ import annotations

import contextlib

import torch


def with_spectrum(shape: tuple[int, ...], sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """float64 matrices (..., m, n) = U diag(sigma) Vᵀ with Haar-random U, V; len(sigma) = min(m, n)."""
    *lead, m, n = shape
    k = min(m, n)
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(*lead, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*lead, n, k, generator=g, dtype=torch.float64))
    return (U * sigma.to(torch.float64)) @ V.mT


def log_spectrum(k: int, kappa: float) -> torch.Tensor:
    """k singular values log-spaced from 1 down to 1/kappa."""
    return torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), k, dtype=torch.float64)


def low_rank(shape: tuple[int, ...], rank: int, seed: int = 0) -> torch.Tensor:
    """float64 matrices of exact rank ``rank`` (singular values log-spaced over 1..1e-2, then zeros)."""
    *lead, m, n = shape
    s = torch.zeros(min(m, n), dtype=torch.float64)
    s[:rank] = log_spectrum(rank, 1e2)
    return with_spectrum(shape, s, seed)


#: every way a step could read a tensor's value on the host (a device sync on a GPU)
HOST_READS = ("item", "__bool__", "tolist", "__float__", "__int__")


@contextlib.contextmanager
def no_host_reads():
    """Inside the block, ``Tensor.item``, ``__bool__``, ``tolist``, ``__float__`` and ``__int__`` raise."""
    saved = {k: getattr(torch.Tensor, k) for k in HOST_READS}

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host read Tensor.{name} inside step()")
        return f

    for k in HOST_READS:
        setattr(torch.Tensor, k, refuse(k))
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(torch.Tensor, k, v)
