"""Reading what other Muon implementations write: their group flags and their optimizer state.

* Group flags: ``use_muon`` (KellerJordan/Muon's ``MuonWithAuxAdam``, Moonlight, DeepSpeed) and
  ``use_fallback`` (timm's ``Muon``: True selects its AdamW) become ``algorithm``.
* State dicts: a state dict whose param groups carry no ``algorithm`` key was written by a peer
  (torch.optim.Muon, KellerJordan/Muon, timm). Its parameters are numbered in the order of the groups
  *as given to that optimizer*; :class:`fastortho.Muon` records the order it was given, so building it
  with the same groups (the same ``params`` lists, flags included) and calling ``load_state_dict`` maps
  each saved parameter onto its own: ``momentum_buffer`` for Muon parameters, ``exp_avg``,
  ``exp_avg_sq`` and ``step`` (an int in KellerJordan/Muon, a tensor in timm and torch) for AdamW ones.
  Saved hyperparameters a peer shares with fastortho (lr, momentum, weight decay, Nesterov, betas, ε) are
  restored; fastortho's own group settings (flatten, split_sizes, schedule, ...) are kept.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["algorithm_from_flags", "is_peer_state_dict", "adopt_peer_state_dict"]

#: hyperparameters taken from a peer's Muon group / AdamW group (peer key -> fastortho key)
_MUON_KEYS = {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay", "nesterov": "nesterov"}
#: torch.optim.Muon's remaining keys mean what fastortho's do
_TORCH_KEYS = {k: k for k in ("ns_coefficients", "eps", "ns_steps", "adjust_lr_fn")}
_ADAMW_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "betas": "betas", "eps": "adamw_eps"}


def _peer_kind(g: dict[str, Any]) -> str:
    """``"muon"``/``"adamw"`` for a flagged group, ``"mixed"`` for timm's (Muon and its AdamW fallback
    in one group: it has ``betas``), ``"torch"`` for torch.optim.Muon's (Muon only)."""
    if "use_muon" in g or "use_fallback" in g:
        return algorithm_from_flags(dict(g))["algorithm"]
    return "mixed" if "betas" in g else "torch"


def _hyperparameters(g: dict[str, Any], algo: str) -> dict[str, Any]:
    """The saved group ``g``'s hyperparameters that apply to a fastortho group of ``algo``."""
    kind = _peer_kind(g)
    if algo == "muon":
        keys = dict(_MUON_KEYS, **(_TORCH_KEYS if kind == "torch" else {"adjust_lr_fn": "adjust_lr_fn"}))
        out = {dst: g[src] for src, dst in keys.items() if src in g}
        if "adjust_lr_fn" in out:
            out["lr_scale"] = None  # the peer's rule, by torch's name
        return out
    if kind == "adamw":
        return {dst: g[src] for src, dst in _ADAMW_KEYS.items() if src in g}
    if kind == "mixed":  # timm: its fallback AdamW runs at lr * fallback_lr_scale
        out = {dst: g[src] for src, dst in _ADAMW_KEYS.items() if src in ("betas", "eps", "weight_decay") and src in g}
        if "lr" in g:
            out["lr"] = g["lr"] * g.get("fallback_lr_scale", 1.0)
        return out
    return {}


def algorithm_from_flags(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with the peers' ``use_muon`` / ``use_fallback`` flags turned into ``algorithm`` (removed)."""
    if "use_muon" not in group and "use_fallback" not in group:
        return group
    group = dict(group)
    use_muon, fallback = group.pop("use_muon", None), group.pop("use_fallback", None)
    if use_muon is not None and fallback is not None and bool(use_muon) == bool(fallback):
        raise ValueError(f"param group says use_muon={use_muon} and use_fallback={fallback}: they contradict; "
                         "pass one (use_fallback=True means AdamW)")
    algo = "muon" if (use_muon if use_muon is not None else not fallback) else "adamw"
    if group.get("algorithm") not in (None, algo):
        raise ValueError(f"param group says algorithm={group['algorithm']!r} but its peer flag "
                         f"(use_muon={use_muon}, use_fallback={fallback}) means {algo!r}; pass one")
    group["algorithm"] = algo
    return group


def is_peer_state_dict(state_dict: dict[str, Any]) -> bool:
    """True for a state dict written by another optimizer (its groups have no ``algorithm``)."""
    groups = state_dict.get("param_groups", [])
    return bool(groups) and not any("algorithm" in g for g in groups)


def _peer_algorithm(state: dict[str, Any]) -> str | None:
    """What the peer ran on a parameter: its own cached routing (timm's ``state['use_muon']``), else
    its state's keys; None when it has no state yet."""
    if "use_muon" in state:
        return "muon" if state["use_muon"] else "adamw"
    if "momentum_buffer" in state:
        return "muon"
    if "exp_avg" in state:
        return "adamw"
    return None


def adopt_peer_state_dict(state_dict: dict[str, Any], given: list[list[Tensor]], groups: list[dict[str, Any]],
                          ) -> dict[str, Any]:
    """A peer's ``state_dict`` rewritten in the layout of ``groups`` (fastortho's param groups), where
    ``given`` is the parameters per group in the order the optimizer was given them."""
    saved = state_dict["param_groups"]
    sizes = [len(g["params"]) for g in saved]
    if sizes != [len(g) for g in given]:
        raise ValueError(f"this state dict has {len(saved)} param group(s) of sizes {sizes}, but this optimizer was "
                         f"given {len(given)} group(s) of sizes {[len(g) for g in given]}: build fastortho.Muon "
                         "with the same param groups (same params, same order) as the optimizer that saved it")
    where: dict[int, tuple[dict[str, Any], Any]] = {}  # id(param) -> (saved group, saved param id)
    for g_saved, params in zip(saved, given):
        for pid, p in zip(g_saved["params"], params):
            where[id(p)] = (g_saved, pid)
    out_state: dict[int, dict[str, Any]] = {}
    out_groups: list[dict[str, Any]] = []
    k = 0
    for group in groups:
        new = {key: v for key, v in group.items() if key != "params"}
        algo = group["algorithm"]
        ids = []
        for p in group["params"]:
            g_saved, pid = where[id(p)]
            s = state_dict["state"].get(pid, {})
            ran = _peer_algorithm(s)
            if ran is not None and ran != algo:
                raise ValueError(f"parameter {tuple(p.shape)} was stepped by the peer's {ran} but is in a fastortho "
                                 f"{algo} group; route it the same way (algorithm={ran!r}) to keep its state")
            if ran == "muon":
                out_state[k] = {"momentum_buffer": s["momentum_buffer"]}
            elif ran == "adamw":
                step = s["step"]
                out_state[k] = {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"],
                                "step": step.detach().float().cpu() if isinstance(step, Tensor)
                                else torch.tensor(float(step))}
            ids.append(k)
            k += 1
        if group["params"]:
            new.update(_hyperparameters(where[id(group["params"][0])][0], algo))
        new["params"] = ids
        out_groups.append(new)
    return {"state": out_state, "param_groups": out_groups}
