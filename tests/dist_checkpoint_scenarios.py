"""Scenarios for ``tests/test_distributed_checkpoint.py``: checkpoints that move between layouts, and
expert parallelism, on CPU/gloo.

Gradients are *identical* across layouts: every rank replays one single-process run of a small model on
deterministic data (:func:`reference_run`), records each step's full gradients, and hands each layout
its shard of them (``distribute_tensor`` with the parameter's own placements). The distributed step is
then bit-identical to one process (``tests/test_distributed.py``), so a checkpoint moved between layouts
must resume *bit-identically*: any difference is the checkpoint's. One scenario also trains end to end
with FSDP2's own forward/backward (gloo's summation order: a tolerance).

The recipe under test is torch's standard one (``torch.distributed.checkpoint.state_dict``):

    save: dcp.save({"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}, path)
    load: state = {"model": get_model_state_dict(m2), "optim": get_optimizer_state_dict(m2, opt2)}
          dcp.load(state, checkpoint_id=path)
          set_model_state_dict(m2, state["model"]); set_optimizer_state_dict(m2, opt2, state["optim"])

One spawn per world size runs several scenarios; checkpoints live in ``$FASTORTHO_CKPT_DIR`` (a temp dir
the parent creates), so a checkpoint written at W=4 is read at W=2 and by the parent (one process).
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import dist_scenarios as S  # noqa: E402  (harness: gloo init, per-scenario error capture, result merge)

LR, ADAMW_LR, WD = 0.02, 1e-3, 0.1
BEFORE, AFTER = 3, 3  # steps before the checkpoint, steps after it
VOCAB, D, HID, MIX, OUT = 10, 16, 32, 18, 5  # 10 and 18 rows: uneven shards at W = 4
N_SAMPLES = 8  # per step (divisible by W = 1, 2, 4)
CKPT_ENV = "FASTORTHO_CKPT_DIR"


# ------------------------------------------------------------------------------------------------
# the model: a Muon group (up, down, mix) and an AdamW group (embedding, norm, biases, head)
# ------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, HID)
        self.down = nn.Linear(HID, D)
        self.mix = nn.Linear(D, MIX, bias=False)
        self.head = nn.Linear(MIX, OUT)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(idx))
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.mix(h)).mean(1)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def make_opt(model: nn.Module, **kw):
    import fastortho

    return fastortho.Muon(fastortho.muon_param_groups(model), lr=LR, weight_decay=WD, adamw_lr=ADAMW_LR, **kw)


def data(step: int, n: int = N_SAMPLES):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, VOCAB, (n, 6), generator=g), torch.randint(0, OUT, (n,), generator=g)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def reference_run(micro: tuple[int, ...] = ()) -> dict:
    """One process, BEFORE + AFTER steps; returns each step's full gradients (by name), the state and
    parameters after step BEFORE and at the end. ``micro[s]``: micro-batches of step s (loss/k each)."""
    model = make_net()
    opt = make_opt(model)
    names = dict((id(p), n) for n, p in model.named_parameters())
    out = {"grads": []}
    for step in range(BEFORE + AFTER):
        x, y = data(step)
        k = micro[step] if micro else 1
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (loss_fn(model, xs, ys) / k).backward()
        out["grads"].append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
        if step == BEFORE - 1:
            out["mid_params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            out["mid_state"] = {names[id(p)]: {k: v.detach().clone() for k, v in st.items()}
                                for p, st in opt.state.items()}
    out["end_params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------
def build(layout: str, world: int):
    """(module handed to the state-dict API, module whose names match the reference, optimizer)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    model = make_net()
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        return ddp, model, make_opt(model, process_group=ddp.process_group)
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    elif layout == "fsdp_tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        full = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, full["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        mesh = full["dp"]
    else:
        raise ValueError(layout)
    for m in (model.emb, model.norm, model.up, model.down, model.mix, model.head):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model, make_opt(model)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """This rank's piece of the reference's full gradients, with each parameter's placements."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for n, p in model.named_parameters():
        if n not in grads:
            continue
        g = grads[n].clone()
        p.grad = (distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                  if isinstance(p, DTensor) else g)


def run_steps(model, opt, ref: dict, start: int, count: int) -> None:
    for step in range(start, start + count):
        set_grads(model, ref["grads"][step])
        opt.step()
        opt.zero_grad()


def compare_state(model, opt, ref_state: dict) -> dict:
    """Every optimizer state tensor (momentum, AdamW moments, step) against the reference's."""
    bad, n = [], 0
    for name, p in model.named_parameters():
        st = opt.state[p]
        want = ref_state[name]
        if sorted(st) != sorted(want):
            bad.append(f"{name}: keys {sorted(st)} != {sorted(want)}")
            continue
        for k, v in want.items():
            n += 1
            got = full(st[k])
            if not torch.equal(got, v):
                diff = (got.double() - v.double()).abs().max().item() if got.shape == v.shape else "shape"
                bad.append(f"{name}.{k}: max |diff| {diff}")
    return dict(state_equal=not bad, state_bad=bad, state_tensors=n)


