// CUDA registrations of the fastortho ops: checks, tensor -> struct conversion, the current stream,
// the float64 partials workspace (from the caching allocator: no sync, graph-capturable), then the
// torch-free launchers of muon_step.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "launch.h"

namespace fastortho {
namespace {

// A launch error, with the fix spelled out for the one a user can act on: a GPU whose architecture
// the build has neither SASS nor PTX for (cudaErrorNoKernelImageForDevice, e.g. a build for "8.0;9.0"
// without "+PTX" run on a newer GPU). The message keeps the phrase "no kernel image", which the
// Python wrappers (fastortho/ops/muon_step.py) recognise to fall back to torch._foreach ops.
void check_launch(cudaError_t e, const char* op, const at::Device& device) {
  if (e == cudaErrorNoKernelImageForDevice) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index());
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index());
    TORCH_CHECK(false, op, ": fastortho._C has no kernel image for this GPU (", device, ", sm_", major, minor,
                "): it was built without SASS or PTX for this architecture. Rebuild with "
                "TORCH_CUDA_ARCH_LIST=\"", major, ".", minor, "+PTX\" FASTORTHO_BUILD_EXT=1 "
                "pip install --no-build-isolation -e . (or pass backend=\"foreach\").");
  }
  C10_CUDA_CHECK(e);
}

void muon_momentum_cuda(at::TensorList grads, at::TensorList bufs, at::TensorList outs, at::Tensor sumsq,
                        double momentum, bool nesterov, bool ema) {
  check_momentum_args(grads, bufs, outs, sumsq);
  const int n = static_cast<int>(grads.size());
  if (n == 0) return;
  TORCH_CHECK(grads[0].is_cuda(), "muon_momentum_ (CUDA kernel) got a ", grads[0].device(), " tensor");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  std::vector<cuda::MomentumTensor> ts(n);
  for (int i = 0; i < n; ++i) {
    ts[i] = {grads[i].const_data_ptr(), bufs[i].data_ptr(), outs[i].data_ptr(), grads[i].numel()};
  }
  const int64_t ws_len = std::max<int64_t>(1, cuda::momentum_workspace_len(ts.data(), n));
  at::Tensor partials = at::empty({ws_len}, sumsq.options().dtype(at::kDouble));
  check_launch(cuda::launch_muon_momentum(
      ts.data(), n, dtype_code(grads[0].scalar_type()), dtype_code(bufs[0].scalar_type()),
      dtype_code(outs[0].scalar_type()), make_momentum_scalars(momentum, nesterov, ema),
      partials.data_ptr<double>(), sumsq.data_ptr(), sumsq.scalar_type() == at::kDouble,
      c10::cuda::getCurrentCUDAStream().stream()), "muon_momentum_", grads[0].device());
}

// coef(i): a_i = lr*s_i (host scalars) or s_i read on the host (see ApplyScalars).
template <typename Coef>
void run_apply_cuda(at::TensorList params, at::TensorList updates, const ApplyScalars& s, Coef coef) {
  const int n = static_cast<int>(params.size());
  TORCH_CHECK(params[0].is_cuda(), "muon_apply_ (CUDA kernel) got a ", params[0].device(), " tensor");
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<cuda::ApplyTensor> ts(n);
  for (int i = 0; i < n; ++i) {
    ts[i] = {params[i].data_ptr(), updates[i].const_data_ptr(), params[i].numel(), coef(i)};
  }
  check_launch(cuda::launch_muon_apply(ts.data(), n, dtype_code(params[0].scalar_type()),
                                       dtype_code(updates[0].scalar_type()), s,
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "muon_apply_", params[0].device());
}

void muon_apply_cuda(at::TensorList params, at::TensorList updates, double lr, double weight_decay,
                     c10::ArrayRef<double> scales) {
  check_apply_args(params, updates, scales);
  if (params.empty()) return;
  ApplyScalars s{};
  s.host_scalars = true;
  s.lr = static_cast<float>(lr);
  s.wd = static_cast<float>(weight_decay);
  s.d_host = static_cast<float>(1.0 - lr * weight_decay);
  run_apply_cuda(params, updates, s, [&](int i) { return static_cast<float>(lr * scales[i]); });
}

void muon_apply_tensor_cuda(at::TensorList params, at::TensorList updates, const at::Tensor& lr,
                            const at::Tensor& weight_decay, const at::Tensor& scales) {
  check_apply_tensor_args(params, updates, lr, weight_decay, scales);
  if (params.empty()) return;
  ApplyScalars s{};
  s.host_scalars = false;
  // A CPU tensor is read here (no device sync); a CUDA one is read by the kernel.
  if (lr.is_cuda()) s.lr_ptr = lr.const_data_ptr<float>();
  else s.lr = *lr.const_data_ptr<float>();
  if (weight_decay.is_cuda()) s.wd_ptr = weight_decay.const_data_ptr<float>();
  else s.wd = *weight_decay.const_data_ptr<float>();
  const float* host_scales = scales.is_cuda() ? nullptr : scales.const_data_ptr<float>();
  if (scales.is_cuda()) s.scales_ptr = scales.const_data_ptr<float>();
  run_apply_cuda(params, updates, s, [&](int i) { return host_scales ? host_scales[i] : 0.0f; });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastortho, CUDA, m) {
  m.impl("muon_momentum_", &muon_momentum_cuda);
  m.impl("muon_apply_", &muon_apply_cuda);
  m.impl("muon_apply_.tensor", &muon_apply_tensor_cuda);
}

}  // namespace fastortho
