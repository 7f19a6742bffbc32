// CUDA kernels of the trust-region ops: tr_cg_init_, cg_dots, cg_step_ (see natasha/trust_region.h).
// One multi-tensor-apply launch per op over the whole list; each block handles one chunk, keeps
// ILP independent elements per thread in flight, and writes one partial per reduction slot;
// a second one-block kernel sums the partials in chunk order (deterministic, no host sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "multi_tensor_apply.cuh"
#include "natasha/args/trust_region.h"
#include "natasha/trust_region.h"

namespace natasha {
namespace cuda {
namespace {

enum InitSlot : int { kInitG, kInitV, kInitA, kInitS, kInitR, kInitP, kInitDepth };

template <typename scalar_t, typename acc_t>
struct InitOp {
  acc_t beta, eps;
  int mode;
  acc_t* partials;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    const scalar_t* g = chunk_ptr<scalar_t>(meta, kInitG, c);
    acc_t* v = chunk_ptr<acc_t>(meta, kInitV, c);
    acc_t* a = chunk_ptr<acc_t>(meta, kInitA, c);
    acc_t* s = chunk_ptr<acc_t>(meta, kInitS, c);
    acc_t* r = chunk_ptr<acc_t>(meta, kInitR, c);
    acc_t* p = chunk_ptr<acc_t>(meta, kInitP, c);
    acc_t acc[2] = {0, 0};
    for (int64_t base = 0; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t gi[kILP], vi[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + threadIdx.x + j * kBlock;
        gi[j] = i < c.n ? static_cast<acc_t>(g[i]) : acc_t(0);
        vi[j] = (i < c.n && mode != tr::kSpherical) ? v[i] : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + threadIdx.x + j * kBlock;
        if (i < c.n) {
          acc_t ai, si, ri, pi;
          tr::init_elem<acc_t>(gi[j], vi[j], ai, si, ri, pi, beta, eps, mode, acc[0], acc[1]);
          if (mode != tr::kSpherical) v[i] = vi[j];
          a[i] = ai;
          s[i] = si;
          r[i] = ri;
          p[i] = pi;
        }
      }
    }
    store_partials<2, acc_t>(acc, partials, c.index);
  }
};

enum DotsSlot : int { kDotsBp, kDotsP, kDotsR, kDotsA, kDotsDepth };

template <typename scalar_t, typename acc_t>
struct DotsOp {
  acc_t* partials;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    const scalar_t* bp = chunk_ptr<scalar_t>(meta, kDotsBp, c);
    const acc_t* p = chunk_ptr<acc_t>(meta, kDotsP, c);
    const acc_t* r = chunk_ptr<acc_t>(meta, kDotsR, c);
    const acc_t* a = chunk_ptr<acc_t>(meta, kDotsA, c);
    acc_t acc[4] = {0, 0, 0, 0};
    for (int64_t base = 0; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t bi[kILP], pi[kILP], ri[kILP], ai[kILP];
      const int64_t first = base + threadIdx.x;
      load_ilp<acc_t>(bi, bp, first, c.n);
      load_ilp<acc_t>(pi, p, first, c.n);
      load_ilp<acc_t>(ri, r, first, c.n);
      load_ilp<acc_t>(ai, a, first, c.n, acc_t(1));  // a = 1 past the end: no 0/0 in the padding
#pragma unroll
      for (int j = 0; j < kILP; ++j) tr::dots_elem<acc_t>(pi[j], bi[j], ri[j], ai[j], acc);
    }
    store_partials<4, acc_t>(acc, partials, c.index);
  }
};

enum StepSlot : int { kStepBp, kStepS, kStepR, kStepP, kStepA, kStepDepth };

template <typename scalar_t, typename acc_t>
struct StepOp {
  acc_t alpha, beta;
  acc_t* partials;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    const scalar_t* bp = chunk_ptr<scalar_t>(meta, kStepBp, c);
    acc_t* s = chunk_ptr<acc_t>(meta, kStepS, c);
    acc_t* r = chunk_ptr<acc_t>(meta, kStepR, c);
    acc_t* p = chunk_ptr<acc_t>(meta, kStepP, c);
    const acc_t* a = chunk_ptr<acc_t>(meta, kStepA, c);
    acc_t acc[4] = {0, 0, 0, 0};
    for (int64_t base = 0; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t bi[kILP], si[kILP], ri[kILP], pi[kILP], ai[kILP];
      const int64_t first = base + threadIdx.x;
      load_ilp<acc_t>(bi, bp, first, c.n);
      load_ilp<acc_t>(si, s, first, c.n);
      load_ilp<acc_t>(ri, r, first, c.n);
      load_ilp<acc_t>(pi, p, first, c.n);
      load_ilp<acc_t>(ai, a, first, c.n, acc_t(1));
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + threadIdx.x + j * kBlock;
        if (i < c.n) {
          tr::step_elem<acc_t>(si[j], ri[j], pi[j], bi[j], ai[j], alpha, beta, acc);
          s[i] = si[j];
          r[i] = ri[j];
          p[i] = pi[j];
        }
      }
    }
    store_partials<4, acc_t>(acc, partials, c.index);
  }
};