def compare_params(model, want: dict) -> dict:
    bad, worst = [], 0.0
    for name, p in model.named_parameters():
        got = full(p)
        if not torch.equal(got, want[name]):
            d = (got.double() - want[name].double()).abs().max().item()
            worst = max(worst, d)
            bad.append(f"{name}: max |diff| {d:.3g}")
    return dict(params_equal=not bad, params_bad=bad, max_diff=worst)


def strategies(opt) -> list[str]:
    return sorted(opt.comm_stats.get("numel", {}))


def ckpt_path(name: str) -> str:
    return os.path.join(os.environ[CKPT_ENV], name)


def save(state_module, opt, name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(state_module),
              "optim": get_optimizer_state_dict(state_module, opt)}, checkpoint_id=ckpt_path(name))


def load(state_module, opt, name: str, no_dist: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(state_module), "optim": get_optimizer_state_dict(state_module, opt)}
    dcp.load(state, checkpoint_id=ckpt_path(name), no_dist=no_dist)
    set_model_state_dict(state_module, state["model"])
    set_optimizer_state_dict(state_module, opt, state["optim"])


def _cached_ref() -> dict:
    global _REF
    if _REF is None:
        _REF = reference_run()
    return _REF


_REF = None


def _source(layout: str, world: int, name: str) -> dict:
    """BEFORE steps in ``layout``, checkpoint ``name``; the state then must equal the reference's."""
    ref = _cached_ref()
    sm, model, opt = build(layout, world)
    run_steps(model, opt, ref, 0, BEFORE)
    res = compare_state(model, opt, ref["mid_state"])
    res.update(strategies=strategies(opt))
    save(sm, opt, name)
    # the uninterrupted run in the source layout: the exactness reference of the resumed runs
    run_steps(model, opt, ref, BEFORE, AFTER)
    res.update({"source_" + k: v for k, v in compare_params(model, ref["end_params"]).items()})
    res["ok"] = res["state_equal"] and res["source_params_equal"]
    return res


def _target(layout: str, world: int, name: str) -> dict:
    """A fresh model and optimizer in ``layout`` load checkpoint ``name`` and take AFTER steps."""
    ref = _cached_ref()
    sm, model, opt = build(layout, world)
    load(sm, opt, name)
    res = compare_state(model, opt, ref["mid_state"])
    res.update({"loaded_" + k: v for k, v in compare_params(model, ref["mid_params"]).items()})
    run_steps(model, opt, ref, BEFORE, AFTER)
    res.update(compare_params(model, ref["end_params"]))
    res.update(strategies=strategies(opt))
    res["ok"] = res["state_equal"] and res["params_equal"]
    return res


# W = 4 spawn ------------------------------------------------------------------------------------
def sc_save_fsdp4(rank, world):
    return _source("fsdp", world, "fsdp4")


def sc_fsdp4_to_hsdp(rank, world):
    return _target("hsdp", world, "fsdp4")


def sc_fsdp4_to_fsdp_tp(rank, world):
    return _target("fsdp_tp", world, "fsdp4")


def sc_save_ddp4(rank, world):
    return _source("ddp", world, "ddp4")


def sc_ddp4_to_fsdp4(rank, world):
    return _target("fsdp", world, "ddp4")


# W = 2 spawn ------------------------------------------------------------------------------------
def sc_fsdp4_to_fsdp2(rank, world):
    return _target("fsdp", world, "fsdp4")


