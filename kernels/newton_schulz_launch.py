"""Launchers of the kernels in ``kernels/newton_schulz.py``: shape checks, config choice, grid, launch.

``sym_mm`` (a symmetric product with a fused epilogue) and ``apply_q`` (Q·X + a·X) are the
matmul building blocks of the Newton–Schulz iterations (``kernels/newton_schulz_iteration.py``)
and of the polar iterations' Gram and Newton–Schulz-tail steps; ``inv_norm_scale`` is the
normalization pass. Every launcher takes *logical* 3-D views (batch, rows, cols) with arbitrary strides, so a caller
passes ``G.mT`` for a tall input and no copy is made. Outputs are written into ``out`` (allocated
by the caller, so iteration buffers can be reused). Configs come from ``kernels/_config.py``
(first call: no autotune stall); ``FASTORTHO_TRITON_AUTOTUNE=1`` times the pruned candidate list
once per (k, L, dtype, arch) key — never per batch size, which keeps batch invariance.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

import triton
import triton.language as tl

from . import _config, interpreter_enabled
from .newton_schulz import _apply_kernel, _scale_cast_kernel, _sym_mm_kernel
from .newton_schulz_norm import _scale_kernel, _sumsq_partial_kernel, _sumsq_scale_kernel
from .newton_schulz_tma import _sym_mm_tma_kernel
from .newton_schulz_tma_launch import _ensure_allocator, apply_q_tma, apply_tma_layout, apply_tma_wanted, tma_trans

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_TUNED: dict[tuple, _config.Config] = {}


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a storage dtype (bfloat16, float16 or float32)."""
    try:
        return _TL[dtype]
    except KeyError:
        raise TypeError(f"unsupported storage dtype {dtype}; use bfloat16, float16 or float32") from None


