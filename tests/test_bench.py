"""The benchmark's bf16 model agrees with real bf16 arithmetic, and the main job runs."""
import pytest
import torch

import fastortho
from fastortho.bench import format_rows, gaussian, main, ns_bf16_model, schedule_rows
from fastortho.coefficients import get_schedule
from fastortho.reference import polar_error


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_model_matches_cpu_bf16(seed):
    G = gaussian(64, 160, seed)
    coeffs, safety = get_schedule("polar_express")
    model = ns_bf16_model(G.float(), coeffs, safety)
    real = fastortho.newton_schulz(G.float(), dtype=torch.bfloat16)
    fp32 = fastortho.newton_schulz(G.float())
    # Measured: model vs real bf16 differ by 3e-4..6.5e-3 (accumulation order), while each differs
    # from fp32 by ~1.4e-2 (bf16 rounding) — the model is within half the effect it models.
    diff = polar_error(model, G, reference=real.double()).item()
    rounding = polar_error(real, G, reference=fp32.double()).item()
    assert diff < 0.5 * rounding
    # and the accuracy it reports is the real one to 5% (measured ≤ 0.2%)
    assert polar_error(model, G).item() == pytest.approx(polar_error(real, G).item(), rel=0.05)


def test_main_job_prints_every_schedule(capsys):
    main(["--m", "16", "--n", "40", "--reps", "0"])  # every row, no timing (timing: the next test)
    out = capsys.readouterr().out
    for name in fastortho.SCHEDULES:
        for k in range(3, 9):
            assert f"| {name} | {k} | fp32 |" in out


def test_main_job_time_column_is_a_median_of_several_calls():
    from fastortho import bench

    calls = []
    median = bench._median_ms(lambda: calls.append(1), reps=5, min_time_s=0.0)
    assert len(calls) == 6 and median >= 0  # one warm-up, then 5 timed calls
    rows = schedule_rows(gaussian(8, 16), reps=2, schedules=["keller"], steps=[3])
    assert rows[0]["ms"] is not None and "ms/call: median" in format_rows(rows, 2)


# ---- command-line hygiene of the benchmarks and examples ------------------------------------------
import ast  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI_FILES = [ROOT / "fastortho" / "bench.py", *(ROOT / "bench" / f for f in (
    "bench_newton_schulz.py", "bench_optimizer.py", "bench_schedules.py", "bench_muon_step.py",
    "bench_polar.py", "bench_distributed.py", "simulate_distributed.py")),
    *sorted((ROOT / "examples").glob("*.py"))]


def _git_status(*paths: str) -> str | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *paths],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("path", CLI_FILES, ids=lambda p: p.name)
def test_every_command_line_option_has_help(path):
    missing = [ast.unparse(n)[:80] for n in ast.walk(ast.parse(path.read_text()))
               if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "add_argument"
               and not any(k.arg == "help" for k in n.keywords)]
    assert not missing, f"{path.name}: options without help text: {missing}"


def test_bench_newton_schulz_writes_to_a_temp_folder_and_prints_it(capsys, monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_newton_schulz", ROOT / "bench" / "bench_newton_schulz.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "TINY", [(1, 16, 24)])
    monkeypatch.chdir(tmp_path)
    before = _git_status("bench", "examples")
    assert mod.main(["--device", "cpu", "--tiny", "--reps", "1", "--impl", "torch", "--impl", "loop"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower(), out  # a reader cannot interpret nan: "n/a on CPU" instead
    assert "n/a on CPU" in out
    csv = Path(out.split("CSV: ")[1].split()[0])
    assert csv.exists() and ROOT not in csv.parents and Path(tempfile.gettempdir()) in csv.parents
    if before is not None:
        assert _git_status("bench", "examples") == before


def test_main_job_legend_and_no_time_column_without_reps(capsys):
    main(["--m", "8", "--n", "16", "--reps", "0"])
    out = capsys.readouterr().out
    assert "ms/call" not in out and "σ_min, σ_max:" in out


def _study():
    spec = importlib.util.spec_from_file_location("_study", ROOT / "examples" / "_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_examples_write_to_a_temp_folder_unless_asked(tmp_path, capsys):
    import argparse

    S = _study()
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    S.add_output_args(ap)
    default = S.output_dir(ap.parse_args([]), "x")
    assert ROOT not in default.parents and default.exists()
    assert str(default) in capsys.readouterr().out  # the command says where its outputs went
    assert S.output_dir(ap.parse_args(["--out", str(tmp_path / "o")]), "x") == (tmp_path / "o").resolve()
    assert S.output_dir(ap.parse_args(["--write-results"]), "x") == ROOT / "examples"
    for bad in (["--write-results", "--out", str(tmp_path)], ["--write-results", "--quick"]):
        with pytest.raises(SystemExit):
            S.output_dir(ap.parse_args(bad), "x")


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_choose_their_output_folder_through_one_helper(path):
    """Every example decides where it writes through _study (temp folder by default, examples/ only
    with --write-results): no script saves under its own folder by itself."""
    src = path.read_text()
    if path.name == "_study.py":
        return
    assert "S.setup(" in src or "_study.output_dir(" in src, path.name
    assert "--no-write" not in src and "os.path.join(HERE" not in src and "HERE /" not in src, path.name
    assert "write_text(" not in src or "(out /" in src, path.name


def test_bf16_model_rows_of_aol_use_its_row_scaling():
    # The main job's bf16-model column runs each schedule's own input scaling: "aol" replaces the
    # Frobenius division by AOL row scaling, so its bf16-model error tracks its fp32 error. Measured on a
    # 256x256 Gaussian at 4 steps: fp32 0.0789, bf16 model 0.0792; dividing by ||G||_F instead gave 0.177.
    from fastortho.bench import gaussian, schedule_rows

    G = gaussian(256, 256).double()
    fp32 = schedule_rows(G, dtype="fp32", steps=[4], reps=0, schedules=["aol"])[0]["error"]
    bf16 = schedule_rows(G, dtype="bf16-model", steps=[4], reps=0, schedules=["aol"])[0]["error"]
    assert abs(bf16 - fp32) < 0.1 * fp32, (fp32, bf16)
