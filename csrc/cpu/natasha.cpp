// CPU kernels of the natasha ops: svrg_step (Natasha1.5 inner step) and oja_step (Oja's
// algorithm with lazy normalisation). One pass over the list in fixed chunks (chunks.h), at::vec
// inner loops for fp32/fp64, per-chunk partial sums added in chunk order (deterministic for any
// thread count). Spec: natasha_ext/ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "chunks.h"
#include "natasha/args/natasha.h"
#include "natasha/natasha.h"
#include "natasha/static_switch.h"

namespace natasha {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------ svrg_step
// s sums deviations x_t - x_hat (exact for parameters that do not move).
// MODE 0: x <- z; 1: finalize without prox (x <- a <- a + (s + x - a + z - a)/m, s <- 0); 2: prox pass 1
// (x <- z, accumulate ||z - c||^2; the prox and the finalize happen in pass 2).
template <typename scalar_t, typename acc_t>
struct SvrgPtrs {
  scalar_t* x;
  const scalar_t* g;
  const scalar_t* gs;
  const acc_t* mu;
  acc_t* a;
  acc_t* s;
  const acc_t* c;
};

template <bool SNAP, bool MU, int MODE, typename scalar_t, typename acc_t>
void svrg_chunk(const SvrgPtrs<scalar_t, acc_t>& p, int64_t n, acc_t lr, acc_t reg, acc_t inv_m,
                acc_t* out_d2, acc_t* out_dist2) {
  acc_t d2 = 0, dist2 = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec vlr(lr), vreg(reg), vinv(inv_m), zero(0);
    Vec vd2(0), vdist2(0);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec x = Vec::loadu(p.x + i);
      const Vec a = Vec::loadu(p.a + i);
      Vec d = Vec::loadu(p.g + i);
      if constexpr (SNAP) d = d - Vec::loadu(p.gs + i);
      if constexpr (MU) d = d + Vec::loadu(p.mu + i);
      d = at::vec::fmadd(vreg, x - a, d);
      const Vec z = x - vlr * d;
      const Vec s = Vec::loadu(p.s + i) + (x - a);
      vd2 = at::vec::fmadd(d, d, vd2);
      if constexpr (MODE == 1) {
        const Vec xh = svrg_finalize<Vec>(a, s, z, vinv);
        xh.store(p.x + i);
        xh.store(p.a + i);
        zero.store(p.s + i);
      } else {
        z.store(p.x + i);
        s.store(p.s + i);
        if constexpr (MODE == 2) {
          const Vec e = z - Vec::loadu(p.c + i);
          vdist2 = at::vec::fmadd(e, e, vdist2);
        }
      }
    }
    acc_t buf[Vec::size()];
    vd2.store(buf);
    for (int j = 0; j < Vec::size(); ++j) d2 += buf[j];
    vdist2.store(buf);
    for (int j = 0; j < Vec::size(); ++j) dist2 += buf[j];
  }
  for (; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(p.x[i]);
    const acc_t gs = SNAP ? static_cast<acc_t>(p.gs[i]) : acc_t(0);
    const acc_t mu = MU ? p.mu[i] : acc_t(0);
    const acc_t d = svrg_direction<acc_t>(static_cast<acc_t>(p.g[i]), gs, mu, reg, x, p.a[i]);
    const acc_t z = x - lr * d;
    const acc_t a = p.a[i];
    const acc_t s = p.s[i] + (x - a);
    d2 += d * d;
    if constexpr (MODE == 1) {
      const acc_t xh = svrg_finalize<acc_t>(a, s, z, inv_m);
      p.x[i] = static_cast<scalar_t>(xh);
      p.a[i] = xh;
      p.s[i] = acc_t(0);
    } else {
      p.x[i] = static_cast<scalar_t>(z);
      p.s[i] = s;
      if constexpr (MODE == 2) {
        const acc_t e = z - p.c[i];
        dist2 += e * e;
      }
    }
  }
  *out_d2 = d2;
  *out_dist2 = dist2;
}

// Pass 2 with the prox: y = c + kappa (x - c); finalize or store.
template <typename scalar_t, typename acc_t>
void prox_chunk(const SvrgPtrs<scalar_t, acc_t>& p, int64_t n, acc_t kappa, acc_t inv_m, bool fin) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t c = p.c[i];
    const acc_t y = c + kappa * (static_cast<acc_t>(p.x[i]) - c);
    if (fin) {
      const acc_t a = p.a[i];
      const acc_t xh = svrg_finalize<acc_t>(a, p.s[i], y, inv_m);
      p.x[i] = static_cast<scalar_t>(xh);
      p.a[i] = xh;
      p.s[i] = acc_t(0);
    } else {
      p.x[i] = static_cast<scalar_t>(y);
    }
  }
}

