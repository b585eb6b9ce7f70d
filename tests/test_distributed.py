"""Distributed fastortho.Muon on CPU with gloo: one spawn per world size runs every scenario.

The scenarios live in ``tests/dist_scenarios.py``; each test asserts on one of them, on every rank.

* Identical gradients (the same full gradient on every rank, sharded with ``distribute_tensor``):
  parameters after 3 steps are ``torch.equal`` to single-process ``fastortho.Muon``, for each strategy
  (a2a on Shard(0)/Shard(1)/Shard(-1), gather, owner, local), with uneven shards (33 rows), an empty
  shard (1×16), a flattened conv kernel, 3-D stacks (a2a on a matrix dim, local on the expert dim), a
  ``split_sizes`` group, an AdamW group of sharded vectors, and a NaN injected into one shard at step 2
  (the whole matrix is skipped on every rank, as in one process).
* End to end at W=2: FSDP2 and DDP are ``torch.equal`` to one process that accumulates the gradients of
  the W micro-batches (loss/W each).
* End to end with a tolerance: TP (W=2), FSDP2, HSDP and FSDP×TP (W=4). The gradients differ from the
  reference by the sum order of gloo's reductions (and TP's partial sums), ~1e-9; after 3 steps at
  lr 0.02 the measured max |Δθ| is 3.2e-7 (TP), 2.0e-7 (FSDP2 W=4), 1.5e-7 (HSDP), 2.1e-7 (FSDP×TP)
  (torch 2.14.1, CPU, fp32 NS); the single-process full-batch vs 2-micro-batch noise floor is 1.5e-7.
  ``E2E_ATOL`` is 2e-6. Orthogonalizing each half of the rows separately instead of the whole
  matrix moves θ by 3.7e-2 (measured: 3 steps at lr 0.02, random gradients), far outside the bound.
* Bytes: ``comm_stats`` equals an independent count of what ``all_to_all_single`` was handed, and the
  mean over ranks equals the closed forms 4(W−1)/W² (a2a, bf16) and 2(W−1)/W (owner, bf16) per parameter.
* Norms: whole matrices reach Newton–Schulz with their Σu² (the all-reduced float64 shard sums, which also
  carry the non-finite check), so no norm pass runs; stacks keep it.
* DCP: FSDP2 ``get_state_dict``/``dcp.save``/``dcp.load``/``set_state_dict`` resumes bit-identically;
  optimizer state keys are the same on every rank, before the first step too.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_scenarios as S  # noqa: E402

import fastortho  # noqa: E402
from fastortho.optim import distributed as D  # noqa: E402
from fastortho.optim import functional as F  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(), reason="needs gloo")

E2E_ATOL = 2e-6
IDENT = ["ident_a2a", "ident_a2a_bf16", "ident_gather", "ident_owner", "ident_local"]
PIPE = ["ident_a2a_bf16_pipe", "ident_owner_pipe"]
NORMUON = ["ident_normuon_fsdp", "ident_normuon_tp", "ident_normuon_owner", "ident_normuon_gather"]
CAPT = ["ident_capturable", "ident_capturable_normuon", "ident_capturable_gather"]
W2 = IDENT + PIPE + NORMUON + CAPT + ["ident_after_ortho", "host_read_guard", "ident_fan_in_first", "ident_svd_bf16",
                                      "normuon_unsupported", "bytes_even", "e2e_fsdp", "e2e_ddp", "e2e_tp", "dcp",
                                      "dcp_normuon", "divergent_grads", "sumsq_reuse"]
W4 = ["ident_a2a_bf16", "ident_gather", "ident_owner", *PIPE, "ident_normuon_fsdp", "bytes_even", "e2e_fsdp",
      "e2e_hsdp", "e2e_fsdp_tp", "sumsq_reuse"]


@pytest.fixture(scope="module")
def w2():
    return S.run_world(2, W2)


@pytest.fixture(scope="module")
def w4():
    return S.run_world(4, W4)


def _get(results, name):
    per_rank = results[name]
    for r, d in enumerate(per_rank):
        assert "error" not in d, f"rank {r}:\n{d['error']}"
    return per_rank


def _check_ident(per_rank, world, nan=1):
    for r, d in enumerate(per_rank):
        assert d["equal"], f"rank {r}: max |diff| {d['max_diff']}"
        assert d["nonfinite"] == (nan, nan), d["nonfinite"]  # the injected NaN, skipped once, on every rank
        for got, measured, ideal in zip(d["bytes"], d["measured"], d["ideal"]):
            for kind in ("a2a", "owner"):
                assert got.get(kind, 0) == ideal.get(kind, 0)
            # NorMuon's row moments ride in the same all-to-all as the slices of O, counted apart
            assert got.get("a2a", 0) + got.get("owner", 0) + got.get("normuon_v", 0) == measured
        assert d["state_keys"] == per_rank[0]["state_keys"]


@pytest.mark.parametrize("name", IDENT)
def test_identical_grads_w2(w2, name):
    per_rank = _get(w2, name)
    _check_ident(per_rank, 2)
    want = {"ident_a2a": ["a2a", "local"], "ident_a2a_bf16": ["a2a", "local"],
            "ident_gather": ["gather", "local"],
            "ident_owner": ["owner"], "ident_local": ["local"]}[name]
    assert per_rank[0]["strategies"] == want


@pytest.mark.parametrize("name", NORMUON)
def test_normuon_bit_identical_w2(w2, name):
    """NorMuon: the rank holding the whole O (owner, or every rank under gather) normalizes it and updates
    the replicated row moments, then sends slices (float32) and moments. After 3 steps with a NaN at step
    2, parameters and every rank's ``normuon_v`` are ``torch.equal`` to one process: FSDP2-like Shard(0)
    (3-D stacks on rows; split blocks across the shard boundary), TP columns with bf16 NS, DDP owner
    (pipelined), forced gather."""
    per_rank = _get(w2, name)
    _check_ident(per_rank, 2)
    for d in per_rank:
        assert d["v_count"] == 15 and d["v_equal"], d["v_max_diff"]  # 13 matrices + 2 split parameters
        if name != "ident_normuon_gather":
            assert all(b["normuon_v"] > 0 for b in d["bytes"])  # the owners' moments were sent
    want = {"ident_normuon_fsdp": ["a2a"], "ident_normuon_tp": ["a2a"], "ident_normuon_owner": ["owner"],
            "ident_normuon_gather": ["gather"]}[name]
    assert per_rank[0]["strategies"] == want


def test_normuon_bit_identical_w4(w4):
    per_rank = _get(w4, "ident_normuon_fsdp")
    _check_ident(per_rank, 4)
    assert all(d["v_count"] == 15 and d["v_equal"] for d in per_rank)


def test_normuon_dcp_round_trip_w2(w2):
    """Sharded DCP save/load under FSDP2 keeps NorMuon's replicated moments and the next step exact."""
    for d in _get(w2, "dcp_normuon"):
        assert d["v_equal"] and d["equal"], d


