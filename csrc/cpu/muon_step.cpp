// CPU twins of the CUDA kernels: same chunks (kChunk elements), same per-element math (muon_step.h),
// at::parallel_for over the (tensor, chunk) work items of the whole list.
//
// Compiled with -ffp-contract=off (see setup.py): the header's separate roundings must stay separate.
// The hot loops exist twice, for baseline x86-64 and for AVX2 + FMA (picked at run time), so a
// portable build still gets 256-bit vectors and one-instruction fmaf() on current CPUs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../muon_step.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
// A second copy of each hot loop compiled for AVX2 + FMA, chosen at run time. (Not target_clones
// with "arch=x86-64-v3": a different `arch` stops GCC from inlining the per-element functions, and
// the loops then run 10x slower.)
#define FO_HAVE_AVX2_COPY 1
#define FO_AVX2 __attribute__((target("avx2,fma")))
#else
#define FO_HAVE_AVX2_COPY 0
#define FO_AVX2
#endif
#if defined(__GNUC__)
#define FO_INLINE inline __attribute__((always_inline))
#else
#define FO_INLINE inline
#endif

namespace fastortho {
namespace {

// Lanes of the sum-of-squares accumulator: independent partial sums let the compiler vectorize the
// loop without reassociating (u*u is exact in double, so the only rounding is the double adds).
constexpr int kLanes = 16;

// fp32 -> storage dtype, round to nearest even. bf16 is spelled out branch-free (bit-identical to
// c10::BFloat16(float), NaN -> 0x7FC0) because c10's branchy version blocks vectorization.
template <typename T>
FO_INLINE T store_as(float x) { return static_cast<T>(x); }
template <>
FO_INLINE c10::BFloat16 store_as<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

struct Item {
  int32_t tensor;
  int64_t begin;  // first element of the chunk
  int64_t size;   // elements in the chunk (<= kChunk)
};

// Work items for a list of numels; first[t] is the index of tensor t's first item.
void make_items(const std::vector<int64_t>& numels, std::vector<Item>& items, std::vector<int64_t>& first) {
  first.assign(numels.size() + 1, 0);
  for (size_t t = 0; t < numels.size(); ++t) {
    first[t] = static_cast<int64_t>(items.size());
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      items.push_back({static_cast<int32_t>(t), b, std::min(kChunk, numels[t] - b)});
    }
  }
  first[numels.size()] = static_cast<int64_t>(items.size());
}

// Enough items per task that a task moves ~64K elements (tiny tensors would otherwise pay the
// scheduling cost per tensor).
int64_t grain_for(int64_t n_items, int64_t total_elems) {
  if (total_elems <= 0) return 1;
  return std::max<int64_t>(1, (n_items * 65536 + total_elems - 1) / total_elems);
}

bool cpu_has_avx2_fma() {
#if FO_HAVE_AVX2_COPY
  // FASTORTHO_CPU_BASELINE=1 forces the portable copy (tests check that it is bit-identical too)
  static const bool ok = std::getenv("FASTORTHO_CPU_BASELINE") == nullptr && __builtin_cpu_supports("avx2") &&
                         __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ----------------------------------------------------------------------------------------------
// momentum
// ----------------------------------------------------------------------------------------------
struct MomentumJob {
  const Item* items;
  void* const* g;
  void* const* b;
  void* const* u;
  double* partial;
  MomentumScalars m;
};

template <typename G, typename B, typename U, bool EMA, bool NEST>
FO_INLINE void momentum_items(const MomentumJob& job, int64_t begin, int64_t end) {
  MomentumScalars m = job.m;
  m.ema = EMA;  // compile-time constants: the per-element branches vanish
  m.nesterov = NEST;
  for (int64_t it = begin; it < end; ++it) {
    const Item item = job.items[it];
    const G* __restrict__ g = static_cast<const G*>(job.g[item.tensor]) + item.begin;
    B* __restrict__ b = static_cast<B*>(job.b[item.tensor]) + item.begin;
    U* __restrict__ u = static_cast<U*>(job.u[item.tensor]) + item.begin;
    const int64_t n = item.size;
    double acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        float bn, uu;
        momentum_elem(static_cast<float>(g[i + k]), static_cast<float>(b[i + k]), m, bn, uu);
        b[i + k] = store_as<B>(bn);
        u[i + k] = store_as<U>(uu);
        acc[k] += static_cast<double>(uu) * static_cast<double>(uu);
      }
    }
    for (int k = 0; i < n; ++i, ++k) {
      float bn, uu;
      momentum_elem(static_cast<float>(g[i]), static_cast<float>(b[i]), m, bn, uu);
      b[i] = store_as<B>(bn);
      u[i] = store_as<U>(uu);
      acc[k] += static_cast<double>(uu) * static_cast<double>(uu);
    }
    double s = 0.0;
    for (int k = 0; k < kLanes; ++k) s += acc[k];
    job.partial[it] = s;
  }
}

