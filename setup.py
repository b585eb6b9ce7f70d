"""Build script: the pure-Python package, plus the optional ``fastortho._C`` extension.

``kernels/`` (Triton sources) is installed as ``fastortho.kernels`` through ``package_dir``,
so a checkout never shadows the installed package with a top-level ``kernels`` module.

Environment switches:
  FASTORTHO_BUILD_EXT   "0" skips ``fastortho._C`` (pure-Python wheel); "1" requires it.
                        Unset: build it when torch is importable and a C++ compiler exists.
  FASTORTHO_CUDA        "0" builds the CPU-only extension even when CUDA torch and nvcc exist;
                        "1" requires the CUDA flavour. Unset: CUDA when torch.version.cuda and nvcc exist.
  TORCH_CUDA_ARCH_LIST  defaults to "8.0;9.0+PTX": SASS for A100 and H100, plus sm_90 PTX that the driver
                        JIT-compiles on newer GPUs (Blackwell sm_100/sm_120), which would otherwise fail
                        with "no kernel image is available". Costs one more device-code compile at build.
  MAX_JOBS              parallel compile jobs (ninja).
  CUDA_HOME             the toolkit root (the folder whose lib64 holds libcudart). When unset it is
                        derived from nvcc, following wrapper scripts (``exec /path/to/nvcc``) and
                        symlinks, because torch's own guess (nvcc's parent folder) is wrong for them.

Install for development with ``pip install --no-build-isolation -e .`` (the extension is compiled
against the torch already in the environment).
"""
from __future__ import annotations

import os
import re
import shutil
import site
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Subpackages are found, not listed, so that a new fastortho/<sub>/ is never left out of the wheel.
PACKAGES = [
    "fastortho",
    *(f"fastortho.{p}" for p in find_packages(os.path.join(HERE, "fastortho"))),
    "fastortho.kernels",
    *(f"fastortho.kernels.{p}" for p in find_packages(os.path.join(HERE, "kernels"))),
]
PACKAGE_DIR = {"fastortho": "fastortho", "fastortho.kernels": "kernels"}


def _env_flag(name: str) -> bool | None:
    """None when unset or empty; True for 1/true/yes/on; False for 0/false/no/off; else an error."""
    v = os.environ.get(name, "").strip().lower()
    if v == "":
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"setup.py: {name}={os.environ[name]!r} is not one of 0/1")


def _log(msg: str) -> None:
    print(f"[fastortho setup] {msg}", file=sys.stderr)


def _toolkit_root_from_nvcc(nvcc: str) -> str | None:
    """The CUDA toolkit root behind ``nvcc``: follows symlinks and one-line ``exec`` wrapper scripts."""
    path = os.path.realpath(nvcc)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            m = re.search(rb"exec\s+\"?([^\s\"]+/nvcc)\b", head)
            if m:
                path = os.path.realpath(m.group(1).decode())
    except OSError:
        return None
    root = os.path.dirname(os.path.dirname(path))
    for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(root, lib, "libcudart.so")) or os.path.exists(
            os.path.join(root, lib, "libcudart_static.a")
        ):
            return root
    return None


def _find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = [nvcc] if nvcc else []
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.exists(c):
            root = _toolkit_root_from_nvcc(c)
            if root:
                return root
    return None


def _nvidia_wheel_includes() -> list[str]:
    """Header folders of the nvidia-* wheels torch depends on (cuSPARSE/cuBLAS headers for ATen)."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # old virtualenv
        pass
    out = []
    for r in sorted(roots):
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            p = os.path.join(r, sub)
            if os.path.isdir(p) and p not in out:
                out.append(p)
    return out


def _extensions():
    """([ext], cmdclass) for fastortho._C, or ([], {}) when it is skipped."""
    want = _env_flag("FASTORTHO_BUILD_EXT")
    want_cuda = _env_flag("FASTORTHO_CUDA")
    if want is False:
        _log("FASTORTHO_BUILD_EXT=0: pure-Python build, no fastortho._C")
        return [], {}

    def skip(reason: str):
        if want:
            raise SystemExit(f"setup.py: FASTORTHO_BUILD_EXT=1 but fastortho._C cannot be built: {reason}")
        _log(f"skipping fastortho._C: {reason}")
        return [], {}

    try:
        import torch
    except ImportError as exc:
        return skip(f"torch is not importable at build time ({exc}); install with --no-build-isolation")
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if not shutil.which(cxx.split()[0]) and not shutil.which("c++") and not shutil.which("g++"):
        return skip("no C++ compiler found")

    cuda_home = None
    use_cuda = False
    if want_cuda is not False:
        cuda_home = _find_cuda_home()
        reasons = []
        if not torch.version.cuda:
            reasons.append("torch is a CPU build")
        if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
            reasons.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
        if reasons:
            if want_cuda:
                raise SystemExit("setup.py: FASTORTHO_CUDA=1 but " + "; ".join(reasons))
            _log("CPU-only fastortho._C: " + "; ".join(reasons))
        else:
            use_cuda = True
            os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is imported below
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    from torch.utils import cpp_extension

    cxx_flags = [
        "-O3",
        # Separate roundings in csrc/muon_step.h must stay separate (bit-exact twins of torch's ops).
        "-ffp-contract=off",
        "-fvisibility=hidden",
        "-g0",  # Python's CFLAGS add -g: debug info triples the object size and slows the build
    ]
    sources = ["csrc/fastortho.cpp", "csrc/cpu/muon_step.cpp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    define_macros: list = []
    if use_cuda:
        if cpp_extension.CUDA_HOME != cuda_home:
            cpp_extension.CUDA_HOME = cuda_home  # torch read the environment before we set it
        sources += ["csrc/cuda/bindings.cpp", "csrc/cuda/muon_step.cu"]
        include_dirs += _nvidia_wheel_includes()
        nvcc_flags = [
            "-O3",
            # explicit fmaf() only: a*b+c must not be contracted (see csrc/muon_step.h)
            "--fmad=false",
            "-lineinfo",
            "-Xptxas=-v" if os.environ.get("FASTORTHO_PTXAS_VERBOSE") == "1" else "-Xptxas=-O3",
        ]
        ext = cpp_extension.CUDAExtension(
            "fastortho._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros + [("FASTORTHO_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
        _log(f"building fastortho._C with CUDA kernels (CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = cpp_extension.CppExtension(
            "fastortho._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
        _log("building CPU-only fastortho._C")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