at::Tensor tr_cg_init_cuda(at::TensorList v, at::TensorList a, at::TensorList s, at::TensorList r, at::TensorList p,
                           at::TensorList grads, double beta, double eps, int64_t norm_mode) {
  const c10::cuda::OptionalCUDAGuard guard(guard_device({grads, v}));
  const auto acc = check_tr_cg_init_args(v, a, s, r, p, grads, norm_mode);
  if (grads.empty()) return cg_empty_result(2, op_device({v, a, s, r, p}));
  Reduction red(grads, 2, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "tr_cg_init_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto lists = slot_lists<kInitDepth>({{kInitG, grads}, {kInitV, v}, {kInitA, a}, {kInitS, s}, {kInitR, r},
                                               {kInitP, p}});
    multi_tensor_apply<kInitDepth>(lists, InitOp<scalar_t, acc_t>{static_cast<acc_t>(beta), static_cast<acc_t>(eps),
                                                                  static_cast<int>(norm_mode),
                                                                  red.partials.data_ptr<acc_t>()});
    red.finish<2, acc_t>();
  });
  return red.result;
}

at::Tensor cg_dots_cuda(at::TensorList p, at::TensorList Bp, at::TensorList r, at::TensorList a) {
  const c10::cuda::OptionalCUDAGuard guard(guard_device({Bp, p}));
  const auto acc = check_cg_dots_args(p, Bp, r, a);
  if (Bp.empty()) return cg_empty_result(4, op_device({p, r, a}));
  Reduction red(Bp, 4, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Bp[0].scalar_type(), "cg_dots", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto lists = slot_lists<kDotsDepth>({{kDotsBp, Bp}, {kDotsP, p}, {kDotsR, r}, {kDotsA, a}});
    multi_tensor_apply<kDotsDepth>(lists, DotsOp<scalar_t, acc_t>{red.partials.data_ptr<acc_t>()});
    red.finish<4, acc_t>();
  });
  return red.result;
}

at::Tensor cg_step_cuda(at::TensorList s, at::TensorList r, at::TensorList p, at::TensorList Bp, at::TensorList a,
                        double alpha, double beta) {
  const c10::cuda::OptionalCUDAGuard guard(guard_device({Bp, s}));
  const auto acc = check_cg_step_args(s, r, p, Bp, a);
  if (Bp.empty()) return cg_empty_result(4, op_device({s, r, p, a}));
  Reduction red(Bp, 4, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Bp[0].scalar_type(), "cg_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto lists = slot_lists<kStepDepth>({{kStepBp, Bp}, {kStepS, s}, {kStepR, r}, {kStepP, p}, {kStepA, a}});
    multi_tensor_apply<kStepDepth>(lists, StepOp<scalar_t, acc_t>{static_cast<acc_t>(alpha), static_cast<acc_t>(beta),
                                                                  red.partials.data_ptr<acc_t>()});
    red.finish<4, acc_t>();
  });
  return red.result;
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("tr_cg_init_", &tr_cg_init_cuda);
  m.impl("cg_dots", &cg_dots_cuda);
  m.impl("cg_step_", &cg_step_cuda);
}

}  // namespace cuda
}  // namespace natasha
