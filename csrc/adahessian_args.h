// Argument validation of adahessian_step, shared by the CPU and CUDA kernels (plumbing; the math
// is in natasha/adahessian.h).
#pragma once
#include <ATen/ATen.h>

#include "natasha/adahessian.h"
#include "tensor_lists.h"

namespace natasha {

// Throws naming the op and the argument; returns false when the lists are empty (nothing to do).
// device: the kernel's device (CPU), or nullopt to take params[0]'s (CUDA: any one GPU).
inline bool check_adahessian_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                                       at::TensorList exp_hess_sq, at::TensorList curv,
                                       at::IntArrayRef group_sizes, int64_t curv_mode,
                                       c10::optional<c10::Device> device) {
  constexpr const char* op = "adahessian_step";
  TORCH_CHECK(curv_mode >= 0 && curv_mode <= 2, op, ": curv_mode must be 0, 1 or 2, got ", curv_mode);
  TORCH_CHECK(static_cast<size_t>(group_sizes.size()) == params.size(), op, ": group_sizes has ",
              group_sizes.size(), " entries but params has ", params.size());
  for (auto g : group_sizes) TORCH_CHECK(g >= 1, op, ": group_sizes must be >= 1");
  check_same_shape(op, "params", params, "grads", grads);
  check_same_shape(op, "params", params, "exp_avg", exp_avg);
  check_same_shape(op, "params", params, "exp_hess_sq", exp_hess_sq);
  if (params.empty()) return false;
  const c10::Device dev = device ? *device : params[0].device();
  check_list(op, "params", params, dev);
  check_list(op, "grads", grads, dev);
  check_list(op, "exp_avg", exp_avg, dev);
  check_list(op, "exp_hess_sq", exp_hess_sq, dev);
  check_same_dtype(op, "params", params);
  check_same_dtype(op, "grads", grads);
  TORCH_CHECK(grads[0].scalar_type() == params[0].scalar_type(), op, ": grads dtype differs from params dtype");
  const auto acc = acc_dtype(params);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(exp_avg[i].scalar_type() == acc && exp_hess_sq[i].scalar_type() == acc, op, ": exp_avg[", i,
                "]/exp_hess_sq[", i, "] must be ", acc);
  }
  if (curv_mode) {
    check_list(op, "curv", curv, dev);
    check_same_shape(op, "params", params, "curv", curv);
    const auto want = curv_mode == kCurvHz ? params[0].scalar_type() : acc;
    for (size_t i = 0; i < curv.size(); ++i)
      TORCH_CHECK(curv[i].scalar_type() == want, op, ": curv[", i, "] must be ", want, " for curv_mode ", curv_mode);
  }
  return true;
}

}  // namespace natasha
