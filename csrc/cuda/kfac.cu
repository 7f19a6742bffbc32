// CUDA kernels of the K-FAC / ANG / IFANG ops (math in natasha/kfac.h, shared with the CPU).
//   * kfac_factor_ema_: one cuBLAS addmm per factor with the EMA folded into beta/alpha.
//   * kfac_precondition: U = G^-1 T A^-1 by cuBLAS (at::matmul), then ONE multi-tensor launch
//     over all layers for the reductions (<T,U>, |U|^2, |T|^2).
//   * kfac_smw_apply: the k x k parts by ATen (cuBLAS/cuSOLVER, tiny), then ONE multi-tensor
//     launch that forms U = (T - Pa Ya - Yg^T Z) / lam^2 and its reductions in the same pass.
//   * ang_combine_: a one-block kernel turns the reductions into the slerp coefficients on the
//     device, then ONE multi-tensor launch applies nat <- c1 nat + c2 grads.
// Reductions: per-chunk partials, summed per layer by a second kernel in a fixed order
// (deterministic); nothing is read back to the host.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../tensor_lists.h"
#include "multi_tensor_apply.cuh"
#include "natasha/kfac.h"

namespace natasha {
namespace cuda {
namespace {

constexpr int kILP = 4;
constexpr int kLayersPerFinish = 256;

void check_layers(const char* op, at::TensorList grads) {
  TORCH_CHECK(!grads.empty(), op, ": grads is empty");
  check_list(op, "grads", grads, grads[0].device());
  check_same_dtype(op, "grads", grads);
  for (size_t l = 0; l < grads.size(); ++l)
    TORCH_CHECK(grads[l].dim() == 2, op, ": grads[", l, "] must be 2-D, got ", grads[l].dim(), "-D");
}

// ------------------------------------------------------------------------------ reductions
// Chunk ranges of every layer in the partials buffer: layer l owns the global chunk indices
// [off[l], off[l+1]) (multi_tensor_apply numbers chunks in list order; empty tensors have none).
std::vector<int64_t> chunk_offsets(at::TensorList ts) {
  std::vector<int64_t> off(ts.size() + 1, 0);
  for (size_t l = 0; l < ts.size(); ++l) off[l + 1] = off[l] + (ts[l].numel() + kChunk - 1) / kChunk;
  return off;
}

struct LayerRanges {
  int64_t off[kLayersPerFinish + 1];
};

// Block b sums the [chunks, 3] partials of layer l0 + b in chunk order into out[(l0 + b) * 3 ...].
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) layer_sums_kernel(const acc_t* partials, LayerRanges r, acc_t* out) {
  acc_t v[3] = {0, 0, 0};
  for (int64_t i = r.off[blockIdx.x] + threadIdx.x; i < r.off[blockIdx.x + 1]; i += kBlock)
#pragma unroll
    for (int q = 0; q < 3; ++q) v[q] += partials[3 * i + q];
  block_reduce<3, acc_t>(v);
  if (threadIdx.x == 0)
#pragma unroll
    for (int q = 0; q < 3; ++q) out[3 * blockIdx.x + q] = v[q];
}

// [L, 3] per-layer sums of the partials (the layer ranges travel by value: no host-device copy).
template <typename acc_t>
void per_layer_sums(const at::Tensor& partials, const std::vector<int64_t>& off, at::Tensor& red) {
  const int64_t L = static_cast<int64_t>(off.size()) - 1;
  for (int64_t l0 = 0; l0 < L; l0 += kLayersPerFinish) {
    const int64_t n = std::min<int64_t>(kLayersPerFinish, L - l0);
    LayerRanges r;
    for (int64_t j = 0; j <= n; ++j) r.off[j] = off[l0 + j];
    layer_sums_kernel<acc_t><<<n, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        partials.data_ptr<acc_t>(), r, red.data_ptr<acc_t>() + 3 * l0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Reductions of (T, U): partials[chunk] = (<t,u>, u^2, t^2) over the chunk.
template <typename scalar_t, typename acc_t>
struct Reduce3Op {
  acc_t* partials;
  __device__ void operator()(const TensorListMeta<2>& meta, const Chunk& c) const {
    const scalar_t* t = chunk_ptr<scalar_t>(meta, 0, c);
    const scalar_t* u = chunk_ptr<scalar_t>(meta, 1, c);
    acc_t v[3] = {0, 0, 0};
    for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t rt[kILP], ru[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + j * kBlock;
        rt[j] = i < c.n ? static_cast<acc_t>(t[i]) : acc_t(0);
        ru[j] = i < c.n ? static_cast<acc_t>(u[i]) : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        v[0] += rt[j] * ru[j];
        v[1] += ru[j] * ru[j];
        v[2] += rt[j] * rt[j];
      }
    }
    block_reduce<3, acc_t>(v);
    if (threadIdx.x == 0)
#pragma unroll
      for (int q = 0; q < 3; ++q) partials[3 * c.index + q] = v[q];
  }
};

// ------------------------------------------------------------------------------ factor EMA
void factor_ema_cuda(at::TensorList factors, at::TensorList rows, at::ArrayRef<double> scales, double decay) {
  constexpr const char* op = "kfac_factor_ema_";
  TORCH_CHECK(rows.size() == factors.size() && scales.size() == factors.size(), op,
              ": factors, rows and scales must have the same length");
  TORCH_CHECK(decay >= 0.0 && decay < 1.0, op, ": decay must be in [0, 1), got ", decay);
  if (factors.empty()) return;
  check_list(op, "factors", factors, factors[0].device());
  check_list(op, "rows", rows, factors[0].device());
  for (size_t l = 0; l < factors.size(); ++l) {
    TORCH_CHECK(factors[l].dim() == 2 && rows[l].dim() == 2 && factors[l].size(0) == rows[l].size(1) &&
                    factors[l].size(1) == rows[l].size(1),
                op, ": factors[", l, "] ", factors[l].sizes(), " does not match rows[", l, "] ", rows[l].sizes());
    at::Tensor f = factors[l];
    kfac::host::factor_ema(f, rows[l], scales[l], decay);  // cuBLAS gemm, EMA in beta/alpha
  }
}

// ------------------------------------------------------------------------------ precondition
std::tuple<std::vector<at::Tensor>, at::Tensor> precondition_cuda(at::TensorList grads, at::TensorList g_inv,
                                                                  at::TensorList a_inv) {
  constexpr const char* op = "kfac_precondition";
  check_layers(op, grads);
  const auto dev = grads[0].device();
  check_list(op, "g_inv", g_inv, dev);
  check_list(op, "a_inv", a_inv, dev);
  TORCH_CHECK(g_inv.size() == grads.size() && a_inv.size() == grads.size(), op,
              ": grads, g_inv and a_inv must have the same length");
  const auto acc = acc_dtype(grads);
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& t = grads[l];
    TORCH_CHECK(g_inv[l].dim() == 2 && g_inv[l].size(0) == t.size(0) && g_inv[l].size(1) == t.size(0) &&
                    a_inv[l].dim() == 2 && a_inv[l].size(0) == t.size(1) && a_inv[l].size(1) == t.size(1),
                op, ": layer ", l, " grads ", t.sizes(), " needs g_inv (", t.size(0), ", ", t.size(0), ") and a_inv (",
                t.size(1), ", ", t.size(1), "), got ", g_inv[l].sizes(), " and ", a_inv[l].sizes());
    const auto pdt = g_inv[l].scalar_type();
    outs.push_back(at::matmul(at::matmul(g_inv[l], t.to(pdt)), a_inv[l].to(pdt)).to(t.scalar_type()).contiguous());
  }
  const int64_t L = static_cast<int64_t>(grads.size());
  at::Tensor red = at::zeros({L, 3}, at::TensorOptions().dtype(acc).device(dev));
  Reduction part(grads, 3, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    multi_tensor_apply<2>({grads.vec(), outs}, Reduce3Op<scalar_t, acc_t>{part.partials.data_ptr<acc_t>()});
    per_layer_sums<acc_t>(part.partials, chunk_offsets(grads), red);
  });
  return {outs, red};
}

// ------------------------------------------------------------------------------ SMW apply
// List slots: 0 T (scalar_t), 1 U (scalar_t), 2 the layer's packed terms (acc_t, read from its
// base address): [o, i, k, 1/lam^2 | Pa (o x k) | Yg (k x o) | Ya (k x i) | Z (k x i)].
template <typename scalar_t, typename acc_t>
struct SmwOp {
  acc_t* partials;
  __device__ void operator()(const TensorListMeta<3>& meta, const Chunk& c) const {
    const scalar_t* t = chunk_ptr<scalar_t>(meta, 0, c);
    scalar_t* u = chunk_ptr<scalar_t>(meta, 1, c);
    const acc_t* terms = static_cast<const acc_t*>(meta.addr[2][c.t]);
    const int64_t o = static_cast<int64_t>(terms[0]), i = static_cast<int64_t>(terms[1]);
    const int k = static_cast<int>(terms[2]);
    const acc_t inv_lam2 = terms[3];
    const acc_t* pa = terms + 4;
    const acc_t* yg = pa + o * k;
    const acc_t* ya = yg + k * o;
    const acc_t* z = ya + k * i;
    acc_t v[3] = {0, 0, 0};
    for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t rt[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t e = base + j * kBlock;
        rt[j] = e < c.n ? static_cast<acc_t>(t[e]) : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t e = base + j * kBlock;
        if (e < c.n) {
          const int64_t g = c.start + e, r = g / i, col = g - r * i;
          const acc_t uu = kfac::smw_element<acc_t>(rt[j], pa + r * k, yg + r, o, ya + col, z + col, i, k, inv_lam2);
          const scalar_t us = static_cast<scalar_t>(uu);
          u[e] = us;
          const acc_t ur = static_cast<acc_t>(us);  // reduce what was stored (as the reference does)
          v[0] += rt[j] * ur;
          v[1] += ur * ur;
          v[2] += rt[j] * rt[j];
        }
      }
    }
    block_reduce<3, acc_t>(v);
    if (threadIdx.x == 0)
#pragma unroll
      for (int q = 0; q < 3; ++q) partials[3 * c.index + q] = v[q];
  }
};

