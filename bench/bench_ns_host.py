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
    """Every kernel of the NS launcher modules becomes a counting stub (``kernels.launch_stubs``), and the
    op's CUDA-only device check is told this is the interpreter (the kernels see the real value)."""
    import fastortho.ops.newton_schulz as op
    from fastortho.kernels.launch_stubs import counting_stubs

    saved = op.interpreter_enabled
    op.interpreter_enabled = lambda: True
    try:
        with counting_stubs(count):
            yield count
    finally:
        op.interpreter_enabled = saved


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
