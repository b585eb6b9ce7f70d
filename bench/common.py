"""Shared benchmark helpers: a timer with percentiles, a device/version string, a CSV writer.

Generic on purpose (used by every ``bench/bench_*.py``); import it as ``from common import ...`` when
running a script from ``bench/`` or as ``bench.common`` from the repo root.

* ``timeit(fn, ...)``: runs ``fn`` after warm-up, returns a :class:`Timing` (p20/p50/p80 in
  milliseconds). On CUDA it times with events around each call (no host overhead in the number,
  but the stream is synchronized once per sample); on CPU with ``time.perf_counter``.
* ``device_string(device)``: "NVIDIA H100 80GB HBM3 | torch 2.x+cu130 | CUDA 13.0 | triton 3.x" or the
  CPU model and thread count; every result row should carry it.
* ``write_csv(path, rows)``: appends dict rows, writing the header when the file is new.
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

__all__ = ["Timing", "timeit", "device_string", "write_csv", "gbps", "tflops", "sync"]


@dataclass(frozen=True)
class Timing:
    """Percentiles of the per-call time in milliseconds, and how many samples made them."""

    p20: float
    p50: float
    p80: float
    n: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def sync(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    # linear interpolation between closest ranks (numpy's default)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def timeit(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    reps: int = 20,
    min_time_s: float = 0.0,
    max_time_s: float = 30.0,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``reps`` timed calls.

    ``setup`` (untimed) runs before every call, e.g. to restore in-place-updated state. Sampling stops
    early after ``max_time_s`` of wall time (at least 3 samples), and continues past ``reps`` until
    ``min_time_s`` has elapsed.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    samples: list[float] = []
    t_start = time.perf_counter()
    while True:
        if setup is not None:
            setup()
        if cuda:
            sync(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - t_start
        if len(samples) >= 3 and elapsed > max_time_s:
            break
        if len(samples) >= reps and elapsed >= min_time_s:
            break
    return Timing(_percentile(samples, 0.2), statistics.median(samples), _percentile(samples, 0.8), len(samples))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_string(device: torch.device | str = "cpu") -> str:
    """One line naming the hardware and the software versions a number was measured with."""
    device = torch.device(device)
    parts = []
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    else:
        parts.append(f"{_cpu_name()} ({torch.get_num_threads()} threads)")
    parts.append(f"torch {torch.__version__}")
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    return " | ".join(parts)


def write_csv(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append ``rows`` (dicts with the same keys) to ``path``; the header is written for a new file."""
    rows = list(rows)
    if not rows:
        return
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            w.writeheader()
        w.writerows(rows)


def gbps(nbytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes) for ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    """Achieved TFLOP/s for ``flops`` in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12