std::tuple<std::vector<at::Tensor>, at::Tensor> smw_apply_cuda(at::TensorList grads, at::TensorList ya,
                                                               at::TensorList yg, at::ArrayRef<double> damping) {
  constexpr const char* op = "kfac_smw_apply";
  check_layers(op, grads);
  const auto dev = grads[0].device();
  check_list(op, "ya", ya, dev);
  check_list(op, "yg", yg, dev);
  TORCH_CHECK(ya.size() == grads.size() && yg.size() == grads.size() && damping.size() == grads.size(), op,
              ": grads, ya, yg and damping must have the same length");
  const auto acc = acc_dtype(grads);
  const auto aopt = at::TensorOptions().dtype(acc).device(dev);
  std::vector<at::Tensor> outs, packed;
  outs.reserve(grads.size());
  packed.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& t = grads[l];
    TORCH_CHECK(ya[l].dim() == 2 && yg[l].dim() == 2 && ya[l].size(1) == t.size(1) && yg[l].size(1) == t.size(0) &&
                    ya[l].size(0) == yg[l].size(0),
                op, ": layer ", l, " grads ", t.sizes(), " needs ya (k, ", t.size(1), ") and yg (k, ", t.size(0),
                "), got ", ya[l].sizes(), " and ", yg[l].sizes());
    TORCH_CHECK(damping[l] > 0, op, ": damping[", l, "] must be > 0, got ", damping[l]);
    outs.push_back(at::empty_like(t));
    if (t.numel() == 0) {
      packed.push_back(at::zeros({4}, aopt));  // never read: empty tensors get no block
      continue;
    }
    const auto s = kfac::host::smw_terms(t, ya[l], yg[l], damping[l], acc);
    // header filled by kernels taking the values as arguments (no host-to-device copy)
    at::Tensor head = at::empty({4}, aopt);
    head.select(0, 0).fill_(static_cast<double>(t.size(0)));
    head.select(0, 1).fill_(static_cast<double>(t.size(1)));
    head.select(0, 2).fill_(static_cast<double>(s.ya.size(0)));
    head.select(0, 3).fill_(1.0 / (damping[l] * damping[l]));
    packed.push_back(at::cat({head, s.pa.reshape(-1), s.yg.reshape(-1), s.ya.reshape(-1), s.z.reshape(-1)}));
  }
  const int64_t L = static_cast<int64_t>(grads.size());
  at::Tensor red = at::zeros({L, 3}, aopt);
  Reduction part(grads, 3, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    multi_tensor_apply<3>({grads.vec(), outs, packed}, SmwOp<scalar_t, acc_t>{part.partials.data_ptr<acc_t>()});
    per_layer_sums<acc_t>(part.partials, chunk_offsets(grads), red);
  });
  return {outs, red};
}

