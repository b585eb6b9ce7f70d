"""Helpers shared by several test files: matrices with known spectra (accuracy tests), a guard
that makes every host read of a tensor's value raise (capturable-step tests, one process and gloo),
and the published Polar Express coefficient tables (schedule and peer-oracle tests)."""
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


# Published coefficient tables, transcribed from their sources, not from fastortho/coefficients.py
# (the tests compare the package's tables and generator against them).
# modded-nanogpt / dion "Polar Express, 5 steps, safety 1.02":
PE5_PUBLISHED = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# The Polar Express paper's raw table (NoahAmsel/PolarExpress); row 8 is printed rounded to its
# fixed point (15/8, -10/8, 3/8):
PE_PAPER_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
