// CUDA kernels of the K-FAC / ANG / IFANG ops (math in natasha/kfac.h, shared with the CPU;
// kfac_factor_ema_ is one composite kernel for every device, csrc/composite.cpp).
//   * kfac_precondition: U = G^-1 T A^-1 by cuBLAS (at::matmul), then ONE multi-tensor launch
//     over all layers for the reductions (<T,U>, |U|^2, |T|^2).
//   * kfac_smw_apply: the k x k parts by ATen (cuBLAS/cuSOLVER, tiny), then ONE multi-tensor
//     launch that forms U = (T - Pa Ya - Yg^T Z) / lam^2 and its reductions in the same pass.
//   * ang_combine_: a one-block kernel turns the reductions into the slerp coefficients on the
//     device, then ONE multi-tensor launch applies nat <- c1 nat + c2 grads.
// Reductions: per-chunk partials, summed per layer by a second kernel in a fixed order
// (deterministic); nothing is read back to the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "natasha/args/kfac.h"
#include "natasha/kfac.h"
#include "natasha/kfac_host.h"

namespace natasha {
namespace cuda {
namespace {

constexpr int kLayersPerFinish = 256;

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
enum Reduce3Slot : int { kRedT, kRedU, kRedDepth };

template <typename scalar_t, typename acc_t>
struct Reduce3Op {
  acc_t* partials;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    const scalar_t* t = chunk_ptr<scalar_t>(meta, kRedT, c);
    const scalar_t* u = chunk_ptr<scalar_t>(meta, kRedU, c);
    acc_t v[3] = {0, 0, 0};
    for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t rt[kILP], ru[kILP];
      load_ilp<acc_t>(rt, t, base, c.n);
      load_ilp<acc_t>(ru, u, base, c.n);
#pragma unroll
      for (int j = 0; j < kILP; ++j) kfac::reduce3_add<acc_t>(v, rt[j], ru[j]);
    }
    store_partials<3, acc_t>(v, partials, c.index);
  }
};

// ------------------------------------------------------------------------------ precondition
std::tuple<std::vector<at::Tensor>, at::Tensor> precondition_cuda(at::TensorList grads, at::TensorList g_inv,
                                                                  at::TensorList a_inv) {
  constexpr const char* op = "kfac_precondition";
  const c10::cuda::OptionalCUDAGuard guard(guard_device({grads, g_inv, a_inv}));
  const auto acc = check_kfac_precondition_args(grads, g_inv, a_inv);
  const auto dev = op_device({grads, g_inv, a_inv});
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& t = grads[l];
    const auto pdt = g_inv[l].scalar_type();
    outs.push_back(at::matmul(at::matmul(g_inv[l], t.to(pdt)), a_inv[l].to(pdt)).to(t.scalar_type()).contiguous());
  }
  const int64_t L = static_cast<int64_t>(grads.size());
  at::Tensor red = at::zeros({L, 3}, at::TensorOptions().dtype(acc).device(dev));
  if (L == 0) return {outs, red};
  Reduction part(grads, 3, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto lists = slot_lists<kRedDepth>({{kRedT, grads}, {kRedU, outs}});
    multi_tensor_apply<kRedDepth>(lists, Reduce3Op<scalar_t, acc_t>{part.partials.data_ptr<acc_t>()});
    per_layer_sums<acc_t>(part.partials, chunk_offsets(grads), red);
  });
  return {outs, red};
}

// ------------------------------------------------------------------------------ SMW apply
// List slots: T, U (scalar_t), the layer's packed terms (acc_t, read from the tensor's base
// address): [1/lam^2 | Pa (o x k) | Yg (k x o) | Ya (k x i) | Z (k x i)], and the layer's
// dimensions [o, i, k] as int64 (exact for any size; the accumulation dtype is not).
enum SmwSlot : int { kSmwT, kSmwU, kSmwTerms, kSmwDims, kSmwDepth };

template <typename scalar_t, typename acc_t>
struct SmwOp {
  acc_t* partials;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    const scalar_t* t = chunk_ptr<scalar_t>(meta, kSmwT, c);
    scalar_t* u = chunk_ptr<scalar_t>(meta, kSmwU, c);
    const acc_t* terms = tensor_ptr<const acc_t>(meta, kSmwTerms, c);
    const int64_t* dims = tensor_ptr<const int64_t>(meta, kSmwDims, c);
    const int64_t o = dims[0], i = dims[1];
    const int k = static_cast<int>(dims[2]);
    const acc_t inv_lam2 = terms[0];
    const acc_t* pa = terms + 1;
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
          // reduce what was stored (as the reference does)
          kfac::reduce3_add<acc_t>(v, rt[j], static_cast<acc_t>(us));
        }
      }
    }
    store_partials<3, acc_t>(v, partials, c.index);
  }
};