def test_normuon_unsupported_layouts_raise(w2):
    """A stack sharded on its stack dim and after_ortho momentum raise, naming the way out."""
    for d in _get(w2, "normuon_unsupported"):
        assert "stack dim" in d["stack"] and "variant='muon'" in d["stack"], d["stack"]
        assert "momentum_placement='before_ortho'" in d["after_ortho"], d["after_ortho"]


@pytest.mark.parametrize("name", CAPT)
def test_capturable_bit_identical_w2(w2, name):
    """capturable=True (device-scalar lr/momentum/weight decay, AdamW step counts on the parameters'
    device) through the engine: ``torch.equal`` to capturable single-process Muon, NaN skip included,
    and steps 2-3 run with every host read of a tensor (item, __bool__, tolist, __float__, __int__)
    raising: a2a + stack-sharded local, NorMuon on a2a (moments sent), gather."""
    per_rank = _get(w2, name)
    _check_ident(per_rank, 2)
    want = {"ident_capturable": ["a2a", "local"], "ident_capturable_normuon": ["a2a"],
            "ident_capturable_gather": ["gather"]}[name]
    assert per_rank[0]["strategies"] == want


def test_host_read_guard_sees_engine_reads(w2):
    for d in _get(w2, "host_read_guard"):
        assert "host read" in d["caught"], d["caught"]


