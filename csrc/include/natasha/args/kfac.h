#pragma once
// Argument validation of the K-FAC / ANG / IFANG ops, shared by the CPU and CUDA kernels
// (plumbing; the per-element math is in natasha/kfac.h, the host-side ATen parts in
// natasha/kfac_host.h). Layers are 2-D matrices T (out x in).
#include <ATen/ATen.h>

#include "natasha/args/tensor_lists.h"

namespace natasha {

// factor_i <- decay factor_i + (1 - decay) scales[i] rows_i^T rows_i: factors square (in x in),
// rows (batch x in) of any kernel dtype (cast to the factor's).
inline void check_kfac_factor_ema_args(at::TensorList factors, at::TensorList rows, at::ArrayRef<double> scales,
                                       double decay) {
  constexpr const char* op = "kfac_factor_ema_";
  TORCH_CHECK(decay >= 0.0 && decay < 1.0, op, ": decay must be in [0, 1), got ", decay);
  check_same_length(op, "factors", factors.size(), "scales", scales.size());
  check_layer_lists(op, "factors", factors, {{"rows", rows}}, op_device({factors}));
  for (size_t l = 0; l < factors.size(); ++l) {
    TORCH_CHECK(factors[l].dim() == 2 && rows[l].dim() == 2 && factors[l].size(0) == rows[l].size(1) &&
                    factors[l].size(1) == rows[l].size(1),
                op, ": factors[", l, "] ", factors[l].sizes(), " does not match rows[", l, "] ", rows[l].sizes());
  }
}

// grads: 2-D, one dtype. Returns the accumulation dtype of the reductions.
inline at::ScalarType check_layers(const char* op, at::TensorList grads) {
  const auto device = op_device({grads});
  check_list(op, "grads", grads, device);
  check_same_dtype(op, "grads", grads);
  for (size_t l = 0; l < grads.size(); ++l)
    TORCH_CHECK(grads[l].dim() == 2, op, ": grads[", l, "] must be 2-D, got ", grads[l].dim(), "-D");
  return acc_dtype(grads);
}

// g_inv_l (out x out) and a_inv_l (in x in) of any kernel dtype (the product runs in g_inv's).
inline at::ScalarType check_kfac_precondition_args(at::TensorList grads, at::TensorList g_inv, at::TensorList a_inv) {
  constexpr const char* op = "kfac_precondition";
  const auto acc = check_layers(op, grads);
  check_layer_lists(op, "grads", grads, {{"g_inv", g_inv}, {"a_inv", a_inv}}, op_device({grads}));
  for (size_t l = 0; l < grads.size(); ++l) {
    const auto& t = grads[l];
    TORCH_CHECK(g_inv[l].dim() == 2 && g_inv[l].size(0) == t.size(0) && g_inv[l].size(1) == t.size(0) &&
                    a_inv[l].dim() == 2 && a_inv[l].size(0) == t.size(1) && a_inv[l].size(1) == t.size(1),
                op, ": layer ", l, " grads ", t.sizes(), " needs g_inv (", t.size(0), ", ", t.size(0), ") and a_inv (",
                t.size(1), ", ", t.size(1), "), got ", g_inv[l].sizes(), " and ", a_inv[l].sizes());
  }
  return acc;
}

// ya_l (k x in), yg_l (k x out) with one k per layer, damping_l > 0. ya/yg may be strided (they
// are read through ATen matmuls), so only their dtype and device are checked.
inline at::ScalarType check_kfac_smw_apply_args(at::TensorList grads, at::TensorList ya, at::TensorList yg,
                                                at::ArrayRef<double> damping) {
  constexpr const char* op = "kfac_smw_apply";
  const auto acc = check_layers(op, grads);
  check_same_length(op, "grads", grads.size(), "ya", ya.size());
  check_same_length(op, "grads", grads.size(), "yg", yg.size());
  check_same_length(op, "grads", grads.size(), "damping", damping.size());
  const auto device = op_device({grads});
  for (const auto& [name, ts] : {NamedList{"ya", ya}, NamedList{"yg", yg}}) {
    for (size_t l = 0; l < ts.size(); ++l) {
      TORCH_CHECK(ts[l].defined() && ts[l].layout() == at::kStrided && is_kernel_dtype(ts[l].scalar_type()), op,
                  ": ", name, "[", l, "] must be a dense float16/bfloat16/float32/float64 tensor");
      TORCH_CHECK(ts[l].device() == device, op, ": ", name, "[", l, "] is on ", ts[l].device(),
                  " but the op runs on ", device);
    }
  }
  for (size_t l = 0; l < grads.size(); ++l) {
    const auto& t = grads[l];
    TORCH_CHECK(ya[l].dim() == 2 && yg[l].dim() == 2 && ya[l].size(1) == t.size(1) && yg[l].size(1) == t.size(0) &&
                    ya[l].size(0) == yg[l].size(0),
                op, ": layer ", l, " grads ", t.sizes(), " needs ya (k, ", t.size(1), ") and yg (k, ", t.size(0),
                "), got ", ya[l].sizes(), " and ", yg[l].sizes());
    TORCH_CHECK(damping[l] > 0, op, ": damping[", l, "] must be > 0, got ", damping[l]);
  }
  return acc;
}

// nat and grads: the same shapes and one dtype; reductions (L, 3) of any floating kernel dtype
// and scale (one value) on the op's device (CPU: a CPU scale; CUDA: CPU or device scale).
// Returns false when the lists are empty (result: an empty (0, 2) coefficient tensor).
inline bool check_ang_combine_args(at::TensorList nat, at::TensorList grads, const at::Tensor& reductions,
                                   const at::Tensor& scale, double lam) {
  constexpr const char* op = "ang_combine_";
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, op, ": lam must be in [0, 1], got ", lam);
  const auto device = nat.empty() ? reductions.device() : nat[0].device();
  check_list_pair(op, "nat", nat, "grads", grads, device);
  TORCH_CHECK(nat.empty() || nat[0].scalar_type() == grads[0].scalar_type(), op,
              ": nat and grads must have the same dtype, got ", nat[0].scalar_type(), " and ", grads[0].scalar_type());
  const int64_t L = static_cast<int64_t>(nat.size());
  TORCH_CHECK(reductions.device() == device && reductions.dim() == 2 && reductions.size(0) == L &&
                  reductions.size(1) == 3,
              op, ": reductions must be a tensor of shape (", L, ", 3) on ", device, ", got ", reductions.sizes(),
              " on ", reductions.device());
  TORCH_CHECK(is_kernel_dtype(reductions.scalar_type()), op, ": reductions has dtype ", reductions.scalar_type(),
              "; expected float16, bfloat16, float32 or float64");
  TORCH_CHECK(scale.numel() == 1 && at::isFloatingType(scale.scalar_type()), op,
              ": scale must hold one floating value, got ", scale.numel(), " of ", scale.scalar_type());
  TORCH_CHECK(device.is_cuda() || scale.device().is_cpu(), op, ": scale must be a CPU tensor for CPU inputs");
  return L > 0;
}

}  // namespace natasha
