// Argument checks shared by every backend of the fastortho ops (CPU, CUDA, Meta), so that a bad call
// fails the same way everywhere (and under torch.compile's fake tensors). Torch headers: .cpp only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace fastortho {

// grads (fp32/bf16/fp16), bufs (fp32/bf16/fp16), outs (bf16/fp32/fp16): one dtype per list, same
// shapes, contiguous, one device; sumsq: float64 (or float32), contiguous, shape (n,), same device.
void check_momentum_args(at::TensorList grads, at::TensorList bufs, at::TensorList outs,
                         const at::Tensor& sumsq);

// params (fp32/bf16/fp16), updates (bf16/fp32/fp16): one dtype per list, same shapes, contiguous,
// one device; scales: one number per tensor.
void check_apply_args(at::TensorList params, at::TensorList updates, c10::ArrayRef<double> scales);

// The .tensor overload: as above, with lr and weight_decay float32 one-element tensors and scales a
// contiguous float32 (n,) tensor, each on the params' device (read by the kernel) or on the CPU (read
// on the host).
void check_apply_tensor_args(at::TensorList params, at::TensorList updates, const at::Tensor& lr,
                             const at::Tensor& weight_decay, const at::Tensor& scales);

// Dtype codes used by the launchers (identical in the CUDA launcher API, see cuda/launch.h).
int dtype_code(at::ScalarType t);  // 0 fp32, 1 bf16, 2 fp16

}  // namespace fastortho
