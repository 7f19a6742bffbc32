#pragma once
// AdaHessian per-element math shared by the CPU and CUDA kernels (Yao, Gholami, Shen, Mustafa,
// Keutzer, Mahoney, "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning", 2020,
// eqs. 8-10). The specification is natasha_ext/ops/reference.py: hutchinson_diag_ and
// adahessian_step.
#include <cmath>
#include <cstdint>
#include "natasha/macros.h"
#include "natasha/philox.h"

namespace natasha {

// curv_mode of adahessian_step
enum AdaCurvMode : int { kCurvNone = 0, kCurvHz = 1, kCurvDiag = 2 };

// Hyperparameters of one adahessian_step call, with the divisions done once on the host.
template <typename acc_t>
struct AdaHessianCoef {
  acc_t lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, power;
  acc_t inv_bc1;       // 1 / (1 - beta1^t)
  acc_t inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^h)
  bool power_one;      // hessian_power == 1: skip pow()
};

template <typename acc_t>
inline AdaHessianCoef<acc_t> make_adahessian_coef(double lr, double beta1, double beta2, double eps,
                                                  double weight_decay, double power, double bc1, double bc2) {
  AdaHessianCoef<acc_t> c;
  c.lr = static_cast<acc_t>(lr);
  c.beta1 = static_cast<acc_t>(beta1);
  c.one_minus_beta1 = static_cast<acc_t>(1.0 - beta1);
  c.beta2 = static_cast<acc_t>(beta2);
  c.one_minus_beta2 = static_cast<acc_t>(1.0 - beta2);
  c.eps = static_cast<acc_t>(eps);
  c.weight_decay = static_cast<acc_t>(weight_decay);
  c.power = static_cast<acc_t>(power);
  c.inv_bc1 = static_cast<acc_t>(1.0 / bc1);
  c.inv_sqrt_bc2 = static_cast<acc_t>(1.0 / std::sqrt(bc2));
  c.power_one = power == 1.0;
  return c;
}

// Second moment (eq. 10 before the square root): v <- beta2 v + (1 - beta2) ds^2.
template <typename acc_t>
NATASHA_HD acc_t adahessian_second_moment(acc_t v, acc_t ds, const AdaHessianCoef<acc_t>& c) {
  return c.beta2 * v + c.one_minus_beta2 * (ds * ds);
}

// First moment (eq. 3 before bias correction): m <- beta1 m + (1 - beta1) g.
template <typename acc_t>
NATASHA_HD acc_t adahessian_first_moment(acc_t m, acc_t g, const AdaHessianCoef<acc_t>& c) {
  return c.beta1 * m + c.one_minus_beta1 * g;
}

// Parameter update: p - lr (m^ / ((sqrt(v^))^k + eps) + weight_decay p).
template <typename acc_t>
NATASHA_HD acc_t adahessian_param(acc_t p, acc_t m, acc_t v, const AdaHessianCoef<acc_t>& c) {
  acc_t den = sqrt(v) * c.inv_sqrt_bc2;
  if (!c.power_one) den = pow(den, c.power);
  den += c.eps;
  return p - c.lr * ((m * c.inv_bc1) / den + c.weight_decay * p);
}

// Summand of element k in its spatial group's mean of D = z * curv (paper eq. 9): |curv| when
// abs_first (|z * c| = |c| for z = +-1, no probe needed), z_k * curv for a Hz curvature, curv for
// a diagonal estimate. Walker: RademacherWalker below.
template <typename acc_t, typename Walker>
NATASHA_HD acc_t adahessian_group_summand(acc_t curv, bool abs_first, bool signed_probe, Walker& z, uint64_t k) {
  if (abs_first) return curv < acc_t(0) ? -curv : curv;
  if (signed_probe) return static_cast<acc_t>(z(k)) * curv;
  return curv;
}

// D^(s) of a group from the sum of its summands: |sum / count|.
template <typename acc_t>
NATASHA_HD acc_t adahessian_group_value(acc_t sum, int64_t count) {
  const acc_t m = sum / static_cast<acc_t>(count);
  return m < acc_t(0) ? -m : m;
}

// A Rademacher sign generator walking forward through a stream: one Philox call per 128
// consecutive elements, so a kernel can regenerate the probe z instead of reading it.
struct RademacherWalker {
  uint64_t seed, offset, block;
  Philox4 bits;
  NATASHA_HD RademacherWalker(uint64_t s, uint64_t o) : seed(s), offset(o), block(~uint64_t(0)), bits() {}
  NATASHA_HD float operator()(uint64_t k) {
    if ((k >> 7) != block) {
      block = k >> 7;
      bits = philox_block(seed, offset, block);
    }
    return rademacher_from_block(bits, k);
  }
};

}  // namespace natasha
