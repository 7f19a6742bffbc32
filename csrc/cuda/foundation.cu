// CUDA kernels of the foundation ops: rademacher_ and global_norm.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../tensor_lists.h"
#include "multi_tensor_apply.cuh"
#include "natasha/philox.h"

namespace natasha {
namespace cuda {
namespace {

template <typename scalar_t>
struct RademacherOp {
  uint64_t seed, offset;
  __device__ void operator()(const TensorListMeta<1>& meta, const Chunk& c) const {
    scalar_t* p = chunk_ptr<scalar_t>(meta, 0, c);
    // Each thread fills 4 consecutive elements from one Philox call (they share a block of 128).
    for (int64_t i = 4 * static_cast<int64_t>(threadIdx.x); i < c.n; i += 4 * kBlock) {
      const uint64_t k = static_cast<uint64_t>(c.first + i);
      const Philox4 b = philox_block(seed, offset, k >> 7);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (i + j < c.n) {
          const uint64_t kj = k + j;
          // k..k+3 may straddle a 128-block boundary only when c.first is not a multiple of 4.
          const Philox4 bj = ((kj >> 7) == (k >> 7)) ? b : philox_block(seed, offset, kj >> 7);
          p[i + j] = static_cast<scalar_t>(rademacher_from_block(bj, kj));
        }
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
struct SumSqOp {
  acc_t* partials;
  __device__ void operator()(const TensorListMeta<1>& meta, const Chunk& c) const {
    const scalar_t* p = chunk_ptr<scalar_t>(meta, 0, c);
    acc_t v[1] = {0};
    for (int64_t i = threadIdx.x; i < c.n; i += kBlock) {
      const acc_t x = static_cast<acc_t>(p[i]);
      v[0] += x * x;
    }
    block_reduce<1, acc_t>(v);
    if (threadIdx.x == 0) partials[c.index] = v[0];
  }
};

template <typename acc_t>
__global__ void sqrt_kernel(acc_t* x) { x[0] = sqrt(x[0]); }

void rademacher_cuda(at::TensorList tensors, int64_t seed, int64_t offset) {
  if (tensors.empty()) return;
  check_list("rademacher_", "tensors", tensors, tensors[0].device());
  check_same_dtype("rademacher_", "tensors", tensors);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "rademacher_", [&] {
    multi_tensor_apply<1>({tensors.vec()},
                          RademacherOp<scalar_t>{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)});
  });
}

at::Tensor global_norm_cuda(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "global_norm: tensors is empty");
  check_list("global_norm", "tensors", tensors, tensors[0].device());
  check_same_dtype("global_norm", "tensors", tensors);
  const auto acc = acc_dtype(tensors);
  Reduction red(tensors, 1, acc);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "global_norm", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    multi_tensor_apply<1>({tensors.vec()}, SumSqOp<scalar_t, acc_t>{red.partials.data_ptr<acc_t>()});
    out = red.finish<1, acc_t>();
    sqrt_kernel<acc_t><<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.view({});
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("rademacher_", &rademacher_cuda);
  m.impl("global_norm", &global_norm_cuda);
}

}  // namespace cuda
}  // namespace natasha
