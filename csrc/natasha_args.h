// Argument validation of svrg_step, shared by the CPU and CUDA kernels (plumbing; the math is in
// natasha/natasha.h).
#pragma once
#include <ATen/ATen.h>

#include "tensor_lists.h"

namespace natasha {

// Throws naming the op and the argument; returns the accumulation dtype of the state lists.
// grads / snapshot_grads share the params' dtype; mu, anchor, avg_sum, center hold acc_dtype.
inline at::ScalarType check_svrg_step_args(at::TensorList params, at::TensorList grads,
                                           c10::optional<at::TensorList> snapshot_grads,
                                           c10::optional<at::TensorList> mu, at::TensorList anchor,
                                           at::TensorList avg_sum, int64_t finalize,
                                           c10::optional<at::TensorList> center, c10::Device device) {
  constexpr const char* op = "svrg_step";
  TORCH_CHECK(finalize >= 0, op, ": finalize must be >= 0, got ", finalize);
  check_list(op, "params", params, device);
  check_same_dtype(op, "params", params);
  const auto acc = acc_dtype(params);
  auto check_aux = [&](const char* name, at::TensorList ts, bool state) {
    check_list(op, name, ts, device);
    check_same_shape(op, "params", params, name, ts);
    for (size_t i = 0; i < ts.size(); ++i) {
      const auto want = state ? acc : params[0].scalar_type();
      TORCH_CHECK(ts[i].scalar_type() == want, op, ": ", name, "[", i, "] has dtype ", ts[i].scalar_type(),
                  " but ", want, " is required");
    }
  };
  check_aux("grads", grads, false);
  if (snapshot_grads) check_aux("snapshot_grads", *snapshot_grads, false);
  if (mu) check_aux("mu", *mu, true);
  check_aux("anchor", anchor, true);
  check_aux("avg_sum", avg_sum, true);
  if (center) check_aux("center", *center, true);
  return acc;
}

}  // namespace natasha