// ------------------------------------------------------------------------------ ANG combine
// One block: coef[l] = scale * (c1, c2) from the [L, 3] reductions (natasha/kfac.h), in double;
// per_layer = false sums the reductions over the layers first (in order: deterministic).
template <typename red_t>
__global__ void ang_coefficients_kernel(const red_t* red, int64_t L, const red_t* scale, double lam, bool per_layer,
                                        red_t* coef) {
  const double sc = static_cast<double>(*scale);
  if (!per_layer) {
    if (threadIdx.x != 0) return;
    double s[3] = {0, 0, 0};
    for (int64_t l = 0; l < L; ++l)
      for (int q = 0; q < 3; ++q) s[q] += static_cast<double>(red[3 * l + q]);
    double a, b;
    kfac::ang_coefficients(s[0], s[1], s[2], lam, &a, &b);
    for (int64_t l = 0; l < L; ++l) {
      coef[2 * l] = static_cast<red_t>(a * sc);
      coef[2 * l + 1] = static_cast<red_t>(b * sc);
    }
    return;
  }
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    double a, b;
    kfac::ang_coefficients(static_cast<double>(red[3 * l]), static_cast<double>(red[3 * l + 1]),
                           static_cast<double>(red[3 * l + 2]), lam, &a, &b);
    coef[2 * l] = static_cast<red_t>(a * sc);
    coef[2 * l + 1] = static_cast<red_t>(b * sc);
  }
}

