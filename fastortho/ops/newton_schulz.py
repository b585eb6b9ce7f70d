"""Triton backend of :func:`fastortho.newton_schulz`: the op ``fastortho::newton_schulz_triton``.

Fused bf16 kernels, standard or Gram-space.

For G (B, m, n) the iteration runs on the short side: X is the logical wide view of G (k = min(m, n)
rows; ``G.mT`` for tall inputs, a stride swap, never a copy). Per matrix

    X₀ = G / max(safety·ν, eps),   ν = ‖G‖_F ("fro") or ‖GGᵀ‖_F^{1/2} ≥ σ_max ("gram"),
    for (a, b, c) in coefficients:  A = XXᵀ,  B = b·A + c·A²,  X ← a·X + B·X,

with X, A, B stored in ``compute_dtype`` and every matmul accumulated in fp32; each linear
combination is formed in fp32 and rounded once (kernels in ``fastortho.kernels.newton_schulz``).
The Gram-space variant (``gram=True``; automatic for long/short ≥ 1.5 and k ≥ 256) iterates on
the k×k Gram matrix with restarts and touches X only at restarts and at the end
(``fastortho.kernels.newton_schulz_iteration``); with bf16 requested it stores in fp16, which it needs.

No host synchronization: norms and scales stay on the device; a zero matrix gives zeros (ν is
clamped by eps), NaN/Inf in G give NaN in that matrix's output. Each matrix is computed by the
same programs whatever the batch, so outputs are bit-identical alone or batched.

Host cost: small inputs (short side k ≤ 128, 32 in fp32 storage; long side ≤ 1024; standard space,
"fro" or "gram", with or without ``sumsq``; e.g. 64 × 128×128) run the whole iteration as one
launch, one program per matrix (``fastortho.kernels.newton_schulz_small``). Larger inputs take the
multi-kernel path: a 5-step standard call is 18 launches from Python (norm pass 2, cast 1, 10
symmetric products, 5 applies; 17 with a given ``sumsq``: one launch turns it into the scale). With
``FASTORTHO_NS_CUDA_GRAPHS=1`` calls of at most ``GRAPH_MAX_NUMEL`` elements on CUDA replay one
captured graph per call signature instead (copy in, replay, copy out), except while a graph is
being captured or compiled (:func:`use_cuda_graph`). Opt-in until a GPU run measures it.
Line 3 of the standard step may go to cuBLAS (``FASTORTHO_NS_LINE3``, see
``fastortho.kernels.newton_schulz_launch.line3_backend``).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from fastortho.kernels import interpreter_enabled

from ._load import triton_available

__all__ = ["newton_schulz_triton", "use_cuda_graph", "use_gram"]

GRAM_MIN_ASPECT = 1.5   # Gram-space needs 6k²L + 14k³ vs 15k²L + 5k³ (5 steps): wins for L > k
GRAM_MIN_SHORT = 256    # below this the extra k×k launches cost more than the FLOPs saved


def use_gram(m: int, n: int) -> bool:
    """Automatic choice: Gram-space NS when long/short ≥ 1.5 and the short side ≥ 256."""
    k, L = min(m, n), max(m, n)
    return k >= GRAM_MIN_SHORT and L >= GRAM_MIN_ASPECT * k


#: Opt-in CUDA graphs for small calls: "1" replays one captured graph per (shape, strides, dtypes,
#: coefficients, options, device) instead of launching the multi-kernel path's ~18 kernels (a small
#: input's single launch) from Python; "0"/unset: never.
GRAPHS_ENV = "FASTORTHO_NS_CUDA_GRAPHS"
#: Largest input (elements) that is graphed: above it the kernels' run time hides the launch cost.
GRAPH_MAX_NUMEL = 1 << 21
GRAPH_CACHE_SIZE = 32        # graphs kept (least recently used evicted), each holding its buffers
_GRAPHS: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor | None]] = {}


def use_cuda_graph(device_type: str, numel: int, *, capturing: bool, compiling: bool, env: str | None) -> bool:
    """Whether a call replays a cached CUDA graph: only when asked for (``env`` = "1", the value of
    ``FASTORTHO_NS_CUDA_GRAPHS``), on CUDA, for inputs of at most ``GRAPH_MAX_NUMEL`` elements, and
    never while a graph is already being captured (the caller's graph must record the kernels
    themselves) or traced by torch.compile."""
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{GRAPHS_ENV} must be '0' or '1', got {env!r}")
    return env == "1" and device_type == "cuda" and 0 < numel <= GRAPH_MAX_NUMEL and not capturing \
        and not compiling


def _graphed(G: Tensor, coefficients, kw: dict) -> Tensor:
    """_impl through one CUDA graph per call signature: copy G into the graph's static input,
    replay (one launch for the ~18 kernels of a 5-step multi-kernel call), return a copy of the static output.
    The first call of a signature runs _impl once on a side stream (Triton compiles, configs are
    chosen) and then captures it."""
    sumsq = kw.get("sumsq")          # a tensor input like G: a static copy, refilled at every replay
    key = (tuple(G.shape), G.stride(), G.dtype, G.device, tuple(map(tuple, coefficients)),
           tuple(sorted((k, v) for k, v in kw.items() if k != "sumsq")), os.environ.get("FASTORTHO_NS_LINE3", ""),
           None if sumsq is None else sumsq.dtype)
    hit = _GRAPHS.pop(key, None)
    if hit is None:
        static_in = torch.empty_strided(G.shape, G.stride(), dtype=G.dtype, device=G.device)
        static_in.copy_(G)
        if sumsq is not None:
            kw = dict(kw, sumsq=sumsq.clone())
        side = torch.cuda.Stream(device=G.device)
        side.wait_stream(torch.cuda.current_stream(G.device))
        with torch.cuda.stream(side):
            _impl(static_in, coefficients, **kw)           # warm-up: compile and choose configs
        torch.cuda.current_stream(G.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = _impl(static_in, coefficients, **kw)
        hit = (graph, static_in, static_out, kw.get("sumsq"))
        while len(_GRAPHS) >= GRAPH_CACHE_SIZE:
            _GRAPHS.pop(next(iter(_GRAPHS)))
    _GRAPHS[key] = hit                                      # most recently used last
    graph, static_in, static_out, static_sumsq = hit
    static_in.copy_(G)
    if sumsq is not None:
        static_sumsq.copy_(sumsq)
    graph.replay()
    return static_out.clone()


def _impl_maybe_graphed(G: Tensor, coefficients: Sequence[tuple[float, float, float]], **kw) -> Tensor:
    if use_cuda_graph(G.device.type, G.numel(), capturing=G.device.type == "cuda" and
                      torch.cuda.is_current_stream_capturing(), compiling=torch.compiler.is_compiling(),
                      env=os.environ.get(GRAPHS_ENV)):
        with torch.cuda.device(G.device):
            return _graphed(G, coefficients, kw)
    return _impl(G, coefficients, **kw)


def _plain_eager(G: Tensor, sumsq: Tensor | None) -> bool:
    """True when calling the op's body directly is indistinguishable from calling the op: a plain tensor
    (no subclass, fake, functorch or meta tensor), no autograd to record, and nothing that intercepts ops
    (torch.compile / torch.jit tracing, a TorchDispatchMode or TorchFunctionMode). Then the custom-op
    dispatcher would only forward to the body, and skipping it is most of a small call's host cost."""
    # is_compiling first: under torch.compile it is a constant True and nothing after it is traced
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and type(G) is Tensor and G.device.type != "meta" and not G.requires_grad
            and (sumsq is None or (type(sumsq) is Tensor and not sumsq.requires_grad))
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._functorch.is_functorch_wrapped_tensor(G))