// dtype codes: 0 fp32, 1 bf16, 2 fp16
#define FO_MOM_CASE(GC, G, BC, B, UC, U)                                                  \
  case (GC) * 9 + (BC) * 3 + (UC):                                                        \
    if (job.m.ema) {                                                                      \
      if (job.m.nesterov) momentum_items<G, B, U, true, true>(job, begin, end);           \
      else momentum_items<G, B, U, true, false>(job, begin, end);                         \
    } else {                                                                              \
      if (job.m.nesterov) momentum_items<G, B, U, false, true>(job, begin, end);          \
      else momentum_items<G, B, U, false, false>(job, begin, end);                        \
    }                                                                                     \
    break;
#define FO_MOM_U(GC, G, BC, B)                    \
  FO_MOM_CASE(GC, G, BC, B, 0, float)             \
  FO_MOM_CASE(GC, G, BC, B, 1, c10::BFloat16)     \
  FO_MOM_CASE(GC, G, BC, B, 2, c10::Half)
#define FO_MOM_B(GC, G)                  \
  FO_MOM_U(GC, G, 0, float)              \
  FO_MOM_U(GC, G, 1, c10::BFloat16)      \
  FO_MOM_U(GC, G, 2, c10::Half)

FO_INLINE void momentum_range_impl(int combo, const MomentumJob& job, int64_t begin, int64_t end) {
  switch (combo) {
    FO_MOM_B(0, float)
    FO_MOM_B(1, c10::BFloat16)
    FO_MOM_B(2, c10::Half)
    default: break;  // unreachable: combos come from checked dtypes
  }
}
void momentum_range_base(int combo, const MomentumJob& job, int64_t b, int64_t e) { momentum_range_impl(combo, job, b, e); }
FO_AVX2 void momentum_range_avx2(int combo, const MomentumJob& job, int64_t b, int64_t e) {
  momentum_range_impl(combo, job, b, e);
}

void muon_momentum_cpu(at::TensorList grads, at::TensorList bufs, at::TensorList outs, at::Tensor sumsq,
                       double momentum, bool nesterov, bool ema) {
  check_momentum_args(grads, bufs, outs, sumsq);
  const size_t n = grads.size();
  if (n == 0) return;
  TORCH_CHECK(grads[0].device().is_cpu(), "muon_momentum_ (CPU kernel) got a ", grads[0].device(), " tensor");
  std::vector<int64_t> numels(n);
  std::vector<void*> gp(n), bp(n), up(n);
  int64_t total = 0;
  for (size_t t = 0; t < n; ++t) {
    numels[t] = grads[t].numel();
    total += numels[t];
    gp[t] = const_cast<void*>(grads[t].data_ptr());
    bp[t] = bufs[t].data_ptr();
    up[t] = outs[t].data_ptr();
  }
  std::vector<Item> items;
  std::vector<int64_t> first;
  make_items(numels, items, first);
  std::vector<double> partial(items.size(), 0.0);
  const int combo = dtype_code(grads[0].scalar_type()) * 9 + dtype_code(bufs[0].scalar_type()) * 3 +
                    dtype_code(outs[0].scalar_type());
  const MomentumJob job{items.data(), gp.data(), bp.data(), up.data(), partial.data(),
                        make_momentum_scalars(momentum, nesterov, ema)};
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain_for(items.size(), total),
                   [&, avx2 = cpu_has_avx2_fma()](int64_t b, int64_t e) {
                     avx2 ? momentum_range_avx2(combo, job, b, e) : momentum_range_base(combo, job, b, e);
                   });
  // fixed-order reduction over a tensor's chunks: the result does not depend on the thread count
  const bool f64 = sumsq.scalar_type() == at::kDouble;
  for (size_t t = 0; t < n; ++t) {
    double s = 0.0;
    for (int64_t it = first[t]; it < first[t + 1]; ++it) s += partial[it];
    if (f64) sumsq.data_ptr<double>()[t] = s;
    else sumsq.data_ptr<float>()[t] = static_cast<float>(s);
  }
}

// ----------------------------------------------------------------------------------------------
// apply
// ----------------------------------------------------------------------------------------------
struct ApplyJob {
  const Item* items;
  void* const* p;
  void* const* o;
  const float* coef;  // per tensor: a_i (host scalars) or s_i
  ApplyScalars s;
};

