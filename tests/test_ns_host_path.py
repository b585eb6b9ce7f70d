"""Host-side choices of the Triton Newton–Schulz path, checked without a GPU: tile rows of batched
mid-size buckets, launches per call, and when a call replays a CUDA graph.

Launches are counted with every Triton kernel replaced by a counting stub (CPU tensors, no
interpreter: nothing runs), which is also how ``bench/RESULTS.md`` measures host overhead.
"""
from __future__ import annotations

import pytest
import torch

from fastortho.kernels import HAS_TRITON, interpreter_enabled

pytestmark = pytest.mark.skipif(not HAS_TRITON or interpreter_enabled(), reason="needs triton, no interpreter")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("k,L", [(512, 512), (512, 2048), (768, 3072), (1024, 1024)])
def test_mid_size_buckets_use_128_tiles(arch, k, L):
    """k ≥ 512: 128-wide tiles for both kernels (24 × 768×3072 had 64×64 symmetric tiles). The rows
    are entries of SYM_CONFIGS / APPLY_CONFIGS, which tests/test_kernels_compile.py compiles for
    sm_80 and sm_90 (zero spills, shared memory within the limit) in the default test set."""
    from fastortho.kernels._config import APPLY_CONFIGS, SYM_CONFIGS, pick_apply, pick_sym

    s, a = pick_sym(k, L, 2, arch, False), pick_apply(k, L, 2, arch, False)
    assert s.block_m == 128 and a.block_m == 128
    assert s in SYM_CONFIGS and a in APPLY_CONFIGS


