"""Tests of the Triton kernels under the CPU interpreter.

They need ``TRITON_INTERPRET=1`` before Triton decorates the kernels, i.e. before anything
imports ``fastortho.kernels``; ``tests/test_kernels_interpret.py`` runs this folder in a
subprocess with that variable set. In any other process (a plain ``pytest tests``) the folder
is not collected, so other test files keep importing fastortho normally.
"""
import os

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    collect_ignore_glob = ["test_*.py"]