template <typename P, typename O>
FO_INLINE void apply_items(const ApplyJob& job, int64_t begin, int64_t end) {
  for (int64_t it = begin; it < end; ++it) {
    const Item item = job.items[it];
    float d, neg_a;
    apply_coefs(job.s, item.tensor, job.coef[item.tensor], d, neg_a);
    P* __restrict__ p = static_cast<P*>(job.p[item.tensor]) + item.begin;
    const O* __restrict__ o = static_cast<const O*>(job.o[item.tensor]) + item.begin;
    for (int64_t i = 0; i < item.size; ++i) {
      p[i] = store_as<P>(apply_elem(static_cast<float>(p[i]), static_cast<float>(o[i]), d, neg_a));
    }
  }
}

#define FO_APPLY_CASE(PC, P, OC, O) \
  case (PC) * 3 + (OC): apply_items<P, O>(job, begin, end); break;
#define FO_APPLY_O(PC, P)             \
  FO_APPLY_CASE(PC, P, 0, float)      \
  FO_APPLY_CASE(PC, P, 1, c10::BFloat16) \
  FO_APPLY_CASE(PC, P, 2, c10::Half)

FO_INLINE void apply_range_impl(int combo, const ApplyJob& job, int64_t begin, int64_t end) {
  switch (combo) {
    FO_APPLY_O(0, float)
    FO_APPLY_O(1, c10::BFloat16)
    FO_APPLY_O(2, c10::Half)
    default: break;
  }
}
void apply_range_base(int combo, const ApplyJob& job, int64_t b, int64_t e) { apply_range_impl(combo, job, b, e); }
FO_AVX2 void apply_range_avx2(int combo, const ApplyJob& job, int64_t b, int64_t e) { apply_range_impl(combo, job, b, e); }


// One pass over every (tensor, chunk) item; coef[t] is a_t (host scalars) or unused (see ApplyScalars).
void run_apply_cpu(at::TensorList params, at::TensorList updates, const ApplyScalars& s,
                   const std::vector<float>& coef) {
  const size_t n = params.size();
  TORCH_CHECK(params[0].device().is_cpu(), "muon_apply_ (CPU kernel) got a ", params[0].device(), " tensor");
  std::vector<int64_t> numels(n);
  std::vector<void*> pp(n), op(n);
  int64_t total = 0;
  for (size_t t = 0; t < n; ++t) {
    numels[t] = params[t].numel();
    total += numels[t];
    pp[t] = params[t].data_ptr();
    op[t] = const_cast<void*>(updates[t].data_ptr());
  }
  std::vector<Item> items;
  std::vector<int64_t> first;
  make_items(numels, items, first);
  const int combo = dtype_code(params[0].scalar_type()) * 3 + dtype_code(updates[0].scalar_type());
  const ApplyJob job{items.data(), pp.data(), op.data(), coef.data(), s};
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain_for(items.size(), total),
                   [&, avx2 = cpu_has_avx2_fma()](int64_t b, int64_t e) {
                     avx2 ? apply_range_avx2(combo, job, b, e) : apply_range_base(combo, job, b, e);
                   });
}

void muon_apply_cpu(at::TensorList params, at::TensorList updates, double lr, double weight_decay,
                    c10::ArrayRef<double> scales) {
  check_apply_args(params, updates, scales);
  const size_t n = params.size();
  if (n == 0) return;
  ApplyScalars s{};
  s.host_scalars = true;
  s.lr = static_cast<float>(lr);
  s.wd = static_cast<float>(weight_decay);
  s.d_host = static_cast<float>(1.0 - lr * weight_decay);
  std::vector<float> coef(n);
  for (size_t t = 0; t < n; ++t) coef[t] = static_cast<float>(lr * scales[t]);
  run_apply_cpu(params, updates, s, coef);
}

void muon_apply_tensor_cpu(at::TensorList params, at::TensorList updates, const at::Tensor& lr,
                           const at::Tensor& weight_decay, const at::Tensor& scales) {
  check_apply_tensor_args(params, updates, lr, weight_decay, scales);
  const size_t n = params.size();
  if (n == 0) return;
  ApplyScalars s{};
  s.host_scalars = false;
  s.lr_ptr = lr.const_data_ptr<float>();
  s.wd_ptr = weight_decay.const_data_ptr<float>();
  s.scales_ptr = scales.const_data_ptr<float>();
  run_apply_cpu(params, updates, s, std::vector<float>(n, 0.0f));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastortho, CPU, m) {
  m.impl("muon_momentum_", &muon_momentum_cpu);
  m.impl("muon_apply_", &muon_apply_cpu);
  m.impl("muon_apply_.tensor", &muon_apply_tensor_cpu);
}

}  // namespace fastortho
