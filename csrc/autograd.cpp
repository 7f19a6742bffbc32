// Autograd kernels of the natasha:: ops. None of them is differentiable (they are optimizer
// updates and reductions over optimizer state), so each gets torch's "not implemented" autograd
// kernel: it runs the op below autograd (the kernels' ATen calls record no graph and out= products
// accept inputs that require grad) and marks outputs that would need a gradient with a node that
// raises if backward reaches it. Without it the default autograd fallback records the kernels'
// internal ATen ops (torch.library's autograd_registration_check).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace natasha {

TORCH_LIBRARY_IMPL(natasha, Autograd, m) {
  for (const char* op : {"rademacher_", "global_norm", "svrg_step_", "oja_step_", "hutchinson_diag_",
                         "adahessian_step_", "kfac_factor_ema_", "kfac_precondition", "kfac_smw_apply",
                         "ang_combine_", "tr_cg_init_", "cg_dots", "cg_step_"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace natasha
