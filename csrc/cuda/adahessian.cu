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
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "multi_tensor_apply.cuh"
#include "natasha/adahessian.h"
#include "natasha/args/adahessian.h"
#include "natasha/philox.h"
#include "natasha/static_switch.h"

namespace natasha {
namespace cuda {
namespace {

// ------------------------------------------------------------------------- hutchinson_diag_
// Each thread takes kILP consecutive elements, so one Philox call serves several of them.
enum HutchinsonSlot : int { kHutchDiag, kHutchHz, kHutchDepth };

template <typename d_t, typename h_t, typename acc_t>
struct HutchinsonOp {
  uint64_t seed, offset;
  acc_t alpha;
  bool accumulate;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    d_t* d = chunk_ptr<d_t>(meta, kHutchDiag, c);
    const h_t* h = chunk_ptr<h_t>(meta, kHutchHz, c);
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
  const c10::cuda::OptionalCUDAGuard guard(guard_device({hz, diag}));
  if (!check_hutchinson_diag_args(diag, hz)) return;
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const auto lists = slot_lists<kHutchDepth>({{kHutchDiag, diag}, {kHutchHz, hz}});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hz[0].scalar_type(), op, [&] {
    using h_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, diag[0].scalar_type(), op, [&] {
      using d_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<h_t, double> || std::is_same_v<d_t, double>, double, float>;
      multi_tensor_apply<kHutchDepth>(lists, HutchinsonOp<d_t, h_t, acc_t>{s, o, static_cast<acc_t>(alpha), accumulate});
    });
  });
}

// ------------------------------------------------------------------------- adahessian_step
// List slots of adahessian_step_ (curv: params again in MODE kCurvNone, never read).
enum AdaSlot : int { kAdaParam, kAdaGrad, kAdaExpAvg, kAdaExpHessSq, kAdaCurv, kAdaDepth };
// Fewer tensors per launch than multi_tensor_apply's default for depth 5, so that the metadata
// and the functor (AdaHessianCoef) stay under the classic 4 KB of kernel parameters.
constexpr int kAdaTensorsPerLaunch = 40;

// One launch per group size G (a field of the functor); params/grads scalar_t, exp_avg/exp_hess_sq
// acc_t, curv curv_t.
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

  // Summand of element i of the tensor in its group's mean (natasha/adahessian.h).
  __device__ __forceinline__ acc_t summand(const curv_t* cv, int64_t i, RademacherWalker& z, uint64_t base) const {
    return adahessian_group_summand<acc_t>(static_cast<acc_t>(cv[i]), abs_first, MODE == kCurvHz, z,
                                           base + static_cast<uint64_t>(i));
  }

  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    // whole-tensor pointers: groups may reach outside the chunk
    scalar_t* p = tensor_ptr<scalar_t>(meta, kAdaParam, c);
    const scalar_t* g = tensor_ptr<const scalar_t>(meta, kAdaGrad, c);
    acc_t* m = tensor_ptr<acc_t>(meta, kAdaExpAvg, c);
    acc_t* v = tensor_ptr<acc_t>(meta, kAdaExpHessSq, c);
    const curv_t* cv = tensor_ptr<const curv_t>(meta, kAdaCurv, c);
    const int64_t numel = meta.numel[c.tensor], lo = c.start, hi = c.start + c.n;
    const uint64_t base = static_cast<uint64_t>(meta.base[c.tensor]);

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
        const acc_t ds = adahessian_group_value<acc_t>(sum, e - s);
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
        const acc_t ds = adahessian_group_value<acc_t>(sum, e - s);
        const int64_t a = s > lo ? s : lo, b = e < hi ? e : hi;
        for (int64_t i = a + lane; i < b; i += 32) update(p, g, m, v, i, ds);
      }
    }
  }
};

void adahessian_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                          at::TensorList exp_hess_sq, at::TensorList curv, at::IntArrayRef group_sizes,
                          int64_t curv_mode, bool abs_first, int64_t seed, int64_t offset, double lr, double beta1,
                          double beta2, double eps, double weight_decay, double hessian_power,
                          double bias_correction1, double bias_correction2) {
  const c10::cuda::OptionalCUDAGuard guard(guard_device({params, grads, exp_avg, exp_hess_sq}));
  if (!check_adahessian_step_args(params, grads, exp_avg, exp_hess_sq, curv, group_sizes, curv_mode)) return;

  // Sub-lists per group size (one launch each; without new curvature G does not matter). Each
  // keeps its tensors' element bases in the whole list, so Philox counters are the full list's.
  const auto classes =
      group_indices<int64_t>(params.size(), [&](size_t i) { return curv_mode ? group_sizes[i] : int64_t(1); });
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adahessian_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = make_adahessian_coef<acc_t>(lr, beta1, beta2, eps, weight_decay, hessian_power, bias_correction1,
                                               bias_correction2);
    for (const auto& cls : classes) {
      const int64_t G = cls.first;
      const std::vector<size_t>& idx = cls.second;
      const auto sub_params = select(params, idx);
      const auto lists = slot_lists<kAdaDepth>(
          {{kAdaParam, sub_params}, {kAdaGrad, select(grads, idx)}, {kAdaExpAvg, select(exp_avg, idx)},
           {kAdaExpHessSq, select(exp_hess_sq, idx)}, {kAdaCurv, curv_mode ? select(curv, idx) : sub_params}});
      const ListPosition pos = position_of(params, idx, 0);
      int_switch<3>(static_cast<int>(curv_mode), [&](auto mode_c) {
        constexpr int MODE = decltype(mode_c)::value;
        using curv_t = std::conditional_t<MODE == kCurvDiag, acc_t, scalar_t>;  // Hz: the params' dtype
        multi_tensor_apply<kAdaDepth, kAdaTensorsPerLaunch>(
            lists, AdaStepOp<scalar_t, acc_t, curv_t, MODE>{k, G, abs_first, s, o}, pos);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("hutchinson_diag_", &hutchinson_diag_cuda);
  m.impl("adahessian_step_", &adahessian_step_cuda);
}

}  // namespace cuda
}  // namespace natasha
