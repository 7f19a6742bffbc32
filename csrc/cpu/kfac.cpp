// CPU kernels of the K-FAC / ANG / IFANG ops: factor EMA (BLAS product with the EMA folded in),
// damped Kronecker apply + reductions, SMW low-rank apply with the reductions in the same pass,
// and ANG's slerp combine. See natasha/kfac.h for the math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "../tensor_lists.h"
#include "chunks.h"
#include "natasha/kfac.h"

namespace natasha {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 16;  // rows per deterministic partial-sum block

void check_layers(const char* op, at::TensorList grads) {
  check_list(op, "grads", grads, c10::Device(c10::kCPU));
  check_same_dtype(op, "grads", grads);
  for (size_t l = 0; l < grads.size(); ++l)
    TORCH_CHECK(grads[l].dim() == 2, op, ": grads[", l, "] must be 2-D, got ", grads[l].dim(), "-D");
}

void factor_ema_cpu(at::TensorList factors, at::TensorList rows, at::ArrayRef<double> scales, double decay) {
  check_list("kfac_factor_ema_", "factors", factors, c10::Device(c10::kCPU));
  check_list("kfac_factor_ema_", "rows", rows, c10::Device(c10::kCPU));
  TORCH_CHECK(rows.size() == factors.size() && scales.size() == factors.size(),
              "kfac_factor_ema_: factors, rows and scales must have the same length");
  TORCH_CHECK(decay >= 0.0 && decay < 1.0, "kfac_factor_ema_: decay must be in [0, 1), got ", decay);
  for (size_t l = 0; l < factors.size(); ++l) {
    TORCH_CHECK(factors[l].dim() == 2 && rows[l].dim() == 2 && factors[l].size(0) == rows[l].size(1) &&
                    factors[l].size(1) == rows[l].size(1),
                "kfac_factor_ema_: factors[", l, "] ", factors[l].sizes(), " does not match rows[", l, "] ",
                rows[l].sizes());
    at::Tensor f = factors[l];
    kfac::host::factor_ema(f, rows[l], scales[l], decay);
  }
}

// Sum of <t,u>, u^2, t^2 over n contiguous elements (vectorised when scalar_t == acc_t).
template <typename scalar_t, typename acc_t>
std::array<acc_t, 3> reduce3(const scalar_t* t, const scalar_t* u, int64_t n) {
  std::array<acc_t, 3> r{0, 0, 0};
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    Vec a(0), b(0), c(0);
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec tv = Vec::loadu(t + j), uv = Vec::loadu(u + j);
      a = at::vec::fmadd(tv, uv, a);
      b = at::vec::fmadd(uv, uv, b);
      c = at::vec::fmadd(tv, tv, c);
    }
    acc_t buf[3][Vec::size()];
    a.store(buf[0]);
    b.store(buf[1]);
    c.store(buf[2]);
    for (int q = 0; q < 3; ++q)
      for (int v = 0; v < Vec::size(); ++v) r[q] += buf[q][v];
  }
  for (; j < n; ++j) {
    const acc_t tv = static_cast<acc_t>(t[j]), uv = static_cast<acc_t>(u[j]);
    r[0] += tv * uv;
    r[1] += uv * uv;
    r[2] += tv * tv;
  }
  return r;
}

// Per-layer reductions of (T, U) into red[l, :], deterministic (fixed row blocks summed in order).
template <typename scalar_t, typename acc_t>
void layer_reductions(const at::Tensor& t, const at::Tensor& u, acc_t* red) {
  const int64_t o = t.size(0), i = t.size(1);
  const int64_t nb = (o + kRowBlock - 1) / kRowBlock;
  std::vector<acc_t> part(3 * std::max<int64_t>(nb, 1), acc_t(0));
  const scalar_t* tp = t.data_ptr<scalar_t>();
  const scalar_t* up = u.data_ptr<scalar_t>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(o, r0 + kRowBlock);
      const auto s = reduce3<scalar_t, acc_t>(tp + r0 * i, up + r0 * i, (r1 - r0) * i);
      for (int q = 0; q < 3; ++q) part[3 * b + q] = s[q];
    }
  });
  const auto tot = sum_partials<3, acc_t>(part);
  for (int q = 0; q < 3; ++q) red[q] = tot[q];
}

