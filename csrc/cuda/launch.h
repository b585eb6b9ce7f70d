// The CUDA launcher API: plain structs and raw pointers, no torch headers, so that muon_step.cu
// compiles with nvcc alone (fast builds) and bindings.cpp does all the at::Tensor work.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../muon_step.h"

namespace fastortho {
namespace cuda {

// dtype codes: 0 fp32, 1 bf16, 2 fp16 (fastortho::dtype_code)

struct MomentumTensor {
  const void* g;  // grad, read only
  void* b;        // momentum buffer, updated in place
  void* u;        // NS input, written
  int64_t numel;
};

struct ApplyTensor {
  void* p;        // parameter, updated in place
  const void* o;  // orthogonalized update, read only
  int64_t numel;
  float coef;     // a_i = lr*s_i (host scalars) or s_i (see ApplyScalars)
};

// Number of float64 partials `launch_muon_momentum` needs in `partials` (one per chunk).
int64_t momentum_workspace_len(const MomentumTensor* ts, int n);

// One pass over every tensor (a few launches of up to kMaxTensorsPerLaunch tensors each, plus a tiny
// deterministic per-tensor reduction of the per-chunk partials into `sumsq[i]`: float64 when
// `sumsq_f64`, else rounded to fp32). Returns the first launch error, or cudaSuccess.
cudaError_t launch_muon_momentum(const MomentumTensor* ts, int n, int g_dtype, int b_dtype, int u_dtype,
                                 MomentumScalars m, double* partials, void* sumsq, bool sumsq_f64,
                                 cudaStream_t stream);

cudaError_t launch_muon_apply(const ApplyTensor* ts, int n, int p_dtype, int o_dtype, ApplyScalars s,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fastortho