template <typename scalar_t, typename acc_t>
at::Tensor svrg_impl(at::TensorList params, at::TensorList grads, const c10::optional<at::TensorList>& gs,
                     const c10::optional<at::TensorList>& mu, at::TensorList anchor, at::TensorList avg_sum,
                     const c10::optional<at::TensorList>& center, acc_t lr, acc_t reg, int64_t finalize,
                     acc_t prox_L, acc_t prox_r) {
  const auto chunks = make_chunks(params);
  std::vector<acc_t> part(2 * chunks.size(), acc_t(0));
  const acc_t inv_m = finalize > 0 ? acc_t(1) / static_cast<acc_t>(finalize) : acc_t(0);
  const bool has_c = center.has_value();
  const int mode = has_c ? 2 : (finalize > 0 ? 1 : 0);
  auto ptrs = [&](const Chunk& c) {
    const int t = c.tensor;
    return SvrgPtrs<scalar_t, acc_t>{
        params[t].data_ptr<scalar_t>() + c.start, grads[t].data_ptr<scalar_t>() + c.start,
        gs ? (*gs)[t].data_ptr<scalar_t>() + c.start : nullptr,
        mu ? (*mu)[t].data_ptr<acc_t>() + c.start : nullptr, anchor[t].data_ptr<acc_t>() + c.start,
        avg_sum[t].data_ptr<acc_t>() + c.start, has_c ? (*center)[t].data_ptr<acc_t>() + c.start : nullptr};
  };
  bool_switch(gs.has_value(), [&](auto snap_c) {
    bool_switch(mu.has_value(), [&](auto mu_c) {
      int_switch<3>(mode, [&](auto mode_c) {
        constexpr bool S = decltype(snap_c)::value, M = decltype(mu_c)::value;
        constexpr int MODE = decltype(mode_c)::value;
        for_each_chunk(chunks, [&](const Chunk& c) {
          svrg_chunk<S, M, MODE, scalar_t, acc_t>(ptrs(c), c.n, lr, reg, inv_m, &part[2 * c.index],
                                                  &part[2 * c.index + 1]);
        });
      });
    });
  });

  const auto tot = sum_partials<2, acc_t>(part);
  acc_t kappa = 1;
  if (has_c) {
    kappa = prox_kappa<acc_t>(tot[1], lr, prox_L, prox_r);
    for_each_chunk(chunks, [&](const Chunk& c) {
      prox_chunk<scalar_t, acc_t>(ptrs(c), c.n, kappa, inv_m, finalize > 0);
    });
  }
  const auto dt = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({3}, at::TensorOptions().dtype(dt));
  acc_t* o = out.template data_ptr<acc_t>();
  o[0] = tot[0];
  o[1] = tot[1];
  o[2] = kappa;
  return out;
}

at::Tensor svrg_step_cpu(at::TensorList params, at::TensorList grads, c10::optional<at::TensorList> snapshot_grads,
                         c10::optional<at::TensorList> mu, at::TensorList anchor, at::TensorList avg_sum,
                         c10::optional<at::TensorList> center, double lr, double reg, int64_t finalize,
                         double prox_L, double prox_radius) {
  check_svrg_step_args(params, grads, snapshot_grads, mu, anchor, avg_sum, center, finalize);
  if (params.empty()) return svrg_step_empty_result(c10::Device(c10::kCPU));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "svrg_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = svrg_impl<scalar_t, acc_t>(params, grads, snapshot_grads, mu, anchor, avg_sum, center,
                                     static_cast<acc_t>(lr), static_cast<acc_t>(reg), finalize,
                                     static_cast<acc_t>(prox_L), static_cast<acc_t>(prox_radius));
  });
  return out;
}

// ------------------------------------------------------------------------------- oja_step
template <typename scalar_t, typename acc_t>
void oja_chunk(acc_t* w, const scalar_t* h, int64_t n, acc_t scale, acc_t eta, acc_t* out_dot, acc_t* out_n2) {
  acc_t dot = 0, n2 = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec vs(scale), veta(eta);
    Vec vdot(0), vn2(0);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec x = Vec::loadu(w + i);
      const Vec hx = Vec::loadu(h + i);
      vdot = at::vec::fmadd(x, hx, vdot);
      const Vec y = vs * (x - veta * hx);
      vn2 = at::vec::fmadd(y, y, vn2);
      y.store(w + i);
    }
    acc_t buf[Vec::size()];
    vdot.store(buf);
    for (int j = 0; j < Vec::size(); ++j) dot += buf[j];
    vn2.store(buf);
    for (int j = 0; j < Vec::size(); ++j) n2 += buf[j];
  }
  for (; i < n; ++i) {
    const acc_t x = w[i], hx = static_cast<acc_t>(h[i]);
    dot += x * hx;
    const acc_t y = oja_update<acc_t>(x, hx, scale, eta);
    n2 += y * y;
    w[i] = y;
  }
  *out_dot = dot;
  *out_n2 = n2;
}

at::Tensor oja_step_cpu(at::TensorList v, at::TensorList hv, const at::Tensor& scale, double eta) {
  if (!check_oja_step_args(v, hv, scale)) return at::zeros({2}, at::kFloat);
  const auto acc = acc_dtype(hv);
  const auto chunks = make_chunks(v);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hv[0].scalar_type(), "oja_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scale.to(at::kDouble).item<double>();
    std::vector<acc_t> part(2 * chunks.size(), acc_t(0));
    for_each_chunk(chunks, [&](const Chunk& c) {
      oja_chunk<scalar_t, acc_t>(v[c.tensor].data_ptr<acc_t>() + c.start,
                                 hv[c.tensor].data_ptr<scalar_t>() + c.start, c.n, s,
                                 static_cast<acc_t>(eta), &part[2 * c.index], &part[2 * c.index + 1]);
    });
    const auto tot = sum_partials<2, acc_t>(part);
    out = at::empty({2}, at::TensorOptions().dtype(acc));
    out.data_ptr<acc_t>()[0] = std::sqrt(tot[1]);
    out.data_ptr<acc_t>()[1] = s * s * tot[0];
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CPU, m) {
  m.impl("svrg_step_", &svrg_step_cpu);
  m.impl("oja_step_", &oja_step_cpu);
}

}  // namespace cpu
}  // namespace natasha
