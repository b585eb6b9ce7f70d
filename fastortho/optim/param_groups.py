"""``muon_param_groups``: which parameters Muon should orthogonalize, decided by module type and shape.

Muon is for the hidden *matrices* of a network. Embeddings (a lookup table: each row is updated
alone, so orthogonalizing the table couples unrelated tokens), output heads (their rows are per-class
logits) and 1-D parameters (biases, norm gains) belong to AdamW. The decision reads the module that
owns each parameter; names are used only to recognise an output head (``lm_head``, ``head``,
``output``, ``out``, ``classifier``, ``fc``, ``score``, ``logits``) and never the sizes of layers:
a hidden matrix whose width happens to equal a vocabulary or a context length is still hidden.
:func:`describe_param_groups` (or ``muon_param_groups(model, verbose=True)``) shows every decision.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["muon_param_groups", "describe_param_groups", "ParamRoute", "HEAD_NAMES"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBED = (nn.Embedding, nn.EmbeddingBag)
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
#: Module names that mark an output head (the last component of the module's path).
HEAD_NAMES = frozenset({"lm_head", "head", "output", "out", "classifier", "fc", "score", "logits"})


def _is_hf_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2, GPT-J's ancestors): a Linear whose weight is stored (in, out)."""
    return type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers")


#: Name fragments of directly registered parameters that are additive tables (position embeddings,
#: learned tokens), not maps: ViT's ``cls_token``/``pos_embed``, ``register_tokens``, ``mask_token``.
_TABLE_WORDS = ("embed", "token", "pos")


class ParamRoute(NamedTuple):
    """One row of :func:`describe_param_groups`: where a parameter goes and why."""

    name: str
    shape: tuple[int, ...]
    group: str  # "muon" or "adamw"
    reason: str
    options: tuple[tuple[str, Any], ...] = ()  # Muon group options (flatten, split_sizes)


def _in_repeated_block(path: str, modules: Mapping[str, nn.Module]) -> bool:
    """True when ``path`` lies strictly inside one of ≥ 2 same-class siblings of a container
    (a transformer block of a ModuleList, a residual block of a Sequential stage): a module
    repeated in every block is part of the body, not the network's output layer."""
    parts = path.split(".")
    for i in range(len(parts) - 1):  # block = parts[:i+1], a proper ancestor of path
        parent = modules.get(".".join(parts[:i]))
        if not isinstance(parent, _CONTAINERS):
            continue
        block = modules[".".join(parts[: i + 1])]
        if sum(type(c) is type(block) for c in parent.children()) >= 2:
            return True
    return False


def _auto_heads(model: nn.Module, embed_ids: set[int]) -> tuple[dict[int, str], str | None]:
    """Output-head weights found by evidence, as {id: reason}, and a warning text when it is a guess.

    Evidence, strongest first: a Linear whose weight is an embedding's (tied input/output table);
    a Linear, or the last Linear of a module, named in :data:`HEAD_NAMES` and not repeated per block.
    Without either: in a model without embeddings, the last Linear outside repeated blocks (a
    classifier), with a warning; in a model with embeddings, no head, with a warning (a Linear
    whose out_features equals some table's size is not evidence: GPT-2 medium's width equals its
    context length).
    """
    modules = dict(model.named_modules())
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    heads: dict[int, str] = {}
    for n, lin in linears:
        if id(lin.weight) in embed_ids:
            heads[id(lin.weight)] = f"output head '{n}' (weight tied to an embedding)"
    for n, mod in modules.items():
        if not n or n.rsplit(".", 1)[-1] not in HEAD_NAMES or _in_repeated_block(n, modules):
            continue
        if isinstance(mod, nn.Linear):
            heads.setdefault(id(mod.weight), f"output head (named '{n}')")
        elif not isinstance(mod, _EMBED):
            inner = [(f"{n}.{k}", m) for k, m in mod.named_modules() if isinstance(m, nn.Linear)]
            if inner:  # e.g. torchvision's classifier = Sequential(..., Linear): the logits layer
                heads.setdefault(id(inner[-1][1].weight), f"output head (last Linear of '{n}')")
    if heads or not linears:
        return heads, None
    outside = [(n, m) for n, m in linears if not _in_repeated_block(n, modules)]
    if embed_ids or not outside:
        last = linears[-1][0]
        why = "the model has embeddings" if embed_ids else "every Linear is inside a repeated block"
        return heads, (f"muon_param_groups: no output head found (no Linear tied to an embedding or named "
                       f"{sorted(HEAD_NAMES)}); {why}, so no Linear is guessed: all Linear weights, "
                       f"including the last one '{last}.weight', go to Muon. If the model has an output "
                       f"layer, pass "
                       f"heads=[model.<head module>] to route it to AdamW; pass heads=[] to confirm there "
                       f"is none (no warning).")
    n, lin = outside[-1]
    heads[id(lin.weight)] = f"output head (guessed: last Linear '{n}' of a model without embeddings)"
    return heads, (f"muon_param_groups: guessed '{n}.weight' {tuple(lin.weight.shape)} as the output head "
                   f"(the last Linear outside repeated blocks; no Linear is tied to an embedding or named "
                   f"{sorted(HEAD_NAMES)}) and routed it to AdamW. To choose the head yourself pass "
                   f"heads=[model.<head module>], or heads=[] to keep every Linear in Muon (no warning).")


