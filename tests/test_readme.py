"""README.md's Python code runs as written: every ```python block is executed in a fresh namespace.

A block that cannot run in a test (it needs a process group, say) is preceded by the line
``<!-- readme-test: skip (reason) -->``; the reason is required and the skipped blocks are listed, so
none disappears silently. The training-loop example must show its loss falling.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+?)\) -->")


def python_blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) for every ```python block of README.md."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            prev = lines[i - 1] if i > 0 else ""
            m = SKIP.search(prev)
            blocks.append((start + 1, "\n".join(lines[start:j]), m.group(1) if m else None))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks()


def test_readme_has_the_blocks_we_expect():
    runnable = [code for _, code, why in BLOCKS if why is None]
    skipped = [why for _, _, why in BLOCKS if why is not None]
    assert len(runnable) >= 3, "Quick start, training loop and migration snippet must run"
    # Only the distributed snippets may skip; a new skip must be a deliberate change here.
    assert len(skipped) <= 2, skipped
    assert all("process group" in why for why in skipped), skipped
    # A skip marker that is not directly above a ```python fence would silently do nothing.
    text = README.read_text()
    assert len(SKIP.findall(text)) == len(skipped)


@pytest.mark.parametrize("line,code", [(ln, c) for ln, c, why in BLOCKS if why is None],
                         ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs(line, code, tmp_path, monkeypatch, capsys):
    # One thread: these blocks use small matrices, where a second thread only adds contention on a
    # shared CI machine. The cwd is a temporary folder so that a block writing files cannot touch
    # the checkout.
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ns: dict = {"__name__": "__readme__"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, f"README.md:{line}", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    # A README example that makes fastortho warn (e.g. a head it cannot find) teaches the wrong thing.
    ours = [w for w in caught if "fastortho" in str(w.message) or "muon_param_groups" in str(w.message)
            or "fastortho" in (w.filename or "")]
    assert not ours, [str(w.message) for w in ours]
    if "losses" in ns:  # the training loop: the loss must visibly fall
        losses = ns["losses"]
        assert len(losses) >= 100
        # measured: 2.84 -> 0.009 over 200 steps (first 10 mean 2.8, last 10 mean < 0.02)
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        assert last < 0.1 * first, (first, last)
        assert "accuracy on all 289 pairs: 100%" in out, out
    if "fastortho.polar(G)" in code:  # the Quick start shows its output
        assert out.count("error") == 3, out
        qdwh = float(re.search(r"QDWH\s+error (\S+)", out).group(1))
        assert qdwh < 1e-5, out  # measured 3.5e-7..3.8e-7 (thread count); float32 QDWH is ~u·κ


def test_training_loop_is_in_the_readme():
    codes = [c for _, c, why in BLOCKS if why is None]
    loop = [c for c in codes if "losses" in c]
    assert len(loop) == 1
    for needed in ("muon_param_groups", "fastortho.Muon(", "lr_scheduler", ".backward()", ".step()",
                   "zero_grad", "torch.save", "load_state_dict"):
        assert needed in loop[0], needed


def test_readme_ci_statement_matches_the_ci_script():
    """README says what .ci/run adds to its two blocks; that statement must stay true."""
    ci = (README.parent / ".ci" / "run").read_text()
    exported = [kv for line in re.findall(r"^export (.+)$", ci, flags=re.M) for kv in line.split()]
    text = README.read_text()
    para = text[text.index("CI (`.ci/run`) runs these two blocks"):].split("\n\n")[0]
    assert exported and all(kv in para for kv in exported), (exported, para)
    extra = re.findall(r"^\.venv/bin/python -m (pytest .+)$", ci, flags=re.M)
    assert extra and all(cmd in para for cmd in extra), (extra, para)
    assert "exactly these" not in text


def test_results_open_with_a_summary_that_readme_and_docs_link_to():
    root = README.parent
    results = (root / "bench" / "RESULTS.md").read_text()
    headings = [ln for ln in results.splitlines() if ln.startswith("## ")]
    assert headings[0] == "## Summary"
    summary = results.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert len(summary.splitlines()) <= 40, "the summary must fit on one screen"
    rows = [ln for ln in summary.splitlines() if ln.startswith("| ") and not ln.startswith("| what")]
    assert all(ln.count("|") == 7 for ln in rows)  # what | result | against | machine | date | command
    assert all("prediction" in ln or "not measured" in ln for ln in rows if "GPU" in ln.split("|")[1])
    assert not [h for h in headings if re.search(r"\(issue \d", h)], "internal issue labels in headings"
    assert "bench/RESULTS.md#summary" in README.read_text()
    assert "RESULTS.md#summary" in (root / "docs" / "optimizer.md").read_text()


def test_ci_setup_installs_the_extras_the_tests_need():
    """CI runs README's ci:setup block verbatim: the adapter tests (tests/test_integrations.py) skip a
    framework that is not installed, so without the ``integrations`` extra CI would skip them all."""
    text = README.read_text()
    block = text[text.index("<!-- ci:setup -->"):].split("```bash", 1)[1].split("```", 1)[0]
    extras = re.search(r'-e "\.\[([a-z,]+)\]"', block)
    assert extras, block
    assert {"test", "triton", "integrations"} <= set(extras.group(1).split(",")), block
