// Ops that are pure ATen on every device: one CompositeExplicitAutograd kernel each (the BLAS or
// cuBLAS product does the work), instead of a CPU and a CUDA copy.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "natasha/args/kfac.h"
#include "natasha/kfac_host.h"

namespace natasha {
namespace {

void kfac_factor_ema_(at::TensorList factors, at::TensorList rows, at::ArrayRef<double> scales, double decay) {
  check_kfac_factor_ema_args(factors, rows, scales, decay);
  for (size_t l = 0; l < factors.size(); ++l) {
    at::Tensor f = factors[l];
    kfac::host::factor_ema(f, rows[l], scales[l], decay);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(natasha, CompositeExplicitAutograd, m) { m.impl("kfac_factor_ema_", &kfac_factor_ema_); }

}  // namespace natasha
