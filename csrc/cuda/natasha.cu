// CUDA kernels of the natasha ops: svrg_step (Natasha1.5 inner step) and oja_step (Oja's
// algorithm with lazy normalisation). One multi-tensor launch per pass, ILP loops, fp32
// accumulation for fp16/bf16, reductions written as per-chunk partials and summed by a second
// kernel in a fixed order (deterministic, no host sync). Spec: natasha_ext/ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "multi_tensor_apply.cuh"
#include "natasha/args/natasha.h"
#include "natasha/natasha.h"
#include "natasha/static_switch.h"

namespace natasha {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------ svrg_step
// List slots of the step pass: x, g, g_snap (scalar_t); mu, anchor, avg_sum, center (acc_t).
// Absent optional lists are filled with a present list of the same dtype and never read.
enum SvrgSlot : int { kSvrgParam, kSvrgGrad, kSvrgSnapGrad, kSvrgMu, kSvrgAnchor, kSvrgAvgSum, kSvrgCenter, kSvrgDepth };
// List slots of the prox pass.
enum ProxSlot : int { kProxParam, kProxAvgSum, kProxAnchor, kProxCenter, kProxDepth };
// s sums deviations x_t - x_hat (exact for parameters that do not move).
// MODE 0: x <- z; 1: finalize (x <- a <- a + (s + x - a + z - a)/m, s <- 0); 2: prox pass 1 (x <- z,
// partial ||z - c||^2; the shrink and the finalize follow in ProxOp).
template <typename scalar_t, typename acc_t, bool SNAP, bool MU, int MODE>
struct SvrgOp {
  acc_t lr, reg, inv_m;
  acc_t* partials;  // [chunks, 3]: sum d^2, sum (z - c)^2, 0 (the kappa slot, set by svrg_finish_kernel)
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    scalar_t* x = chunk_ptr<scalar_t>(meta, kSvrgParam, c);
    const scalar_t* g = chunk_ptr<scalar_t>(meta, kSvrgGrad, c);
    const scalar_t* gs = chunk_ptr<scalar_t>(meta, kSvrgSnapGrad, c);
    const acc_t* mu = chunk_ptr<acc_t>(meta, kSvrgMu, c);
    acc_t* a = chunk_ptr<acc_t>(meta, kSvrgAnchor, c);
    acc_t* s = chunk_ptr<acc_t>(meta, kSvrgAvgSum, c);
    const acc_t* ctr = chunk_ptr<acc_t>(meta, kSvrgCenter, c);
    acc_t red[3] = {0, 0, 0};
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
            const acc_t xh = svrg_finalize<acc_t>(ra[j], sum, z, inv_m);
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
    store_partials<3, acc_t>(red, partials, c.index);
  }
};

