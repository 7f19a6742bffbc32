#pragma once
// Argument validation of rademacher_ and global_norm, shared by the CPU and CUDA kernels. Both
// take any list of kernel-dtype tensors, mixed dtypes included (one contract on both devices).
#include <ATen/ATen.h>

#include "natasha/args/tensor_lists.h"

namespace natasha {

inline void check_rademacher_args(at::TensorList tensors) {
  check_list("rademacher_", "tensors", tensors, op_device({tensors}));
}

// global_norm accumulates in acc_dtype(tensors) (fp64 when tensors[0] is fp64, else fp32).
inline at::ScalarType check_global_norm_args(at::TensorList tensors) {
  check_list("global_norm", "tensors", tensors, op_device({tensors}));
  return acc_dtype(tensors);
}

}  // namespace natasha