std::tuple<std::vector<at::Tensor>, at::Tensor> precondition_cpu(at::TensorList grads, at::TensorList g_inv,
                                                                 at::TensorList a_inv) {
  check_layers("kfac_precondition", grads);
  check_list("kfac_precondition", "g_inv", g_inv, c10::Device(c10::kCPU));
  check_list("kfac_precondition", "a_inv", a_inv, c10::Device(c10::kCPU));
  TORCH_CHECK(g_inv.size() == grads.size() && a_inv.size() == grads.size(),
              "kfac_precondition: grads, g_inv and a_inv must have the same length");
  const auto acc = acc_dtype(grads);
  at::Tensor red = at::zeros({static_cast<int64_t>(grads.size()), 3}, at::TensorOptions().dtype(acc));
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& t = grads[l];
    TORCH_CHECK(g_inv[l].dim() == 2 && g_inv[l].size(0) == t.size(0) && g_inv[l].size(1) == t.size(0) &&
                    a_inv[l].dim() == 2 && a_inv[l].size(0) == t.size(1) && a_inv[l].size(1) == t.size(1),
                "kfac_precondition: layer ", l, " grads ", t.sizes(), " needs g_inv (", t.size(0), ", ", t.size(0),
                ") and a_inv (", t.size(1), ", ", t.size(1), "), got ", g_inv[l].sizes(), " and ", a_inv[l].sizes());
    const auto pdt = g_inv[l].scalar_type();
    at::Tensor u = at::matmul(at::matmul(g_inv[l], t.to(pdt)), a_inv[l].to(pdt)).to(t.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kfac_precondition", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      layer_reductions<scalar_t, acc_t>(t, u, red.data_ptr<acc_t>() + 3 * l);
    });
    outs.push_back(std::move(u));
  }
  return {outs, red};
}

// Final SMW pass over one layer: U = (T - Pa Ya - Yg^T Z) / lam^2 with the reductions fused.
template <typename scalar_t, typename acc_t>
void smw_layer(const at::Tensor& t, at::Tensor& u, const kfac::host::SmwTerms& s, double lam, acc_t* red) {
  const int64_t o = t.size(0), i = t.size(1), k = s.ya.size(0);
  const acc_t inv_lam2 = static_cast<acc_t>(1.0 / (lam * lam));
  const scalar_t* tp = t.data_ptr<scalar_t>();
  scalar_t* up = u.data_ptr<scalar_t>();
  const acc_t* pa = s.pa.data_ptr<acc_t>();
  const acc_t* ya = s.ya.data_ptr<acc_t>();
  const acc_t* yg = s.yg.data_ptr<acc_t>();
  const acc_t* z = s.z.data_ptr<acc_t>();
  const int64_t nb = (o + kRowBlock - 1) / kRowBlock;
  std::vector<acc_t> part(3 * std::max<int64_t>(nb, 1), acc_t(0));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> coef(2 * k);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(o, r0 + kRowBlock);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j = 0; j < k; ++j) {
          coef[j] = pa[r * k + j];
          coef[k + j] = yg[j * o + r];
        }
        const scalar_t* trow = tp + r * i;
        scalar_t* urow = up + r * i;
        int64_t c = 0;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          using Vec = at::vec::Vectorized<acc_t>;
          const Vec il(inv_lam2);
          for (; c + Vec::size() <= i; c += Vec::size()) {
            Vec v = Vec::loadu(trow + c);
            for (int64_t j = 0; j < k; ++j) {
              v = v - Vec(coef[j]) * Vec::loadu(ya + j * i + c) - Vec(coef[k + j]) * Vec::loadu(z + j * i + c);
            }
            (v * il).store(urow + c);
          }
        }
        for (; c < i; ++c) {
          acc_t v = static_cast<acc_t>(trow[c]);
          for (int64_t j = 0; j < k; ++j) v -= coef[j] * ya[j * i + c] + coef[k + j] * z[j * i + c];
          urow[c] = static_cast<scalar_t>(v * inv_lam2);
        }
      }
      // reductions of the rows just written (still in cache)
      const auto s3 = reduce3<scalar_t, acc_t>(tp + r0 * i, up + r0 * i, (r1 - r0) * i);
      for (int q = 0; q < 3; ++q) part[3 * b + q] = s3[q];
    }
  });
  const auto tot = sum_partials<3, acc_t>(part);
  for (int q = 0; q < 3; ++q) red[q] = tot[q];
}

std::tuple<std::vector<at::Tensor>, at::Tensor> smw_apply_cpu(at::TensorList grads, at::TensorList ya,
                                                              at::TensorList yg, at::ArrayRef<double> damping) {
  check_layers("kfac_smw_apply", grads);
  check_list("kfac_smw_apply", "ya", ya, c10::Device(c10::kCPU));
  check_list("kfac_smw_apply", "yg", yg, c10::Device(c10::kCPU));
  TORCH_CHECK(ya.size() == grads.size() && yg.size() == grads.size() && damping.size() == grads.size(),
              "kfac_smw_apply: grads, ya, yg and damping must have the same length");
  const auto acc = acc_dtype(grads);
  at::Tensor red = at::zeros({static_cast<int64_t>(grads.size()), 3}, at::TensorOptions().dtype(acc));
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& t = grads[l];
    TORCH_CHECK(ya[l].dim() == 2 && yg[l].dim() == 2 && ya[l].size(1) == t.size(1) && yg[l].size(1) == t.size(0) &&
                    ya[l].size(0) == yg[l].size(0),
                "kfac_smw_apply: layer ", l, " grads ", t.sizes(), " needs ya (k, ", t.size(1), ") and yg (k, ",
                t.size(0), "), got ", ya[l].sizes(), " and ", yg[l].sizes());
    TORCH_CHECK(damping[l] > 0, "kfac_smw_apply: damping[", l, "] must be > 0, got ", damping[l]);
    at::Tensor u = at::empty_like(t);
    if (t.numel() > 0) {
      const auto terms = kfac::host::smw_terms(t, ya[l], yg[l], damping[l], acc);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kfac_smw_apply", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        smw_layer<scalar_t, acc_t>(t, u, terms, damping[l], red.data_ptr<acc_t>() + 3 * l);
      });
    }
    outs.push_back(std::move(u));
  }
  return {outs, red};
}