_SMALL: list = [None]   # fastortho.kernels.newton_schulz_small, imported on first use (needs triton)


def _small_module():
    from fastortho.kernels import newton_schulz_small

    _SMALL[0] = newton_schulz_small
    return newton_schulz_small


def _impl(G: Tensor, coefficients: Sequence[tuple[float, float, float]], *, safety: float, normalize: str,
          eps: float, compute_dtype: torch.dtype, out_dtype: torch.dtype, fp32_first_gram: bool,
          gram: bool | None, sumsq: Tensor | None = None) -> Tensor:
    B, m, n = G.shape
    # Small matrices (k ≤ 128): the whole standard iteration in one launch, one program per matrix
    # (kernels/newton_schulz_small.py); eligibility depends on the shape, options and dtypes only.
    small = _SMALL[0] or _small_module()
    # A given sumsq stays on this path: the kernel forms the scale from it (the scale kernel's formula).
    if (small.ENABLED and not fp32_first_gram and not (use_gram(m, n) if gram is None else gram)
            and small.small_eligible(min(m, n), max(m, n), normalize, len(coefficients), compute_dtype)):
        return small.run(G, coefficients, safety=safety, normalize=normalize, eps=eps, cdt=compute_dtype,
                         out_dtype=out_dtype, sumsq=sumsq)
    from fastortho.kernels.newton_schulz_iteration import ns_gram, ns_standard

    out = torch.empty(B, m, n, device=G.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    tall = m > n
    Gv = G.mT if tall else G
    if gram is None:
        gram = use_gram(m, n)
    if gram and compute_dtype == torch.bfloat16:
        compute_dtype = torch.float16
    # The last step writes the result rounded to compute_dtype; write straight into `out` when the dtypes
    # agree, else into a compute_dtype buffer converted once (the rounding torch.to would do).
    res = out if out_dtype == compute_dtype else torch.empty(B, m, n, device=G.device, dtype=compute_dtype)
    resv = res.mT if tall else res
    run = ns_gram if gram else ns_standard
    # Triton launches on the current device; custom_op adds no device guard, so a tensor on
    # cuda:1 while cuda:0 is current needs one (it then runs on cuda:1's current stream).
    guard = torch.cuda.device(G.device) if G.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        run(Gv, resv, list(coefficients), normalize=normalize, safety=safety, eps=eps,
            cdt=compute_dtype, fp32_first=fp32_first_gram, sumsq=sumsq)
    if res is not out:
        out.copy_(res)
    return out


if triton_available():
    @torch.library.custom_op("fastortho::newton_schulz_triton", mutates_args=())
    def _ns_op(G: Tensor, a: list[float], b: list[float], c: list[float], safety: float, normalize: str,
               eps: float, compute_dtype: torch.dtype, out_dtype: torch.dtype, fp32_first_gram: bool,
               gram: bool | None, sumsq: Tensor | None = None) -> Tensor:
        """gram: None chooses by shape (:func:`use_gram`), True Gram-space, False standard; sumsq: (B,)
        ‖G_b‖_F² replacing the norm pass, or None."""
        return _impl_maybe_graphed(G, list(zip(a, b, c)), safety=safety, normalize=normalize, eps=eps,
                                   compute_dtype=compute_dtype, out_dtype=out_dtype,
                                   fp32_first_gram=fp32_first_gram, gram=gram, sumsq=sumsq)

    @_ns_op.register_fake
    def _ns_fake(G, a, b, c, safety, normalize, eps, compute_dtype, out_dtype, fp32_first_gram, gram, sumsq=None):
        return G.new_empty(G.shape, dtype=out_dtype)


def newton_schulz_triton(G: Tensor, coefficients: Sequence[tuple[float, float, float]], *, safety: float,
                         normalize: Literal["fro", "gram"], eps: float, compute_dtype: torch.dtype,
                         out_dtype: torch.dtype, fp32_first_gram: bool = False,
                         gram: bool | None = None, sumsq: Tensor | None = None) -> Tensor:
    """Newton–Schulz on a batch G (B, m, n) with the fused Triton kernels (module docstring).

    Args:
        G: (B, m, n), any float dtype and strides; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        coefficients: per-step (a, b, c) of p(σ) = aσ + bσ³ + cσ⁵.
        safety, eps: X₀ = G / max(safety·ν, eps).
        normalize: "fro" (ν = ‖G‖_F) or "gram" (ν = ‖GGᵀ‖_F^{1/2}, free from the first Gram), or "aol":
            AOL row scaling X₀ = D·G, D_ii = 1/max(√(Σ_j |(GGᵀ)_ij|), eps), from the first Gram
            product, which step 1 reuses as D·GGᵀ·D (``safety`` unused; standard and Gram-space).
        compute_dtype: storage of X and the k×k matrices (bfloat16, float16 or float32).
        out_dtype: dtype of the result (the compute_dtype result is converted once).
        fp32_first_gram: form the first Gram product from G in fp32 (no bf16 input-rounding floor).
        gram: True/False force Gram-space/standard NS; None chooses by shape (:func:`use_gram`).
        sumsq: (B,) float64 or float32 ‖G_b‖_F² on G's device (``normalize="fro"`` only): the scale
            s = 1/max(safety·√sumsq, eps) is formed from it and the norm pass over G is skipped.

    Returns:
        (B, m, n) tensor in ``out_dtype``; G is not modified.
    """
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install triton)")
    if G.dim() != 3:
        raise ValueError(f"newton_schulz_triton expects a 3-D (B, m, n) tensor, got shape {tuple(G.shape)}")
    if G.device.type not in ("cuda", "meta") and not interpreter_enabled():
        raise RuntimeError(f"backend='triton' needs a CUDA tensor (got {G.device}); CPU tensors run only "
                           "under the Triton interpreter (TRITON_INTERPRET=1 set before import)")
    if not G.is_floating_point():
        raise TypeError(f"newton_schulz_triton expects a floating-point tensor, got {G.dtype}")
    if normalize not in ("fro", "gram", "aol"):
        raise ValueError(f"normalize must be 'fro', 'gram' or 'aol', got {normalize!r}")
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype}")
    if G.dtype == torch.float64:     # kernels read at most fp32; the scale is applied in fp32
        G = G.float()
    if sumsq is not None:
        if normalize != "fro":
            raise ValueError(f"sumsq is ‖G‖_F², the scale of normalize='fro' only, got normalize={normalize!r}")
        if sumsq.shape != G.shape[:1] or sumsq.dtype not in (torch.float32, torch.float64) or sumsq.device != G.device:
            raise ValueError(f"sumsq must be a ({G.shape[0]},) float64 or float32 tensor on {G.device}, got "
                             f"{tuple(sumsq.shape)} {sumsq.dtype} on {sumsq.device}")
        sumsq = sumsq.contiguous()
    co = [tuple(float(v) for v in t) for t in coefficients]
    if _plain_eager(G, sumsq):   # the op's body without the dispatcher (≈ 15 µs a call)
        return _impl_maybe_graphed(G, co, safety=float(safety), normalize=normalize, eps=float(eps),
                                   compute_dtype=compute_dtype, out_dtype=out_dtype,
                                   fp32_first_gram=bool(fp32_first_gram), gram=None if gram is None else bool(gram),
                                   sumsq=sumsq)
    return torch.ops.fastortho.newton_schulz_triton(
        G, [t[0] for t in co], [t[1] for t in co], [t[2] for t in co], float(safety), normalize,
        float(eps), compute_dtype, out_dtype, bool(fp32_first_gram), None if gram is None else bool(gram), sumsq)
