// The op registry: every op of the natasha namespace is declared here, once, with its schema.
// CPU kernels register in csrc/cpu/*.cpp, CUDA kernels in csrc/cuda/*.cu (TORCH_LIBRARY_IMPL),
// and natasha_ext/ops/reference.py holds a pure-PyTorch function with the same signature.
// Conventions: tensor lists in, in-place where that is the meaning (Tensor(a!)[]), scalars
// out as 0-dim tensors so that no op forces a host sync.
#include <torch/library.h>

TORCH_LIBRARY(natasha, m) {
  // ---- foundation -------------------------------------------------------------------------
  // Fill every tensor with +-1 from the Philox stream (seed, offset); see natasha/philox.h.
  m.def("rademacher_(Tensor(a!)[] tensors, int seed, int offset) -> ()");
  // sqrt(sum_i ||t_i||^2) over the whole list, as a 0-dim fp32 (fp64 for fp64 input) tensor.
  m.def("global_norm(Tensor[] tensors) -> Tensor");
  // ---- natasha (svrg_step, oja_step) ---------------------------------------------------------
  // Natasha1.5 inner step, in place (spec: reference.svrg_step): d = g [- snapshot_grads] [+ mu]
  // + reg (x - anchor); avg_sum += x; x <- x - lr d, then the prox of prox_L max(0, ||x - center||
  // - prox_radius)^2 when center is given; finalize = m > 0 ends a sub-epoch (x <- anchor <-
  // (avg_sum + x) / m, avg_sum <- 0). Returns [sum d^2, ||z - center||^2, kappa].
  m.def("svrg_step(Tensor(a!)[] params, Tensor[] grads, Tensor[]? snapshot_grads, Tensor[]? mu, "
        "Tensor(b!)[] anchor, Tensor(c!)[] avg_sum, float lr, float reg, int finalize, Tensor[]? center, "
        "float prox_L, float prox_radius) -> Tensor");
  // Oja step with lazy normalisation, in place (spec: reference.oja_step): v <- scale (v - eta hv);
  // returns [||v_new||, scale^2 <v, hv>].
  m.def("oja_step(Tensor(a!)[] v, Tensor[] hv, Tensor scale, float eta) -> Tensor");
  // ---- adahessian (hutchinson_diag, adahessian_step) ----------------------------------------
  // ---- kfac / ang / ifang --------------------------------------------------------------------
  // ---- trust region (cg_step) ---------------------------------------------------------------
  // Preconditioned Steihaug-Toint CG in the A-norm, A = diag(a); see natasha/trust_region.h.
  // State lists (v, a, s, r, p) are fp32 (fp64 for fp64 inputs); grads / Bp any float dtype.
  // Ellipsoid update (mode 0 spherical a=1, 1 rmsprop, 2 adagrad; a = v + eps) fused with the
  // CG start s=0, r=g, p=-g/a. Returns [g^T A^-1 g, g^T g].
  m.def("tr_cg_init_(Tensor(a!)[] v, Tensor(b!)[] a, Tensor(c!)[] s, Tensor(d!)[] r, Tensor(e!)[] p, "
        "Tensor[] grads, float beta, float eps, int mode) -> Tensor");
  // [p.Bp, r.p, r.A^-1 Bp, Bp.A^-1 Bp] after the curvature product.
  m.def("cg_dots(Tensor[] p, Tensor[] Bp, Tensor[] r, Tensor[] a) -> Tensor");
  // s += alpha p; r += alpha Bp; p = -r/a + beta p. Returns [r.A^-1 r, s.A.s, s.A.p, p.A.p].
  m.def("cg_step_(Tensor(a!)[] s, Tensor(b!)[] r, Tensor(c!)[] p, Tensor[] Bp, Tensor[] a, float alpha, "
        "float beta) -> Tensor");
}

#ifdef NATASHA_PYTHON_MODULE
// natasha_ext._C is imported for its side effect (the registrations above); it has no
// Python-level functions of its own.
#include <Python.h>
static struct PyModuleDef natasha_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&natasha_module); }
#endif