def _check_model(model: Any) -> None:
    if isinstance(model, nn.Module):
        return
    kind = type(model).__name__
    raise TypeError(
        f"muon_param_groups(model): expected the nn.Module (it reads each parameter's owning module "
        f"to route it), got {kind}. Pass the model itself, e.g. muon_param_groups(model); for a plain "
        f"list of parameters build the groups by hand: [dict(params=matrices, algorithm='muon'), "
        f"dict(params=others, algorithm='adamw')], or pass the list straight to fastortho.Muon, which "
        f"splits it by ndim."
    )


def _routes(
    model: nn.Module,
    heads: str | Iterable[nn.Module | nn.Parameter],
    force_adamw: Iterable[nn.Module | nn.Parameter | str],
    force_muon: Iterable[nn.Module | nn.Parameter | str],
    split_qkv: bool,
) -> tuple[list[tuple[ParamRoute, nn.Parameter]], str | None]:
    """Every parameter once (at its first owner in ``model.named_modules()``), with its route."""
    _check_model(model)
    params_by_name = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params_by_name.items()}

    def ids(items: Iterable[nn.Module | nn.Parameter | str], arg: str) -> set[int]:
        if isinstance(items, (str, nn.Module, torch.Tensor)):
            items = [items]  # a single module / parameter / name
        out: set[int] = set()
        for it in items:
            if isinstance(it, str):
                if it not in params_by_name:
                    raise KeyError(f"{arg}: {it!r} is not a parameter name of the model "
                                   f"(names come from model.named_parameters())")
                out.add(id(params_by_name[it]))
            elif isinstance(it, nn.Module):
                out.update(id(p) for p in it.parameters())
            elif isinstance(it, torch.Tensor):
                out.add(id(it))
            else:
                raise TypeError(f"{arg}: expected modules, parameters or parameter names, "
                                f"got {type(it).__name__}")
        return out

    to_adamw, to_muon = ids(force_adamw, "force_adamw"), ids(force_muon, "force_muon")
    if to_adamw & to_muon:
        both = sorted(name_of.get(i, "?") for i in to_adamw & to_muon)
        raise ValueError(f"parameters forced to both Muon and AdamW: {both}")
    embed_of = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, _EMBED)}
    warning = None
    if isinstance(heads, str):
        if heads != "auto":
            raise ValueError(f"heads must be 'auto' or an iterable of modules/parameters, got {heads!r}")
        head_reason, warning = _auto_heads(model, set(embed_of))
    else:
        head_reason = {i: "output head (heads=...)" for i in ids(heads, "heads")}

    rows: list[tuple[ParamRoute, nn.Parameter]] = []
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = name_of.get(id(p), f"{mname}.{pname}" if mname else pname)
            opts: tuple[tuple[str, Any], ...] = ()
            direct = not (isinstance(mod, (nn.Linear, *_CONV, *_CONV_T, *_EMBED, nn.MultiheadAttention))
                          or _is_hf_conv1d(mod))
            if id(p) in to_adamw:
                group, reason = "adamw", "force_adamw"
            elif id(p) in to_muon:
                if p.ndim < 2:
                    raise ValueError(f"force_muon: {full} is {p.ndim}-D; Muon needs a matrix (ndim >= 2)")
                group, reason = "muon", "force_muon"
                opts = ((("flatten", True),) if isinstance(mod, _CONV) else
                        (("fan_in_first", True),) if _is_hf_conv1d(mod) and pname == "weight" else ())
            elif p.ndim < 2:
                group, reason = "adamw", f"{p.ndim}-D (bias, norm gain or scalar)"
            elif id(p) in embed_of:
                group, reason = "adamw", "embedding (lookup table)"
                if id(p) in head_reason:
                    group, reason = "adamw", "embedding, tied to the output head"
            elif id(p) in head_reason:
                group, reason = "adamw", head_reason[id(p)]
            elif isinstance(mod, _CONV_T):
                # dim 0 is fan_in: flattening would orthogonalize the transpose of the map at the wrong scale
                group, reason = "adamw", "transposed conv kernel"
            elif direct and 1 in p.shape[-2:]:
                group, reason = "adamw", "a vector stored as a matrix (a learned token)"
            elif direct and p.ndim >= 3 and p.shape[0] == 1:
                group, reason = "adamw", "broadcast-added table (leading dim 1: a position embedding)"
            elif direct and any(w in pname.lower() for w in _TABLE_WORDS):
                group, reason = "adamw", f"additive table (named '{pname}')"
            elif isinstance(mod, _CONV):
                group, reason, opts = "muon", "conv kernel, flattened to (out, in·k...)", (("flatten", True),)
            elif split_qkv and isinstance(mod, nn.MultiheadAttention) and pname == "in_proj_weight":
                group, reason = "muon", "fused Q/K/V projection, split in 3"
                opts = (("split_sizes", (mod.embed_dim,) * 3),)
            elif _is_hf_conv1d(mod) and pname == "weight":
                # stored (fan_in, fan_out): the lr scale must read the shape transposed
                group, reason, opts = "muon", "Hugging Face Conv1D, weight stored (in, out)", (("fan_in_first", True),)
            elif p.ndim >= 3:
                group, reason, opts = "muon", "stack of matrices (e.g. experts)", (("flatten", False),)
            else:
                group, reason = "muon", "hidden matrix"
            rows.append((ParamRoute(full, tuple(p.shape), group, reason, opts), p))
    return rows, warning


