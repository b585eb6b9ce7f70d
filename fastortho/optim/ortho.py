r""":class:`OrthoConfig`: everything that decides the orthogonalizer's output in a Muon step, read once
from a param group.

Re-exported by :mod:`fastortho.optim.functional`, whose ``orthogonalize_units`` buckets matrix units by
config and runs ``orthogonalize`` once per bucket.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fastortho.coefficients import Schedule
from fastortho.optim.defaults import ORTHOGONALIZER_ALIASES, TORCH_NS_STEPS

__all__ = ["Orthogonalizer", "OrthoConfig", "POLAR_METHODS", "coarsest_dtype"]

#: ``orthogonalizer=`` names that run a method of :func:`fastortho.polar` (rank cut at the data's precision).
POLAR_METHODS = ("svd", "qdwh", "higham")


def coarsest_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype with the largest machine epsilon (float64's ε for non-floating dtypes)."""
    return max(dtypes, key=lambda d: torch.finfo(d if d.is_floating_point else torch.float64).eps)


#: A user-supplied orthogonalizer: maps a ``(B, m, n)`` stack to a tensor of the same shape.
Orthogonalizer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class OrthoConfig:
    """Everything that decides the orthogonalizer's output; units with equal configs share a batched call."""

    orthogonalizer: str | Orthogonalizer = "newton_schulz"
    coefficients: Hashable = None  # a schedule name, a tuple of (a, b, c) triples or a Schedule
    steps: int | None = TORCH_NS_STEPS
    normalize: str = "fro"
    eps: float = 1e-7
    dtype: torch.dtype | None = None
    backend: str = "auto"
    # The coarsest dtype the matrix was stored in before it reached the orthogonalizer (parameter,
    # momentum); None: the input's own dtype. Only the polar methods read it (their rank cut).
    data_dtype: torch.dtype | None = None

    def for_data(self, *tensors: Tensor) -> "OrthoConfig":
        """This config for matrices built from ``tensors`` (a parameter and its momentum buffer).

        The polar methods ("svd", "qdwh", "higham") cut singular values at the precision of the data
        (:func:`fastortho.reference.default_rtol`): a bfloat16 parameter's momentum handed over as a
        float32 copy still carries bfloat16 rounding noise (σ ≈ 0.1·ε_bf16·σ_max), which a float32 cut
        would map to full unit directions. Newton–Schulz and callables do not read it, so their configs
        are returned unchanged (units of different storage dtypes keep sharing one batched call).
        """
        if self.orthogonalizer not in POLAR_METHODS or not tensors:
            return self
        return replace(self, data_dtype=coarsest_dtype(*(t.dtype for t in tensors)))

    @staticmethod
    def from_group(group: dict[str, Any]) -> "OrthoConfig":
        """The config of a param group (``coefficients=None``: torch's one triple, ``ns_steps`` times)."""
        coeffs, steps = group.get("coefficients"), group.get("ns_steps")
        if coeffs is None:
            steps = TORCH_NS_STEPS if steps is None else int(steps)
            coeffs = (tuple(float(c) for c in group["ns_coefficients"]),) * steps
        elif not isinstance(coeffs, (str, Schedule)):
            coeffs = tuple(tuple(float(c) for c in t) for t in coeffs)  # hashable, for bucketing
        orth = group["orthogonalizer"]
        return OrthoConfig(
            orthogonalizer=ORTHOGONALIZER_ALIASES.get(orth, orth) if isinstance(orth, str) else orth,
            coefficients=coeffs, steps=steps, normalize=group["normalize"], eps=float(group["eps"]),
            dtype=group["ns_dtype"],
            # capturable: fixed kernels (cuBLAS matmuls), no autotuning launch that could run inside a capture
            backend="torch" if group.get("capturable") and group["backend"] == "auto" else group["backend"],
        )
