// CPU kernels of the trust-region ops: tr_cg_init_, cg_dots, cg_step_ (see natasha/trust_region.h).
// One pass over all tensors in fixed chunks (at::parallel_for), at::vec on the fp32/fp64 path
// (tr_cg_init_ streams its write-only outputs on large lists: streaming.h),
// per-chunk partial sums added in chunk order (same bits for any thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <type_traits>

#include "chunks.h"
#include "streaming.h"
#include "natasha/args/trust_region.h"
#include "natasha/static_switch.h"
#include "natasha/trust_region.h"

namespace natasha {
namespace cpu {
namespace {

template <int R>
at::Tensor totals(const std::vector<double>& part, at::ScalarType acc) {
  const auto t = sum_partials<R, double>(part);
  return at::tensor(std::vector<double>(t.begin(), t.end()), at::TensorOptions().dtype(at::kDouble)).to(acc);
}

template <typename T>
inline T hsum(const at::vec::Vectorized<T>& v) {
  T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T t = 0;
  for (int j = 0; j < at::vec::Vectorized<T>::size(); ++j) t += buf[j];
  return t;
}

// ------------------------------------------------------------------ tr_cg_init_
// tr::init_elem over n elements with at::vec (g in the state's dtype), mode M fixed. a, s, r and p
// are written without being read: streamed (streaming.h) when `stream` and they are aligned.
template <typename acc_t, int M>
void init_vec(const acc_t* g, acc_t* v, acc_t* a, acc_t* s, acc_t* r, acc_t* p, int64_t n, acc_t beta, acc_t eps,
              bool stream, acc_t& rz, acc_t& gg) {
  using Vec = at::vec::Vectorized<acc_t>;
  const bool st = stream && can_stream(a) && can_stream(s) && can_stream(r) && can_stream(p);
  const Vec vb(beta), vob(acc_t(1) - beta), ve(eps), zero(acc_t(0)), one(acc_t(1));
  Vec vrz(0), vgg(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec gv = Vec::loadu(g + i);
    Vec av = one;
    if constexpr (M != tr::kSpherical) {
      const Vec vv = (M == tr::kRmsprop) ? vb * Vec::loadu(v + i) + vob * gv * gv : Vec::loadu(v + i) + gv * gv;
      vv.store(v + i);
      av = vv + ve;
    }
    const Vec z = gv / av;
    store_vec(a + i, av, st);
    store_vec(s + i, zero, st);
    store_vec(r + i, gv, st);
    store_vec(p + i, z.neg(), st);
    vrz = at::vec::fmadd(gv, z, vrz);
    vgg = at::vec::fmadd(gv, gv, vgg);
  }
  if (st) stream_fence();
  rz += hsum(vrz);
  gg += hsum(vgg);
  for (; i < n; ++i) {
    acc_t vv = v[i];
    tr::init_elem<acc_t>(g[i], vv, a[i], s[i], r[i], p[i], beta, eps, M, rz, gg);
    if (M != tr::kSpherical) v[i] = vv;
  }
}

at::Tensor tr_cg_init_cpu(at::TensorList v, at::TensorList a, at::TensorList s, at::TensorList r, at::TensorList p,
                          at::TensorList grads, double beta, double eps, int64_t norm_mode) {
  const auto acc = check_tr_cg_init_args(v, a, s, r, p, grads, norm_mode);
  if (grads.empty()) return cg_empty_result(2, c10::Device(c10::kCPU));
  const auto chunks = make_chunks(grads);
  std::vector<double> part(chunks.size() * 2, 0.0);
  const int m = static_cast<int>(norm_mode);
  const bool stream = worth_streaming({a, s, r, p});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "tr_cg_init_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t b = static_cast<acc_t>(beta), e = static_cast<acc_t>(eps);
    for_each_chunk(chunks, [&](const Chunk& c) {
      const int64_t ci = c.index;
      const scalar_t* g = grads[c.tensor].data_ptr<scalar_t>() + c.start;
      acc_t* pv = v[c.tensor].data_ptr<acc_t>() + c.start;
      acc_t* pa = a[c.tensor].data_ptr<acc_t>() + c.start;
      acc_t* ps = s[c.tensor].data_ptr<acc_t>() + c.start;
      acc_t* pr = r[c.tensor].data_ptr<acc_t>() + c.start;
      acc_t* pp = p[c.tensor].data_ptr<acc_t>() + c.start;
      acc_t rz = 0, gg = 0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        int_switch<3>(m, [&](auto mode) {
          init_vec<acc_t, decltype(mode)::value>(g, pv, pa, ps, pr, pp, c.n, b, e, stream, rz, gg);
        });
      } else {
        for (int64_t i = 0; i < c.n; ++i) {
          acc_t vv = pv[i];
          tr::init_elem<acc_t>(static_cast<acc_t>(g[i]), vv, pa[i], ps[i], pr[i], pp[i], b, e, m, rz, gg);
          if (m != tr::kSpherical) pv[i] = vv;
        }
      }
      part[ci * 2] = rz;
      part[ci * 2 + 1] = gg;
    });
  });
  return totals<2>(part, acc);
}