def test_fan_in_first_w2(w2):
    """fan_in_first (a (fan_in, fan_out) weight): the engine's lr scale is s(n, m), as one process.
    Without the swap the spectral rule moves θ by 6.2e-2 (measured) after 3 steps."""
    _check_ident(_get(w2, "ident_fan_in_first"), 2)


def test_svd_orthogonalizer_on_bf16_parameters_cuts_as_one_process_w2(w2):
    """orthogonalizer="svd" on bf16 parameters with rank-1 gradients: the owner's rank cut follows bf16,
    as in one process (with the fp32 cut the engine kept the rounding directions: 5.2e-2 after 3 steps)."""
    _check_ident(_get(w2, "ident_svd_bf16"), 2)


def test_identical_grads_after_ortho_w2(w2):
    _check_ident(_get(w2, "ident_after_ortho"), 2, nan=0)


@pytest.mark.parametrize("name", ["ident_a2a_bf16", "ident_gather", "ident_owner"])
def test_identical_grads_w4(w4, name):
    _check_ident(_get(w4, name), 4)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", PIPE)
def test_pipelined_exchange_bit_identical(w2, w4, world, name):
    """Stages of one matrix (a2a) or ~600 elements (owner): stage s+1's exchange is in flight while stage
    s is orthogonalized, and stage s−1's results return meanwhile. Parameters stay ``torch.equal`` to one
    process (so to the one-stage step, which the other ident tests check), with the same bytes."""
    per_rank = _get(w2 if world == 2 else w4, name)
    _check_ident(per_rank, world)
    kind = "a2a" if "a2a" in name else "owner"
    for d in per_rank:
        for stages, calls in zip(d["stages"], d["collectives"]):
            # 19 matrices and split blocks over W owners, about one per owner and stage: W=2 gives 7-10
            # stages, W=4 gives 4-6 (the busiest owner's count); never one
            assert stages >= 3
            assert calls[kind] == (2 if kind == "a2a" else 1) * stages  # one exchange per stage and way


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_match_closed_form(w2, w4, world):
    per_rank = _get(w2 if world == 2 else w4, "bytes_even")
    for d in per_rank:
        for kind in ("a2a", "owner"):
            assert d[kind]["bytes"] == d[kind]["measured"] == d[kind]["ideal"]
        assert d["a2a"]["calls"] == 2 and d["owner"]["calls"] == 1  # one exchange each way / one gather
    W = world
    assert per_rank[0]["a2a"]["mean_per_param"] == pytest.approx(4 * (W - 1) / W**2, rel=1e-12)
    assert per_rank[0]["owner"]["mean_per_param"] == pytest.approx(2 * (W - 1) / W, rel=1e-12)
    # LPT on NS flops: 7 matrices on W ranks; the busiest rank within 1.5x of the mean
    assert per_rank[0]["a2a"]["max_flops"] <= 1.5 * per_rank[0]["a2a"]["mean_flops"]