def sc_save_fsdp2(rank, world):
    """FSDP2 at W=2: a DCP checkpoint and a full (unsharded) optimizer state dict for one process."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    res = _source("fsdp", world, "fsdp2")
    ref = _cached_ref()
    sm, model, opt = build("fsdp", world)
    run_steps(model, opt, ref, 0, BEFORE)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on rank 0 only
    msd = get_model_state_dict(sm, options=opts)
    osd = get_optimizer_state_dict(sm, opt, options=opts)
    if rank == 0:
        torch.save({"model": msd, "optim": osd}, ckpt_path("fsdp2_full.pt"))
    return res


# ------------------------------------------------------------------------------------------------
# real forward/backward: FSDP2 W=4 -> W=2, against one process with the same micro-batches
# ------------------------------------------------------------------------------------------------
def _train(model, opt, rank, world, start, count):
    per = N_SAMPLES // world
    for step in range(start, start + count):
        x, y = data(step)
        loss_fn(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
        opt.step()
        opt.zero_grad()


def sc_e2e_save_fsdp4(rank, world):
    sm, model, opt = build("fsdp", world)
    _train(model, opt, rank, world, 0, BEFORE)
    save(sm, opt, "e2e_fsdp4")
    return dict(ok=True)


def sc_e2e_fsdp4_to_fsdp2(rank, world):
    sm, model, opt = build("fsdp", world)
    load(sm, opt, "e2e_fsdp4")
    _train(model, opt, rank, world, BEFORE, AFTER)
    ref = reference_run(micro=(4,) * BEFORE + (2,) * AFTER)  # the micro-batches each phase used
    res = compare_params(model, ref["end_params"])
    rel = max(((full(p).double() - ref["end_params"][n].double()).norm() / ref["end_params"][n].double().norm()
               ).item() for n, p in model.named_parameters())
    res.update(max_rel=rel, ok=True)
    return res


# ------------------------------------------------------------------------------------------------
# expert parallelism on a 2x2 (ep, fsdp) mesh
# ------------------------------------------------------------------------------------------------
E, EM, EN = 4, 24, 16  # 4 experts: 2 per EP rank; stacks (E, 24, 16) and (E, 16, 24)


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(EN, EN)  # dense: FSDP2
        self.gate = nn.Linear(EN, E, bias=False)  # dense (router)
        self.w_in = nn.Parameter(0.1 * torch.randn(E, EM, EN))  # stacked experts, (E, m, n)
        self.w_out = nn.Parameter(0.1 * torch.randn(E, EN, EM))


def _moe_grads(step: int, nan: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    shapes = {n: p.shape for n, p in MoE().named_parameters()}
    g = torch.Generator().manual_seed(900 + step)
    out = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    if nan and step == 1:
        out["w_in"][E - 1, 0, 0] = float("nan")  # the last expert: on the last ep rank only
    return out


def _moe_reference(nan: bool = False):
    """One process; with ``nan``, step 1 skips the whole w_in stack (non-finite detection is per
    parameter, and a stack is one parameter)."""
    import fastortho

    torch.manual_seed(0)
    model = MoE()
    opt = fastortho.Muon(fastortho.muon_param_groups(model, heads=[]), lr=LR, weight_decay=WD, adamw_lr=ADAMW_LR)
    for step in range(BEFORE):
        for n, p in model.named_parameters():
            p.grad = _moe_grads(step, nan)[n]
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.nonfinite_count


def _ep_model(mesh, mode: str) -> MoE:
    """Dense weights FSDP2 over the fsdp dim; experts: ``"local"`` (Shard(0) over ep, replicated over
    fsdp), ``"2d"`` (Shard(0) over ep, Shard(1) over fsdp: explicit DTensors) or ``"fsdp2"`` (Shard(0)
    over ep, then FSDP2's ``fully_shard`` shards their rows over fsdp: torchtitan's recipe)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    model = MoE()
    for n in ("w_in", "w_out"):
        t = getattr(model, n).detach()
        dt = (distribute_tensor(t, mesh["ep"], [Shard(0)], src_data_rank=None) if mode == "fsdp2" else
              distribute_tensor(t, mesh, [Shard(0), Replicate() if mode == "local" else Shard(1)],
                                src_data_rank=None))
        setattr(model, n, nn.Parameter(dt))
    for m in (model.proj, model.gate):
        fully_shard(m, mesh=mesh["fsdp"])
    if mode == "fsdp2":
        fully_shard(model, mesh=mesh["fsdp"], shard_placement_fn=lambda p: Shard(1))
    return model


