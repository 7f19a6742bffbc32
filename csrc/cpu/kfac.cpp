// CPU kernels of the K-FAC / ANG / IFANG ops: damped Kronecker apply + reductions, SMW low-rank
// apply with the reductions in the same pass, and ANG's slerp combine. See natasha/kfac.h for the
// math; kfac_factor_ema_ is one composite kernel for every device (csrc/composite.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "chunks.h"
#include "natasha/args/kfac.h"
#include "natasha/kfac.h"
#include "natasha/kfac_host.h"

namespace natasha {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 16;  // rows per deterministic partial-sum block

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
  acc_t tail[3] = {0, 0, 0};
  for (; j < n; ++j) kfac::reduce3_add<acc_t>(tail, static_cast<acc_t>(t[j]), static_cast<acc_t>(u[j]));
  for (int q = 0; q < 3; ++q) r[q] += tail[q];
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
  const auto acc = check_kfac_precondition_args(grads, g_inv, a_inv);
  at::Tensor red = at::zeros({static_cast<int64_t>(grads.size()), 3}, at::TensorOptions().dtype(acc));
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& t = grads[l];
    const auto pdt = g_inv[l].scalar_type();
    at::Tensor u = at::matmul(at::matmul(g_inv[l], t.to(pdt)), a_inv[l].to(pdt)).to(t.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kfac_precondition", [&] {
      using acc_t = at::opmath_type<scalar_t>;
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
  const auto acc = check_kfac_smw_apply_args(grads, ya, yg, damping);
  at::Tensor red = at::zeros({static_cast<int64_t>(grads.size()), 3}, at::TensorOptions().dtype(acc));
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& t = grads[l];
    at::Tensor u = at::empty_like(t);
    if (t.numel() > 0) {
      const auto terms = kfac::host::smw_terms(t, ya[l], yg[l], damping[l], acc);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kfac_smw_apply", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        smw_layer<scalar_t, acc_t>(t, u, terms, damping[l], red.data_ptr<acc_t>() + 3 * l);
      });
    }
    outs.push_back(std::move(u));
  }
  return {outs, red};
}

at::Tensor ang_combine_cpu(at::TensorList nat, at::TensorList grads, const at::Tensor& reductions,
                           const at::Tensor& scale, double lam, bool per_layer) {
  const int64_t L = static_cast<int64_t>(nat.size());
  if (!check_ang_combine_args(nat, grads, reductions, scale, lam)) return reductions.new_empty({0, 2});
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
    cp[2 * l] = c1[l] * sc;
    cp[2 * l + 1] = c2[l] * sc;
  }
  // the coefficients are returned in the reductions' dtype and applied as returned (the reference's
  // contract: fp16/bf16/fp32 reductions give coefficients rounded to that dtype)
  coef = coef.to(reductions.scalar_type());
  const at::Tensor applied = coef.to(at::kDouble);
  const double* ap = applied.data_ptr<double>();
  for (int64_t l = 0; l < L; ++l) {
    c1[l] = ap[2 * l];
    c2[l] = ap[2 * l + 1];
  }
  {
    const auto chunks = make_chunks(nat);
    for_each_chunk(chunks, [&](const Chunk& ch) {
      const at::Tensor& u = nat[ch.tensor];
      const at::Tensor& t = grads[ch.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "ang_combine_", [&] {
        using acc_t = at::opmath_type<scalar_t>;
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
  return coef;
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CPU, m) {
  m.impl("kfac_precondition", &precondition_cpu);
  m.impl("kfac_smw_apply", &smw_apply_cpu);
  m.impl("ang_combine_", &ang_combine_cpu);
}

}  // namespace cpu
}  // namespace natasha
