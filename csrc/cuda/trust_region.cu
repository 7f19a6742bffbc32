// CUDA kernels of the trust-region ops: tr_cg_init_, cg_dots, cg_step_ (see natasha/trust_region.h).
// One multi-tensor-apply launch per op over the whole list; each block handles one chunk, keeps
// ILP independent elements per thread in flight, and writes one partial per reduction slot;
// a second one-block kernel sums the partials in chunk order (deterministic, no host sync).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../tensor_lists.h"
#include "multi_tensor_apply.cuh"
#include "natasha/trust_region.h"

namespace natasha {
namespace cuda {
namespace {

constexpr int kILP = 4;

template <typename scalar_t, typename acc_t>
struct InitOp {  // lists: g, v, a, s, r, p
  acc_t beta, eps;
  int mode;
  acc_t* partials;
  __device__ void operator()(const TensorListMeta<6>& meta, const Chunk& c) const {
    const scalar_t* g = chunk_ptr<scalar_t>(meta, 0, c);
    acc_t* v = chunk_ptr<acc_t>(meta, 1, c);
    acc_t* a = chunk_ptr<acc_t>(meta, 2, c);
    acc_t* s = chunk_ptr<acc_t>(meta, 3, c);
    acc_t* r = chunk_ptr<acc_t>(meta, 4, c);
    acc_t* p = chunk_ptr<acc_t>(meta, 5, c);
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
    block_reduce<2, acc_t>(acc);
    if (threadIdx.x == 0) {
      partials[c.index * 2] = acc[0];
      partials[c.index * 2 + 1] = acc[1];
    }
  }
};

template <typename scalar_t, typename acc_t>
struct DotsOp {  // lists: Bp, p, r, a
  acc_t* partials;
  __device__ void operator()(const TensorListMeta<4>& meta, const Chunk& c) const {
    const scalar_t* bp = chunk_ptr<scalar_t>(meta, 0, c);
    const acc_t* p = chunk_ptr<acc_t>(meta, 1, c);
    const acc_t* r = chunk_ptr<acc_t>(meta, 2, c);
    const acc_t* a = chunk_ptr<acc_t>(meta, 3, c);
    acc_t acc[4] = {0, 0, 0, 0};
    for (int64_t base = 0; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t bi[kILP], pi[kILP], ri[kILP], ai[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + threadIdx.x + j * kBlock;
        const bool in = i < c.n;
        bi[j] = in ? static_cast<acc_t>(bp[i]) : acc_t(0);
        pi[j] = in ? p[i] : acc_t(0);
        ri[j] = in ? r[i] : acc_t(0);
        ai[j] = in ? a[i] : acc_t(1);
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) tr::dots_elem<acc_t>(pi[j], bi[j], ri[j], ai[j], acc);
    }
    block_reduce<4, acc_t>(acc);
    if (threadIdx.x == 0)
#pragma unroll
      for (int k = 0; k < 4; ++k) partials[c.index * 4 + k] = acc[k];
  }
};

template <typename scalar_t, typename acc_t>
struct StepOp {  // lists: Bp, s, r, p, a
  acc_t alpha, beta;
  acc_t* partials;
  __device__ void operator()(const TensorListMeta<5>& meta, const Chunk& c) const {
    const scalar_t* bp = chunk_ptr<scalar_t>(meta, 0, c);
    acc_t* s = chunk_ptr<acc_t>(meta, 1, c);
    acc_t* r = chunk_ptr<acc_t>(meta, 2, c);
    acc_t* p = chunk_ptr<acc_t>(meta, 3, c);
    const acc_t* a = chunk_ptr<acc_t>(meta, 4, c);
    acc_t acc[4] = {0, 0, 0, 0};
    for (int64_t base = 0; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t bi[kILP], si[kILP], ri[kILP], pi[kILP], ai[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + threadIdx.x + j * kBlock;
        const bool in = i < c.n;
        bi[j] = in ? static_cast<acc_t>(bp[i]) : acc_t(0);
        si[j] = in ? s[i] : acc_t(0);
        ri[j] = in ? r[i] : acc_t(0);
        pi[j] = in ? p[i] : acc_t(0);
        ai[j] = in ? a[i] : acc_t(1);
      }
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
    block_reduce<4, acc_t>(acc);
    if (threadIdx.x == 0)
#pragma unroll
      for (int k = 0; k < 4; ++k) partials[c.index * 4 + k] = acc[k];
  }
};

void check_state(const char* op, const char* name, at::TensorList ts, at::ScalarType acc) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK(ts[i].scalar_type() == acc, op, ": ", name, "[", i, "] has dtype ", ts[i].scalar_type(),
                " but the state lists must be ", acc, " for these inputs");
}

// Validates the input list and the state lists against it; returns the accumulation dtype.
at::ScalarType check_all(const char* op, const char* in_name, at::TensorList in,
                         std::initializer_list<std::pair<const char*, at::TensorList>> state) {
  check_list(op, in_name, in, in[0].device());
  check_same_dtype(op, in_name, in);
  const auto acc = acc_dtype(in);
  for (const auto& kv : state) {
    check_list(op, kv.first, kv.second, in[0].device());
    check_same_shape(op, in_name, in, kv.first, kv.second);
    check_state(op, kv.first, kv.second, acc);
  }
  return acc;
}

at::Tensor tr_cg_init_cuda(at::TensorList v, at::TensorList a, at::TensorList s, at::TensorList r, at::TensorList p,
                           at::TensorList grads, double beta, double eps, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "tr_cg_init_: mode must be 0 (spherical), 1 (rmsprop) or 2 (adagrad), got ",
              mode);
  if (grads.empty()) return at::zeros({2}, at::kFloat);
  const auto acc = check_all("tr_cg_init_", "grads", grads, {{"v", v}, {"a", a}, {"s", s}, {"r", r}, {"p", p}});
  Reduction red(grads, 2, acc);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "tr_cg_init_", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    multi_tensor_apply<6>({grads.vec(), v.vec(), a.vec(), s.vec(), r.vec(), p.vec()},
                          InitOp<scalar_t, acc_t>{static_cast<acc_t>(beta), static_cast<acc_t>(eps),
                                                  static_cast<int>(mode), red.partials.data_ptr<acc_t>()});
    out = red.finish<2, acc_t>();
  });
  return out;
}

