"""The package installs like a user gets it: a wheel with fastortho and fastortho.kernels, importable
without triton, a compiler or a GPU, that ships its licence and type marker and states one version."""
import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, FASTORTHO_BUILD_EXT="0")  # the pure-Python wheel: no compiler involved
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True, env=env, capture_output=True, text=True,
    )
    (whl,) = out.glob("fastortho-*.whl")
    return whl


def test_wheel_imports_in_a_clean_venv(wheel, tmp_path):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "fastortho/__init__.py" in names and "fastortho/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must install as fastortho.kernels"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
        capture_output=True, text=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, str(wheel)],
        check=True, capture_output=True, text=True,
    )
    # torch comes from the test environment's site-packages, appended *after* the clean venv's, so
    # this environment's editable fastortho (a .pth hook there) is never activated.
    here = sysconfig.get_paths()["purelib"]
    (Path(site) / "_torch_from_test_env.pth").write_text(here + "\n")
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import must work without triton
        import fastortho, fastortho.kernels, torch
        assert fastortho.__file__.startswith(sys.prefix), fastortho.__file__
        assert not fastortho.ns_triton_available()
        X = fastortho.newton_schulz(torch.randn(8, 12))
        print(fastortho.__file__, tuple(X.shape))
        """
    )
    res = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(8, 12)" in res.stdout


def test_wheel_ships_license_and_py_typed(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "fastortho/py.typed" in names, "type checkers need the PEP 561 marker in the wheel"
    licenses = [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[-1] == "LICENSE"]
    assert licenses, f"LICENSE missing from the wheel's .dist-info: {names}"
    text = zipfile.ZipFile(wheel).read(licenses[0]).decode()
    assert text.startswith("MIT License")


def test_wheel_metadata_has_one_version_and_authors(wheel):
    import email
    import zipfile

    zf = zipfile.ZipFile(wheel)
    (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(zf.read(meta_name))
    ns: dict = {}
    exec((ROOT / "fastortho" / "_version.py").read_text(), ns)
    assert meta["Version"] == ns["__version__"]
    assert f"-{ns['__version__']}-" in wheel.name
    # the version is written once: fastortho/_version.py (pyproject.toml reads it, __init__ imports it)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert '__version__ = "' not in (ROOT / "fastortho" / "__init__.py").read_text()
    # There is no public repository yet: a Project-URL would point at a page that does not exist.
    assert not meta.get_all("Project-URL"), "no public remote yet: add project URLs together with it"
    assert meta["Author"] or meta["Author-email"], "authors missing from the metadata"
    assert meta["License-Expression"] == "MIT"


def test_wheel_metadata_declares_the_extras(wheel):
    import email
    import zipfile

    zf = zipfile.ZipFile(wheel)
    (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(zf.read(meta_name))
    assert {"test", "triton", "examples", "integrations"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    # torch's common_optimizers imports expecttest (tests/test_torch_optim_suite.py uses a stand-in
    # only when it is absent)
    assert any(r.startswith("expecttest") and 'extra == "test"' in r for r in requires), requires


def test_integrations_extra_installs_every_framework_the_adapter_tests_need():
    """CI installs ``.[integrations]`` (README's ci:setup), so none of the adapter tests may skip there
    for a missing framework: the extra must name every module tests/test_integrations.py imports."""
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in extras["integrations"]}
    adapters = (ROOT / "tests" / "test_integrations.py").read_text()
    needed = set(re.findall(r'importorskip\("([A-Za-z_]+)', adapters))
    assert needed, "tests/test_integrations.py no longer uses importorskip: update this test"
    assert needed <= names, (needed - names, names)