def describe_param_groups(
    model: nn.Module,
    *,
    heads: str | Iterable[nn.Module | nn.Parameter] = "auto",
    force_adamw: Iterable[nn.Module | nn.Parameter | str] = (),
    force_muon: Iterable[nn.Module | nn.Parameter | str] = (),
    split_qkv: bool = True,
) -> list[ParamRoute]:
    """The routing :func:`muon_param_groups` would use, one :class:`ParamRoute` per parameter
    (name, shape, group, reason, Muon options), in module order. Same arguments; never warns."""
    return [r for r, _ in _routes(model, heads, force_adamw, force_muon, split_qkv)[0]]


def format_routes(rows: Iterable[ParamRoute]) -> str:
    """A plain-text table of routes (what ``verbose=True`` prints)."""
    rows = list(rows)
    cells = [(r.name, "×".join(map(str, r.shape)) or "scalar", r.group, r.reason) for r in rows]
    head = ("parameter", "shape", "group", "reason")
    w = [max(len(c[i]) for c in [head, *cells]) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in [head, *cells]]
    n_m = sum(r.group == "muon" for r in rows)
    lines.append(f"{n_m} parameter(s) to Muon, {len(rows) - n_m} to AdamW")
    return "\n".join(lines)


def muon_param_groups(
    model: nn.Module,
    *,
    muon: Mapping[str, Any] | None = None,
    adamw: Mapping[str, Any] | None = None,
    heads: str | Iterable[nn.Module | nn.Parameter] = "auto",
    force_adamw: Iterable[nn.Module | nn.Parameter | str] = (),
    force_muon: Iterable[nn.Module | nn.Parameter | str] = (),
    split_qkv: bool = True,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Param groups for :class:`fastortho.Muon`, routed by module type and shape.

    Rules, in order (each parameter appears once, at its first owner in ``model.named_modules()``):

    1. ``force_adamw`` / ``force_muon`` (modules, parameters, or exact parameter names from
       ``named_parameters``): as told (a forced-Muon parameter must have ndim ≥ 2).
    2. Parameters with ndim < 2 (biases, norm gains, scalars) → AdamW.
    3. ``nn.Embedding``/``nn.EmbeddingBag`` weights (including one tied to the output head) → AdamW.
    4. Output heads → AdamW. ``heads="auto"`` takes, in order of evidence: a Linear whose weight *is*
       an embedding's (tied); a Linear named ``lm_head``, ``head``, ``output``, ``out``,
       ``classifier``, ``fc``, ``score`` or ``logits`` (or the last Linear inside a module of that
       name, e.g. torchvision's ``classifier`` Sequential), unless it is repeated in every block
       of a ModuleList/Sequential (a block's ``fc`` or BERT's per-layer ``output``). Without such
       evidence, in a model without embeddings the last Linear outside repeated blocks is *guessed*
       to be the classifier, and in a model with embeddings no head is guessed; both cases emit a
       ``UserWarning`` saying what was done and how to override. Layer sizes are never evidence.
       Or pass the head modules/params (``heads=[model.proj]``; ``heads=[]`` for none).
    5. Transposed convs → AdamW (their first dim is fan_in; flattening would orthogonalize the
       transpose of their linear map with the wrong scale).
    6. Parameters registered directly on a custom module (not a Linear/Conv/Embedding/attention
       weight) that are additive tables rather than maps → AdamW: a vector stored as a matrix
       (``cls_token`` of shape (1, 1, d)), a leading broadcast dim of 1 (``pos_embed`` of shape
       (1, T, d)), or a name containing ``embed``, ``token`` or ``pos``.
    7. Conv kernels (``nn.Conv1d/2d/3d``), stems and patch projections included → Muon with
       ``flatten=True``: ``(out, in·k...)`` matrices.
    8. ``nn.MultiheadAttention.in_proj_weight`` → Muon with ``split_sizes=(E, E, E)`` when ``split_qkv``
       (Q, K and V are separate maps stored in one tensor).
    9. Hugging Face ``Conv1D`` weights (GPT-2) → Muon with ``fan_in_first=True``: they are stored
       ``(in, out)``, so the lr scale reads the shape transposed.
    10. Any other parameter with ndim ≥ 2 (``nn.Linear`` weights, custom 2-D matrices, stacked
       ``(E, m, n)`` experts) → Muon; ndim ≥ 3 ones are stacks (``flatten=False``).

    ``verbose=True`` prints the routing table (:func:`describe_param_groups` returns it as rows).
    Returns non-empty groups, each with ``algorithm`` set, updated with ``muon`` or ``adamw`` (per-group
    hyperparameters, e.g. ``muon=dict(lr=0.02)``, ``adamw=dict(lr=3e-4, weight_decay=0.0)``); pass them to
    :class:`fastortho.Muon`. Edit or split the returned groups for finer control.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (e.g. a list of parameters).
    """
    rows, warning = _routes(model, heads, force_adamw, force_muon, split_qkv)
    if warning is not None:
        warnings.warn(warning, UserWarning, stacklevel=2)
    if verbose:
        print(format_routes(r for r, _ in rows))
    # buckets keyed by the Muon group options they need, in first-seen order
    muon_buckets: dict[tuple, list[nn.Parameter]] = {}
    adamw_params: list[nn.Parameter] = []
    for r, p in rows:
        if r.group == "muon":
            muon_buckets.setdefault(r.options, []).append(p)
        else:
            adamw_params.append(p)
    groups: list[dict[str, Any]] = []
    for key, ps in muon_buckets.items():
        groups.append({**dict(key), "params": ps, "algorithm": "muon", **dict(muon or {})})
    if adamw_params:
        groups.append({"params": adamw_params, "algorithm": "adamw", **dict(adamw or {})})
    return groups
