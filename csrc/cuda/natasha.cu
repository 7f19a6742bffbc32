// CUDA kernels of the natasha ops: svrg_step (Natasha1.5 inner step) and oja_step (Oja's
// algorithm with lazy normalisation). One multi-tensor launch per pass, ILP loops, fp32
// accumulation for fp16/bf16, reductions written as per-chunk partials and summed by a second
// kernel in a fixed order (deterministic, no host sync). Spec: natasha_ext/ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../natasha_args.h"
#include "../tensor_lists.h"
#include "multi_tensor_apply.cuh"
#include "natasha/natasha.h"

namespace natasha {
namespace cuda {
namespace {

constexpr int kILP = 4;

// ------------------------------------------------------------------------------ svrg_step
// List slots: 0 x (scalar_t), 1 g, 2 g_snap (scalar_t), 3 mu, 4 anchor, 5 avg_sum, 6 center
// (acc_t). Absent optional lists are filled with a present list of the same dtype and never read.
// s sums deviations x_t - x_hat (exact for parameters that do not move).
// MODE 0: x <- z; 1: finalize (x <- a <- a + (s + x - a + z - a)/m, s <- 0); 2: prox pass 1 (x <- z,
// partial ||z - c||^2; the shrink and the finalize follow in ProxOp).
template <typename scalar_t, typename acc_t, bool SNAP, bool MU, int MODE>
struct SvrgOp {
  acc_t lr, reg, inv_m;
  acc_t* partials;  // [chunks, 3]: sum d^2, sum (z - c)^2, 0
  __device__ void operator()(const TensorListMeta<7>& meta, const Chunk& c) const {
    scalar_t* x = chunk_ptr<scalar_t>(meta, 0, c);
    const scalar_t* g = chunk_ptr<scalar_t>(meta, 1, c);
    const scalar_t* gs = chunk_ptr<scalar_t>(meta, 2, c);
    const acc_t* mu = chunk_ptr<acc_t>(meta, 3, c);
    acc_t* a = chunk_ptr<acc_t>(meta, 4, c);
    acc_t* s = chunk_ptr<acc_t>(meta, 5, c);
    const acc_t* ctr = chunk_ptr<acc_t>(meta, 6, c);
    acc_t red[2] = {0, 0};
    for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t rx[kILP], rg[kILP], ra[kILP], rs[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + j * kBlock;
        if (i < c.n) {
          rx[j] = static_cast<acc_t>(x[i]);
          rg[j] = static_cast<acc_t>(g[i]);
          if (SNAP) rg[j] -= static_cast<acc_t>(gs[i]);
          if (MU) rg[j] += mu[i];
          ra[j] = a[i];
          rs[j] = s[i];
        }
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + j * kBlock;
        if (i < c.n) {
          const acc_t d = svrg_direction<acc_t>(rg[j], acc_t(0), acc_t(0), reg, rx[j], ra[j]);
          const acc_t z = rx[j] - lr * d;
          const acc_t sum = rs[j] + (rx[j] - ra[j]);
          red[0] += d * d;
          if (MODE == 1) {
            const acc_t xh = ra[j] + (sum + (z - ra[j])) * inv_m;
            x[i] = static_cast<scalar_t>(xh);
            a[i] = xh;
            s[i] = acc_t(0);
          } else {
            x[i] = static_cast<scalar_t>(z);
            s[i] = sum;
            if (MODE == 2) {
              const acc_t e = z - ctr[i];
              red[1] += e * e;
            }
          }
        }
      }
    }
    block_reduce<2, acc_t>(red);
    if (threadIdx.x == 0) {
      partials[3 * c.index] = red[0];
      partials[3 * c.index + 1] = red[1];
    }
  }
};

// Pass 2 of the prox: kappa from the reduced ||z - c||^2 (device memory), y = c + kappa (x - c).
template <typename scalar_t, typename acc_t>
struct ProxOp {
  const acc_t* result;  // [3] after the first-stage reduction
  acc_t lr, L, r, inv_m;
  bool fin;
  __device__ void operator()(const TensorListMeta<4>& meta, const Chunk& c) const {
    scalar_t* x = chunk_ptr<scalar_t>(meta, 0, c);
    acc_t* s = chunk_ptr<acc_t>(meta, 1, c);
    acc_t* a = chunk_ptr<acc_t>(meta, 2, c);
    const acc_t* ctr = chunk_ptr<acc_t>(meta, 3, c);
    const acc_t kappa = prox_kappa<acc_t>(result[1], lr, L, r);
    for (int64_t i = threadIdx.x; i < c.n; i += kBlock) {
      const acc_t cc = ctr[i];
      const acc_t y = cc + kappa * (static_cast<acc_t>(x[i]) - cc);
      if (fin) {
        const acc_t aa = a[i];
        const acc_t xh = aa + (s[i] + (y - aa)) * inv_m;
        x[i] = static_cast<scalar_t>(xh);
        a[i] = xh;
        s[i] = acc_t(0);
      } else {
        x[i] = static_cast<scalar_t>(y);
      }
    }
  }
};

template <typename acc_t>
__global__ void svrg_finish_kernel(acc_t* out, acc_t lr, acc_t L, acc_t r, bool has_center) {
  out[2] = has_center ? prox_kappa<acc_t>(out[1], lr, L, r) : acc_t(1);
}

at::Tensor svrg_step_cuda(at::TensorList params, at::TensorList grads, c10::optional<at::TensorList> snapshot_grads,
                          c10::optional<at::TensorList> mu, at::TensorList anchor, at::TensorList avg_sum,
                          double lr, double reg, int64_t finalize, c10::optional<at::TensorList> center,
                          double prox_L, double prox_radius) {
  constexpr const char* op = "svrg_step";
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  const auto dev = params[0].device();
  const auto acc = check_svrg_step_args(params, grads, snapshot_grads, mu, anchor, avg_sum, finalize, center, dev);

  const bool has_c = center.has_value();
  const int mode = has_c ? 2 : (finalize > 0 ? 1 : 0);
  std::vector<std::vector<at::Tensor>> lists = {
      params.vec(), grads.vec(), snapshot_grads ? snapshot_grads->vec() : grads.vec(),
      mu ? mu->vec() : anchor.vec(), anchor.vec(), avg_sum.vec(), has_c ? center->vec() : anchor.vec()};
  Reduction red(params, 3, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "svrg_step", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t a_lr = static_cast<acc_t>(lr), a_reg = static_cast<acc_t>(reg);
    const acc_t inv_m = finalize > 0 ? acc_t(1) / static_cast<acc_t>(finalize) : acc_t(0);
    acc_t* part = red.partials.data_ptr<acc_t>();
    auto launch = [&](auto snap_c, auto mu_c, auto mode_c) {
      constexpr bool S = decltype(snap_c)::value, M = decltype(mu_c)::value;
      constexpr int MODE = decltype(mode_c)::value;
      multi_tensor_apply<7>(lists, SvrgOp<scalar_t, acc_t, S, M, MODE>{a_lr, a_reg, inv_m, part});
    };
    auto by_mode = [&](auto snap_c, auto mu_c) {
      if (mode == 0) launch(snap_c, mu_c, std::integral_constant<int, 0>{});
      else if (mode == 1) launch(snap_c, mu_c, std::integral_constant<int, 1>{});
      else launch(snap_c, mu_c, std::integral_constant<int, 2>{});
    };
    auto by_mu = [&](auto snap_c) {
      if (mu) by_mode(snap_c, std::true_type{});
      else by_mode(snap_c, std::false_type{});
    };
    if (snapshot_grads) by_mu(std::true_type{});
    else by_mu(std::false_type{});
    red.finish<3, acc_t>();
    acc_t* res = red.result.data_ptr<acc_t>();
    const acc_t a_L = static_cast<acc_t>(prox_L), a_r = static_cast<acc_t>(prox_radius);
    if (has_c) {
      multi_tensor_apply<4>({params.vec(), avg_sum.vec(), anchor.vec(), center->vec()},
                            ProxOp<scalar_t, acc_t>{res, a_lr, a_L, a_r, inv_m, finalize > 0});
    }
    svrg_finish_kernel<acc_t><<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(res, a_lr, a_L, a_r, has_c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return red.result;
}

// ------------------------------------------------------------------------------- oja_step
// One pass: reads w (acc_t) and Hw (scalar_t), writes w <- scale (w - eta Hw); partials of
// <w, Hw> and ||w_new||^2. `scale` (= 1/||w|| from the previous step) is read on the device.
template <typename scalar_t, typename acc_t>
struct OjaOp {
  const acc_t* scale;
  acc_t eta;
  acc_t* partials;  // [chunks, 2]
  __device__ void operator()(const TensorListMeta<2>& meta, const Chunk& c) const {
    acc_t* w = chunk_ptr<acc_t>(meta, 0, c);
    const scalar_t* h = chunk_ptr<scalar_t>(meta, 1, c);
    const acc_t s = *scale;
    acc_t red[2] = {0, 0};
    for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t rw[kILP], rh[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + j * kBlock;
        if (i < c.n) {
          rw[j] = w[i];
          rh[j] = static_cast<acc_t>(h[i]);
        }
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + j * kBlock;
        if (i < c.n) {
          red[0] += rw[j] * rh[j];
          const acc_t y = oja_update<acc_t>(rw[j], rh[j], s, eta);
          red[1] += y * y;
          w[i] = y;
        }
      }
    }
    block_reduce<2, acc_t>(red);
    if (threadIdx.x == 0) {
      partials[2 * c.index] = red[0];
      partials[2 * c.index + 1] = red[1];
    }
  }
};

// result = [<w, Hw>, ||w_new||^2] -> out = [||w_new||, scale^2 <w, Hw>]
template <typename acc_t>
__global__ void oja_finish_kernel(const acc_t* result, const acc_t* scale, acc_t* out) {
  const acc_t s = *scale;
  out[0] = sqrt(result[1]);
  out[1] = s * s * result[0];
}

at::Tensor oja_step_cuda(at::TensorList v, at::TensorList hv, const at::Tensor& scale, double eta) {
  constexpr const char* op = "oja_step";
  TORCH_CHECK(!v.empty(), op, ": v is empty");
  const auto dev = v[0].device();
  check_list(op, "v", v, dev);
  check_list(op, "hv", hv, dev);
  check_same_shape(op, "v", v, "hv", hv);
  check_same_dtype(op, "v", v);
  check_same_dtype(op, "hv", hv);
  const auto acc = acc_dtype(v);
  TORCH_CHECK(v[0].scalar_type() == acc, op, ": v must be fp32 or fp64 (the Oja vector is kept in the "
              "accumulation dtype), got ", v[0].scalar_type());
  TORCH_CHECK(scale.numel() == 1 && scale.device() == dev && scale.scalar_type() == acc, op,
              ": scale must be a 1-element ", acc, " tensor on ", dev);
  const auto scale_c = scale.contiguous();
  Reduction red(v, 2, acc);
  auto out = at::empty({2}, at::TensorOptions().dtype(acc).device(dev));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hv[0].scalar_type(), "oja_step", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    TORCH_CHECK((std::is_same_v<acc_t, double>) == (acc == at::kDouble), op, ": hv has dtype ",
                hv[0].scalar_type(), " but v has ", v[0].scalar_type());
    multi_tensor_apply<2>({v.vec(), hv.vec()},
                          OjaOp<scalar_t, acc_t>{scale_c.data_ptr<acc_t>(), static_cast<acc_t>(eta),
                                                 red.partials.data_ptr<acc_t>()});
    red.finish<2, acc_t>();
    oja_finish_kernel<acc_t><<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
        red.result.data_ptr<acc_t>(), scale_c.data_ptr<acc_t>(), out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("svrg_step", &svrg_step_cuda);
  m.impl("oja_step", &oja_step_cuda);
}

}  // namespace cuda
}  // namespace natasha
