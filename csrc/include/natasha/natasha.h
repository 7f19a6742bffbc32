#pragma once
// Per-element math of the natasha ops (svrg_step, oja_step), shared by the CPU and CUDA
// kernels; natasha_ext/ops/reference.py is the specification.
#include <cmath>
#include "natasha/macros.h"

namespace natasha {

// Natasha1.5's gradient estimator (Liu, Liu, Liu & Li, Natasha2 PyTorch project report, Columbia,
// undated, Alg. 1 line 29 / Alg. 2 line 7):
//   d = g - g_snap + mu + reg * (x - x_hat)
// reg = 2 sigma for the faithful estimator, sigma for the report's simplified one; the caller
// passes g_snap = mu = 0 when those terms are absent.
template <typename acc_t>
NATASHA_HD acc_t svrg_direction(acc_t g, acc_t g_snap, acc_t mu, acc_t reg, acc_t x, acc_t x_hat) {
  return (g - g_snap + mu) + reg * (x - x_hat);
}

// Scale kappa of the closed-form prox of psi(y) = L max(0, ||y - c|| - r)^2 with step lr:
//   prox(z) = c + kappa (z - c),  kappa = 1 if ||z - c|| <= r else (1 + 2 lr L r / ||z - c||) / (1 + 2 lr L).
template <typename acc_t>
NATASHA_HD acc_t prox_kappa(acc_t dist2, acc_t lr, acc_t L, acc_t r) {
  const acc_t dist = sqrt(dist2);
  if (!(dist > r)) return acc_t(1);
  const acc_t two_al = acc_t(2) * lr * L;
  return (acc_t(1) + two_al * r / dist) / (acc_t(1) + two_al);
}

// End of a sub-epoch (finalize = m): the new anchor and iterate is the mean of the sub-epoch's
// iterates, x_hat <- a + (s + (z - a)) / m with s the running sum of x_t - a (exact for
// parameters that do not move) and z the step's new iterate. T: a scalar or an at::vec vector.
template <typename T>
NATASHA_HD T svrg_finalize(T a, T s, T z, T inv_m) {
  return a + (s + (z - a)) * inv_m;
}

// Oja step with the pending normalisation folded in: w <- scale * (w - eta * Hw).
template <typename acc_t>
NATASHA_HD acc_t oja_update(acc_t w, acc_t hw, acc_t scale, acc_t eta) {
  return scale * (w - eta * hw);
}

}  // namespace natasha
