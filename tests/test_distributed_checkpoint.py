"""Checkpoints that move between layouts, and expert parallelism, on CPU/gloo.

One spawn at W=4, one at W=2, and the one-process side in this process; the scenarios are in
``tests/dist_checkpoint_scenarios.py``.

* **Across layouts, bit-identical.** A small model (Muon: three Linear weights, one with uneven
  shards; AdamW: embedding, LayerNorm, biases, head) takes 3 steps, is saved with torch's standard
  recipe (``dcp.save`` of ``get_model_state_dict`` / ``get_optimizer_state_dict``), and is loaded under
  another layout (``dcp.load`` then ``set_model_state_dict`` / ``set_optimizer_state_dict``) by a fresh
  model and optimizer, which take 3 more steps. Pairs: W=4 FSDP2 → W=2 FSDP2; W=2 FSDP2 → one process
  (DCP directory, and a full state dict via ``torch.save``); W=4 FSDP2 → W=4 HSDP (2×2); W=4 FSDP2 →
  FSDP×TP (2×2); W=4 DDP ``owner`` → W=4 FSDP2. Every layout gets the same full gradients (those of
  one single-process run on deterministic data), so the distributed step is bit-identical to one
  process; the loaded state (momentum, AdamW moments, step counts) and the parameters after the 3
  resumed steps must be ``torch.equal`` to the uninterrupted single-process run.
* **End to end** (FSDP2's own forward/backward, W=4 → W=2): within ``E2E_ATOL`` of one process
  taking the same micro-batches (4 per step before the checkpoint, 2 after). The only difference is
  gloo's summation order; measured max |Δθ| 6.7e-7 (torch 2.14.1, CPU), the bound of
  ``tests/test_distributed.py`` (2e-6).
* **Expert parallelism** on a 2×2 (ep, fsdp) mesh, stacked experts (4, 24, 16) and (4, 16, 24),
  dense weights FSDP2 over fsdp: experts on Shard(0) over ep (whole experts per rank) are
  orthogonalized locally, no payload bytes (a NaN in one expert skips the whole stack on every
  rank, as in one process: the flag is all-reduced over ep); experts also sharded on their rows over fsdp
  (explicit DTensors, and FSDP2's ``fully_shard`` on top of EP) are exact with ``a2a`` over fsdp on
  each rank's own experts.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_checkpoint_scenarios as C  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(), reason="needs gloo")

E2E_ATOL = 2e-6  # as tests/test_distributed.py; measured 6.7e-7 here
W4 = ["save_fsdp4", "fsdp4_to_hsdp", "fsdp4_to_fsdp_tp", "save_ddp4", "ddp4_to_fsdp4", "e2e_save_fsdp4",
      "ep_local", "ep_local_nan", "ep_fsdp", "ep_fsdp2"]
W2 = ["fsdp4_to_fsdp2", "save_fsdp2", "e2e_fsdp4_to_fsdp2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """W=4, then W=2 (reads W=4's checkpoints), then one process (reads W=2's)."""
    d = str(tmp_path_factory.mktemp("ckpt"))
    out = {}
    out.update(C.run_world(4, W4, d))
    out.update(C.run_world(2, W2, d))
    os.environ[C.CKPT_ENV] = d
    out["fsdp2_to_one_dcp"] = [C.one_process("fsdp2", "dcp")]
    out["fsdp2_to_one_full"] = [C.one_process("fsdp2_full.pt", "full")]
    return out


def _get(runs, name):
    per_rank = runs[name]
    for r, d in enumerate(per_rank):
        assert "error" not in d, f"{name}, rank {r}:\n{d['error']}"
    return per_rank


@pytest.mark.parametrize("name,strategies", [("save_fsdp4", ["a2a"]), ("save_ddp4", ["owner"]),
                                             ("save_fsdp2", ["a2a"])])
def test_source_layout(runs, name, strategies):
    """The state saved equals the single-process state, and the uninterrupted run in the source layout
    equals the single-process run: the exactness premise of the resumed runs."""
    for d in _get(runs, name):
        assert d["state_equal"], d["state_bad"]
        assert d["state_tensors"] == 3 + 3 * 7  # 3 momentum buffers, 7 AdamW params × (step, m, v)
        assert d["source_params_equal"], d["source_params_bad"]
        assert d["strategies"] == strategies


@pytest.mark.parametrize("name,strategies", [
    ("fsdp4_to_fsdp2", ["a2a"]),
    ("fsdp4_to_hsdp", ["a2a"]),
    ("fsdp4_to_fsdp_tp", ["a2a", "gather"]),  # up/down: (_StridedShard dp, Shard tp); mix: Shard(0) dp
    ("ddp4_to_fsdp4", ["a2a"]),
    ("fsdp2_to_one_dcp", None),
    ("fsdp2_to_one_full", None),
])
def test_resume_across_layouts(runs, name, strategies):
    for d in _get(runs, name):
        assert d["state_equal"], d["state_bad"]  # momentum, exp_avg, exp_avg_sq, step: every tensor
        assert d["state_tensors"] == 24
        assert d["loaded_params_equal"], d["loaded_params_bad"]
        assert d["params_equal"], d["params_bad"]  # 3 steps after the load == the uninterrupted run
        if strategies is not None:
            assert d["strategies"] == strategies


def test_resume_end_to_end_fsdp4_to_fsdp2(runs):
    _get(runs, "e2e_save_fsdp4")
    for d in _get(runs, "e2e_fsdp4_to_fsdp2"):
        assert d["max_diff"] <= E2E_ATOL, d["params_bad"]


def test_experts_whole_per_rank_are_local(runs):
    """Experts on Shard(0) over ep, replicated over fsdp: NS on this rank's experts only, no bytes."""
    for d in _get(runs, "ep_local"):
        assert d["params_equal"], d["params_bad"]  # dense (a2a over fsdp) and experts, vs one process
        assert d["experts_equal"]
        assert d["expert_strategies"] == ["local"]
        assert d["strategies"] == ["a2a", "local"]
        assert d["expert_local_shape"] == (C.E // 2, C.EM, C.EN)
        # no payload: neither the NS input nor its result leaves the rank (the one-float64-per-parameter
        # Σu² all-reduce over ep, the non-finite flags, is allowed: see test_experts_local_nonfinite_skips_whole_stack)
        for b, c in zip(d["bytes_experts"], d["collectives_experts"]):
            assert set(b) <= {"flags"} and set(c) <= {"flags"}, (b, c)
            assert b.get("flags", 0) <= 8 * 2  # 2 stacks × float64 × 2(W_ep − 1)/W_ep, W_ep = 2


def test_experts_local_nonfinite_skips_whole_stack(runs):
    """A NaN in one expert (last ep rank) at step 2: the whole stack is skipped on every rank, as in one
    process (non-finite detection is per parameter)."""
    for d in _get(runs, "ep_local_nan"):
        assert d["nonfinite"] == d["nonfinite_ref"] == 1
        assert d["params_equal"], d["params_bad"]


@pytest.mark.parametrize("name", ["ep_fsdp", "ep_fsdp2"])
def test_experts_ep_x_fsdp_exact(runs, name):
    """Experts on Shard(0) over ep and on their rows over fsdp: exact."""
    for d in _get(runs, name):
        assert d["params_equal"], d["params_bad"]
        assert d["experts_equal"]
        assert d["expert_local_shape"] == (C.E // 2, C.EM // 2, C.EN)


@pytest.mark.parametrize("name", ["ep_fsdp", "ep_fsdp2"])
def test_experts_ep_x_fsdp_no_gather(runs, name):
    """a2a over the fsdp dim within each ep rank's own experts; bytes equal the a2a ideal."""
    for d in _get(runs, name):
        assert d["expert_strategies"] == ["a2a"]
        for got, ideal in zip(d["bytes_experts"], d["ideal_experts"]):
            assert "gather" not in got
            assert got["a2a"] == ideal["a2a"]
