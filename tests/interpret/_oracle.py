"""Independent float64 oracle of Newton–Schulz for the differential tests.

In exact arithmetic every step maps G = U S Vᵀ to U p(S) Vᵀ, so the iteration's exact result is
X* = U f(σ) Vᵀ with f = p_k ∘ … ∘ p_1 applied to σ / max(safety·ν, eps), ν = ‖σ‖₂ ("fro") or
(Σσ⁴)^{1/4} ("gram", = ‖GGᵀ‖_F^{1/2}). Computed from a float64 SVD (``torch.linalg.svd``), not
from either backend's code, and compared in the relative Frobenius norm ‖X − X*‖_F / ‖X*‖_F.
The polar factor itself is ``fastortho.reference.polar_svd``.
"""
from __future__ import annotations

import torch

from fastortho.coefficients import get_schedule


def exact_ns(G: torch.Tensor, name, steps, normalize: str, eps: float = 1e-7) -> torch.Tensor:
    """X* for G (..., m, n), float64 (scale handled by first dividing G by its max, exactly)."""
    co, safety = get_schedule(name, steps)
    G64 = G.detach().to(torch.float64)
    amax = G64.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    U, S, Vh = torch.linalg.svd(G64 / amax, full_matrices=False)
    nu = S.square().sum(-1, keepdim=True).sqrt() if normalize == "fro" else S.pow(4).sum(-1, keepdim=True).pow(0.25)
    d = torch.maximum(safety * nu, eps / amax[..., 0])
    x = S / d
    for a, b, c in co:
        x = x * (a + x * x * (b + c * x * x))
    return (U * x.unsqueeze(-2)) @ Vh


def rel_to(X: torch.Tensor, R: torch.Tensor) -> float:
    """max over the batch of ‖X − R‖_F / ‖R‖_F (R = 0 counts absolutely)."""
    X, R = X.double(), R.double()
    num = torch.linalg.matrix_norm(X - R)
    den = torch.linalg.matrix_norm(R)
    return float((num / torch.where(den > 0, den, torch.ones_like(den))).max())


def draw_input(m, n, batch, layout, log_scale, dtype, seed):
    """(batch, m, n) Gaussian times 10^log_scale, rounded to ``dtype``, laid out as asked:
    contiguous, a transposed view (the other orientation in memory), or a strided slice."""
    gen = torch.Generator().manual_seed(seed)
    shape = {"transposed": (batch, n, m), "strided": (batch, 2 * m, n + 3)}.get(layout, (batch, m, n))
    G = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 10.0**log_scale).to(dtype)
    G = {"transposed": lambda t: t.mT, "strided": lambda t: t[:, ::2, 3:]}.get(layout, lambda t: t)(G)
    assert G.shape == (batch, m, n) and (layout == "contiguous" or not G.is_contiguous() or min(m, n) == 1)
    return G
