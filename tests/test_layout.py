"""The package's shape: the import graph of fastortho/ and kernels/ (installed as ``fastortho.kernels``) read
with ``ast``, and file sizes.

* ``kernels/`` never imports the rest of ``fastortho`` (kernels are leaves: a launcher imports them);
* no module inside ``fastortho`` imports the package face ``fastortho`` itself (``import fastortho`` or
  ``from fastortho import <not a submodule>``), not even inside a function: modules import the module
  that defines what they use;
* no import cycle among fastortho modules at module level;
* no source file is longer than 400 lines.

Today's exceptions are named below with the reason; anything else fails, and an exception that no
longer applies fails too (so the list only shrinks).
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
LONG_FILES = {
    "fastortho/muon_step.py": "fused momentum/apply wrappers; the op layer (fastortho/ops.py) replaces it",
    "fastortho/optim/qk_clip.py": "QKClip (MuonClip), to be split into layouts / observer / rescale",
    "kernels/aot.py": "ahead-of-time kernel tooling; moves out of the kernel sources with the kernels/ tree",
}
#: (importing module, imported module) pairs allowed against the first two rules, with why
ALLOWED_IMPORTS = {
    ("fastortho.orthogonalize", "fastortho"): "ns_triton_available lives in the package face until the op "
                                              "layer (fastortho/ops.py) owns the Triton check",
    ("fastortho.kernels.aot", "fastortho.coefficients"): "AOT tooling traces newton_schulz's launches",
    ("fastortho.kernels.aot", "fastortho.orthogonalize"): "AOT tooling traces newton_schulz's launches",
    ("fastortho.kernels.aot", "fastortho.ns_triton"): "AOT tooling traces newton_schulz's launches",
    # the framework adapters are being written now; they should import fastortho.optim's Muon and
    # muon_param_groups, which fastortho re-exports
    ("fastortho.integrations", "fastortho"): "in progress: import from fastortho.optim",
    ("fastortho.integrations.lightning", "fastortho"): "in progress: import from fastortho.optim",
    ("fastortho.integrations.timm", "fastortho"): "in progress: import from fastortho.optim",
    ("fastortho.integrations.transformers", "fastortho"): "in progress: import from fastortho.optim",
}


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
            in_kernels = name.startswith("fastortho.kernels")
            wrong = (in_kernels and target.startswith("fastortho") and not target.startswith("fastortho.kernels")
                     or target == "fastortho")
            if wrong:
                if (name, target) in ALLOWED_IMPORTS:
                    used.add((name, target))
                else:
                    bad.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "imports that run back up to the package face (or from kernels/ into fastortho):\n" + \
        "\n".join(bad)
    assert used == ALLOWED_IMPORTS.keys(), f"allowed imports that no longer exist: {ALLOWED_IMPORTS.keys() - used}"


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
    assert LONG_FILES.keys() <= long.keys(), f"no longer over {MAX_LINES} lines, drop from LONG_FILES: " + \
        str(LONG_FILES.keys() - long.keys())


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
