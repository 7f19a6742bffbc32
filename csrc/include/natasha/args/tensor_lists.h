#pragma once
// Plumbing shared by every op's validator (natasha/args/*.h, used by the CPU and the CUDA kernel
// alike): checks of tensor-list arguments with error messages that name the op and the argument,
// so bad input surfaces as a Python RuntimeError instead of a crash inside a kernel.
#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace natasha {

// A list argument and its name (for error messages).
using NamedList = std::pair<const char*, at::TensorList>;

// dtypes the kernels are compiled for (AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16)).
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Dense fp16/bf16/fp32/fp64 tensors, all on `device` (or all on ts[0]'s device); contiguous unless
// `any_strides` (read-only inputs of CPU kernels that gather them chunk by chunk: check_read_list).
inline void check_list(const char* op, const char* name, at::TensorList ts,
                       c10::optional<c10::Device> device = c10::nullopt, bool any_strides = false) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i,
                "] is sparse; sparse tensors are not supported");
    TORCH_CHECK(is_kernel_dtype(t.scalar_type()), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                "; expected a floating-point dtype the kernels take (float16, bfloat16, float32, float64)");
    TORCH_CHECK(any_strides || t.is_contiguous(), op, ": ", name, "[", i,
                "] is not contiguous (the Python wrappers in natasha_ext.ops handle that)");
    const c10::Device want = device ? *device : ts[0].device();
    TORCH_CHECK(t.device() == want, op, ": ", name, "[", i, "] is on ", t.device(), " but the op runs on ",
                want, "; all tensors must share one device");
  }
}

// A read-only input list: any strides on CPU, where the kernels read it through
// cpu/chunks.h's read_chunk (a strided tensor is gathered chunk by chunk into a buffer in cache
// instead of copied whole beforehand); contiguous on CUDA. natasha_ext.ops._dispatch.readable is
// the Python side of the same rule.
inline void check_read_list(const char* op, const char* name, at::TensorList ts, c10::Device device) {
  check_list(op, name, ts, device, device.is_cpu());
}

// Same number of tensors, and element for element the same numel.
inline void check_same_shape(const char* op, const char* ref_name, at::TensorList ref,
                             const char* name, at::TensorList other) {
  TORCH_CHECK(ref.size() == other.size(), op, ": ", name, " has ", other.size(),
              " tensors but ", ref_name, " has ", ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    TORCH_CHECK(ref[i].numel() == other[i].numel(), op, ": ", name, "[", i, "] has ",
                other[i].numel(), " elements but ", ref_name, "[", i, "] has ", ref[i].numel());
  }
}

inline void check_same_length(const char* op, const char* ref_name, size_t ref, const char* name, size_t n) {
  TORCH_CHECK(ref == n, op, ": ", name, " has ", n, " entries but ", ref_name, " has ", ref);
}

// Every tensor of `ts` has the same dtype as ts[0].
inline void check_same_dtype(const char* op, const char* name, at::TensorList ts) {
  for (size_t i = 1; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].scalar_type() == ts[0].scalar_type(), op, ": ", name, "[", i,
                "] has dtype ", ts[i].scalar_type(), " but ", name, "[0] has ",
                ts[0].scalar_type(), "; one dtype per list");
  }
}

// Every tensor of `ts` has dtype `want` (state lists: the accumulation dtype).
inline void check_dtype(const char* op, const char* name, at::TensorList ts, at::ScalarType want) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK(ts[i].scalar_type() == want, op, ": ", name, "[", i, "] has dtype ", ts[i].scalar_type(),
                " but ", want, " is required");
}

// Two lists side by side (same count, same numels), each of one dtype, all on `device`.
inline void check_list_pair(const char* op, const char* ref_name, at::TensorList ref, const char* name,
                            at::TensorList other, c10::Device device) {
  check_list(op, ref_name, ref, device);
  check_list(op, name, other, device);
  check_same_shape(op, ref_name, ref, name, other);
  check_same_dtype(op, ref_name, ref);
  check_same_dtype(op, name, other);
}

// Per-layer lists beside `ref` (one entry per layer, any shape), all on `device`.
inline void check_layer_lists(const char* op, const char* ref_name, at::TensorList ref,
                              std::initializer_list<NamedList> others,
                              c10::Device device) {
  check_list(op, ref_name, ref, device);
  for (const auto& kv : others) {
    check_same_length(op, ref_name, ref.size(), kv.first, kv.second.size());
    check_list(op, kv.first, kv.second, device);
  }
}

inline int64_t total_numel(at::TensorList ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

// Accumulation dtype (natasha_ext.precision.accumulation_dtype): fp64 for fp64, fp32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType acc_dtype(at::TensorList ts) {
  return acc_dtype(ts.empty() ? at::kFloat : ts[0].scalar_type());
}

// The device of an op's call: its first tensor's (the CUDA ops put a device guard on it).
inline c10::Device op_device(std::initializer_list<at::TensorList> lists) {
  for (const auto& ts : lists)
    if (!ts.empty()) return ts[0].device();
  return c10::Device(c10::kCPU);
}


}  // namespace natasha
