// Per-element math of the fused Muon step, shared by the CPU kernels (csrc/cpu/muon_step.cpp) and the
// CUDA kernels (csrc/cuda/muon_step.cu). No torch headers: the .cu file includes this.
//
// Bit-exactness contract: every rounding here is spelled out. Multiply-adds that torch performs as
// one fused operation are written as fmaf(); products and sums that torch rounds separately are plain
// `*` / `+`, and both compilers are told never to contract them (host: -ffp-contract=off; nvcc:
// --fmad=false). So the CPU and CUDA kernels agree bit for bit, and agree with torch's vectorized
// CPU kernels (which use fma on AVX2/AVX-512 machines).
#pragma once

#include <math.h>
#include <cstdint>

#if defined(__CUDACC__)
#define FO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// forced: GCC otherwise keeps momentum_elem out of line in the CPU loops, which then do not vectorize
#define FO_HD inline __attribute__((always_inline))
#else
#define FO_HD inline
#endif

namespace fastortho {

// Elements per chunk: the unit of work of one CUDA block and of one CPU task, and the granularity of
// the per-chunk sum-of-squares partials. 16 Ki elements = 64 per thread at 256 threads.
constexpr int64_t kChunk = 16384;

inline int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// ---------------------------------------------------------------------------------------------
// muon_momentum_
// ---------------------------------------------------------------------------------------------
struct MomentumScalars {
  float beta;            // (float)beta
  float one_minus_beta;  // (float)(1.0 - beta), computed in double like torch's scalar `1 - momentum`
  bool nesterov;
  bool ema;              // true: EMA (lerp) convention; false: sum (heavy-ball) convention
};

inline MomentumScalars make_momentum_scalars(double beta, bool nesterov, bool ema) {
  return MomentumScalars{static_cast<float>(beta), static_cast<float>(1.0 - beta), nesterov, ema};
}

// torch.lerp(s, e, w) exactly as ATen evaluates it (Lerp.h / lerp_vec): the small-weight branch is
// accurate near s, the other near e, so lerp(s, e, 1) == e exactly.
// Written as selects feeding one fma (not two fma branches) so that CPU compilers vectorize it.
FO_HD float lerp_torch(float s, float e, float w) {
  const bool small = fabsf(w) < 0.5f;
  const float c = small ? w : w - 1.0f;
  const float base = small ? s : e;
  return fmaf(c, e - s, base);
}

// One element: reads the grad g and the buffer b (both widened to fp32), returns the new buffer
// b_new (before any rounding to the buffer's dtype) and the NS input u (fp32).
//   ema: b_new = b.lerp(g, 1-beta);           u = nesterov ? g.lerp(b_new, beta) : b_new
//   sum: b_new = round(beta*b) + g  (2 ops);  u = nesterov ? fma(beta, b_new, g) : b_new
FO_HD void momentum_elem(float g, float b, const MomentumScalars& m, float& b_new, float& u) {
  if (m.ema) {
    b_new = lerp_torch(b, g, m.one_minus_beta);
    u = m.nesterov ? lerp_torch(g, b_new, m.beta) : b_new;
  } else {
    const float t = m.beta * b;  // torch: buf.mul_(beta) rounds here
    b_new = t + g;               //        .add_(g)
    u = m.nesterov ? fmaf(m.beta, b_new, g) : b_new;  // g.add(buf, alpha=beta): one fma
  }
}

// ---------------------------------------------------------------------------------------------
// muon_apply_
// ---------------------------------------------------------------------------------------------
// Where the scalars come from. When all are host numbers, d = 1 - lr*wd and a_i = lr*s_i are computed
// in double on the host and rounded to fp32 (what torch does with Python scalars): `host_coef[i]`
// is a_i. Otherwise (any of lr / wd / scales is a tensor) both are computed in fp32 per block from
// the values behind the pointers (nullptr: use the host float), and `host_coef[i]` is s_i.
struct ApplyScalars {
  const float* lr_ptr;
  const float* wd_ptr;
  const float* scales_ptr;  // indexed by the tensor's position in the op's list
  float lr;
  float wd;
  float d_host;             // (float)(1.0 - lr*wd) when host_scalars
  bool host_scalars;
};

// (d, -a_i) for the tensor at list position `index` whose host coefficient is `coef`.
FO_HD void apply_coefs(const ApplyScalars& s, int64_t index, float coef, float& d, float& neg_a) {
  if (s.host_scalars) {
    d = s.d_host;
    neg_a = -coef;
    return;
  }
  const float lr = s.lr_ptr ? *s.lr_ptr : s.lr;
  const float wd = s.wd_ptr ? *s.wd_ptr : s.wd;
  const float sc = s.scales_ptr ? s.scales_ptr[index] : coef;
  d = 1.0f - lr * wd;
  neg_a = -(lr * sc);
}

// p_new = p*d - a*o: torch's p.mul_(d) rounds, then p.add_(o, alpha=-a) is one fma.
FO_HD float apply_elem(float p, float o, float d, float neg_a) { return fmaf(neg_a, o, p * d); }

}  // namespace fastortho
