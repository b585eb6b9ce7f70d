"""The package's shape: the import graph of fastortho/ and kernels/ (installed as ``fastortho.kernels``) read
with ``ast``, and file sizes.

* ``kernels/`` never imports the rest of ``fastortho`` (kernels are leaves: a launcher imports them);
* no module inside ``fastortho`` imports the package face ``fastortho`` itself (``import fastortho`` or
  ``from fastortho import <not a submodule>``), not even inside a function: modules import the module
  that defines what they use;
* no import cycle among fastortho modules at module level;
* no source file is longer than 400 lines.

Today's exceptions are named below with the reason; anything else fails, and an exception that no
longer applies is reported as a warning (drop it from the list).
"""
from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400

#: files longer than MAX_LINES today, each with why it is allowed for now
LONG_FILES: dict[str, str] = {}
#: modules of kernels/ allowed to import the rest of fastortho, with why
KERNEL_IMPORTS = {
    "fastortho.kernels.aot.trace": "AOT tooling, not a kernel: it traces newton_schulz's launches",
}
#: modules allowed to import the package face ``fastortho``, with why
FACE_IMPORTS: dict[str, str] = {}


def _stale(kind: str, listed: set[str], found: set[str]) -> None:
    """An exception that no longer applies is reported (not failed: the file's owner may be mid-change)."""
    if listed - found:
        warnings.warn(f"{kind}: no longer needed, drop from the list: {sorted(listed - found)}", stacklevel=2)


def _modules() -> dict[str, Path]:
    """Module name -> file, for fastortho/ and kernels/ (= fastortho.kernels, see setup.py)."""
    out = {}
    for base, pkg in ((ROOT / "fastortho", "fastortho"), (ROOT / "kernels", "fastortho.kernels")):
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str, module_level: bool) -> list[tuple[str, int]]:
    """(imported module, line) of every import in module ``name``; ``module_level``: only those that run
    at import time (not inside a function, not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if module_level and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    pkg = name if _is_package(name) else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{child.module}" if child.module else pkg
                else:
                    base = child.module or ""
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in MODULES else base, child.lineno))
            visit(child)

    visit(tree)
    return found


def test_the_module_map_covers_the_package():
    assert {"fastortho", "fastortho.optim.muon", "fastortho.optim.distributed.engine",
            "fastortho.kernels"} <= MODULES.keys()


def test_no_import_runs_back_up():
    bad, used = [], set()
    for name in MODULES:
        for target, line in _imports(name, module_level=False):
            into_fastortho = target.startswith("fastortho") and not target.startswith("fastortho.kernels")
            if name.startswith("fastortho.kernels") and into_fastortho:
                allowed = name in KERNEL_IMPORTS
            elif target == "fastortho":
                allowed = name in FACE_IMPORTS
            else:
                continue
            if allowed:
                used.add(name)
            else:
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "imports that run back up to the package face (or from kernels/ into fastortho):\n" + \
        "\n".join(bad)
    _stale("allowed imports", set(KERNEL_IMPORTS) | set(FACE_IMPORTS), used)


def test_no_import_cycle_at_module_level():
    graph = {name: sorted({t for t, _ in _imports(name, module_level=True) if t in MODULES and t != name})
             for name in MODULES}
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in graph:
        if v not in index:
            strong(v)
    cycles = [sorted(c) for c in comps if len(c) > 1]
    assert not cycles, f"module-level import cycles: {cycles}"


def test_no_source_file_exceeds_400_lines():
    long = {str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in MODULES.values()}
    long = {k: n for k, n in long.items() if n > MAX_LINES}
    assert long.keys() <= LONG_FILES.keys(), f"files over {MAX_LINES} lines: " + \
        str({k: n for k, n in long.items() if k not in LONG_FILES})
    _stale(f"LONG_FILES (now within {MAX_LINES} lines)", set(LONG_FILES), set(long))


@pytest.mark.parametrize("old, new, names", [
    ("fastortho.distributed", "fastortho.optim.distributed",
     ["STRATEGIES", "DistributedMuonEngine", "make_engine", "ns_flops", "shard_extents", "lpt_owners"]),
    ("fastortho.param_groups", "fastortho.optim.param_groups", ["muon_param_groups", "describe_param_groups"]),
])
def test_moved_modules_keep_a_deprecated_alias(old, new, names):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        alias = importlib.import_module(old)
    target = importlib.import_module(new)
    assert all(getattr(alias, n) is getattr(target, n) for n in names)


def test_package_face_exports_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import fastortho
        import fastortho.optim

        assert fastortho.describe_param_groups is fastortho.optim.describe_param_groups
        assert fastortho.muon_param_groups is fastortho.optim.muon_param_groups
