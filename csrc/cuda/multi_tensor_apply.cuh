#pragma once
// Multi-tensor apply: one kernel launch over a whole list of tensors (several lists of the
// same shapes side by side: params, grads, moments ...). The tensors' addresses travel in the
// kernel's parameter block (kept under the classic 4 KB limit); each block handles one chunk of
// one tensor. Lists with more tensors or chunks than fit are covered by several launches.
// Blocks also know their global chunk index, so reductions write one partial per chunk and a
// second kernel sums them in a fixed order: deterministic and without a host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <vector>

namespace natasha {
namespace cuda {

constexpr int kBlock = 512;
constexpr int64_t kChunk = 65536;
constexpr int kMaxBlocks = 256;

// Tensors per launch so that the metadata stays below 4 KB for a list depth D.
template <int D>
struct MaxTensors {
  static constexpr int value = (2800 / ((D + 2) * 8)) > 96 ? 96 : (2800 / ((D + 2) * 8));
};

template <int D>
struct TensorListMeta {
  void* addr[D][MaxTensors<D>::value];
  int64_t numel[MaxTensors<D>::value];
  int64_t base[MaxTensors<D>::value];  // index of the tensor's first element in the whole list
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
  int64_t chunk0;  // global chunk index of this launch's block 0
};

// What a functor gets for its block: the tensor slot t (pointers: meta.addr[d][t] + start),
// the chunk length n, the chunk's first element index in the concatenated list (Philox
// counters) and the global chunk index (the slot of its partial sum).
struct Chunk {
  int t;
  int64_t start, n, first, index;
};

template <typename T, int D>
__device__ __forceinline__ T* chunk_ptr(const TensorListMeta<D>& meta, int d, const Chunk& c) {
  return static_cast<T*>(meta.addr[d][c.t]) + c.start;
}

template <int D, typename Op>
__global__ void __launch_bounds__(kBlock) multi_tensor_kernel(TensorListMeta<D> meta, Op op) {
  Chunk c;
  c.t = meta.block_tensor[blockIdx.x];
  c.start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t rest = meta.numel[c.t] - c.start;
  c.n = rest < kChunk ? rest : kChunk;
  c.first = meta.base[c.t] + c.start;
  c.index = meta.chunk0 + blockIdx.x;
  op(meta, c);
}

// Number of chunks (= blocks over all launches = partial slots) a list is cut into.
inline int64_t count_chunks(at::TensorList ts) {
  int64_t c = 0;
  for (const auto& t : ts) c += (t.numel() + kChunk - 1) / kChunk;
  return c;
}

// Launches `op` over all chunks of lists[0] (the other lists must have the same numels).
// Op is a device functor called as op(meta, chunk) in every block.
template <int D, typename Op>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, Op op) {
  TORCH_CHECK(lists.size() == D, "multi_tensor_apply: expected ", D, " lists");
  const auto& first = lists[0];
  if (first.empty()) return;
  c10::cuda::CUDAGuard guard(first[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  TensorListMeta<D> meta;
  int nt = 0, nb = 0;
  int64_t chunk0 = 0, base = 0;
  auto launch = [&]() {
    meta.chunk0 = chunk0;
    multi_tensor_kernel<D><<<nb, kBlock, 0, stream>>>(meta, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    chunk0 += nb;
  };
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t n = first[i].numel();
    if (n == 0) continue;
    for (int d = 0; d < D; ++d) meta.addr[d][nt] = lists[d][i].data_ptr();
    meta.numel[nt] = n;
    meta.base[nt] = base;
    base += n;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt);
      meta.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool tensors_full = (nt + 1 == MaxTensors<D>::value) && (c + 1 == chunks);
      if (nb == kMaxBlocks || tensors_full) {
        launch();
        nb = 0;
        if (c + 1 == chunks) {
          nt = -1;  // start the next tensor at slot 0
        } else {
          // the current tensor continues in the next launch, moved to slot 0
          for (int d = 0; d < D; ++d) meta.addr[d][0] = meta.addr[d][nt];
          meta.numel[0] = meta.numel[nt];
          meta.base[0] = meta.base[nt];
          nt = 0;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) launch();
}

// Block-wide sum of R values (all threads get the result in thread 0's return).
template <int R, typename acc_t>
__device__ __forceinline__ void block_reduce(acc_t (&v)[R]) {
  __shared__ acc_t smem[R][kBlock / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    acc_t x = v[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    if (lane == 0) smem[r][warp] = x;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc_t x = lane < kBlock / 32 ? smem[r][lane] : acc_t(0);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
      v[r] = x;
    }
  }
  __syncthreads();
}

// Second stage: out[r] = sum over chunks of partials[chunk, r], in a fixed order.
template <int R, typename acc_t>
__global__ void __launch_bounds__(kBlock) sum_partials_kernel(const acc_t* partials, int64_t n,
                                                              acc_t* out) {
  acc_t v[R];
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock)
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] += partials[i * R + r];
  block_reduce<R, acc_t>(v);
  if (threadIdx.x == 0)
#pragma unroll
    for (int r = 0; r < R; ++r) out[r] = v[r];
}

// Allocates the [chunks, R] partials buffer and the R-element result of a reduction.
struct Reduction {
  at::Tensor partials, result;
  Reduction(at::TensorList ts, int R, at::ScalarType acc) {
    const auto opts = at::TensorOptions().dtype(acc).device(ts[0].device());
    partials = at::zeros({std::max<int64_t>(count_chunks(ts), 1), R}, opts);
    result = at::empty({R}, opts);
  }
  template <int R, typename acc_t>
  at::Tensor finish() {
    sum_partials_kernel<R, acc_t><<<1, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        partials.data_ptr<acc_t>(), partials.size(0), result.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return result;
  }
};

}  // namespace cuda
}  // namespace natasha
