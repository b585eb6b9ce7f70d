"""``muon_param_groups``: which parameters Muon should orthogonalize, decided by module type and shape.

Muon is for the hidden *matrices* of a network. Embeddings (a lookup table: each row is updated
alone, so orthogonalizing the table couples unrelated tokens), output heads (their rows are per-class
logits) and 1-D parameters (biases, norm gains) belong to AdamW. Peers route by parameter names
(``"embed"``, ``"lm_head"``), which breaks silently on any other naming scheme; here the decision reads
the module that owns the parameter, and names are only an optional override.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["muon_param_groups"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBED = (nn.Embedding, nn.EmbeddingBag)


def _find_heads(model: nn.Module, embed_sizes: set[int], embed_params: set[int]) -> set[int]:
    """ids of output-head weights: Linear weights tied to an embedding, or with out_features equal to
    an embedding's vocabulary; with no embedding at all, the last ``nn.Linear`` registered (a classifier)."""
    heads: set[int] = set()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for lin in linears:
        if id(lin.weight) in embed_params or lin.out_features in embed_sizes:
            heads.add(id(lin.weight))
    if not embed_sizes and linears:
        heads.add(id(linears[-1].weight))
    return heads


def muon_param_groups(
    model: nn.Module,
    *,
    muon: Mapping[str, Any] | None = None,
    adamw: Mapping[str, Any] | None = None,
    heads: str | Iterable[nn.Module | nn.Parameter] = "auto",
    force_adamw: Iterable[nn.Module | nn.Parameter | str] = (),
    force_muon: Iterable[nn.Module | nn.Parameter | str] = (),
    split_qkv: bool = True,
) -> list[dict[str, Any]]:
    """Param groups for :class:`fastortho.Muon`, routed by module type and shape.

    Rules, in order (each parameter appears once, at its first owner in ``model.named_modules()``):

    1. ``force_adamw`` / ``force_muon`` (modules, parameters, or exact parameter names from
       ``named_parameters``): as told (a forced-Muon parameter must have ndim ≥ 2).
    2. Parameters with ndim < 2 (biases, norm gains, scalars) → AdamW.
    3. ``nn.Embedding``/``nn.EmbeddingBag`` weights → AdamW.
    4. Output heads → AdamW. ``heads="auto"``: a Linear whose weight *is* an embedding's (tied) or whose
       ``out_features`` equals an embedding's ``num_embeddings`` (an LM head); in a model without
       embeddings, the last registered ``nn.Linear`` (a classifier). Or pass the head modules/params.
    5. Conv kernels (``nn.Conv1d/2d/3d``) → Muon with ``flatten=True``: ``(out, in·k...)`` matrices.
       Transposed convs → AdamW (their first dim is fan_in; flattening would orthogonalize the
       transpose of their linear map with the wrong scale).
    6. ``nn.MultiheadAttention.in_proj_weight`` → Muon with ``split_sizes=(E, E, E)`` when ``split_qkv``
       (Q, K and V are separate maps stored in one tensor).
    7. Any other parameter with ndim ≥ 2 (``nn.Linear`` weights, custom 2-D matrices, stacked
       ``(E, m, n)`` experts) → Muon; ndim ≥ 3 ones are stacks (``flatten=False``).

    Returns non-empty groups, each with ``algorithm`` set, updated with ``muon`` or ``adamw`` (per-group
    hyperparameters, e.g. ``muon=dict(lr=0.02)``, ``adamw=dict(lr=3e-4, weight_decay=0.0)``); pass them to
    :class:`fastortho.Muon`. Edit or split the returned groups for finer control.
    """
    params_by_name = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params_by_name.items()}

    def ids(items: Iterable[nn.Module | nn.Parameter | str]) -> set[int]:
        out: set[int] = set()
        for it in items:
            if isinstance(it, str):
                if it not in params_by_name:
                    raise KeyError(f"{it!r} is not a parameter name of the model")
                out.add(id(params_by_name[it]))
            elif isinstance(it, nn.Module):
                out.update(id(p) for p in it.parameters())
            elif isinstance(it, torch.Tensor):
                out.add(id(it))
            else:
                raise TypeError(f"expected a module, a parameter or a name, got {type(it).__name__}")
        return out

    to_adamw, to_muon = ids(force_adamw), ids(force_muon)
    if to_adamw & to_muon:
        both = sorted(name_of.get(i, "?") for i in to_adamw & to_muon)
        raise ValueError(f"parameters forced to both Muon and AdamW: {both}")
    embeds = [m for m in model.modules() if isinstance(m, _EMBED)]
    embed_params = {id(m.weight) for m in embeds}
    if heads == "auto":
        head_ids = _find_heads(model, {m.num_embeddings for m in embeds}, embed_params)
    else:
        head_ids = ids(heads)  # type: ignore[arg-type]

    # buckets keyed by the Muon group options they need, in first-seen order
    muon_buckets: dict[tuple, list[nn.Parameter]] = {}
    adamw_params: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key: tuple | None
            if id(p) in to_adamw:
                key = None
            elif id(p) in to_muon:
                if p.ndim < 2:
                    raise ValueError(f"{name_of.get(id(p))}: a {p.ndim}-D parameter cannot go to Muon")
                key = (("flatten", True),) if isinstance(mod, _CONV) else ()
            elif p.ndim < 2 or id(p) in embed_params or id(p) in head_ids or isinstance(mod, _CONV_T):
                key = None
            elif isinstance(mod, _CONV):
                key = (("flatten", True),)
            elif split_qkv and isinstance(mod, nn.MultiheadAttention) and pname == "in_proj_weight":
                key = (("split_sizes", (mod.embed_dim,) * 3),)
            elif p.ndim >= 3:
                key = (("flatten", False),)
            else:
                key = ()
            if key is None:
                adamw_params.append(p)
            else:
                muon_buckets.setdefault(key, []).append(p)

    groups: list[dict[str, Any]] = []
    for key, ps in muon_buckets.items():
        groups.append({**dict(key), "params": ps, "algorithm": "muon", **dict(muon or {})})
    if adamw_params:
        groups.append({"params": adamw_params, "algorithm": "adamw", **dict(adamw or {})})
    return groups
