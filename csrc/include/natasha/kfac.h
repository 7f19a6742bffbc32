#pragma once
// K-FAC / ANG / IFANG math shared by the CPU and CUDA kernels (asymptotic-natural-gradient.md).
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

// ---------------------------------------------------------------------------------------------
// Host-side orchestration shared by the CPU and CUDA ops (ATen calls, device-agnostic): the
// small k x k parts of the SMW apply and the factor EMA around the BLAS/cuBLAS product.
// ---------------------------------------------------------------------------------------------
#include <ATen/ATen.h>

namespace natasha {
namespace kfac {
namespace host {

// factor <- decay * factor + (1 - decay) * scale * rows^T rows, the EMA folded into addmm's
// beta/alpha (one read and one write of the factor besides the product). decay == 0 ignores the
// old contents (addmm's beta = 0 semantics).
inline void factor_ema(at::Tensor& factor, const at::Tensor& rows, double scale, double decay) {
  const at::Tensor x = rows.scalar_type() == factor.scalar_type() ? rows : rows.to(factor.scalar_type());
  at::addmm_out(factor, factor, x.t(), x, decay, (1.0 - decay) * scale);
}

// Pa (o x k) and Z (k x i), in the accumulation dtype, such that lam^2 U = T - Pa Ya - Yg^T Z.
struct SmwTerms {
  at::Tensor pa, z, ya, yg;
};

// X = K^-1 B from K's Cholesky factor L (two triangular solves: far cheaper than cholesky_solve's
// LAPACK/cuSOLVER path for the k x k systems here).
inline at::Tensor chol_solve(const at::Tensor& b, const at::Tensor& l) {
  const at::Tensor y = at::linalg_solve_triangular(l, b, /*upper=*/false);
  return at::linalg_solve_triangular(l.mT(), y, /*upper=*/true);
}

inline SmwTerms smw_terms(const at::Tensor& t, const at::Tensor& ya_in, const at::Tensor& yg_in, double lam,
                          at::ScalarType acc) {
  const at::Tensor T = t.to(acc), ya = ya_in.to(acc).contiguous(), yg = yg_in.to(acc).contiguous();
  const int64_t k = ya.size(0);
  const auto eye = at::eye(k, ya.options());
  const at::Tensor ka = at::addmm(eye, ya, ya.t(), lam, 1.0);  // lam I + Ya Ya^T
  const at::Tensor kg = at::addmm(eye, yg, yg.t(), lam, 1.0);
  // lam I + Y Y^T is SPD (eigenvalues >= lam > 0): the _ex variant skips the info check, which
  // would be a host sync on CUDA
  const at::Tensor la = std::get<0>(at::linalg_cholesky_ex(ka)), lg = std::get<0>(at::linalg_cholesky_ex(kg));
  const at::Tensor tya = at::matmul(T, ya.t());                 // o x k
  const at::Tensor s = at::matmul(yg, T);                       // k x i
  const at::Tensor pa = chol_solve(tya.t(), la).t();            // T Ya^T Ka^-1
  const at::Tensor c = at::matmul(yg, tya);                     // Yg T Ya^T (k x k)
  const at::Tensor w = s - at::matmul(c, chol_solve(ya, la));
  const at::Tensor z = chol_solve(w, lg);
  return {pa.contiguous(), z.contiguous(), ya, yg};
}

}  // namespace host
}  // namespace kfac
}  // namespace natasha