// List slots: 0 nat (in place), 1 grads, 2 the layer's row of the coefficients (base address).
template <typename scalar_t, typename acc_t, typename coef_t>
struct CombineOp {
  __device__ void operator()(const TensorListMeta<3>& meta, const Chunk& c) const {
    scalar_t* u = chunk_ptr<scalar_t>(meta, 0, c);
    const scalar_t* t = chunk_ptr<scalar_t>(meta, 1, c);
    const coef_t* cf = static_cast<const coef_t*>(meta.addr[2][c.t]);
    const acc_t a = static_cast<acc_t>(cf[0]), b = static_cast<acc_t>(cf[1]);
    for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t ru[kILP], rt[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + j * kBlock;
        ru[j] = i < c.n ? static_cast<acc_t>(u[i]) : acc_t(0);
        rt[j] = i < c.n ? static_cast<acc_t>(t[i]) : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t i = base + j * kBlock;
        if (i < c.n) u[i] = static_cast<scalar_t>(a * ru[j] + b * rt[j]);
      }
    }
  }
};

at::Tensor ang_combine_cuda(at::TensorList nat, at::TensorList grads, const at::Tensor& reductions,
                            const at::Tensor& scale, double lam, bool per_layer) {
  constexpr const char* op = "ang_combine_";
  TORCH_CHECK(!nat.empty(), op, ": nat is empty");
  const auto dev = nat[0].device();
  check_list(op, "nat", nat, dev);
  check_list(op, "grads", grads, dev);
  check_same_shape(op, "nat", nat, "grads", grads);
  check_same_dtype(op, "nat", nat);
  check_same_dtype(op, "grads", grads);
  TORCH_CHECK(nat[0].scalar_type() == grads[0].scalar_type(), op, ": nat and grads must have the same dtype");
  const int64_t L = static_cast<int64_t>(nat.size());
  TORCH_CHECK(reductions.device() == dev && reductions.dim() == 2 && reductions.size(0) == L &&
                  reductions.size(1) == 3 && at::isFloatingType(reductions.scalar_type()),
              op, ": reductions must be a floating tensor of shape (", L, ", 3) on ", dev, ", got ",
              reductions.sizes(), " on ", reductions.device());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must hold one value");
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, op, ": lam must be in [0, 1], got ", lam);
  TORCH_CHECK(reductions.scalar_type() == at::kFloat || reductions.scalar_type() == at::kDouble, op,
              ": reductions must be fp32 or fp64, got ", reductions.scalar_type());
  const at::Tensor red = reductions.contiguous();
  // a CPU scale (user input) is copied once; the optimizers pass a device tensor
  const at::Tensor sc = scale.reshape({1}).to(dev, reductions.scalar_type()).contiguous();
  at::Tensor coef = at::empty({L, 2}, red.options());
  AT_DISPATCH_FLOATING_TYPES(red.scalar_type(), "ang_coefficients", [&] {
    ang_coefficients_kernel<scalar_t><<<1, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        red.data_ptr<scalar_t>(), L, sc.data_ptr<scalar_t>(), lam, per_layer, coef.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  std::vector<at::Tensor> rows;
  rows.reserve(L);
  for (int64_t l = 0; l < L; ++l) rows.push_back(coef.select(0, l));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, nat[0].scalar_type(), op, [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    if (red.scalar_type() == at::kDouble) {
      multi_tensor_apply<3>({nat.vec(), grads.vec(), rows}, CombineOp<scalar_t, acc_t, double>{});
    } else {
      multi_tensor_apply<3>({nat.vec(), grads.vec(), rows}, CombineOp<scalar_t, acc_t, float>{});
    }
  });
  return coef;
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("kfac_factor_ema_", &factor_ema_cuda);
  m.impl("kfac_precondition", &precondition_cuda);
  m.impl("kfac_smw_apply", &smw_apply_cuda);
  m.impl("ang_combine_", &ang_combine_cuda);
}

}  // namespace cuda
}  // namespace natasha
