"""``bench/ns_model.py``: executed FLOPs per launch against hand counts and the package's NS FLOP
formula (``kernels.newton_schulz_iteration.matmul_flops``), and the cuBLAS-loop reference."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastortho.kernels import HAS_TRITON
from fastortho.kernels.newton_schulz_iteration import matmul_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ns_model  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the model traces the Triton launchers")


def _mm(costs):
    return [c for c in costs if c.kernel in ("sym", "apply")]


@pytest.fixture
def multi_kernel(monkeypatch):
    """The multi-kernel path for every shape: the one-launch small-matrix kernel (where present) off."""
    try:
        from fastortho.kernels import newton_schulz_small
    except ImportError:
        return
    monkeypatch.setattr(newton_schulz_small, "ENABLED", False, raising=False)


def test_hand_count_128x128_standard(multi_kernel):
    """64 × 128×128, 5 steps, standard NS, sm_90 table: sym 64² tiles (T = 2: 3 triangle tiles),
    apply 64×128 tiles (2 programs). Per matrix and step:
      XXᵀ: 3·64·64·2·128 = 3 145 728;  A²: same;  apply: 2·64·128·2·128 = 4 194 304."""
    costs = ns_model.launch_costs((64, 128, 128))
    mm = _mm(costs)
    assert [c.kernel for c in mm] == ["sym", "sym", "apply"] * 5
    per_step = [c.flops / 64 for c in mm[:3]]
    assert per_step == [3_145_728, 3_145_728, 4_194_304]
    assert sum(c.flops for c in mm) == 64 * 5 * 10_485_760
    # the first step reads X' = round(p·G) in the storage dtype and applies the scale in the
    # epilogues: every launch is in the pipelined class
    # (sm_90: the persistent TMA kernels, sym-tma and apply-tma classes)
    assert [c.klass for c in mm[:3]] == ["sym-tma", "sym-tma", "apply-tma"]
    assert all(not c.klass.endswith("sync") for c in mm[3:])


@pytest.mark.parametrize("shape,gram", [((1, 4096, 4096), False), ((1, 4096, 16384), True),
                                        ((24, 768, 3072), True), ((2, 256, 512), True), ((3, 512, 192), False)])
def test_executed_flops_equal_package_formula(shape, gram):
    """Σ of the traced launches = matmul_flops(k, L, steps, gram, tile) (independent derivation)."""
    B, m, n = shape
    k, L = min(m, n), max(m, n)
    costs = ns_model.launch_costs(shape)
    from fastortho.kernels.aot import trace_newton_schulz

    sym_bm = {ln.kwargs["BLOCK_M"] for ln in trace_newton_schulz(shape, "bf16", 90) if ln.kernel in ("_sym_mm_kernel", "_sym_mm_tma_kernel")}
    assert len(sym_bm) == 1
    want = B * matmul_flops(k, L, 5, gram=gram, tile=sym_bm.pop())
    got = sum(c.flops for c in _mm(costs))
    assert got == want      # tile sizes divide k and L here; padded tiles would add executed FLOPs


def test_anchor_executed_flops_4096():
    """4096², 5 steps, 128² sym tiles: 1.3959e12 executed (gpu review: 1396 GFLOP), 4096×16384
    Gram space: 2.6586e12 (2659 GFLOP)."""
    assert sum(c.flops for c in ns_model.launch_costs((1, 4096, 4096))) == pytest.approx(1.3959e12, rel=1e-4)
    assert sum(c.flops for c in ns_model.launch_costs((1, 4096, 16384))) == pytest.approx(2.6586e12, rel=1e-4)


def test_cublas_loop_reference():
    """4096², 5 steps: 5·(2·4096³·3) = 2.0616e12 FLOP at 789 TFLOP/s = 2.613 ms (all 128×256 grids
    are 512 tiles = 3.88 waves: efficiency 512/528), plus X's defensive copy 5·2·33.5 MB / 3 TB/s."""
    ms = ns_model.cublas_loop_ms(1, 4096, 4096, 5)
    want = 2.0616e12 / 789e12 / (512 / 528) * 1e3 + 5 * 2 * 4096 * 4096 * 2 / 3e12 * 1e3
    assert ms == pytest.approx(want, rel=1e-3)


def test_predictions_are_labelled_and_ordered():
    rows = ns_model.predictions()
    assert [r["shape"] for r in rows] == [s for s, *_ in ns_model.SHAPES]
    for r in rows:
        assert r["call_ms"][0] <= r["call_ms"][1] and r["verdict"].startswith(("predicted", "uncertain"))
    md = ns_model.to_markdown(rows)
    assert "verdict (prediction)" in md


