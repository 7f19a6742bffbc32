// CUDA kernels of the AdaHessian ops: hutchinson_diag_ and adahessian_step (spec:
// natasha_ext/ops/reference.py; per-element math in natasha/adahessian.h, shared with the CPU).
//
// adahessian_step is one pass per element: read p, g, m, v (and the curvature), write p, m, v.
// The spatial mean of |D| runs over groups of G consecutive elements of one tensor (conv
// kernels, blocks). A group may straddle two chunks of the multi-tensor apply: every block
// recomputes the mean of each group that touches its chunk (reading the curvature, which is
// read-only, past its chunk's ends when needed) and writes only its own elements, so blocks
// never race and no chunk has to be aligned to G. The probe z is regenerated from Philox at
// the element's index in the whole list, like the CPU kernel and the reference.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <map>

#include "../adahessian_args.h"
#include "../tensor_lists.h"
#include "multi_tensor_apply.cuh"
#include "natasha/adahessian.h"
#include "natasha/philox.h"

namespace natasha {
namespace cuda {
namespace {

constexpr int kILP = 4;

// ------------------------------------------------------------------------- hutchinson_diag_
// Each thread takes kILP consecutive elements, so one Philox call serves several of them.
template <typename d_t, typename h_t, typename acc_t>
struct HutchinsonOp {
  uint64_t seed, offset;
  acc_t alpha;
  bool accumulate;
  __device__ void operator()(const TensorListMeta<2>& meta, const Chunk& c) const {
    d_t* d = chunk_ptr<d_t>(meta, 0, c);
    const h_t* h = chunk_ptr<h_t>(meta, 1, c);
    for (int64_t i0 = static_cast<int64_t>(threadIdx.x) * kILP; i0 < c.n; i0 += static_cast<int64_t>(kBlock) * kILP) {
      RademacherWalker z(seed, offset);
      acc_t rh[kILP], rd[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = i0 + j;
        if (i < c.n) {
          rh[j] = static_cast<acc_t>(h[i]);
          rd[j] = accumulate ? static_cast<acc_t>(d[i]) : acc_t(0);
        }
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = i0 + j;
        if (i < c.n) {
          const acc_t val = (static_cast<acc_t>(z(static_cast<uint64_t>(c.first + i))) * rh[j]) * alpha;
          d[i] = static_cast<d_t>(accumulate ? rd[j] + val : val);
        }
      }
    }
  }
};

void hutchinson_diag_cuda(at::TensorList diag, at::TensorList hz, int64_t seed, int64_t offset, double alpha,
                          bool accumulate) {
  constexpr const char* op = "hutchinson_diag_";
  if (hz.empty() && diag.empty()) return;
  const auto dev = hz.empty() ? diag[0].device() : hz[0].device();
  check_list(op, "diag", diag, dev);
  check_list(op, "hz", hz, dev);
  check_same_shape(op, "hz", hz, "diag", diag);
  check_same_dtype(op, "hz", hz);
  check_same_dtype(op, "diag", diag);
  if (hz.empty()) return;
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  std::vector<std::vector<at::Tensor>> lists = {diag.vec(), hz.vec()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hz[0].scalar_type(), op, [&] {
    using h_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, diag[0].scalar_type(), op, [&] {
      using d_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<h_t, double> || std::is_same_v<d_t, double>, double, float>;
      multi_tensor_apply<2>(lists, HutchinsonOp<d_t, h_t, acc_t>{s, o, static_cast<acc_t>(alpha), accumulate});
    });
  });
}

// ------------------------------------------------------------------------- adahessian_step
// Launch metadata like multi_tensor_apply's TensorListMeta<5>, with fewer tensors per launch so
// that it and the functor (coefficients) stay under the classic 4 KB of kernel parameters.
constexpr int kStepTensors = 40;
struct StepMeta {
  void* addr[5][kStepTensors];
  int64_t numel[kStepTensors];
  int64_t base[kStepTensors];  // the tensor's first element in the whole list (Philox counters)
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
  int64_t chunk0;
};

template <typename Op>
__global__ void __launch_bounds__(kBlock) step_kernel(StepMeta meta, Op op) {
  Chunk c;
  c.t = meta.block_tensor[blockIdx.x];
  c.start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t rest = meta.numel[c.t] - c.start;
  c.n = rest < kChunk ? rest : kChunk;
  c.first = meta.base[c.t] + c.start;
  c.index = meta.chunk0 + blockIdx.x;
  op(meta, c);
}

// List slots: 0 params, 1 grads (scalar_t), 2 exp_avg, 3 exp_hess_sq (acc_t), 4 curv (curv_t;
// params again in MODE 0, never read). One launch per group size G (a field of the functor).
// MODE: kCurvNone (moments/update only), kCurvHz (D = z * curv), kCurvDiag (D = curv).
template <typename scalar_t, typename acc_t, typename curv_t, int MODE>
struct AdaStepOp {
  AdaHessianCoef<acc_t> k;
  int64_t G;
  bool abs_first;
  uint64_t seed, offset;

