#pragma once
// Argument validation of hutchinson_diag_ and adahessian_step_, shared by the CPU and CUDA kernels
// (plumbing; the math is in natasha/adahessian.h).
#include <ATen/ATen.h>

#include "natasha/adahessian.h"
#include "natasha/args/tensor_lists.h"

namespace natasha {

// Throws naming the op and the argument; returns false when the lists are empty (nothing to do).
// diag and hz each hold one dtype (any kernel dtype; the pair decides the accumulation).
inline bool check_hutchinson_diag_args(at::TensorList diag, at::TensorList hz) {
  constexpr const char* op = "hutchinson_diag_";
  const c10::Device dev = op_device({hz, diag});
  check_read_list(op, "hz", hz, dev);
  check_list(op, "diag", diag, dev);
  check_same_shape(op, "hz", hz, "diag", diag);
  check_same_dtype(op, "hz", hz);
  check_same_dtype(op, "diag", diag);
  return !hz.empty();
}

// Throws naming the op and the argument; returns false when the lists are empty (nothing to do).
inline bool check_adahessian_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                                       at::TensorList exp_hess_sq, at::TensorList curv,
                                       at::IntArrayRef group_sizes, int64_t curv_mode) {
  constexpr const char* op = "adahessian_step_";
  TORCH_CHECK(curv_mode >= 0 && curv_mode <= 2, op, ": curv_mode must be 0, 1 or 2, got ", curv_mode);
  check_same_length(op, "params", params.size(), "group_sizes", group_sizes.size());
  for (auto g : group_sizes) TORCH_CHECK(g >= 1, op, ": group_sizes must be >= 1, got ", g);
  check_same_shape(op, "params", params, "grads", grads);
  check_same_shape(op, "params", params, "exp_avg", exp_avg);
  check_same_shape(op, "params", params, "exp_hess_sq", exp_hess_sq);
  if (params.empty()) return false;
  const c10::Device dev = params[0].device();
  check_list(op, "params", params, dev);
  check_read_list(op, "grads", grads, dev);
  check_list(op, "exp_avg", exp_avg, dev);
  check_list(op, "exp_hess_sq", exp_hess_sq, dev);
  check_same_dtype(op, "params", params);
  check_dtype(op, "grads", grads, params[0].scalar_type());
  const auto acc = acc_dtype(params);
  check_dtype(op, "exp_avg", exp_avg, acc);
  check_dtype(op, "exp_hess_sq", exp_hess_sq, acc);
  if (curv_mode != kCurvNone) {
    check_read_list(op, "curv", curv, dev);
    check_same_shape(op, "params", params, "curv", curv);
    check_dtype(op, "curv", curv, curv_mode == kCurvHz ? params[0].scalar_type() : acc);
  }
  return true;
}

}  // namespace natasha
