#pragma once
// Host-side orchestration of the K-FAC ops shared by the CPU and CUDA kernels (ATen calls,
// device-agnostic): the factor EMA around the BLAS/cuBLAS product and the small k x k parts of
// the SMW apply. The per-element math is in natasha/kfac.h.
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
