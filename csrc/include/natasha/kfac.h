#pragma once
// K-FAC / ANG / IFANG per-element math shared by the CPU and CUDA kernels (device-safe: no ATen
// here; the host-side ATen parts are in natasha/kfac_host.h). Martens & Grosse, "Optimizing Neural
// Networks with Kronecker-factored Approximate Curvature", 2015; ANG/IFANG eq. numbers below.
//
// Per layer the gradient is a matrix T (out x in[+1]). The ops produce
//   * U = (G + lam I)^-1 T (A + lam I)^-1 (K-FAC, explicit inverses) or, for IFANG, the same with
//     low-rank factors A = Ya^T Ya, G = Yg^T Yg applied by Sherman-Morrison-Woodbury:
//       lam^2 U = T - Pa Ya - Yg^T Z,   Pa = T Ya^T Ka^-1,   Z = Kg^-1 (Yg T - (Yg T Ya^T) Ka^-1 Ya),
//       Ka = lam I_k + Ya Ya^T,  Kg = lam I_k + Yg Yg^T   (k x k, k = rank)
//     (expanding (lam I + Y^T Y)^-1 = lam^-1 [I - Y^T Ka^-1 Y] on both sides, eqs. 11-13);
//   * the reductions <T,U>, ||U||^2, ||T||^2 (ANG's t^T G^-1 t, ||t||_G^2, ||t||^2);
//   * ANG's blend d = c1 U + c2 T (eq. 7), coefficients below.
#include <cmath>

#include "natasha/macros.h"

namespace natasha {
namespace kfac {

NATASHA_HD bool finite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// Coefficients of d = c1 U + c2 T from dot = t^T G^-1 t, nu2 = ||U||^2, nt2 = ||T||^2 and the blend
// lam in [0, 1]: with W = arccos(dot / (nu nt)),
//   c1 = sin((1-lam) W) / sin W,   c2 = (sin(lam W) / sin W) * nu / nt,
// so that d = ||U|| * slerp(U/||U||, T/||T||; lam) has norm ||U||. Parallel directions (sin W ~ 0)
// take the limits 1-lam and lam; dot <= 0 or non-finite inputs give eq. 7's fallback d = T.
NATASHA_HD void ang_coefficients(double dot, double nu2, double nt2, double lam, double* c1, double* c2) {
  const double nu = sqrt(nu2), nt = sqrt(nt2);
  const bool ok = dot > 0.0 && finite(dot) && finite(nu2) && finite(nt2) && nu > 0.0 && nt > 0.0;
  if (!ok) {
    *c1 = 0.0;
    *c2 = 1.0;
    return;
  }
  double c = dot / (nu * nt);
  c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
  const double om = acos(c);
  const double s = sin(om);
  double w1, w2;
  if (s < 1e-6) {
    w1 = 1.0 - lam;
    w2 = lam;
  } else {
    w1 = sin((1.0 - lam) * om) / s;
    w2 = sin(lam * om) / s;
  }
  *c1 = w1;
  *c2 = w2 * nu / nt;
}

// The per-layer reductions of (T, U): adds <t,u>, u^2, t^2 of one element.
template <typename acc_t>
NATASHA_HD void reduce3_add(acc_t (&v)[3], acc_t t, acc_t u) {
  v[0] += t * u;
  v[1] += u * u;
  v[2] += t * t;
}

// One element of the SMW apply: (t - sum_j pa[j] ya[j*i] - sum_j yg[j*o] z[j*i]) * inv_lam2, where
// pa points at Pa[r, 0], yg at Yg[0, r] (stride o), ya at Ya[0, c] and z at Z[0, c] (stride i).
template <typename acc_t>
NATASHA_HD acc_t smw_element(acc_t t, const acc_t* pa, const acc_t* yg, int64_t o, const acc_t* ya,
                             const acc_t* z, int64_t i, int k, acc_t inv_lam2) {
  acc_t u = t;
  for (int j = 0; j < k; ++j) u -= pa[j] * ya[j * i] + yg[j * o] * z[j * i];
  return u * inv_lam2;
}

}  // namespace kfac
}  // namespace natasha
