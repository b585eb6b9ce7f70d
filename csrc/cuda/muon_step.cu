// CUDA kernels of the fused Muon step, multi-tensor (apex-style): a whole list of tensors in a few
// launches. No torch headers here (build time): bindings.cpp converts tensors to the structs of
// launch.h and calls the launchers below.
//
// Work decomposition, shared with the CPU twins: every tensor is cut into chunks of kChunk elements;
// one block handles one chunk. A launch carries up to kMaxTensorsPerLaunch tensors in its by-value
// argument struct (kept under the classic 4 KiB kernel-parameter limit) with the prefix sums of
// their chunk counts; a block finds its tensor by binary search over those prefixes, so one launch
// covers any number of chunks (a 64M-element tensor is one launch of 4096 blocks).
//
// Compiled with --fmad=false: the per-element math in muon_step.h spells out every fma.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace fastortho {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensorsPerLaunch = 96;  // 96 * 36 B + prefixes: ~3.5 KiB of kernel arguments

// --------------------------------------------------------------------------------------------
// dtype helpers
// --------------------------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

// round to nearest even, like c10::BFloat16 / c10::Half on the CPU
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Four consecutive elements, loaded/stored as one 16 B (fp32) or 8 B (16-bit) access.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ bool aligned4(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0;
}

