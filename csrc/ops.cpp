// The op registry: every op of the natasha namespace is declared here, once, with its schema.
// CPU kernels register in csrc/cpu/*.cpp, CUDA kernels in csrc/cuda/*.cu, ops that are pure ATen
// on every device once in csrc/composite.cpp (TORCH_LIBRARY_IMPL); natasha_ext/ops/reference.py
// holds a pure-PyTorch function for each op, and natasha_ext/ops/*.py its wrapper and fake kernel.
// Conventions (as ATen's): ops that mutate an input end in `_` and mark it (Tensor(a!)[]); scalar
// arguments are keyword-only (after `*`); the C++ kernels name their arguments as the schema does;
// scalars come back as tensors so that no op forces a host sync. Argument checks: one validator
// per op in natasha/args/, shared by its CPU and CUDA kernels.
#include <torch/library.h>

TORCH_LIBRARY(natasha, m) {
  // ---- foundation -------------------------------------------------------------------------
  // Fill every tensor with +-1 from the Philox stream (seed, offset); see natasha/philox.h.
  m.def("rademacher_(Tensor(a!)[] tensors, *, int seed, int offset) -> ()");
  // sqrt(sum_i ||t_i||^2) over the whole list, as a 0-dim fp32 (fp64 for fp64 input) tensor.
  m.def("global_norm(Tensor[] tensors) -> Tensor");
  // ---- natasha (svrg_step_, oja_step_) -------------------------------------------------------
  // Natasha1.5 inner step, in place (spec: reference.svrg_step): d = g [- snapshot_grads] [+ mu]
  // + reg (x - anchor); avg_sum += x - anchor; x <- x - lr d, then the prox of prox_L max(0,
  // ||x - center|| - prox_radius)^2 when center is given; finalize = m > 0 ends a sub-epoch
  // (x <- anchor <- anchor + (avg_sum + x - anchor) / m, avg_sum <- 0). Returns [sum d^2,
  // ||z - center||^2, kappa].
  m.def("svrg_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[]? snapshot_grads, Tensor[]? mu, "
        "Tensor(b!)[] anchor, Tensor(c!)[] avg_sum, Tensor[]? center, *, float lr, float reg, int finalize, "
        "float prox_L, float prox_radius) -> Tensor");
  // Oja step with lazy normalisation, in place (spec: reference.oja_step): v <- scale (v - eta hv);
  // returns [||v_new||, scale^2 <v, hv>].
  m.def("oja_step_(Tensor(a!)[] v, Tensor[] hv, Tensor scale, *, float eta) -> Tensor");
  // ---- adahessian (hutchinson_diag_, adahessian_step_) --------------------------------------
  // diag = (accumulate ? diag : 0) + alpha * z * hz, z regenerated from the Philox stream
  // (seed, offset) over the concatenated list (the rademacher_ draw the probe came from).
  m.def("hutchinson_diag_(Tensor(a!)[] diag, Tensor[] hz, *, int seed, int offset, float alpha, "
        "bool accumulate) -> ()");
  // One AdaHessian update in place: spatial mean of |D| over runs of group_sizes[i] elements
  // (conv kernels / blocks), both moments, bias corrections, Hessian power, decoupled weight
  // decay. curv_mode 0: no new curvature, 1: curv = Hz of the probe at (seed, offset), 2: curv = D.
  m.def("adahessian_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_hess_sq, "
        "Tensor[] curv, int[] group_sizes, *, int curv_mode, bool abs_first, int seed, int offset, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, float hessian_power, float bias_correction1, "
        "float bias_correction2) -> ()");
  // ---- kfac / ang / ifang --------------------------------------------------------------------
  // factor_i <- decay factor_i + (1 - decay) scales[i] rows_i^T rows_i (EMA folded into addmm).
  m.def("kfac_factor_ema_(Tensor(a!)[] factors, Tensor[] rows, float[] scales, *, float decay) -> ()");
  // U_i = g_inv_i @ grads_i @ a_inv_i and per-layer reductions [L, 3] = (<T,U>, |U|^2, |T|^2).
  m.def("kfac_precondition(Tensor[] grads, Tensor[] g_inv, Tensor[] a_inv) -> (Tensor[], Tensor)");
  // U_i = (lam I + yg^T yg)^-1 grads_i (lam I + ya^T ya)^-1 by SMW (rank k), reductions as above.
  m.def("kfac_smw_apply(Tensor[] grads, Tensor[] ya, Tensor[] yg, float[] damping) -> (Tensor[], Tensor)");
  // ANG slerp (eq. 7): nat_i <- scale (c1 nat_i + c2 grads_i); returns the [L, 2] coefficients.
  m.def("ang_combine_(Tensor(a!)[] nat, Tensor[] grads, Tensor reductions, Tensor scale, *, float lam, "
        "bool per_layer) -> Tensor");
  // ---- trust region (tr_cg_init_, cg_dots, cg_step_) -----------------------------------------
  // Preconditioned Steihaug-Toint CG in the A-norm, A = diag(a); see natasha/trust_region.h.
  // State lists (v, a, s, r, p) are fp32 (fp64 for fp64 inputs); grads / Bp any kernel dtype.
  // Ellipsoid update (norm_mode 0 spherical a=1, 1 rmsprop, 2 adagrad; a = v + eps) fused with the
  // CG start s=0, r=g, p=-g/a. Returns [g^T A^-1 g, g^T g].
  m.def("tr_cg_init_(Tensor(a!)[] v, Tensor(b!)[] a, Tensor(c!)[] s, Tensor(d!)[] r, Tensor(e!)[] p, "
        "Tensor[] grads, *, float beta, float eps, int norm_mode) -> Tensor");
  // [p.Bp, r.p, r.A^-1 Bp, Bp.A^-1 Bp] after the curvature product.
  m.def("cg_dots(Tensor[] p, Tensor[] Bp, Tensor[] r, Tensor[] a) -> Tensor");
  // s += alpha p; r += alpha Bp; p = -r/a + beta p. Returns [r.A^-1 r, s.A.s, s.A.p, p.A.p].
  m.def("cg_step_(Tensor(a!)[] s, Tensor(b!)[] r, Tensor(c!)[] p, Tensor[] Bp, Tensor[] a, *, float alpha, "
        "float beta) -> Tensor");
}

#ifdef NATASHA_PYTHON_MODULE
// natasha_ext._C is imported for its side effect (the registrations above); it has no
// Python-level functions of its own.
#include <Python.h>
static struct PyModuleDef natasha_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&natasha_module); }
#endif