def _ep(rank, world, mode: str, nan: bool = False) -> dict:
    """BEFORE steps on identical gradients against one process; the experts' bytes in an optimizer of
    their own (same layout, same gradients)."""
    import fastortho
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "fsdp"))
    kw = dict(lr=LR, weight_decay=WD, adamw_lr=ADAMW_LR)
    model = _ep_model(mesh, mode)
    opt = fastortho.Muon(fastortho.muon_param_groups(model, heads=[]), **kw)
    twin = _ep_model(mesh, mode)
    experts = [twin.w_in, twin.w_out]
    opt_exp = fastortho.Muon(experts, **kw)
    res = {"bytes_experts": [], "ideal_experts": [], "collectives_experts": []}
    for step in range(BEFORE):
        gs = _moe_grads(step, nan)
        set_grads(model, gs)
        opt.step()
        set_grads(twin, {n: g for n, g in gs.items() if n in ("w_in", "w_out")})
        opt_exp.step()
        res["bytes_experts"].append(dict(opt_exp.comm_stats["bytes"]))
        res["ideal_experts"].append(dict(opt_exp.comm_stats["ideal"]))
        res["collectives_experts"].append(dict(opt_exp.comm_stats["collectives"]))
    want, res["nonfinite_ref"] = _moe_reference(nan)
    res["nonfinite"] = opt.nonfinite_count
    res.update(compare_params(model, want))
    res["experts_equal"] = all(torch.equal(full(p), want[n]) for p, n in zip(experts, ("w_in", "w_out")))
    res["strategies"] = strategies(opt)
    res["expert_strategies"] = strategies(opt_exp)
    res["expert_placements"] = str(model.w_in.placements)
    res["expert_local_shape"] = tuple(model.w_in.to_local().shape)
    res["ok"] = res["params_equal"] and res["experts_equal"]
    return res


def sc_ep_local(rank, world):
    return _ep(rank, world, "local")


def sc_ep_local_nan(rank, world):
    return _ep(rank, world, "local", nan=True)


def sc_ep_fsdp(rank, world):
    return _ep(rank, world, "2d")


def sc_ep_fsdp2(rank, world):
    return _ep(rank, world, "fsdp2")


SCENARIOS = {
    "save_fsdp4": sc_save_fsdp4,
    "fsdp4_to_hsdp": sc_fsdp4_to_hsdp,
    "fsdp4_to_fsdp_tp": sc_fsdp4_to_fsdp_tp,
    "save_ddp4": sc_save_ddp4,
    "ddp4_to_fsdp4": sc_ddp4_to_fsdp4,
    "e2e_save_fsdp4": sc_e2e_save_fsdp4,
    "ep_local": sc_ep_local,
    "ep_local_nan": sc_ep_local_nan,
    "ep_fsdp": sc_ep_fsdp,
    "ep_fsdp2": sc_ep_fsdp2,
    "fsdp4_to_fsdp2": sc_fsdp4_to_fsdp2,
    "save_fsdp2": sc_save_fsdp2,
    "e2e_fsdp4_to_fsdp2": sc_e2e_fsdp4_to_fsdp2,
}


# ------------------------------------------------------------------------------------------------
# harness: dist_scenarios' worker with these scenarios registered (fork or spawn alike)
# ------------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    S.SCENARIOS.update(SCENARIOS)
    S._worker(rank, world, port, outdir, names)


def run_world(world: int, names: list[str], ckpt_dir: str) -> dict[str, list[dict]]:
    """Run ``names`` in one spawn of ``world`` gloo processes, checkpoints under ``ckpt_dir``."""
    os.environ[CKPT_ENV] = ckpt_dir
    return S.run_world(world, names, worker=_worker)


def one_process(name: str, how: str) -> dict:
    """The one-process side, in the caller's process (no process group): load checkpoint ``name`` (a
    DCP directory, or a full state dict written by ``torch.save``) and take AFTER steps."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    threads = torch.get_num_threads()
    # the workers run one thread; so does this side, so that the reference's gradients (a backward
    # pass) and the NS matmuls have the same summation order, hence the same bits, as in the workers
    torch.set_num_threads(1)
    try:
        ref = _cached_ref()
        model = make_net()
        opt = make_opt(model)
        if how == "dcp":
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process.*")
                load(model, opt, name, no_dist=True)
        else:
            sd = torch.load(ckpt_path(name), weights_only=True)
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, sd["model"], options=opts)
            set_optimizer_state_dict(model, opt, sd["optim"], options=opts)
        res = compare_state(model, opt, ref["mid_state"])
        res.update({"loaded_" + k: v for k, v in compare_params(model, ref["mid_params"]).items()})
        run_steps(model, opt, ref, BEFORE, AFTER)
        res.update(compare_params(model, ref["end_params"]))
        res["ok"] = res["state_equal"] and res["params_equal"]
        return res
    except Exception:
        return {"ok": False, "error": traceback.format_exc()}
    finally:
        torch.set_num_threads(threads)
