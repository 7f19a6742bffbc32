#pragma once
// Plumbing shared by the CPU and CUDA kernels: validation of tensor-list arguments with
// error messages that name the argument. Every op checks its inputs here before any kernel
// runs, so bad input surfaces as a Python RuntimeError instead of a crash inside a kernel.
#include <ATen/ATen.h>
#include <string>
#include <vector>

namespace natasha {

inline void check_list(const char* op, const char* name, at::TensorList ts,
                       c10::optional<c10::Device> device = c10::nullopt) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i,
                "] is sparse; sparse tensors are not supported");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, "[", i,
                "] has dtype ", t.scalar_type(), "; expected a floating-point dtype");
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i,
                "] is not contiguous (the Python wrappers in natasha_ext.ops handle that)");
    if (device) {
      TORCH_CHECK(t.device() == *device, op, ": ", name, "[", i, "] is on ", t.device(),
                  " but the op runs on ", *device, "; all tensors must share one device");
    }
  }
  if (!device && !ts.empty()) {
    for (size_t i = 1; i < ts.size(); ++i) {
      TORCH_CHECK(ts[i].device() == ts[0].device(), op, ": ", name, "[", i, "] is on ",
                  ts[i].device(), " but ", name, "[0] is on ", ts[0].device(),
                  "; all tensors must share one device");
    }
  }
}

// Checks that `other` matches `ref` element for element in length, numel and device.
inline void check_same_shape(const char* op, const char* ref_name, at::TensorList ref,
                             const char* name, at::TensorList other) {
  TORCH_CHECK(ref.size() == other.size(), op, ": ", name, " has ", other.size(),
              " tensors but ", ref_name, " has ", ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    TORCH_CHECK(ref[i].numel() == other[i].numel(), op, ": ", name, "[", i, "] has ",
                other[i].numel(), " elements but ", ref_name, "[", i, "] has ", ref[i].numel());
  }
}

// Checks that every tensor of `ts` has the same dtype as ts[0].
inline void check_same_dtype(const char* op, const char* name, at::TensorList ts) {
  for (size_t i = 1; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].scalar_type() == ts[0].scalar_type(), op, ": ", name, "[", i,
                "] has dtype ", ts[i].scalar_type(), " but ", name, "[0] has ",
                ts[0].scalar_type(), "; one dtype per list");
  }
}

inline int64_t total_numel(at::TensorList ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

// Accumulation dtype: fp32 for fp32/fp16/bf16, fp64 for fp64.
inline at::ScalarType acc_dtype(at::TensorList ts) {
  return (!ts.empty() && ts[0].scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

}  // namespace natasha
