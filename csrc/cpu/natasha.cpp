// CPU kernels of the natasha ops: svrg_step (Natasha1.5 inner step) and oja_step (Oja's
// algorithm with lazy normalisation). One pass over the list in fixed chunks (chunks.h), at::vec
// inner loops for fp32/fp64, per-chunk partial sums added in chunk order (deterministic for any
// thread count). Spec: natasha_ext/ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../natasha_args.h"
#include "../tensor_lists.h"
#include "chunks.h"
#include "natasha/natasha.h"

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
        const Vec xh = a + (s + (z - a)) * vinv;
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
      const acc_t xh = a + (s + (z - a)) * inv_m;
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
      const acc_t xh = a + (p.s[i] + (y - a)) * inv_m;
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
                     acc_t lr, acc_t reg, int64_t finalize, const c10::optional<at::TensorList>& center,
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
  auto run = [&](auto snap_c, auto mu_c, auto mode_c) {
    constexpr bool S = decltype(snap_c)::value, M = decltype(mu_c)::value;
    constexpr int MODE = decltype(mode_c)::value;
    for_each_chunk(chunks, [&](const Chunk& c, int64_t k) {
      svrg_chunk<S, M, MODE, scalar_t, acc_t>(ptrs(c), c.n, lr, reg, inv_m, &part[2 * k], &part[2 * k + 1]);
    });
  };
  auto by_mode = [&](auto snap_c, auto mu_c) {
    if (mode == 0) run(snap_c, mu_c, std::integral_constant<int, 0>{});
    else if (mode == 1) run(snap_c, mu_c, std::integral_constant<int, 1>{});
    else run(snap_c, mu_c, std::integral_constant<int, 2>{});
  };
  auto by_mu = [&](auto snap_c) {
    if (mu) by_mode(snap_c, std::true_type{});
    else by_mode(snap_c, std::false_type{});
  };
  if (gs) by_mu(std::true_type{});
  else by_mu(std::false_type{});

  const auto tot = sum_partials<2, acc_t>(part);
  acc_t kappa = 1;
  if (has_c) {
    kappa = prox_kappa<acc_t>(tot[1], lr, prox_L, prox_r);
    for_each_chunk(chunks, [&](const Chunk& c, int64_t) {
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
                         double lr, double reg, int64_t finalize, c10::optional<at::TensorList> center,
                         double prox_L, double prox_radius) {
  check_svrg_step_args(params, grads, snapshot_grads, mu, anchor, avg_sum, finalize, center, c10::Device(c10::kCPU));
  if (params.empty()) return at::tensor({0.0f, 0.0f, 1.0f});
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "svrg_step", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      out = svrg_impl<double, double>(params, grads, snapshot_grads, mu, anchor, avg_sum, lr, reg, finalize,
                                       center, prox_L, prox_radius);
    } else {
      out = svrg_impl<scalar_t, float>(params, grads, snapshot_grads, mu, anchor, avg_sum, static_cast<float>(lr),
                                       static_cast<float>(reg), finalize, center, static_cast<float>(prox_L),
                                       static_cast<float>(prox_radius));
    }
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
  constexpr const char* op = "oja_step";
  const c10::Device cpu(c10::kCPU);
  check_list(op, "v", v, cpu);
  check_list(op, "hv", hv, cpu);
  check_same_shape(op, "v", v, "hv", hv);
  check_same_dtype(op, "v", v);
  check_same_dtype(op, "hv", hv);
  TORCH_CHECK(scale.numel() == 1 && scale.device().is_cpu(), op, ": scale must be a 1-element CPU tensor");
  if (v.empty()) return at::zeros({2}, at::kFloat);
  const auto acc = acc_dtype(v);
  TORCH_CHECK(v[0].scalar_type() == acc, op, ": v must be fp32 or fp64 (the Oja vector is kept in the "
              "accumulation dtype), got ", v[0].scalar_type());
  TORCH_CHECK(acc == at::kFloat || hv[0].scalar_type() == at::kDouble, op, ": hv[0] has dtype ",
              hv[0].scalar_type(), " but v is fp64");
  const auto chunks = make_chunks(v);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hv[0].scalar_type(), "oja_step", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(v[0].scalar_type() == (std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat), op,
                ": v has dtype ", v[0].scalar_type(), " but hv needs ", std::is_same_v<acc_t, double> ? "fp64" : "fp32");
    const acc_t s = scale.to(at::kDouble).item<double>();
    std::vector<acc_t> part(2 * chunks.size(), acc_t(0));
    for_each_chunk(chunks, [&](const Chunk& c, int64_t k) {
      oja_chunk<scalar_t, acc_t>(v[c.tensor].data_ptr<acc_t>() + c.start,
                                 hv[c.tensor].data_ptr<scalar_t>() + c.start, c.n, s,
                                 static_cast<acc_t>(eta), &part[2 * k], &part[2 * k + 1]);
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
  m.impl("svrg_step", &svrg_step_cpu);
  m.impl("oja_step", &oja_step_cpu);
}

}  // namespace cpu
}  // namespace natasha