__device__ __forceinline__ double block_sum(double x) {
  __shared__ double warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = 0.0;
  if (warp == 0) {
    x = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;  // valid in thread 0
}

// The tensor owning chunk `c`: the largest t with chunk_start[t] <= c (tensors without chunks are
// skipped because the next tensor has the same start).
__device__ __forceinline__ int find_tensor(const int* chunk_start, int n, int c) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// --------------------------------------------------------------------------------------------
// momentum
// --------------------------------------------------------------------------------------------
struct MomentumPack {
  const void* g[kMaxTensorsPerLaunch];
  void* b[kMaxTensorsPerLaunch];
  void* u[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int chunk_start[kMaxTensorsPerLaunch + 1];  // prefix sums of the chunk counts
  int ntensors;
  int tensor_base;      // list index of this pack's first tensor (for sumsq)
  int64_t chunk_base;   // index of this pack's first chunk in the partials workspace
};

template <typename G, typename B, typename U>
__global__ void __launch_bounds__(kThreads)
    muon_momentum_kernel(const MomentumPack pk, const MomentumScalars m, double* __restrict__ partials) {
  const int chunk = blockIdx.x;
  const int t = find_tensor(pk.chunk_start, pk.ntensors, chunk);
  const int64_t begin = static_cast<int64_t>(chunk - pk.chunk_start[t]) * kChunk;
  const int64_t n = min(kChunk, pk.numel[t] - begin);
  const G* __restrict__ g = static_cast<const G*>(pk.g[t]) + begin;
  B* __restrict__ b = static_cast<B*>(pk.b[t]) + begin;
  U* __restrict__ u = static_cast<U*>(pk.u[t]) + begin;

  double acc = 0.0;
  int64_t i0 = 0;  // first element left for the scalar loop
  if (aligned4(g) && aligned4(b) && aligned4(u)) {
    const int64_t nvec = n / 4;
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
      const Vec4<G> gv = reinterpret_cast<const Vec4<G>*>(g)[v];
      const Vec4<B> bv = reinterpret_cast<const Vec4<B>*>(b)[v];
      Vec4<B> bo;
      Vec4<U> uo;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float bn, uu;
        momentum_elem(to_f(gv.v[k]), to_f(bv.v[k]), m, bn, uu);
        bo.v[k] = from_f<B>(bn);
        uo.v[k] = from_f<U>(uu);
        acc += static_cast<double>(uu) * static_cast<double>(uu);  // exact square in double
      }
      reinterpret_cast<Vec4<B>*>(b)[v] = bo;
      reinterpret_cast<Vec4<U>*>(u)[v] = uo;
    }
    i0 = nvec * 4;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += kThreads) {
    float bn, uu;
    momentum_elem(to_f(g[i]), to_f(b[i]), m, bn, uu);
    b[i] = from_f<B>(bn);
    u[i] = from_f<U>(uu);
    acc += static_cast<double>(uu) * static_cast<double>(uu);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[pk.chunk_base + chunk] = acc;
}

// One block per tensor of the pack: the sum of its chunks' partials, in a fixed order (deterministic).
template <typename S>
__global__ void __launch_bounds__(kThreads)
    sumsq_reduce_kernel(const MomentumPack pk, const double* __restrict__ partials, S* __restrict__ sumsq) {
  const int t = blockIdx.x;
  double acc = 0.0;
  for (int c = pk.chunk_start[t] + threadIdx.x; c < pk.chunk_start[t + 1]; c += kThreads) {
    acc += partials[pk.chunk_base + c];
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) sumsq[pk.tensor_base + t] = static_cast<S>(acc);
}

template <typename G, typename B, typename U>
cudaError_t momentum_typed(const MomentumTensor* ts, int n, MomentumScalars m, double* partials, void* sumsq,
                           bool sumsq_f64, cudaStream_t stream) {
  MomentumPack pk;
  int64_t chunk_base = 0;
  for (int first = 0; first < n; first += kMaxTensorsPerLaunch) {
    const int cnt = min(kMaxTensorsPerLaunch, n - first);
    int chunks = 0;
    for (int j = 0; j < cnt; ++j) {
      const MomentumTensor& x = ts[first + j];
      pk.g[j] = x.g;
      pk.b[j] = x.b;
      pk.u[j] = x.u;
      pk.numel[j] = x.numel;
      pk.chunk_start[j] = chunks;
      chunks += static_cast<int>(num_chunks(x.numel));
    }
    pk.chunk_start[cnt] = chunks;
    pk.ntensors = cnt;
    pk.tensor_base = first;
    pk.chunk_base = chunk_base;
    if (chunks > 0) {
      muon_momentum_kernel<G, B, U><<<chunks, kThreads, 0, stream>>>(pk, m, partials);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
    if (sumsq_f64) {
      sumsq_reduce_kernel<double><<<cnt, kThreads, 0, stream>>>(pk, partials, static_cast<double*>(sumsq));
    } else {
      sumsq_reduce_kernel<float><<<cnt, kThreads, 0, stream>>>(pk, partials, static_cast<float*>(sumsq));
    }
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    chunk_base += chunks;
  }
  return cudaSuccess;
}

// --------------------------------------------------------------------------------------------
// apply
// --------------------------------------------------------------------------------------------
struct ApplyPack {
  void* p[kMaxTensorsPerLaunch];
  const void* o[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  float coef[kMaxTensorsPerLaunch];
  int chunk_start[kMaxTensorsPerLaunch + 1];
  int ntensors;
  int tensor_base;
};

template <typename P, typename O>
__global__ void __launch_bounds__(kThreads) muon_apply_kernel(const ApplyPack pk, const ApplyScalars s) {
  const int chunk = blockIdx.x;
  const int t = find_tensor(pk.chunk_start, pk.ntensors, chunk);
  const int64_t begin = static_cast<int64_t>(chunk - pk.chunk_start[t]) * kChunk;
  const int64_t n = min(kChunk, pk.numel[t] - begin);
  P* __restrict__ p = static_cast<P*>(pk.p[t]) + begin;
  const O* __restrict__ o = static_cast<const O*>(pk.o[t]) + begin;
  float d, neg_a;
  apply_coefs(s, pk.tensor_base + t, pk.coef[t], d, neg_a);  // lr/wd/scales may live on the device

  int64_t i0 = 0;
  if (aligned4(p) && aligned4(o)) {
    const int64_t nvec = n / 4;
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
      Vec4<P> pv = reinterpret_cast<Vec4<P>*>(p)[v];
      const Vec4<O> ov = reinterpret_cast<const Vec4<O>*>(o)[v];
#pragma unroll
      for (int k = 0; k < 4; ++k) pv.v[k] = from_f<P>(apply_elem(to_f(pv.v[k]), to_f(ov.v[k]), d, neg_a));
      reinterpret_cast<Vec4<P>*>(p)[v] = pv;
    }
    i0 = nvec * 4;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += kThreads) {
    p[i] = from_f<P>(apply_elem(to_f(p[i]), to_f(o[i]), d, neg_a));
  }
}

template <typename P, typename O>
cudaError_t apply_typed(const ApplyTensor* ts, int n, ApplyScalars s, cudaStream_t stream) {
  ApplyPack pk;
  for (int first = 0; first < n; first += kMaxTensorsPerLaunch) {
    const int cnt = min(kMaxTensorsPerLaunch, n - first);
    int chunks = 0;
    for (int j = 0; j < cnt; ++j) {
      const ApplyTensor& x = ts[first + j];
      pk.p[j] = x.p;
      pk.o[j] = x.o;
      pk.numel[j] = x.numel;
      pk.coef[j] = x.coef;
      pk.chunk_start[j] = chunks;
      chunks += static_cast<int>(num_chunks(x.numel));
    }
    pk.chunk_start[cnt] = chunks;
    pk.ntensors = cnt;
    pk.tensor_base = first;
    if (chunks == 0) continue;
    muon_apply_kernel<P, O><<<chunks, kThreads, 0, stream>>>(pk, s);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// dtype code -> type, for the dispatch switches below
template <int C> struct TypeOf;
template <> struct TypeOf<0> { using type = float; };
template <> struct TypeOf<1> { using type = __nv_bfloat16; };
template <> struct TypeOf<2> { using type = __half; };

}  // namespace

int64_t momentum_workspace_len(const MomentumTensor* ts, int n) {
  int64_t c = 0;
  for (int i = 0; i < n; ++i) c += num_chunks(ts[i].numel);
  return c;
}

#define FO_T(C) typename TypeOf<C>::type

cudaError_t launch_muon_momentum(const MomentumTensor* ts, int n, int g_dtype, int b_dtype, int u_dtype,
                                 MomentumScalars m, double* partials, void* sumsq, bool sumsq_f64,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
#define FO_MOM(GC, BC, UC)                                                                         \
  if (g_dtype == GC && b_dtype == BC && u_dtype == UC)                                             \
    return momentum_typed<FO_T(GC), FO_T(BC), FO_T(UC)>(ts, n, m, partials, sumsq, sumsq_f64, stream);
#define FO_MOM_U(GC, BC) FO_MOM(GC, BC, 0) FO_MOM(GC, BC, 1) FO_MOM(GC, BC, 2)
#define FO_MOM_B(GC) FO_MOM_U(GC, 0) FO_MOM_U(GC, 1) FO_MOM_U(GC, 2)
  FO_MOM_B(0) FO_MOM_B(1) FO_MOM_B(2)
#undef FO_MOM_B
#undef FO_MOM_U
#undef FO_MOM
  return cudaErrorInvalidValue;  // unsupported dtype combination (the bindings check first)
}

cudaError_t launch_muon_apply(const ApplyTensor* ts, int n, int p_dtype, int o_dtype, ApplyScalars s,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
#define FO_APPLY(PC, OC) \
  if (p_dtype == PC && o_dtype == OC) return apply_typed<FO_T(PC), FO_T(OC)>(ts, n, s, stream);
#define FO_APPLY_O(PC) FO_APPLY(PC, 0) FO_APPLY(PC, 1) FO_APPLY(PC, 2)
  FO_APPLY_O(0) FO_APPLY_O(1) FO_APPLY_O(2)
#undef FO_APPLY_O
#undef FO_APPLY
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastortho
