"""Test matrices with known spectra, shared by the accuracy tests."""
from __future__ import annotations

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
