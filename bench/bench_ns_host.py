"""Host (Python) cost of one ``fastortho.newton_schulz`` call on the Triton backend, without a GPU.

Every Triton kernel of the Newton–Schulz launchers is replaced by a counting stub (nothing runs), and
G is a CPU tensor; the op layer's CUDA-only device check is told this is the interpreter. What is
left is the Python a call executes: argument checks, schedule lookup, the custom-op dispatcher,
allocations, config choice and the launches' argument handling (not Triton's own launch path, which
a GPU run measures). Prints launches per call and µs per call (min over repeats) for the single-
program small-matrix kernel and for the multi-kernel path (``newton_schulz_small.ENABLED = False``).

    python bench/bench_ns_host.py [--shape 64x128x128] [--calls 200] [--repeats 7]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch


@contextlib.contextmanager
def stubbed_kernels(count: dict):
    """Every JITFunction of the NS launcher modules becomes a stub that counts its launches."""
    import importlib

    from triton.runtime.jit import JITFunction

    import fastortho.ops.newton_schulz as op

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def run(*a, **k):
                count[self.name] = count.get(self.name, 0) + 1
            return run

    saved = []
    mods = [importlib.import_module(f"fastortho.kernels.{m}") for m in
            ("newton_schulz_launch", "newton_schulz_small", "newton_schulz_tma_launch", "newton_schulz_aol")
            if importlib.util.find_spec(f"fastortho.kernels.{m}")]
    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                saved.append((mod, name, obj))
                setattr(mod, name, Stub(name))
    saved.append((op, "interpreter_enabled", op.interpreter_enabled))
    op.interpreter_enabled = lambda: True       # the op's CPU check only; kernels see the real value
    try:
        yield count
    finally:
        for mod, name, obj in reversed(saved):
            setattr(mod, name, obj)


def measure(shape, *, small: bool, calls: int, repeats: int) -> tuple[dict, float]:
    """(launches per call, min µs per call) of newton_schulz(G, backend='triton', dtype=bf16)."""
    import fastortho
    import fastortho.kernels.newton_schulz_small as ns_small

    G = torch.randn(*shape, dtype=torch.bfloat16)
    count: dict = {}
    old = ns_small.ENABLED
    ns_small.ENABLED = small
    try:
        with stubbed_kernels(count):
            def call():
                return fastortho.newton_schulz(G, backend="triton", dtype=torch.bfloat16)
            call()
            per = {k: v for k, v in count.items()}
            count.clear()
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(calls):
                    call()
                best = min(best, (time.perf_counter() - t) / calls)
    finally:
        ns_small.ENABLED = old
    return per, best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x128x128")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    torch.set_num_threads(1)
    for small in (False, True):
        per, us = measure(shape, small=small, calls=args.calls, repeats=args.repeats)
        name = "single-program kernel" if small else "multi-kernel path"
        print(f"{args.shape} {name}: {sum(per.values())} launches/call {per}, {us:.1f} us/call (host, stubbed)")


if __name__ == "__main__":
    main()