@pytest.mark.parametrize("world", [2, 4])
def test_whole_matrices_hand_their_sum_to_newton_schulz(w2, w4, world):
    """Every orthogonalize call of whole matrices gets the whole matrices' Σu² (the all-reduced shard sums,
    measured within 1.3e-16 relative of the float64 Σ of the assembled input; bound 1e-12), so NS runs no
    norm pass: a2a on rows and on columns (on its owner), a gathered flattened conv kernel (on every rank).
    The 3-D stack (one sum for 3 matrices) keeps the pass. One SUM all-reduce of a float64 per sharded
    parameter carries the sums (and the non-finite check): 4 × 8 B × 2(W−1)/W per rank, one call."""
    per_rank = _get(w2 if world == 2 else w4, "sumsq_reuse")
    calls = [c for d in per_rank for c in d["calls"]]
    assert sorted({shape for shape, _ in calls}) == [(1, 8, 27), (1, 16, 40), (1, 33, 16), (3, 6, 10)]
    assert sum(shape == (1, 8, 27) for shape, _ in calls) == world  # gather: NS on every rank
    for shape, rel in calls:
        if shape[0] == 1:
            assert rel is not None and rel <= 1e-12, (shape, rel)
        else:
            assert rel is None, shape
    for d in per_rank:
        assert d["strategies"] == ["a2a", "gather"]
        assert d["flags"] == 4 * 8 * 2 * (world - 1) // world and d["flag_calls"] == 1


@pytest.mark.parametrize("name", ["e2e_fsdp", "e2e_ddp"])
def test_e2e_w2_bit_identical(w2, name):
    for d in _get(w2, name):
        assert d["equal"], d["max_diff"]
        assert d["bytes_ok"]
    if name == "e2e_fsdp":
        assert w2[name][0]["ns_outside_step"] == 0  # NS runs in step(), not per micro-batch
        assert w2[name][0]["strategies"] == ["a2a"]
    else:
        assert w2[name][0]["strategies"] == ["owner"]


def test_e2e_tp_w2(w2):
    for d in _get(w2, "e2e_tp"):
        assert d["max_diff"] <= E2E_ATOL
        assert d["bytes_ok"]
        assert d["strategies"] == ["a2a"]
        assert "(Shard(dim=1),)" in d["placements"]


@pytest.mark.parametrize("name,strategy",
                         [("e2e_fsdp", "a2a"), ("e2e_hsdp", "a2a"), ("e2e_fsdp_tp", "gather")])
def test_e2e_w4(w4, name, strategy):
    for d in _get(w4, name):
        assert d["max_diff"] <= E2E_ATOL
        assert d["bytes_ok"]
        assert d["strategies"] == [strategy]


def test_dcp_roundtrip(w2):
    for d in _get(w2, "dcp"):
        assert d["same_keys"]
        assert d["equal"]


# ------------------------------------------------------------------------------------------------
# no process group needed
# ------------------------------------------------------------------------------------------------
def test_ns_independent_of_batch_composition():
    """The owner batches a matrix with different neighbours than one process does: NS must not care."""
    cfg = F.OrthoConfig.from_group(dict(ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=None,
                                        coefficients=None, orthogonalizer="newton_schulz", normalize="fro",
                                        eps=1e-7, ns_dtype=None,
                                        backend="auto"))
    g = torch.Generator().manual_seed(0)
    for m, n in [(33, 16), (16, 64), (1, 16), (40, 72)]:
        X = torch.randn(6, m, n, generator=g)
        full = F.orthogonalize(X, cfg)
        for sub in ([0], [5], [1, 2], [0, 3, 5]):
            assert torch.equal(F.orthogonalize(X[sub].contiguous(), cfg), full[sub])


def test_shard_extents_and_lpt():
    assert D.shard_extents(33, 2) == [(0, 17), (17, 16)]
    assert D.shard_extents(1, 2) == [(0, 1), (1, 0)]
    assert D.shard_extents(5, 4) == [(0, 2), (2, 2), (4, 1), (5, 0)]
    # largest first to the least loaded rank: not round robin by count
    assert D.lpt_owners([1, 1, 1, 10], 2) == [1, 1, 1, 0]
    assert D.ns_flops(1, 64, 16) == D.ns_flops(1, 16, 64)


def test_single_process_has_no_engine():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = fastortho.Muon([p])
    assert opt._dist_engine is None and opt.comm_stats == {}
    with pytest.raises(ValueError, match="strategy"):
        fastortho.Muon([p], strategy="nope")


def test_rank_divergent_grads_raise(w2):
    for d in _get(w2, "divergent_grads"):  # checked at the first step, and at every step on request
        assert "disagree" in d["first_step"] and "disagree" in d["later_step"], d
