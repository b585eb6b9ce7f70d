// fastortho._C: op schemas, argument checks, Meta (fake) kernels and the Python module stub.
//
// Backends register themselves in their own files: cpu/muon_step.cpp (CPU), cuda/bindings.cpp (CUDA).
// The module is a plain C extension with no pybind11: importing it runs the static registrations
// below, and the ops are reached through torch.ops.fastortho.*.
#include <Python.h>

#include <torch/library.h>

#include "checks.h"

namespace fastortho {

namespace {
bool any_of(at::ScalarType t, std::initializer_list<at::ScalarType> ok) {
  for (auto s : ok) if (s == t) return true;
  return false;
}

// Checks two parallel lists; returns the common device of their tensors (the first one's).
void check_pair(const char* na, at::TensorList a, const char* nb, at::TensorList b,
                std::initializer_list<at::ScalarType> dtypes_a, std::initializer_list<at::ScalarType> dtypes_b) {
  TORCH_CHECK(a.size() == b.size(), na, " and ", nb, " must have the same length, got ", a.size(), " and ",
              b.size());
  if (a.empty()) return;
  const auto device = a[0].device();
  const auto da = a[0].scalar_type(), db = b[0].scalar_type();
  TORCH_CHECK(any_of(da, dtypes_a), na, " has unsupported dtype ", da);
  TORCH_CHECK(any_of(db, dtypes_b), nb, " has unsupported dtype ", db);
  for (size_t i = 0; i < a.size(); ++i) {
    for (auto [name, t, dt] : {std::tuple{na, &a[i], da}, std::tuple{nb, &b[i], db}}) {
      TORCH_CHECK(t->defined(), name, "[", i, "] is undefined");
      TORCH_CHECK(t->layout() == at::kStrided, name, "[", i, "] must be dense (strided), got ", t->layout());
      TORCH_CHECK(t->scalar_type() == dt, name, "[", i, "] has dtype ", t->scalar_type(), " but ", name,
                  "[0] has ", dt, ": one dtype per list and call (group tensors by dtype)");
      TORCH_CHECK(t->device() == device, name, "[", i, "] is on ", t->device(), " but ", na, "[0] is on ",
                  device);
      TORCH_CHECK(t->is_contiguous(), name, "[", i, "] must be contiguous (shape ", t->sizes(), ", strides ",
                  t->strides(), ")");
    }
    TORCH_CHECK(a[i].sizes() == b[i].sizes(), na, "[", i, "] has shape ", a[i].sizes(), " but ", nb, "[", i,
                "] has ", b[i].sizes());
  }
}
}  // namespace

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "fastortho: unsupported dtype ", t);
  }
}

void check_momentum_args(at::TensorList grads, at::TensorList bufs, at::TensorList outs,
                         const at::Tensor& sumsq) {
  check_pair("grads", grads, "bufs", bufs, {at::kFloat, at::kBFloat16, at::kHalf},
             {at::kFloat, at::kBFloat16, at::kHalf});
  check_pair("grads", grads, "outs", outs, {at::kFloat, at::kBFloat16, at::kHalf},
             {at::kBFloat16, at::kFloat, at::kHalf});
  // float64 holds the kernels' double sum as it is: it cannot overflow for fp32/bf16/fp16 u (at most
  // numel * 2^256); float32 rounds it and overflows to inf above 3.4e38.
  TORCH_CHECK(sumsq.scalar_type() == at::kDouble || sumsq.scalar_type() == at::kFloat,
              "sumsq must be float64 (or float32), got ", sumsq.scalar_type());
  TORCH_CHECK(sumsq.dim() == 1 && sumsq.size(0) == static_cast<int64_t>(grads.size()) && sumsq.is_contiguous(),
              "sumsq must be a contiguous tensor of shape (", grads.size(), ",), got ", sumsq.sizes());
  if (!grads.empty()) {
    TORCH_CHECK(sumsq.device() == grads[0].device(), "sumsq is on ", sumsq.device(), " but grads on ",
                grads[0].device());
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    // a buffer updated in place while also being read as the grad or written as the output would race
    TORCH_CHECK(!bufs[i].is_same(grads[i]) && !bufs[i].is_same(outs[i]) && !outs[i].is_same(grads[i]),
                "grads[", i, "], bufs[", i, "] and outs[", i, "] must be distinct tensors");
  }
}

