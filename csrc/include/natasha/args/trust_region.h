#pragma once
// Argument validation of the trust-region ops (tr_cg_init_, cg_dots, cg_step_), shared by the CPU
// and CUDA kernels (plumbing; the math is in natasha/trust_region.h). One input list (grads or
// Bp: any kernel dtype, one per list) and state lists of its accumulation dtype.
#include <ATen/ATen.h>

#include "natasha/args/tensor_lists.h"
#include "natasha/trust_region.h"

namespace natasha {

// Scalars first, then lengths, then (for non-empty lists) devices, dtypes, sizes. Returns the
// accumulation dtype; an empty input list means nothing to do (result: zeros).
inline at::ScalarType check_cg_lists(const char* op, const char* in_name, at::TensorList in,
                                     std::initializer_list<NamedList> state) {
  for (const auto& kv : state) check_same_shape(op, in_name, in, kv.first, kv.second);
  const auto device = op_device({in});
  check_list(op, in_name, in, device);
  check_same_dtype(op, in_name, in);
  const auto acc = acc_dtype(in);
  for (const auto& kv : state) {
    check_list(op, kv.first, kv.second, device);
    check_dtype(op, kv.first, kv.second, acc);
  }
  return acc;
}

inline at::ScalarType check_tr_cg_init_args(at::TensorList v, at::TensorList a, at::TensorList s, at::TensorList r,
                                            at::TensorList p, at::TensorList grads, int64_t norm_mode) {
  TORCH_CHECK(norm_mode >= tr::kSpherical && norm_mode <= tr::kAdagrad,
              "tr_cg_init_: norm_mode must be 0 (spherical), 1 (rmsprop) or 2 (adagrad), got ", norm_mode);
  return check_cg_lists("tr_cg_init_", "grads", grads, {{"v", v}, {"a", a}, {"s", s}, {"r", r}, {"p", p}});
}

inline at::ScalarType check_cg_dots_args(at::TensorList p, at::TensorList Bp, at::TensorList r, at::TensorList a) {
  return check_cg_lists("cg_dots", "Bp", Bp, {{"p", p}, {"r", r}, {"a", a}});
}

inline at::ScalarType check_cg_step_args(at::TensorList s, at::TensorList r, at::TensorList p, at::TensorList Bp,
                                         at::TensorList a) {
  return check_cg_lists("cg_step_", "Bp", Bp, {{"s", s}, {"r", r}, {"p", p}, {"a", a}});
}

// The result of a trust-region op on an empty list: R zeros (fp32) on `device`.
inline at::Tensor cg_empty_result(int64_t R, c10::Device device) {
  return at::zeros({R}, at::TensorOptions().dtype(at::kFloat).device(device));
}

}  // namespace natasha
