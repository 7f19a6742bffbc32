#pragma once
// Argument validation of svrg_step_ and oja_step_, shared by the CPU and CUDA kernels (plumbing;
// the math is in natasha/natasha.h). Contract on both devices: bad arguments raise naming the op
// and the argument; empty lists (reachable when another tensor argument decides the device)
// return the neutral results below.
#include <ATen/ATen.h>

#include "natasha/args/tensor_lists.h"

namespace natasha {

// Throws naming the op and the argument; returns the accumulation dtype of the state lists.
// grads / snapshot_grads share the params' dtype; mu, anchor, avg_sum, center hold acc_dtype.
inline at::ScalarType check_svrg_step_args(at::TensorList params, at::TensorList grads,
                                           c10::optional<at::TensorList> snapshot_grads,
                                           c10::optional<at::TensorList> mu, at::TensorList anchor,
                                           at::TensorList avg_sum, c10::optional<at::TensorList> center,
                                           int64_t finalize) {
  constexpr const char* op = "svrg_step_";
  TORCH_CHECK(finalize >= 0, op, ": finalize must be >= 0, got ", finalize);
  const auto device = op_device({params});
  check_list(op, "params", params, device);
  check_same_dtype(op, "params", params);
  const auto acc = acc_dtype(params);
  auto check_aux = [&](const char* name, at::TensorList ts, bool state) {
    check_list(op, name, ts, device);
    check_same_shape(op, "params", params, name, ts);
    if (!params.empty()) check_dtype(op, name, ts, state ? acc : params[0].scalar_type());
  };
  check_aux("grads", grads, false);
  if (snapshot_grads) check_aux("snapshot_grads", *snapshot_grads, false);
  if (mu) check_aux("mu", *mu, true);
  check_aux("anchor", anchor, true);
  check_aux("avg_sum", avg_sum, true);
  if (center) check_aux("center", *center, true);
  return acc;
}

// svrg_step_ of an empty list: [sum d^2, ||z - center||^2, kappa] = [0, 0, 1].
inline at::Tensor svrg_step_empty_result(c10::Device device) {
  return at::tensor({0.0f, 0.0f, 1.0f}).to(device);
}

// Throws naming the op and the argument; returns false when the lists are empty (result: zeros).
// v is kept in the accumulation dtype of hv (fp32, fp64 for fp64 hv); scale is one value of that
// dtype on v's device (CPU: any CPU tensor).
inline bool check_oja_step_args(at::TensorList v, at::TensorList hv, const at::Tensor& scale) {
  constexpr const char* op = "oja_step_";
  const auto device = op_device({v, hv});
  check_list_pair(op, "v", v, "hv", hv, device);
  TORCH_CHECK(scale.defined() && scale.numel() == 1 && at::isFloatingType(scale.scalar_type()), op,
              ": scale must be a 1-element floating tensor, got ", scale.defined() ? scale.sizes() : at::IntArrayRef{});
  if (v.empty()) return false;
  TORCH_CHECK(scale.device() == device, op, ": scale is on ", scale.device(), " but v is on ", device);
  const auto acc = acc_dtype(hv);
  TORCH_CHECK(v[0].scalar_type() == acc, op, ": v has dtype ", v[0].scalar_type(), " but hv (", hv[0].scalar_type(),
              ") needs v in ", acc, " (the Oja vector is kept in the accumulation dtype)");
  return true;
}

}  // namespace natasha