@pytest.mark.parametrize("k,L", [(128, 128), (256, 1024)])
def test_small_outputs_keep_64_tiles(k, L):
    from fastortho.kernels._config import pick_apply, pick_sym

    assert pick_sym(k, L, 2, 90, False).block_m == 64 and pick_apply(k, L, 2, 90, False).block_m == 64


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches per kernel name; the kernels never run (``kernels.launch_stubs``)."""
    import fastortho.kernels.newton_schulz_launch as launch
    from fastortho.kernels.launch_stubs import counting_stubs

    monkeypatch.setattr(launch, "SYM_TMA", "off", raising=False)
    with counting_stubs() as count:
        yield count


@pytest.fixture
def multi_kernel(monkeypatch):
    """The multi-kernel path for every shape (small inputs otherwise take the single-program kernel)."""
    import fastortho.kernels.newton_schulz_small as small

    monkeypatch.setattr(small, "ENABLED", False)


def _call(shape, gram, monkeypatch, line3="triton", sumsq=None):
    from fastortho.coefficients import get_schedule
    from fastortho.ops.newton_schulz import _impl

    monkeypatch.setenv("FASTORTHO_NS_LINE3", line3)
    co, safety = get_schedule("polar_express")
    _impl(torch.zeros(shape), co, safety=safety, normalize="fro", eps=1e-7, compute_dtype=torch.bfloat16,
          out_dtype=torch.bfloat16, fp32_first_gram=False, gram=gram, sumsq=sumsq)


def test_launches_per_call_small_matrices(launches, monkeypatch):
    """64 × 128×128, 5 steps: one launch, the single-program kernel (kernels/newton_schulz_small.py), for
    both normalizations and a tall input; through the public function too."""
    _call((64, 128, 128), False, monkeypatch)
    _call((64, 128, 96), None, monkeypatch)
    assert launches == {"_ns_small_kernel": 2}
    launches.clear()
    _public_call(monkeypatch, (64, 128, 128), normalize="gram")
    assert launches == {"_ns_small_kernel": 1}


@pytest.mark.parametrize("qdt", [torch.float64, torch.float32])
def test_launches_per_call_small_matrices_with_sumsq(launches, monkeypatch, qdt):
    """A given sum of squares (Muon's momentum kernel computes it) keeps small buckets on the one-launch
    path: the kernel turns it into the scale itself (no norm pass, no separate scale kernel)."""
    _call((64, 128, 128), False, monkeypatch, sumsq=torch.ones(64, dtype=qdt))
    _call((64, 128, 96), None, monkeypatch, sumsq=torch.ones(64, dtype=qdt))
    assert launches == {"_ns_small_kernel": 2}
    launches.clear()
    _public_call(monkeypatch, (64, 128, 128), sumsq=torch.ones(64, dtype=qdt))
    assert launches == {"_ns_small_kernel": 1}


def _public_call(monkeypatch, shape, **kw):
    """fastortho.newton_schulz on a CPU tensor with stubbed kernels (the op's CUDA check told otherwise)."""
    import fastortho
    import fastortho.ops.newton_schulz as op

    monkeypatch.setattr(op, "interpreter_enabled", lambda: True)
    return fastortho.newton_schulz(torch.zeros(shape, dtype=torch.bfloat16), backend="triton", dtype=torch.bfloat16,
                                   **kw)


@pytest.mark.parametrize("kw", [dict(fp32_first_gram=True), dict(gram=True), dict(dtype=torch.float32)])
def test_small_kernel_not_taken(launches, monkeypatch, kw):
    """fp32_first_gram, forced Gram space and fp32 storage past k = 32 stay on the multi-kernel path."""
    import fastortho
    import fastortho.ops.newton_schulz as op

    monkeypatch.setattr(op, "interpreter_enabled", lambda: True)
    kw = dict(dict(dtype=torch.bfloat16), **kw)
    fastortho.newton_schulz(torch.zeros(2, 64, 128), backend="triton", **kw)
    assert "_ns_small_kernel" not in launches and launches.get("_sym_mm_kernel", 0) > 0


def test_small_kernel_shape_rule():
    """Eligibility from the shape, options and storage dtype only (never the batch)."""
    from fastortho.kernels.newton_schulz_small import small_eligible

    bf, f32 = torch.bfloat16, torch.float32
    assert small_eligible(128, 128, "fro", 5, bf) and small_eligible(1, 1024, "gram", 5, bf)
    assert small_eligible(32, 128, "fro", 5, f32) and not small_eligible(33, 128, "fro", 5, f32)
    assert not small_eligible(129, 256, "fro", 5, bf) and not small_eligible(64, 1025, "fro", 5, bf)
    assert not small_eligible(64, 64, "aol", 4, bf) and not small_eligible(64, 64, "fro", 0, bf)


def test_launches_per_call_multi_kernel_path(launches, multi_kernel, monkeypatch):
    """64 × 128×128, 5 steps, standard: norm pass 2 + cast 1 + 10 symmetric products + 5 applies = 18
    (bench/RESULTS.md). With line 3 on cuBLAS, 4 of the applies become torch.baddbmm calls."""
    _call((64, 128, 128), False, monkeypatch)
    assert launches == {"_sumsq_partial_kernel": 1, "_scale_kernel": 1, "_scale_cast_kernel": 1,
                        "_sym_mm_kernel": 10, "_apply_kernel": 5}
    launches.clear()
    _call((64, 128, 128), False, monkeypatch, line3="cublas")
    assert launches["_apply_kernel"] == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_zero_work_launches_are_skipped(launches, monkeypatch, enabled):
    import fastortho.kernels.newton_schulz_small as small

    monkeypatch.setattr(small, "ENABLED", enabled)
    for shape in [(0, 128, 128), (3, 0, 16), (3, 16, 0)]:
        _call(shape, False, monkeypatch)
    assert launches == {}


def test_cuda_graph_decision():
    """Graphs only when asked for, on CUDA, for small inputs, and never inside a capture or a compile."""
    from fastortho.ops.newton_schulz import GRAPH_MAX_NUMEL, use_cuda_graph

    n = 64 * 128 * 128
    assert use_cuda_graph("cuda", n, capturing=False, compiling=False, env="1")
    assert not use_cuda_graph("cuda", n, capturing=False, compiling=False, env=None)     # opt-in
    assert not use_cuda_graph("cuda", n, capturing=False, compiling=False, env="0")
    assert not use_cuda_graph("cuda", n, capturing=True, compiling=False, env="1")
    assert not use_cuda_graph("cuda", n, capturing=False, compiling=True, env="1")
    assert not use_cuda_graph("cpu", n, capturing=False, compiling=False, env="1")
    assert not use_cuda_graph("cuda", GRAPH_MAX_NUMEL + 1, capturing=False, compiling=False, env="1")
    assert not use_cuda_graph("cuda", 0, capturing=False, compiling=False, env="1")
    with pytest.raises(ValueError, match="FASTORTHO_NS_CUDA_GRAPHS must be '0' or '1'"):
        use_cuda_graph("cuda", n, capturing=False, compiling=False, env="yes")


def test_eager_calls_skip_the_dispatcher_only_when_nothing_intercepts():
    """newton_schulz_triton calls the op's body directly (no custom-op dispatcher) for plain eager tensors,
    and goes through the op under autograd, fake tensors, meta tensors and dispatch modes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastortho.ops.newton_schulz import _plain_eager

    G = torch.zeros(2, 8, 8)
    assert _plain_eager(G, None) and _plain_eager(G, torch.ones(2, dtype=torch.float64))
    assert not _plain_eager(G.clone().requires_grad_(), None)
    assert not _plain_eager(G, torch.ones(2, requires_grad=True))
    assert not _plain_eager(torch.zeros(2, 8, 8, device="meta"), None)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not _plain_eager(G, None)
    with FakeTensorMode() as mode:
        assert not _plain_eager(mode.from_tensor(G), None)
    assert _plain_eager(G, None)
