// CUDA kernels of the foundation ops: rademacher_ and global_norm. Mixed-dtype lists are taken
// as the CPU kernels take them: one launch per dtype over that dtype's tensors, each keeping its
// place in the whole list (Philox counters, partial-sum rows).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "multi_tensor_apply.cuh"
#include "natasha/args/foundation.h"
#include "natasha/philox.h"

namespace natasha {
namespace cuda {
namespace {

template <typename scalar_t>
struct RademacherOp {
  uint64_t seed, offset;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
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

// Per-chunk sum of squares, accumulated in opmath (fp64 for fp64 tensors) and stored as acc_t
// (the list's accumulation dtype), as the CPU kernel does.
template <typename scalar_t, typename acc_t>
struct SumSqOp {
  acc_t* partials;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* p = chunk_ptr<scalar_t>(meta, 0, c);
    op_t v[1] = {0};
    for (int64_t i = threadIdx.x; i < c.n; i += kBlock) {
      const op_t x = static_cast<op_t>(p[i]);
      v[0] += x * x;
    }
    block_reduce<1, op_t>(v);
    if (threadIdx.x == 0) partials[c.index] = static_cast<acc_t>(v[0]);
  }
};

template <typename acc_t>
__global__ void sqrt_kernel(acc_t* x) { x[0] = sqrt(x[0]); }

// Calls f(scalar_t{}, tensors, position) once per dtype class of `tensors` (first-seen order);
// position.bases keep each tensor's place in the whole list.
template <typename F>
void for_each_dtype(at::TensorList tensors, F&& f) {
  const auto classes =
      group_indices<at::ScalarType>(tensors.size(), [&](size_t i) { return tensors[i].scalar_type(); });
  for (const auto& cls : classes) {
    const std::vector<size_t>& idx = cls.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cls.first, "natasha_for_each_dtype", [&] {
      f(scalar_t(0), select(tensors, idx), position_of(tensors, idx, 0));
    });
  }
}

void rademacher_cuda(at::TensorList tensors, int64_t seed, int64_t offset) {
  const c10::cuda::OptionalCUDAGuard guard(guard_device({tensors}));
  check_rademacher_args(tensors);
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  for_each_dtype(tensors, [&](auto tag, const std::vector<at::Tensor>& sub, const ListPosition& pos) {
    using scalar_t = decltype(tag);
    multi_tensor_apply<1>({sub}, RademacherOp<scalar_t>{s, o}, pos);
  });
}

at::Tensor global_norm_cuda(at::TensorList tensors) {
  const c10::cuda::OptionalCUDAGuard guard(guard_device({tensors}));
  const auto acc = check_global_norm_args(tensors);
  Reduction red(tensors, 1, acc);
  // Each dtype class writes the partial rows of its own chunks: number them by class, one
  // after the other (the sum is over all rows, so only disjointness matters).
  int64_t chunk0 = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "global_norm", [&] {
    using acc_t = scalar_t;
    for_each_dtype(tensors, [&](auto tag, const std::vector<at::Tensor>& sub, ListPosition pos) {
      using in_t = decltype(tag);
      pos.chunk0 = chunk0;
      multi_tensor_apply<1>({sub}, SumSqOp<in_t, acc_t>{red.partials.data_ptr<acc_t>()}, pos);
      chunk0 += count_chunks(sub);
    });
    red.finish<1, acc_t>();
    sqrt_kernel<acc_t><<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(red.result.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return red.result.view({});
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("rademacher_", &rademacher_cuda);
  m.impl("global_norm", &global_norm_cuda);
}

}  // namespace cuda
}  // namespace natasha