// Pass 2 of the prox: kappa from the reduced ||z - c||^2 (device memory), y = c + kappa (x - c).
template <typename scalar_t, typename acc_t>
struct ProxOp {
  const acc_t* result;  // [3] after the first-stage reduction
  acc_t lr, L, r, inv_m;
  bool fin;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    scalar_t* x = chunk_ptr<scalar_t>(meta, kProxParam, c);
    acc_t* s = chunk_ptr<acc_t>(meta, kProxAvgSum, c);
    acc_t* a = chunk_ptr<acc_t>(meta, kProxAnchor, c);
    const acc_t* ctr = chunk_ptr<acc_t>(meta, kProxCenter, c);
    const acc_t kappa = prox_kappa<acc_t>(result[1], lr, L, r);
    for (int64_t i = threadIdx.x; i < c.n; i += kBlock) {
      const acc_t cc = ctr[i];
      const acc_t y = cc + kappa * (static_cast<acc_t>(x[i]) - cc);
      if (fin) {
        const acc_t aa = a[i];
        const acc_t xh = svrg_finalize<acc_t>(aa, s[i], y, inv_m);
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
                          c10::optional<at::TensorList> center, double lr, double reg, int64_t finalize,
                          double prox_L, double prox_radius) {
  const c10::cuda::OptionalCUDAGuard guard(guard_device({params, grads, anchor, avg_sum}));
  const auto acc = check_svrg_step_args(params, grads, snapshot_grads, mu, anchor, avg_sum, center, finalize);
  if (params.empty()) return svrg_step_empty_result(op_device({grads, anchor, avg_sum}));

  const bool has_c = center.has_value();
  const int mode = has_c ? 2 : (finalize > 0 ? 1 : 0);
  // absent optional lists: a present list of the same dtype in their slot (never read)
  const auto lists = slot_lists<kSvrgDepth>(
      {{kSvrgParam, params}, {kSvrgGrad, grads}, {kSvrgSnapGrad, snapshot_grads ? *snapshot_grads : grads},
       {kSvrgMu, mu ? *mu : anchor}, {kSvrgAnchor, anchor}, {kSvrgAvgSum, avg_sum},
       {kSvrgCenter, has_c ? *center : anchor}});
  Reduction red(params, 3, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "svrg_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a_lr = static_cast<acc_t>(lr), a_reg = static_cast<acc_t>(reg);
    const acc_t inv_m = finalize > 0 ? acc_t(1) / static_cast<acc_t>(finalize) : acc_t(0);
    acc_t* part = red.partials.data_ptr<acc_t>();
    bool_switch(snapshot_grads.has_value(), [&](auto snap_c) {
      bool_switch(mu.has_value(), [&](auto mu_c) {
        int_switch<3>(mode, [&](auto mode_c) {
          constexpr bool S = decltype(snap_c)::value, M = decltype(mu_c)::value;
          constexpr int MODE = decltype(mode_c)::value;
          multi_tensor_apply<kSvrgDepth>(lists, SvrgOp<scalar_t, acc_t, S, M, MODE>{a_lr, a_reg, inv_m, part});
        });
      });
    });
    red.finish<3, acc_t>();
    acc_t* res = red.result.data_ptr<acc_t>();
    const acc_t a_L = static_cast<acc_t>(prox_L), a_r = static_cast<acc_t>(prox_radius);
    if (has_c) {
      const auto prox = slot_lists<kProxDepth>(
          {{kProxParam, params}, {kProxAvgSum, avg_sum}, {kProxAnchor, anchor}, {kProxCenter, *center}});
      multi_tensor_apply<kProxDepth>(prox, ProxOp<scalar_t, acc_t>{res, a_lr, a_L, a_r, inv_m, finalize > 0});
    }
    svrg_finish_kernel<acc_t><<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(res, a_lr, a_L, a_r, has_c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return red.result;
}

// ------------------------------------------------------------------------------- oja_step
// One pass: reads w (acc_t) and Hw (scalar_t), writes w <- scale (w - eta Hw); partials of
// <w, Hw> and ||w_new||^2. `scale` (= 1/||w|| from the previous step) is read on the device.
enum OjaSlot : int { kOjaV, kOjaHv, kOjaDepth };

template <typename scalar_t, typename acc_t>
struct OjaOp {
  const acc_t* scale;
  acc_t eta;
  acc_t* partials;  // [chunks, 2]
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    acc_t* w = chunk_ptr<acc_t>(meta, kOjaV, c);
    const scalar_t* h = chunk_ptr<scalar_t>(meta, kOjaHv, c);
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
    store_partials<2, acc_t>(red, partials, c.index);
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
  const c10::cuda::OptionalCUDAGuard guard(guard_device({v, hv, at::TensorList(scale)}));
  if (!check_oja_step_args(v, hv, scale)) return at::zeros({2}, at::TensorOptions().dtype(at::kFloat).device(scale.device()));
  const auto acc = acc_dtype(hv);
  const auto dev = v[0].device();
  const auto scale_c = scale.reshape({1}).to(acc).contiguous();  // on the device: no sync
  Reduction red(v, 2, acc);
  auto out = at::empty({2}, at::TensorOptions().dtype(acc).device(dev));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hv[0].scalar_type(), "oja_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto lists = slot_lists<kOjaDepth>({{kOjaV, v}, {kOjaHv, hv}});
    multi_tensor_apply<kOjaDepth>(lists, OjaOp<scalar_t, acc_t>{scale_c.data_ptr<acc_t>(), static_cast<acc_t>(eta),
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
  m.impl("svrg_step_", &svrg_step_cuda);
  m.impl("oja_step_", &oja_step_cuda);
}

}  // namespace cuda
}  // namespace natasha
