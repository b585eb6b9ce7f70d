"""``bench/gpu_acceptance.py`` on a CPU machine: the dry run prints the plan and exits 0; a real run
without a GPU says so, still writes its results files, and exits non-zero."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_acceptance.py"


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_plan_and_exits_0(tmp_path):
    r = _run("--out", str(tmp_path / "o"), "--dry-run")
    assert r.returncode == 0, r.stderr
    for section in ("[env]", "[ns]", "[muon_ops]", "[pytest_gpu]", "[sanitizer]"):
        assert section in r.stdout
    assert "4096x16384" in r.stdout and "64x128x128" in r.stdout
    assert not (tmp_path / "o").exists()          # a dry run writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_gpu_reports_and_writes_results(tmp_path):
    r = _run("--out", str(tmp_path))
    assert r.returncode == 2
    assert "no CUDA device" in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["sections"]["env"]["status"] == "ok" and "torch" in res["sections"]["env"]
    assert (tmp_path / "results.md").read_text().startswith("# GPU acceptance run")


def test_markdown_of_a_recorded_run():
    """The report renders measured rows, goal checks and missing pieces (no GPU needed)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_acceptance as ga
    finally:
        sys.path.pop(0)
    row = {"shape": (1, 4096, 4096), "g_dtype": "bfloat16", "fastortho": {"p50": 2.0},
           "cublas_loop": {"p50": 3.0}, "eager_loop": {"error": "x"}}
    row["goal"] = ga._goal_check((1, 4096, 4096), row)
    assert row["goal"]["ms"]["met"] is False and row["goal"]["ratio"]["met"] is True   # 2.0 > 1.9; 1.5 ≥ 1.4
    md = ga.to_markdown({"sections": {"ns": {"status": "ok", "rows": [row], "gram_newton_schulz": "not importable"},
                                      "sanitizer": {"status": "unavailable", "reason": "no tool"}}, "notes": []})
    assert "| 4096x4096 | bfloat16 | 2.000 | 3.000 | err |" in md
    assert "ms: 2 vs 1.9 missed" in md and "sanitizer**: unavailable" in md