at::Tensor cg_dots_cuda(at::TensorList p, at::TensorList Bp, at::TensorList r, at::TensorList a) {
  if (Bp.empty()) return at::zeros({4}, at::kFloat);
  const auto acc = check_all("cg_dots", "Bp", Bp, {{"p", p}, {"r", r}, {"a", a}});
  Reduction red(Bp, 4, acc);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Bp[0].scalar_type(), "cg_dots", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    multi_tensor_apply<4>({Bp.vec(), p.vec(), r.vec(), a.vec()},
                          DotsOp<scalar_t, acc_t>{red.partials.data_ptr<acc_t>()});
    out = red.finish<4, acc_t>();
  });
  return out;
}

at::Tensor cg_step_cuda(at::TensorList s, at::TensorList r, at::TensorList p, at::TensorList Bp, at::TensorList a,
                        double alpha, double beta) {
  if (Bp.empty()) return at::zeros({4}, at::kFloat);
  const auto acc = check_all("cg_step_", "Bp", Bp, {{"s", s}, {"r", r}, {"p", p}, {"a", a}});
  Reduction red(Bp, 4, acc);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Bp[0].scalar_type(), "cg_step_", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    multi_tensor_apply<5>({Bp.vec(), s.vec(), r.vec(), p.vec(), a.vec()},
                          StepOp<scalar_t, acc_t>{static_cast<acc_t>(alpha), static_cast<acc_t>(beta),
                                                  red.partials.data_ptr<acc_t>()});
    out = red.finish<4, acc_t>();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("tr_cg_init_", &tr_cg_init_cuda);
  m.impl("cg_dots", &cg_dots_cuda);
  m.impl("cg_step_", &cg_step_cuda);
}

}  // namespace cuda
}  // namespace natasha
