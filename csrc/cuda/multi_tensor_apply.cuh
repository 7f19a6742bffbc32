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

#include <algorithm>
#include <initializer_list>
#include <utility>
#include <vector>

#include "natasha/chunk.h"

namespace natasha {
namespace cuda {

constexpr int kBlock = 512;
constexpr int64_t kChunk = 65536;
constexpr int kMaxBlocks = 256;
constexpr int kILP = 4;  // independent elements in flight per thread in the element loops

// The device every CUDA op guards once at its entry (c10::cuda::OptionalCUDAGuard): its
// launches, allocations and second-stage kernels then go to the tensors' device, not to the
// current one (a model on cuda:1 while cuda:0 is current). The first CUDA tensor's device.
inline c10::optional<c10::Device> guard_device(std::initializer_list<at::TensorList> lists) {
  for (const auto& ts : lists)
    for (const auto& t : ts)
      if (t.defined() && t.is_cuda()) return t.device();
  return c10::nullopt;
}

// Tensors per launch so that the metadata stays below 4 KB for a list depth D.
template <int D>
struct MaxTensors {
  static constexpr int value = (2800 / ((D + 2) * 8)) > 96 ? 96 : (2800 / ((D + 2) * 8));
};

// The per-launch metadata (kernel parameter block): D tensor addresses for each of MaxT slots.
// MaxT is a template parameter (as in ATen's MultiTensorApply.cuh) so that an op whose functor
// carries many coefficients can trade slots for parameter space.
template <int D, int MaxT = MaxTensors<D>::value>
struct TensorListMeta {
  static_assert(MaxT >= 1 && MaxT < 256, "block_tensor holds slot numbers in an unsigned char");
  static constexpr int kDepth = D;
  static constexpr int kMaxTensors = MaxT;
  void* addr[D][MaxT];
  int64_t numel[MaxT];
  int64_t base[MaxT];  // index of the tensor's first element in the whole list
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
  int64_t chunk0;  // global chunk index of this launch's block 0
};

// A block's chunk (natasha/chunk.h): c.tensor is the metadata slot (pointers: meta.addr[d][slot]
// + start), c.first the chunk's first element in the whole list (Philox counters), c.index the
// global chunk index (the row of its partial sums).
template <typename T, typename Meta>
__device__ __forceinline__ T* chunk_ptr(const Meta& meta, int d, const Chunk& c) {
  return static_cast<T*>(meta.addr[d][c.tensor]) + c.start;
}

// The whole tensor of the chunk (for reads that reach outside the chunk, or per-tensor data).
template <typename T, typename Meta>
__device__ __forceinline__ T* tensor_ptr(const Meta& meta, int d, const Chunk& c) {
  return static_cast<T*>(meta.addr[d][c.tensor]);
}

template <typename Meta, typename Op>
__global__ void __launch_bounds__(kBlock) multi_tensor_kernel(Meta meta, Op op) {
  Chunk c;
  c.tensor = meta.block_tensor[blockIdx.x];
  c.start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t rest = meta.numel[c.tensor] - c.start;
  c.n = rest < kChunk ? rest : kChunk;
  c.first = meta.base[c.tensor] + c.start;
  c.index = meta.chunk0 + blockIdx.x;
  op(meta, c);
}

inline int64_t count_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Number of chunks (= blocks over all launches = partial slots) a list is cut into.
inline int64_t count_chunks(at::TensorList ts) {
  int64_t c = 0;
  for (const auto& t : ts) c += count_chunks(t.numel());
  return c;
}

// Where a sub-list sits in the whole list it was taken from (a dtype or group-size class of
// tensors): each tensor's first element in the whole list (Philox counters; empty: the running
// sum over this list) and the global index of the sub-list's first chunk (partial-sum rows).
struct ListPosition {
  std::vector<int64_t> bases;
  int64_t chunk0 = 0;
};

// Launches `op` over all chunks of lists[0] (the other lists must have the same numels), as
// several launches when the tensors or chunks do not fit one metadata block. Op is a device
// functor called as op(meta, chunk) in every block. The caller holds a device guard on the
// tensors' device (every CUDA op sets one at its entry).
template <int D, int MaxT = MaxTensors<D>::value, typename Op>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, Op op, const ListPosition& pos = {}) {
  using Meta = TensorListMeta<D, MaxT>;
  TORCH_CHECK(lists.size() == D, "multi_tensor_apply: expected ", D, " lists");
  const auto& first = lists[0];
  TORCH_CHECK(pos.bases.empty() || pos.bases.size() == first.size(), "multi_tensor_apply: one base per tensor");
  if (first.empty()) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  Meta meta;
  int nt = 0, nb = 0;
  int64_t chunk0 = pos.chunk0, base = 0;
  auto launch = [&]() {
    meta.chunk0 = chunk0;
    multi_tensor_kernel<Meta><<<nb, kBlock, 0, stream>>>(meta, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    chunk0 += nb;
  };
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t n = first[i].numel();
    const int64_t tensor_base = pos.bases.empty() ? base : pos.bases[i];
    base += n;
    if (n == 0) continue;
    for (int d = 0; d < D; ++d) meta.addr[d][nt] = lists[d][i].data_ptr();
    meta.numel[nt] = n;
    meta.base[nt] = tensor_base;
    const int64_t chunks = count_chunks(n);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt);
      meta.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool tensors_full = (nt + 1 == MaxT) && (c + 1 == chunks);
      if (nb == kMaxBlocks || tensors_full) {
        launch();
        nb = 0;
        if (c + 1 == chunks) {
          nt = -1;  // start the next tensor at slot 0
        } else {
          // the current tensor continues in the next launch, moved to slot 0 (block_chunk keeps
          // counting its chunks, so c.start and c.first stay those of the whole tensor)
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

// The D lists of a launch, each in its named slot (the ops' k...Slot enums): {{kParam, params}, ...}.
template <int D>
std::vector<std::vector<at::Tensor>> slot_lists(std::initializer_list<std::pair<int, at::TensorList>> slots) {
  TORCH_CHECK(slots.size() == D, "slot_lists: expected ", D, " lists, got ", slots.size());
  std::vector<std::vector<at::Tensor>> lists(D);
  for (const auto& slot : slots) lists[slot.first] = slot.second.vec();
  return lists;
}

// Sub-lists of the indices 0 .. n-1 grouped by key(i) (dtype, group size ...), in first-seen key
// order, each with its ListPosition in the whole list (element bases, first chunk).
template <typename Key, typename KeyFn>
std::vector<std::pair<Key, std::vector<size_t>>> group_indices(size_t n, KeyFn key) {
  std::vector<std::pair<Key, std::vector<size_t>>> out;
  for (size_t i = 0; i < n; ++i) {
    const Key k = key(i);
    auto it = std::find_if(out.begin(), out.end(), [&](const auto& kv) { return kv.first == k; });
    if (it == out.end()) out.push_back({k, {i}});
    else it->second.push_back(i);
  }
  return out;
}

// The ListPosition of the tensors `idx` of `whole` (their element bases in the whole list) with
// partial rows starting at chunk0.
inline ListPosition position_of(at::TensorList whole, const std::vector<size_t>& idx, int64_t chunk0) {
  std::vector<int64_t> all(whole.size());
  int64_t base = 0;
  for (size_t i = 0; i < whole.size(); ++i) {
    all[i] = base;
    base += whole[i].numel();
  }
  ListPosition pos;
  pos.chunk0 = chunk0;
  for (size_t i : idx) pos.bases.push_back(all[i]);
  return pos;
}

// The tensors `idx` of `ts`.
inline std::vector<at::Tensor> select(at::TensorList ts, const std::vector<size_t>& idx) {
  std::vector<at::Tensor> out;
  out.reserve(idx.size());
  for (size_t i : idx) out.push_back(ts[i]);
  return out;
}

// Loads elements first + j * kBlock (j < kILP) of p as acc_t into r; `fill` past the chunk end n.
template <typename acc_t, typename T>
__device__ __forceinline__ void load_ilp(acc_t (&r)[kILP], const T* p, int64_t first, int64_t n,
                                         acc_t fill = acc_t(0)) {
#pragma unroll
  for (int j = 0; j < kILP; ++j) {
    const int64_t i = first + static_cast<int64_t>(j) * kBlock;
    r[j] = i < n ? static_cast<acc_t>(p[i]) : fill;
  }
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

// Block-reduces the R per-thread values and stores them as row `index` of the [chunks, R]
// partials (thread 0), the first stage of every reduction.
template <int R, typename acc_t>
__device__ __forceinline__ void store_partials(acc_t (&v)[R], acc_t* partials, int64_t index) {
  block_reduce<R, acc_t>(v);
  if (threadIdx.x == 0)
#pragma unroll
    for (int r = 0; r < R; ++r) partials[R * index + r] = v[r];
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