def _arch(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


_DEVICE_SMEM: dict[int, int | None] = {}


def _device_smem(t: torch.Tensor) -> int | None:
    """The device's per-block opt-in shared memory (bytes), None off CUDA or when torch hides it."""
    if t.device.type != "cuda":
        return None
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_SMEM:
        props = torch.cuda.get_device_properties(idx)
        _DEVICE_SMEM[idx] = getattr(props, "shared_memory_per_block_optin", None) or None
    return _DEVICE_SMEM[idx]


def dot_setup(round_dtype: torch.dtype, device: torch.device, first_fp32: bool = False):
    """(DOT_DTYPE, INPUT_PRECISION) for operands stored in ``round_dtype``.

    GPU: tensor-core dots in the storage dtype; fp32 storage uses IEEE fp32 unless torch allows
    TF32; an fp32 first Gram product uses 3xTF32 (≈ fp32 accuracy at tensor-core speed).
    Interpreter: always fp32 operands (bf16 ``tl.dot`` is wrong there, triton #11584)."""
    if interpreter_enabled() or device.type != "cuda":
        return tl.float32, "ieee"
    if round_dtype == torch.float32:
        if first_fp32:
            return tl.float32, "tf32x3"
        return tl.float32, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    return tl_dtype(round_dtype), "ieee"


def _autotune_on() -> bool:
    return os.environ.get("FASTORTHO_TRITON_AUTOTUNE", "0") not in ("", "0")


def _capturing() -> bool:
    """True inside CUDA-graph capture: timing candidates there would be captured (or fail)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _choose(kind: str, k: int, L: int, dtype: torch.dtype, t: torch.Tensor, launch,
            precision: str = "ieee", load_bytes: int | None = None) -> _config.Config:
    """Config for one launch. ``dtype``: precision of the dot operands; ``load_bytes``: size of
    the widest element the kernel loads (an fp32 input rounded to bf16 in registers still fills
    the pipeline buffers with fp32), which is what shared memory is counted with."""
    interp = interpreter_enabled() or t.device.type != "cuda"
    arch = _arch(t)
    eb = torch.finfo(dtype).bits // 8
    lb = max(eb, load_bytes or eb)
    if eb == 4 and not interp:
        return _config.FP32_SYM[precision] if kind == "sym" else _config.FP32_APPLY
    limit = None if interp else _device_smem(t)
    pick = _config.pick_sym if kind == "sym" else _config.pick_apply
    if interp or not _autotune_on() or _capturing():
        return pick(k, L, lb, arch, interp, limit)
    key = (kind, k, L, dtype, lb, arch)
    if key not in _TUNED:
        cands = [c for c in (_config.SYM_CONFIGS if kind == "sym" else _config.APPLY_CONFIGS)
                 if c.fits(arch, lb, limit)]
        times = []
        for c in cands:
            try:
                times.append((triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20), c))
            except Exception:  # noqa: BLE001 - a config the compiler rejects (resources) is skipped
                continue
        _TUNED[key] = min(times, key=lambda x: x[0])[1] if times else pick(k, L, lb, arch, False, limit)
    return _TUNED[key]


def sym_mm(P: torch.Tensor, S: torch.Tensor, out: torch.Tensor, *, Y: torch.Tensor | None = None,
           alpha: float = 1.0, beta: float = 0.0, scale: torch.Tensor | None = None,
           round_dtype: torch.dtype | None = None, first_fp32: bool = False) -> torch.Tensor:
    """out[b] = α·σ_b²·P[b]·S[b]ᵀ + β·Y[b], computed on the upper-triangle tiles and mirrored.

    Requires the exact result to be symmetric (P = S, or P and S commuting and symmetric).
    P, S: (B, k, L); Y, out: (B, k, k). ``scale`` (B,) fp32: σ, applied in the epilogue (the
    first Gram product t²·X'X'ᵀ), else σ = 1. ``round_dtype``: precision operands are rounded to
    (default: out's dtype, or P's when out is fp32); operands already in it are used as loaded,
    which keeps the sm_90 pipeline asynchronous."""
    if P.dim() != 3 or S.shape != P.shape:
        raise ValueError(f"sym_mm: P and S must be the same 3-D shape, got {tuple(P.shape)}, {tuple(S.shape)}")
    B, k, L = P.shape
    if out.shape != (B, k, k) or (Y is not None and Y.shape != (B, k, k)):
        raise ValueError("sym_mm: out and Y must be (B, k, k)")
    if scale is not None and (scale.shape != (B,) or scale.dtype != torch.float32):
        raise ValueError("sym_mm: scale must be a (B,) float32 tensor")
    rd = round_dtype or (out.dtype if out.dtype != torch.float32 else P.dtype)
    dot_dt, prec = dot_setup(rd, P.device, first_fp32)
    Yt = Y if Y is not None else out
    dummy = scale if scale is not None else out

    if B > 0 and k > 0 and L > 0 and _sym_tma_wanted(P) and _sym_tma_layout(P, S, rd) is not None:
        return _sym_mm_tma(P, S, out, Yt, dummy, scale is not None, Y is not None, float(alpha), float(beta),
                           rd, dot_dt, prec)

    def launch(cfg: _config.Config) -> None:
        T = triton.cdiv(k, cfg.block_m)
        n_tri = T * (T + 1) // 2
        _sym_mm_kernel[(B * n_tri,)](
            P, S, Yt, out, dummy, k, L, n_tri,
            *P.stride(), *S.stride(), *Yt.stride(), *out.stride(),
            float(alpha), float(beta),
            HAS_SCALE=scale is not None, HAS_Y=Y is not None,
            ROUND_DTYPE=tl_dtype(rd), DOT_DTYPE=dot_dt, INPUT_PRECISION=prec,
            OUT_ROUND=tl_dtype(out.dtype), SOFT_BF16=interpreter_enabled(), BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if B > 0 and k > 0:
        launch(_choose("sym", k, L, rd, P, launch, prec, load_bytes=max(P.element_size(), S.element_size())))
    return out


#: Which symmetric-product kernel ``sym_mm`` launches: "auto" = the TMA kernel
#: (``kernels/newton_schulz_tma.py``) on sm_90 / sm_100 when the operands allow it, else the cp.async
#: kernel; "on" = the TMA kernel wherever the operands allow it, also under the interpreter (tests);
#: "off" = always the cp.async kernel.
SYM_TMA = "auto"


def _sym_tma_wanted(t: torch.Tensor) -> bool:
    if SYM_TMA not in ("auto", "on", "off"):
        raise ValueError(f"newton_schulz_launch.SYM_TMA must be 'auto', 'on' or 'off', got {SYM_TMA!r}")
    if SYM_TMA == "on":
        return True
    return SYM_TMA == "auto" and not interpreter_enabled() and _arch(t) in _config.TMA_ARCHS


def _sym_tma_layout(P: torch.Tensor, S: torch.Tensor, rd: torch.dtype) -> tuple[bool, bool] | None:
    """(P read transposed, S read transposed) when both operands can be described for TMA, else None.

    TMA needs a 16-byte aligned base, one axis of stride 1 and the other strides multiples of
    16 bytes; the operands must already be in the rounding dtype ``rd`` (a 16-bit one on a GPU: the
    kernel applies no rounding in registers, which would serialize wgmma)."""
    if not interpreter_enabled() and rd not in (torch.bfloat16, torch.float16):
        return None
    p_t, s_t = tma_trans(P, (rd,)), tma_trans(S, (rd,))
    return None if p_t is None or s_t is None else (p_t, s_t)


def _sym_mm_tma(P, S, out, Yt, scale_arg, has_scale: bool, has_y: bool, alpha: float, beta: float,
                rd: torch.dtype, dot_dt, prec: str) -> torch.Tensor:
    """``sym_mm`` through the TMA kernel: persistent grid of min(tiles, SMs × CTAs per SM)."""
    B, k, L = P.shape
    p_t, s_t = _sym_tma_layout(P, S, rd)
    interp = interpreter_enabled() or P.device.type != "cuda"
    cfg, per_sm, maxnreg = _config.pick_sym_tma(k, L, P.element_size(), _arch(P), interp, None if interp else _device_smem(P))
    T = triton.cdiv(k, cfg.block_m)
    n_tri = T * (T + 1) // 2
    if interp:
        slots = _config.INTERPRET_TMA_PROGRAMS
    else:
        idx = P.device.index if P.device.index is not None else torch.cuda.current_device()
        slots = torch.cuda.get_device_properties(idx).multi_processor_count * per_sm
    programs = max(1, min(B * n_tri, slots))
    _ensure_allocator()
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
    _sym_mm_tma_kernel[(programs,)](
        P, S, Yt, out, scale_arg, B, k, L, n_tri, programs,
        *P.stride(), *S.stride(), *Yt.stride(), *out.stride(), alpha, beta,
        HAS_SCALE=has_scale, HAS_Y=has_y, P_T=p_t, S_T=s_t, DOT_DTYPE=dot_dt, INPUT_PRECISION=prec,
        OUT_ROUND=tl_dtype(out.dtype), SOFT_BF16=interpreter_enabled(),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)
    return out


def apply_q(Q: torch.Tensor, X: torch.Tensor, out: torch.Tensor, *, a: float = 0.0,
            scale: torch.Tensor | None = None, round_dtype: torch.dtype | None = None,
            x_round_dtype: torch.dtype | None = None, first_fp32: bool = False) -> torch.Tensor:
    """out[b] = round(σ_b·(Q[b]·X̂[b] + a·X̂[b])) with X̂ = round_x(X[b]), σ = ``scale`` or 1.

    Q: (B, k, k) in storage dtype; X, out: (B, k, L); ``scale`` (B,) fp32 is applied in the
    epilogue (the first and restart applies t·(Q·X' + a·X')). The result is rounded to
    ``round_dtype`` (storage, default Q's dtype) and then stored in out's dtype.
    ``x_round_dtype`` (default ``round_dtype``) is the precision of X̂: float32 for the first
    step of ``fp32_first_gram``, whose input must not be rounded to bf16 on either side of the
    product; X already in it is used as loaded."""
    if Q.dim() != 3 or X.dim() != 3 or Q.shape[0] != X.shape[0] or Q.shape[1:] != (X.shape[1], X.shape[1]):
        raise ValueError(f"apply_q: need Q (B, k, k) and X (B, k, L), got {tuple(Q.shape)}, {tuple(X.shape)}")
    if out.shape != X.shape:
        raise ValueError("apply_q: out must have X's shape")
    B, k, L = X.shape
    rd = round_dtype or Q.dtype
    xrd = x_round_dtype or rd
    dot_dt, prec = dot_setup(xrd, X.device, first_fp32)
    interp = interpreter_enabled()
    dummy = scale if scale is not None else out
    lb = max(Q.element_size(), X.element_size())
    if B > 0 and k > 0 and L > 0 and apply_tma_wanted(_arch(X)) and (lay := apply_tma_layout(Q, X, out, xrd)):
        # the table tile (never autotuned: the same tiles as the cp.async kernel, so the same bits),
        # if its operand ring plus the output box TMA stores from fit in shared memory
        arch, dev = _arch(X), interp or X.device.type != "cuda"
        cfg = _config.pick_apply(k, L, lb, arch, dev, _device_smem(X))
        if dev or cfg.smem_bytes(lb, arch) + cfg.block_m * cfg.block_n * out.element_size() <= _config.smem_limit(arch, _device_smem(X)):
            return apply_q_tma(Q, X, out, lay, a=a, scale=scale, cfg=cfg, arch=arch, dot_dt=dot_dt, prec=prec,
                               out_round=tl_dtype(rd))

    def launch(cfg: _config.Config) -> None:
        tm, tn = _cdiv(k, cfg.block_m), _cdiv(L, cfg.block_n)
        _apply_kernel[(B * tm * tn,)](
            Q, X, out, dummy, k, L, tm, tn,
            *Q.stride(), *X.stride(), *out.stride(), float(a),
            HAS_AX=a != 0.0, HAS_SCALE=scale is not None,
            ROUND_DTYPE=tl_dtype(xrd), DOT_DTYPE=dot_dt, INPUT_PRECISION=prec,
            OUT_ROUND=tl_dtype(rd), SOFT_BF16=interp, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if B > 0 and k > 0 and L > 0:
        launch(_choose("apply", k, L, xrd, X, launch, prec, load_bytes=lb))
    return out


LINE3_ENV = "FASTORTHO_NS_LINE3"


def line3_backend(k: int, L: int, t: torch.Tensor, force: str | None = None) -> str:
    """Who computes line 3 (X ← a·X + B·X) of a k×L standard step: "triton" or "cublas".

    ``force`` (or, when it is None, the environment variable ``FASTORTHO_NS_LINE3``) = "triton" or
    "cublas" decides for every shape; "auto" or unset reads the (arch, shape) table
    ``_config.LINE3``, which answers "triton" until a GPU benchmark fills it in. Off CUDA (and
    under the interpreter) the arch is 0, which no table row names."""
    choice = force if force is not None else (os.environ.get(LINE3_ENV, "") or "auto")
    if choice == "auto":
        return _config.pick_line3(k, L, _arch(t))
    if choice not in _config.LINE3_CHOICES:
        src = "line3" if force is not None else LINE3_ENV
        raise ValueError(f"{src} must be 'auto', 'triton' or 'cublas', got {choice!r}")
    return choice


def apply_blas(Q: torch.Tensor, X: torch.Tensor, out: torch.Tensor, *, a: float = 0.0) -> torch.Tensor:
    """out[b] = round(Q[b]·X[b] + a·X[b]) by cuBLAS (``torch.baddbmm``): fp32 accumulation, a·X added
    in the epilogue, one rounding to out's dtype (the apply kernel's result without a scale).
    ``out`` must not overlap X or Q."""
    if Q.dim() != 3 or X.dim() != 3 or Q.shape[0] != X.shape[0] or Q.shape[1:] != (X.shape[1], X.shape[1]):
        raise ValueError(f"apply_blas: need Q (B, k, k) and X (B, k, L), got {tuple(Q.shape)}, {tuple(X.shape)}")
    if out.shape != X.shape:
        raise ValueError("apply_blas: out must have X's shape")
    return torch.baddbmm(X, Q, X, beta=a, alpha=1.0, out=out)


def _cdiv(a: int, b: int) -> int:
    """⌈a/b⌉ in plain Python: ``triton.cdiv`` outside a kernel costs ~2 µs a call (argument unwrapping),
    and a small Newton–Schulz call computes a dozen grids."""
    return -(-a // b)


#: Norm-pass tiles (rows, cols, pipeline stages): 64×64 on a GPU, 16-byte vector loads along whichever
#: axis is contiguous; small tiles under the interpreter, where every tile costs Python time.
NORM_TILE, NORM_TILE_INTERP = (64, 64, 3), (16, 32, 1)
#: at most this many programs per matrix, each with at least NORM_TILES_PER_PROGRAM tiles
NORM_MAX_SPLIT, NORM_TILES_PER_PROGRAM = 512, 8


def _norm_tile() -> tuple[int, int, int]:
    return NORM_TILE_INTERP if interpreter_enabled() else NORM_TILE


def _split(rows: int, cols: int) -> int:
    """Programs per matrix of the norm pass: ⌊tiles / 8⌋ clamped to [1, 512], a function of the shape
    only (batch invariance). 4096² has 4096 tiles: 512 programs (≈ 4 per SM on 132 SMs)."""
    br, bc, _ = _norm_tile()
    tiles = _cdiv(rows, br) * _cdiv(cols, bc)
    return max(1, min(NORM_MAX_SPLIT, tiles // NORM_TILES_PER_PROGRAM))


class NormScale(NamedTuple):
    """Per-matrix normalization factors, (B,) fp32 each: s = p·t = 1 / max(safety·ν, eps).

    p: a power of two (clamped to [2^-126, 2^126]) with max|G·p| < 2 that shifts G into range
    exactly; t = s/p: the rest, applied in the kernels' epilogues (``kernels/newton_schulz_norm.py``)."""
    s: torch.Tensor
    p: torch.Tensor
    t: torch.Tensor


def _norm_out(B: int, device: torch.device) -> NormScale:
    return NormScale(*(torch.empty(B, device=device, dtype=torch.float32) for _ in range(3)))


def inv_norm_scale(X: torch.Tensor, *, safety: float, eps: float, root: int = 2,
                   pre: torch.Tensor | None = None) -> NormScale:
    """(s, p, t) from one scaled pass over X; no host sync.

    root = 2 (X = G): s_b = 1 / max(safety·‖G_b‖_F, eps), p_b the power of two with max|G_b|·p_b
    in [1, 2), t_b = s_b / p_b.
    root = 4 (X = (G·p)(G·p)ᵀ, ``pre`` = p from the root-2 pass): s_b = 1 / max(safety·ν_b, eps)
    with ν_b = ‖G_bG_bᵀ‖_F^{1/2} ≥ σ_max(G_b), p = ``pre`` and t_b = s_b / p_b, the factor that
    turns X_b into X₀X₀ᵀ = t_b²·X_b.

    Squares are taken of x·2^-E (E the clamped exponent of max|x|), so neither ‖G‖² nor ν(G)
    itself is ever formed: finite inputs from 1e-38 to 3e38 give the same s up to rounding
    (``kernels/newton_schulz_norm._sumsq_partial_kernel``). s is rounded once to fp32; it is subnormal
    (fewer than 24 significant bits) only when safety·ν(G) > 2^126 ≈ 8.5e37."""
    B, R, N = X.shape
    if root not in (2, 4) or (root == 4) != (pre is not None):
        raise ValueError("inv_norm_scale: root=2 without pre, or root=4 with pre (the root-2 pass's p)")
    split = _split(R, N)
    br, bc, stages = _norm_tile()
    part = torch.empty(B * split, device=X.device, dtype=torch.float32)
    expo = torch.empty(B * split, device=X.device, dtype=torch.int32)
    out = _norm_out(B, X.device)
    if B == 0:
        return out
    tc = _cdiv(N, bc)
    _sumsq_partial_kernel[(B * split,)](X, part, expo, R, N, split, tc, _cdiv(R, br) * tc, *X.stride(),
                                        BLOCK_R=br, BLOCK_C=bc, NUM_STAGES=stages)
    _scale_kernel[(B,)](part, expo, pre if pre is not None else out.s, out.s, out.p, out.t, split, float(safety),
                        float(eps), ROOT=root, BLOCK_S=1 << (split - 1).bit_length())
    return out


def sumsq_norm_scale(sumsq: torch.Tensor, *, safety: float, eps: float) -> NormScale:
    """(s, p, t) of ``inv_norm_scale(G, root=2)`` from given sums of squares sumsq[b] = ‖G_b‖_F²
    ((B,) float64 or float32, on G's device), without reading G: one launch over B numbers, no host
    sync. s = 1/max(safety·√sumsq, eps) formed in float64, p = 2^-E with E the exponent of √sumsq
    (so max|G·p| < 2), t = s/p; NaN/Inf sumsq give NaN s and t (``_sumsq_scale_kernel``)."""
    B = sumsq.shape[0]
    out = _norm_out(B, sumsq.device)
    if B:
        _sumsq_scale_kernel[(_cdiv(B, 128),)](sumsq, out.s, out.p, out.t, B, float(safety), float(eps), BLOCK=128)
    return out


def scale_cast(X: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b] = round_out(scale[b]·X[b]) (product in fp32, one rounding to out's dtype).

    X: (B, R, N) any float dtype and strides; scale: (B,) fp32; out: (B, R, N) bf16, fp16 or fp32.
    With scale = p (``NormScale.p``) this is the first step's operand X' = round(p·G): exact when
    G is already in out's dtype (a power-of-two shift)."""
    if X.dim() != 3 or out.shape != X.shape:
        raise ValueError(f"scale_cast: X and out must be the same 3-D shape, got {tuple(X.shape)}, {tuple(out.shape)}")
    if scale.shape != X.shape[:1] or scale.dtype != torch.float32:
        raise ValueError("scale_cast: scale must be a (B,) float32 tensor")
    B, R, N = X.shape
    # Along the contiguous axis of the input: 128 elements (16-byte loads and stores), 32 rows.
    interp = interpreter_enabled()
    block_r, block_c = (16, 32) if interp else (32, 128)
    tc = _cdiv(N, block_c)
    if B * R * N > 0:
        _scale_cast_kernel[(B * _cdiv(R, block_r) * tc,)](
            X, out, scale, R, N, tc, *X.stride(), *out.stride(),
            OUT_ROUND=tl_dtype(out.dtype), SOFT_BF16=interp, BLOCK_R=block_r, BLOCK_C=block_c)
    return out