// ------------------------------------------------------------------ cg_dots
template <typename acc_t>
void dots_vec(const acc_t* p, const acc_t* bp, const acc_t* r, const acc_t* a, int64_t n, acc_t (&out)[4]) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec v0(0), v1(0), v2(0), v3(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec vp = Vec::loadu(p + i), vb = Vec::loadu(bp + i), vr = Vec::loadu(r + i), va = Vec::loadu(a + i);
    const Vec ba = vb / va;
    v0 = at::vec::fmadd(vp, vb, v0);
    v1 = at::vec::fmadd(vr, vp, v1);
    v2 = at::vec::fmadd(vr, ba, v2);
    v3 = at::vec::fmadd(vb, ba, v3);
  }
  out[0] = hsum(v0);
  out[1] = hsum(v1);
  out[2] = hsum(v2);
  out[3] = hsum(v3);
  for (; i < n; ++i) tr::dots_elem<acc_t>(p[i], bp[i], r[i], a[i], out);
}

at::Tensor cg_dots_cpu(at::TensorList p, at::TensorList Bp, at::TensorList r, at::TensorList a) {
  const auto acc = check_cg_dots_args(p, Bp, r, a);
  if (Bp.empty()) return cg_empty_result(4, c10::Device(c10::kCPU));
  const auto chunks = make_chunks(Bp);
  std::vector<double> part(chunks.size() * 4, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Bp[0].scalar_type(), "cg_dots", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_chunk(chunks, [&](const Chunk& c) {
      const int64_t ci = c.index;
      const acc_t* pp = p[c.tensor].data_ptr<acc_t>() + c.start;
      const acc_t* pr = r[c.tensor].data_ptr<acc_t>() + c.start;
      const acc_t* pa = a[c.tensor].data_ptr<acc_t>() + c.start;
      const scalar_t* pb = Bp[c.tensor].data_ptr<scalar_t>() + c.start;
      acc_t o[4] = {0, 0, 0, 0};
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        dots_vec<acc_t>(pp, reinterpret_cast<const acc_t*>(pb), pr, pa, c.n, o);
      } else {
        for (int64_t i = 0; i < c.n; ++i) tr::dots_elem<acc_t>(pp[i], static_cast<acc_t>(pb[i]), pr[i], pa[i], o);
      }
      for (int k = 0; k < 4; ++k) part[ci * 4 + k] = o[k];
    });
  });
  return totals<4>(part, acc);
}

// ------------------------------------------------------------------ cg_step_
template <typename acc_t>
void step_vec(acc_t* s, acc_t* r, acc_t* p, const acc_t* bp, const acc_t* a, int64_t n, acc_t alpha, acc_t beta,
              acc_t (&out)[4]) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec va(alpha), vbeta(beta);
  Vec v0(0), v1(0), v2(0), v3(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec vp = Vec::loadu(p + i), vA = Vec::loadu(a + i);
    const Vec vs = at::vec::fmadd(va, vp, Vec::loadu(s + i));
    const Vec vr = at::vec::fmadd(va, Vec::loadu(bp + i), Vec::loadu(r + i));
    const Vec z = vr / vA;
    const Vec pn = vbeta * vp - z;
    vs.store(s + i);
    vr.store(r + i);
    pn.store(p + i);
    const Vec sa = vs * vA;
    v0 = at::vec::fmadd(vr, z, v0);
    v1 = at::vec::fmadd(sa, vs, v1);
    v2 = at::vec::fmadd(sa, pn, v2);
    v3 = at::vec::fmadd(pn * vA, pn, v3);
  }
  out[0] = hsum(v0);
  out[1] = hsum(v1);
  out[2] = hsum(v2);
  out[3] = hsum(v3);
  for (; i < n; ++i) tr::step_elem<acc_t>(s[i], r[i], p[i], bp[i], a[i], alpha, beta, out);
}

at::Tensor cg_step_cpu(at::TensorList s, at::TensorList r, at::TensorList p, at::TensorList Bp, at::TensorList a,
                       double alpha, double beta) {
  const auto acc = check_cg_step_args(s, r, p, Bp, a);
  if (Bp.empty()) return cg_empty_result(4, c10::Device(c10::kCPU));
  const auto chunks = make_chunks(Bp);
  std::vector<double> part(chunks.size() * 4, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Bp[0].scalar_type(), "cg_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t al = static_cast<acc_t>(alpha), be = static_cast<acc_t>(beta);
    for_each_chunk(chunks, [&](const Chunk& c) {
      const int64_t ci = c.index;
      acc_t* ps = s[c.tensor].data_ptr<acc_t>() + c.start;
      acc_t* pr = r[c.tensor].data_ptr<acc_t>() + c.start;
      acc_t* pp = p[c.tensor].data_ptr<acc_t>() + c.start;
      const acc_t* pa = a[c.tensor].data_ptr<acc_t>() + c.start;
      const scalar_t* pb = Bp[c.tensor].data_ptr<scalar_t>() + c.start;
      acc_t o[4] = {0, 0, 0, 0};
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        step_vec<acc_t>(ps, pr, pp, reinterpret_cast<const acc_t*>(pb), pa, c.n, al, be, o);
      } else {
        for (int64_t i = 0; i < c.n; ++i)
          tr::step_elem<acc_t>(ps[i], pr[i], pp[i], static_cast<acc_t>(pb[i]), pa[i], al, be, o);
      }
      for (int k = 0; k < 4; ++k) part[ci * 4 + k] = o[k];
    });
  });
  return totals<4>(part, acc);
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CPU, m) {
  m.impl("tr_cg_init_", &tr_cg_init_cpu);
  m.impl("cg_dots", &cg_dots_cpu);
  m.impl("cg_step_", &cg_step_cpu);
}

}  // namespace cpu
}  // namespace natasha