  // Moments and parameter of element i of the tensor (ds: the group's D^(s), when MODE != 0).
  __device__ __forceinline__ void update(scalar_t* p, const scalar_t* g, acc_t* m, acc_t* v, int64_t i,
                                         acc_t ds) const {
    acc_t vi = v[i];
    if (MODE != kCurvNone) {
      vi = adahessian_second_moment<acc_t>(vi, ds, k);
      v[i] = vi;
    }
    const acc_t mi = adahessian_first_moment<acc_t>(m[i], static_cast<acc_t>(g[i]), k);
    m[i] = mi;
    p[i] = static_cast<scalar_t>(adahessian_param<acc_t>(static_cast<acc_t>(p[i]), mi, vi, k));
  }

  // Summand of element i in its group's mean.
  __device__ __forceinline__ acc_t summand(const curv_t* cv, int64_t i, RademacherWalker& z, uint64_t base) const {
    const acc_t x = static_cast<acc_t>(cv[i]);
    if (abs_first) return x < acc_t(0) ? -x : x;  // |z * x| = |x|: no probe needed
    if (MODE == kCurvHz) return static_cast<acc_t>(z(base + static_cast<uint64_t>(i))) * x;
    return x;
  }

  __device__ void operator()(const StepMeta& meta, const Chunk& c) const {
    // whole-tensor pointers: groups may reach outside the chunk
    scalar_t* p = static_cast<scalar_t*>(meta.addr[0][c.t]);
    const scalar_t* g = static_cast<const scalar_t*>(meta.addr[1][c.t]);
    acc_t* m = static_cast<acc_t*>(meta.addr[2][c.t]);
    acc_t* v = static_cast<acc_t*>(meta.addr[3][c.t]);
    const curv_t* cv = static_cast<const curv_t*>(meta.addr[4][c.t]);
    const int64_t numel = meta.numel[c.t], lo = c.start, hi = c.start + c.n;
    const uint64_t base = static_cast<uint64_t>(meta.base[c.t]);

    if (MODE == kCurvNone || G == 1) {
      // elementwise: |D| = |curv| whatever z is (z = +-1)
      for (int64_t b = lo + threadIdx.x; b < hi; b += static_cast<int64_t>(kBlock) * kILP) {
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          const int64_t i = b + j * kBlock;
          if (i < hi) {
            acc_t ds = acc_t(0);
            if (MODE != kCurvNone) {
              ds = static_cast<acc_t>(cv[i]);
              ds = ds < acc_t(0) ? -ds : ds;
            }
            update(p, g, m, v, i, ds);
          }
        }
      }
      return;
    }
    const int64_t g0 = lo / G, g1 = (hi - 1) / G;  // groups touching [lo, hi)
    if (G < 32) {
      // one thread per group
      for (int64_t gi = g0 + threadIdx.x; gi <= g1; gi += kBlock) {
        const int64_t s = gi * G, e = s + G < numel ? s + G : numel;
        RademacherWalker z(seed, offset);
        acc_t sum = acc_t(0);
        for (int64_t i = s; i < e; ++i) sum += summand(cv, i, z, base);
        acc_t ds = sum / static_cast<acc_t>(e - s);
        ds = ds < acc_t(0) ? -ds : ds;
        const int64_t a = s > lo ? s : lo, b = e < hi ? e : hi;
        for (int64_t i = a; i < b; ++i) update(p, g, m, v, i, ds);
      }
    } else {
      // one warp per group: strided partial sums, butterfly reduction (every lane gets the sum)
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      for (int64_t gi = g0 + warp; gi <= g1; gi += kBlock / 32) {
        const int64_t s = gi * G, e = s + G < numel ? s + G : numel;
        RademacherWalker z(seed, offset);
        acc_t sum = acc_t(0);
        for (int64_t i = s + lane; i < e; i += 32) sum += summand(cv, i, z, base);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        acc_t ds = sum / static_cast<acc_t>(e - s);
        ds = ds < acc_t(0) ? -ds : ds;
        const int64_t a = s > lo ? s : lo, b = e < hi ? e : hi;
        for (int64_t i = a + lane; i < b; i += 32) update(p, g, m, v, i, ds);
      }
    }
  }
};

// multi_tensor_apply's loop for a sub-list whose tensors keep their element bases in the whole
// list (`bases[i]`), so Philox counters stay those of the full list.
template <typename Op>
void apply_with_bases(const std::vector<std::vector<at::Tensor>>& lists, const std::vector<int64_t>& bases, Op op) {
  const auto& first = lists[0];
  if (first.empty()) return;
  c10::cuda::CUDAGuard guard(first[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int D = 5;
  StepMeta meta;
  int nt = 0, nb = 0;
  int64_t chunk0 = 0;
  auto launch = [&]() {
    meta.chunk0 = chunk0;
    step_kernel<<<nb, kBlock, 0, stream>>>(meta, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    chunk0 += nb;
  };
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t n = first[i].numel();
    if (n == 0) continue;
    for (int d = 0; d < D; ++d) meta.addr[d][nt] = lists[d][i].data_ptr();
    meta.numel[nt] = n;
    meta.base[nt] = bases[i];
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt);
      meta.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool tensors_full = (nt + 1 == kStepTensors) && (c + 1 == chunks);
      if (nb == kMaxBlocks || tensors_full) {
        launch();
        nb = 0;
        if (c + 1 == chunks) {
          nt = -1;
        } else {
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

void adahessian_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                          at::TensorList exp_hess_sq, at::TensorList curv, at::IntArrayRef group_sizes,
                          int64_t curv_mode, bool abs_first, int64_t seed, int64_t offset, double lr, double beta1,
                          double beta2, double eps, double weight_decay, double hessian_power, double bc1,
                          double bc2) {
  if (!check_adahessian_step_args(params, grads, exp_avg, exp_hess_sq, curv, group_sizes, curv_mode, c10::nullopt)) return;

  // Sub-lists per group size (one launch each; without new curvature G does not matter).
  std::vector<int64_t> all_bases(params.size());
  std::map<int64_t, std::vector<size_t>> by_group;
  int64_t base = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    all_bases[i] = base;
    base += params[i].numel();
    by_group[curv_mode ? group_sizes[i] : 1].push_back(i);
  }
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adahessian_step", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto k = make_adahessian_coef<acc_t>(lr, beta1, beta2, eps, weight_decay, hessian_power, bc1, bc2);
    for (const auto& [G, idx] : by_group) {
      std::vector<std::vector<at::Tensor>> lists(5);
      std::vector<int64_t> bases;
      for (size_t i : idx) {
        lists[0].push_back(params[i]);
        lists[1].push_back(grads[i]);
        lists[2].push_back(exp_avg[i]);
        lists[3].push_back(exp_hess_sq[i]);
        lists[4].push_back(curv_mode ? curv[i] : params[i]);
        bases.push_back(all_bases[i]);
      }
      if (curv_mode == kCurvNone) {
        apply_with_bases(lists, bases, AdaStepOp<scalar_t, acc_t, scalar_t, kCurvNone>{k, G, abs_first, s, o});
      } else if (curv_mode == kCurvHz) {
        apply_with_bases(lists, bases, AdaStepOp<scalar_t, acc_t, scalar_t, kCurvHz>{k, G, abs_first, s, o});
      } else {
        apply_with_bases(lists, bases, AdaStepOp<scalar_t, acc_t, acc_t, kCurvDiag>{k, G, abs_first, s, o});
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("hutchinson_diag_", &hutchinson_diag_cuda);
  m.impl("adahessian_step", &adahessian_step_cuda);
}

}  // namespace cuda
}  // namespace natasha