def test_persistent_launches_count_tiles_not_programs():
    """4096², sm_90: the persistent TMA apply runs 512 tiles of 128×256 on 132 programs (1 CTA/SM), the
    symmetric kernel 528 triangle tiles on 264 (2 CTAs/SM): FLOPs from the tiles, and the wave
    efficiency of a persistent grid is tiles / (⌈tiles / programs⌉ · programs)."""
    costs = ns_model.launch_costs((1, 4096, 4096))
    app = [c for c in costs if c.klass == "apply-tma"]
    sym = [c for c in costs if c.klass == "sym-tma"]
    assert len(app) == 5 and len(sym) == 10
    assert all((c.programs, c.tiles, c.flops) == (132, 512, 512 * 128 * 256 * 2.0 * 4096) for c in app)
    assert all((c.programs, c.tiles) == (264, 528) for c in sym)
    assert ns_model._wave_eff(132, tiles=512) == 512 / 528
    assert ns_model._wave_eff(264, tiles=528) == 1.0
    assert ns_model._wave_eff(132, tiles=133) == 133 / 264     # one program runs a second tile
    assert ns_model._wave_eff(512) == 512 / 528                # one tile per program: whole waves


def test_tma_classes_use_their_rates():
    """An apply-tma launch costs its FLOPs at the apply-tma rate (published persistent TMA matmul
    rates), scaled by its persistent wave efficiency; the sym-tma class keeps the sym rate."""
    assert ns_model.RATES["sym-tma"] == ns_model.RATES["sym"]
    c = ns_model.LaunchCost("apply", "apply-tma", 1e12, 0.0, 132, 512)
    p = ns_model.predict_fastortho([c])
    lo, hi = ns_model.RATES["apply-tma"]
    eff = 512 / 528
    assert p["gpu_ms"] == pytest.approx((1e12 / (hi * 1e12 * eff) * 1e3, 1e12 / (lo * 1e12 * eff) * 1e3), rel=1e-12)


def test_small_kernel_class_counts_its_loop():
    """64 × 128×128, 5 steps: one launch of the single-program kernel (class "small"), executing per matrix
    the first Gram product + 5 × (A·A, B·X, X·Xᵀ) = 16 products of 2·128³ (its loop forms X·Xᵀ after the
    last step too). 100×1000 pads to BLOCK_K = 128 and 63 chunks of 16 columns (Lp = 1008)."""
    costs = ns_model.launch_costs((64, 128, 128))
    assert [(c.kernel, c.klass, c.programs) for c in costs] == [("ns_small", "small", 64)]
    assert costs[0].flops == 64 * 16 * 2 * 128 ** 3
    assert costs[0].bytes == 2 * 64 * 128 * 128 * 2            # G read once, the output written once
    (c,) = ns_model.launch_costs((8, 100, 1000))
    assert c.flops == 8 * (2 * 128 ** 2 * 1008 + 5 * (2 * 128 ** 3 + 4 * 128 ** 2 * 1008))


def test_small_kernel_time_and_host():
    """GPU: each program runs on its own SM at SMALL_SM_FRACTION of the per-SM cuBLAS share, whole waves
    of 132 programs; host: the measured Python of a one-launch call plus one Triton launch."""
    sm = ns_model.CUBLAS_TFLOPS * 1e12 / ns_model.H100_SMS
    per = 16 * 2 * 128 ** 3
    lo, hi = ns_model.SMALL_SM_FRACTION
    for B, waves in ((64, 1), (132, 1), (133, 2)):
        p = ns_model.predict_fastortho([ns_model.LaunchCost("ns_small", "small", B * per, 0.0, B)])
        assert p["gpu_ms"] == pytest.approx((waves * per / (hi * sm) * 1e3, waves * per / (lo * sm) * 1e3), rel=1e-12)
    py, tr = ns_model.HOST_PY_SMALL_US, ns_model.HOST_US
    assert p["host_ms"] == pytest.approx(((py[0] + tr[0]) / 1e3, (py[1] + tr[1]) / 1e3), rel=1e-12)
    row = [r for r in ns_model.predictions() if r["shape"] == (64, 128, 128)][0]
    assert row["launches"] == 1 and row["executed_gflop"] == pytest.approx(64 * per / 1e9)