at::Tensor ang_combine_cpu(at::TensorList nat, at::TensorList grads, const at::Tensor& reductions,
                           const at::Tensor& scale, double lam, bool per_layer) {
  check_list("ang_combine_", "nat", nat, c10::Device(c10::kCPU));
  check_list("ang_combine_", "grads", grads, c10::Device(c10::kCPU));
  check_same_shape("ang_combine_", "nat", nat, "grads", grads);
  check_same_dtype("ang_combine_", "nat", nat);
  check_same_dtype("ang_combine_", "grads", grads);
  TORCH_CHECK(nat.empty() || nat[0].scalar_type() == grads[0].scalar_type(),
              "ang_combine_: nat and grads must have the same dtype");
  const int64_t L = static_cast<int64_t>(nat.size());
  TORCH_CHECK(reductions.device().is_cpu() && reductions.dim() == 2 && reductions.size(0) == L &&
                  reductions.size(1) == 3,
              "ang_combine_: reductions must be a CPU tensor of shape (", L, ", 3), got ", reductions.sizes());
  TORCH_CHECK(scale.numel() == 1, "ang_combine_: scale must hold one value");
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "ang_combine_: lam must be in [0, 1], got ", lam);
  const at::Tensor r = reductions.to(at::kDouble).contiguous();
  const double* rp = r.data_ptr<double>();
  const double sc = scale.to(at::kDouble).item<double>();  // CPU tensor: no device sync
  std::vector<double> c1(L), c2(L);
  if (per_layer) {
    for (int64_t l = 0; l < L; ++l) kfac::ang_coefficients(rp[3 * l], rp[3 * l + 1], rp[3 * l + 2], lam, &c1[l], &c2[l]);
  } else {
    double s[3] = {0, 0, 0};
    for (int64_t l = 0; l < L; ++l)
      for (int q = 0; q < 3; ++q) s[q] += rp[3 * l + q];
    double a, b;
    kfac::ang_coefficients(s[0], s[1], s[2], lam, &a, &b);
    std::fill(c1.begin(), c1.end(), a);
    std::fill(c2.begin(), c2.end(), b);
  }
  at::Tensor coef = at::empty({L, 2}, at::TensorOptions().dtype(at::kDouble));
  double* cp = coef.data_ptr<double>();
  for (int64_t l = 0; l < L; ++l) {
    c1[l] *= sc;
    c2[l] *= sc;
    cp[2 * l] = c1[l];
    cp[2 * l + 1] = c2[l];
  }
  if (L > 0) {
    const auto chunks = make_chunks(nat);
    for_each_chunk(chunks, [&](const Chunk& ch, int64_t) {
      const at::Tensor& u = nat[ch.tensor];
      const at::Tensor& t = grads[ch.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "ang_combine_", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        scalar_t* up = u.data_ptr<scalar_t>() + ch.start;
        const scalar_t* tp = t.data_ptr<scalar_t>() + ch.start;
        const acc_t a = static_cast<acc_t>(c1[ch.tensor]), b = static_cast<acc_t>(c2[ch.tensor]);
        int64_t j = 0;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          using Vec = at::vec::Vectorized<acc_t>;
          const Vec av(a), bv(b);
          for (; j + Vec::size() <= ch.n; j += Vec::size())
            at::vec::fmadd(av, Vec::loadu(up + j), bv * Vec::loadu(tp + j)).store(up + j);
        }
        for (; j < ch.n; ++j)
          up[j] = static_cast<scalar_t>(a * static_cast<acc_t>(up[j]) + b * static_cast<acc_t>(tp[j]));
      });
    });
  }
  return coef.to(reductions.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CPU, m) {
  m.impl("kfac_factor_ema_", &factor_ema_cpu);
  m.impl("kfac_precondition", &precondition_cpu);
  m.impl("kfac_smw_apply", &smw_apply_cpu);
  m.impl("ang_combine_", &ang_combine_cpu);
}

}  // namespace cpu
}  // namespace natasha