std::tuple<std::vector<at::Tensor>, at::Tensor> smw_apply_cuda(at::TensorList grads, at::TensorList ya,
                                                               at::TensorList yg, at::ArrayRef<double> damping) {
  constexpr const char* op = "kfac_smw_apply";
  const c10::cuda::OptionalCUDAGuard guard(guard_device({grads, ya, yg}));
  const auto acc = check_kfac_smw_apply_args(grads, ya, yg, damping);
  const auto dev = op_device({grads, ya, yg});
  const auto aopt = at::TensorOptions().dtype(acc).device(dev);
  const auto iopt = at::TensorOptions().dtype(at::kLong).device(dev);
  std::vector<at::Tensor> outs, packed, dims;
  outs.reserve(grads.size());
  packed.reserve(grads.size());
  dims.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& t = grads[l];
    outs.push_back(at::empty_like(t));
    if (t.numel() == 0) {  // never read: empty tensors get no block
      packed.push_back(at::zeros({1}, aopt));
      dims.push_back(at::zeros({3}, iopt));
      continue;
    }
    const auto s = kfac::host::smw_terms(t, ya[l], yg[l], damping[l], acc);
    // small headers filled on the device from host values (fill_ takes a scalar: no copy, no sync)
    at::Tensor head = at::empty({1}, aopt).fill_(1.0 / (damping[l] * damping[l]));
    at::Tensor d = at::empty({3}, iopt);
    d.select(0, 0).fill_(t.size(0));
    d.select(0, 1).fill_(t.size(1));
    d.select(0, 2).fill_(s.ya.size(0));
    packed.push_back(at::cat({head, s.pa.reshape(-1), s.yg.reshape(-1), s.ya.reshape(-1), s.z.reshape(-1)}));
    dims.push_back(d);
  }
  const int64_t L = static_cast<int64_t>(grads.size());
  at::Tensor red = at::zeros({L, 3}, aopt);
  if (L == 0) return {outs, red};
  Reduction part(grads, 3, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto lists =
        slot_lists<kSmwDepth>({{kSmwT, grads}, {kSmwU, outs}, {kSmwTerms, packed}, {kSmwDims, dims}});
    multi_tensor_apply<kSmwDepth>(lists, SmwOp<scalar_t, acc_t>{part.partials.data_ptr<acc_t>()});
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

// List slots: nat (in place), grads, the layer's row of the coefficients (its base address).
enum CombineSlot : int { kCombNat, kCombGrad, kCombCoef, kCombDepth };

template <typename scalar_t, typename acc_t, typename coef_t>
struct CombineOp {
  template <typename Meta>
  __device__ void operator()(const Meta& meta, const Chunk& c) const {
    scalar_t* u = chunk_ptr<scalar_t>(meta, kCombNat, c);
    const scalar_t* t = chunk_ptr<scalar_t>(meta, kCombGrad, c);
    const coef_t* cf = tensor_ptr<const coef_t>(meta, kCombCoef, c);
    const acc_t a = static_cast<acc_t>(cf[0]), b = static_cast<acc_t>(cf[1]);
    for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kBlock) * kILP) {
      acc_t ru[kILP], rt[kILP];
      load_ilp<acc_t>(ru, u, base, c.n);
      load_ilp<acc_t>(rt, t, base, c.n);
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
  const c10::cuda::OptionalCUDAGuard guard(guard_device({nat, grads, at::TensorList(reductions)}));
  if (!check_ang_combine_args(nat, grads, reductions, scale, lam)) return reductions.new_empty({0, 2});
  const auto dev = nat[0].device();
  const int64_t L = static_cast<int64_t>(nat.size());
  // fp16/bf16 reductions (accepted as on the CPU) are read in fp32; the coefficients come back in
  // the reductions' dtype, as the CPU kernel returns them
  const auto coef_dt = reductions.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor red = reductions.to(coef_dt).contiguous();
  // a CPU scale (user input) is copied once; the optimizers pass a device tensor
  const at::Tensor sc = scale.reshape({1}).to(dev, coef_dt).contiguous();
  at::Tensor coef = at::empty({L, 2}, red.options());
  AT_DISPATCH_FLOATING_TYPES(coef_dt, "ang_coefficients", [&] {
    ang_coefficients_kernel<scalar_t><<<1, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        red.data_ptr<scalar_t>(), L, sc.data_ptr<scalar_t>(), lam, per_layer, coef.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // returned in the reductions' dtype and applied as returned (rounded for fp16/bf16), as on the CPU
  const at::Tensor out = coef.to(reductions.scalar_type());
  const at::Tensor applied = out.scalar_type() == coef_dt ? out : out.to(coef_dt);
  std::vector<at::Tensor> rows;  // the coefficient row of each layer
  rows.reserve(L);
  for (int64_t l = 0; l < L; ++l) rows.push_back(applied.select(0, l));
  const auto lists = slot_lists<kCombDepth>({{kCombNat, nat}, {kCombGrad, grads}, {kCombCoef, rows}});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, nat[0].scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (coef_dt == at::kDouble) {
      multi_tensor_apply<kCombDepth>(lists, CombineOp<scalar_t, acc_t, double>{});
    } else {
      multi_tensor_apply<kCombDepth>(lists, CombineOp<scalar_t, acc_t, float>{});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CUDA, m) {
  m.impl("kfac_precondition", &precondition_cuda);
  m.impl("kfac_smw_apply", &smw_apply_cuda);
  m.impl("ang_combine_", &ang_combine_cuda);
}

}  // namespace cuda
}  // namespace natasha