void check_apply_args(at::TensorList params, at::TensorList updates, c10::ArrayRef<double> scales) {
  check_pair("params", params, "updates", updates, {at::kFloat, at::kBFloat16, at::kHalf},
             {at::kBFloat16, at::kFloat, at::kHalf});
  TORCH_CHECK(scales.size() == params.size(), "scales has ", scales.size(), " entries for ", params.size(),
              " tensors");
}

void check_apply_tensor_args(at::TensorList params, at::TensorList updates, const at::Tensor& lr,
                             const at::Tensor& weight_decay, const at::Tensor& scales) {
  check_pair("params", params, "updates", updates, {at::kFloat, at::kBFloat16, at::kHalf},
             {at::kBFloat16, at::kFloat, at::kHalf});
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == n &&
                  scales.is_contiguous(),
              "scales must be a contiguous float32 tensor of shape (", n, ",), got ", scales.scalar_type(), " ",
              scales.sizes());
  for (auto [name, t] : {std::pair{"lr", &lr}, std::pair{"weight_decay", &weight_decay}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1, name,
                " must be a float32 tensor with one element, got ", t->scalar_type(), " ", t->sizes());
  }
  if (n == 0) return;
  // A CPU tensor is read on the host (no device sync); any other must sit with the params.
  for (auto [name, t] : {std::pair{"lr", &lr}, std::pair{"weight_decay", &weight_decay}, std::pair{"scales", &scales}}) {
    TORCH_CHECK(t->device() == params[0].device() || t->device().is_cpu(), name, " is on ", t->device(),
                " but params on ", params[0].device());
  }
}

namespace {
// Meta kernels: the ops return nothing and only mutate their arguments, so tracing (FakeTensor,
// torch.compile) needs nothing but the checks.
void muon_momentum_meta(at::TensorList grads, at::TensorList bufs, at::TensorList outs, at::Tensor sumsq,
                        double /*momentum*/, bool /*nesterov*/, bool /*ema*/) {
  check_momentum_args(grads, bufs, outs, sumsq);
}
void muon_apply_meta(at::TensorList params, at::TensorList updates, double /*lr*/, double /*wd*/,
                     c10::ArrayRef<double> scales) {
  check_apply_args(params, updates, scales);
}
void muon_apply_tensor_meta(at::TensorList params, at::TensorList updates, const at::Tensor& lr,
                            const at::Tensor& weight_decay, const at::Tensor& scales) {
  check_apply_tensor_args(params, updates, lr, weight_decay, scales);
}
}  // namespace

TORCH_LIBRARY(fastortho, m) {
  // Outputs are caller-allocated (mutable args, `-> ()`): torch.compile can auto-functionalize an op
  // that mutates tensor lists, but not one that also returns a list of new tensors.
  m.def(
      "muon_momentum_(Tensor[] grads, Tensor(a!)[] bufs, Tensor(b!)[] outs, Tensor(c!) sumsq, "
      "float momentum, bool nesterov, bool ema) -> ()");
  // Scalars as numbers (d = 1 - lr*wd and a_i = lr*s_i in double, rounded to float: torch.optim.Muon's
  // p.mul_(1 - lr*wd); p.add_(O, alpha=-lr*s)) or, in the .tensor overload (as torch's
  // _fused_adam_.tensor_lr), as float32 tensors read where they live, with d and a_i in float.
  m.def("muon_apply_(Tensor(a!)[] params, Tensor[] updates, float lr, float weight_decay, float[] scales) -> ()");
  m.def(
      "muon_apply_.tensor(Tensor(a!)[] params, Tensor[] updates, Tensor lr, Tensor weight_decay, "
      "Tensor scales) -> ()");
}

TORCH_LIBRARY_IMPL(fastortho, Meta, m) {
  m.impl("muon_momentum_", &muon_momentum_meta);
  m.impl("muon_apply_", &muon_apply_meta);
  m.impl("muon_apply_.tensor", &muon_apply_tensor_meta);
}

}  // namespace fastortho

// A module object for `import fastortho._C`; the ops were registered by the static initializers above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastortho compiled ops (torch.ops.fastortho)",
                                   -1, nullptr};
  return PyModule_Create(&module_def);
}
