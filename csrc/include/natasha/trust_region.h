#pragma once
// Per-element math of the trust-region ops (preconditioned Steihaug-Toint CG in the A-norm,
// A = diag(a)), shared by the CPU and CUDA kernels. acc_t is the state/accumulation type
// (fp32, or fp64 for fp64 lists); inputs (gradients, Bp) may be narrower.
#include "natasha/macros.h"

namespace natasha {
namespace tr {

enum Mode : int { kSpherical = 0, kRmsprop = 1, kAdagrad = 2 };

// Ellipsoid update (paper eqs. 2-3, diagonal) and CG start s = 0, r = g, p = -g/a.
// Adds g^2/a and g^2 to the two reduction slots.
template <typename acc_t>
NATASHA_HD void init_elem(acc_t g, acc_t& v, acc_t& a, acc_t& s, acc_t& r, acc_t& p, acc_t beta, acc_t eps,
                          int mode, acc_t& rz, acc_t& gg) {
  if (mode == kSpherical) {
    a = acc_t(1);
  } else {
    v = (mode == kRmsprop) ? beta * v + (acc_t(1) - beta) * g * g : v + g * g;
    a = v + eps;
  }
  s = acc_t(0);
  r = g;
  const acc_t z = g / a;
  p = -z;
  rz += g * z;
  gg += g * g;
}

// Reductions after the curvature product: p.Bp, r.p, r.Bp/a, Bp.Bp/a.
template <typename acc_t>
NATASHA_HD void dots_elem(acc_t p, acc_t bp, acc_t r, acc_t a, acc_t (&acc)[4]) {
  const acc_t ba = bp / a;
  acc[0] += p * bp;
  acc[1] += r * p;
  acc[2] += r * ba;
  acc[3] += bp * ba;
}

// One CG iteration's vector work: s += alpha p, r += alpha Bp, z = r/a, p = -z + beta p;
// accumulates r.z, s.A.s, s.A.p, p.A.p of the updated vectors.
template <typename acc_t>
NATASHA_HD void step_elem(acc_t& s, acc_t& r, acc_t& p, acc_t bp, acc_t a, acc_t alpha, acc_t beta,
                          acc_t (&acc)[4]) {
  s = s + alpha * p;
  r = r + alpha * bp;
  const acc_t z = r / a;
  p = beta * p - z;
  const acc_t sa = s * a;
  acc[0] += r * z;
  acc[1] += sa * s;
  acc[2] += sa * p;
  acc[3] += p * a * p;
}

}  // namespace tr
}  // namespace natasha
