"""Rows for the AdaHessian ops: adahessian_step (with a new Hutchinson probe, and the
``update_each`` steps that reuse the second moment) and hutchinson_diag_.

Variants (benchmarks.variants): 'fused' (the kernels: z regenerated from Philox, spatial mean,
moments, bias corrections and the update in one pass), 'foreach-warm'/'foreach-cold'/'compiled'
(torch._foreach_* for the elementwise parts with the probe z materialised, as an optimizer
written in PyTorch must, and a per-tensor mean over the conv kernel dims), 'per-tensor' (the
reference: a plain loop over tensors).
Minimal traffic in fp32: adahessian_step reads p, g, m, v, Hz and writes p, m, v (32 B/param);
without new curvature it reads p, g, m, v and writes p, m (24 B/param); hutchinson_diag_ reads
Hz and writes D (8 B/param).
"""
import math

import torch

from benchmarks.variants import COLD, op_cases
from natasha_ext import ops
from natasha_ext.ops import adahessian as aops
from natasha_ext.ops import reference

LR, B1, B2, EPS, WD, SEED, OFFSET = 0.15, 0.9, 0.999, 1e-4, 0.0, 1234, 0
BC1, BC2 = 1 - B1 ** 3, 1 - B2 ** 3
# D^(s) as AdaHessian computes it by default: eq. 9's |mean of z Hz| over each conv kernel (the
# released codes' mean |z Hz| is AdaHessian.practical's, abs_first=True)
ABS_FIRST = False


def adahessian_foreach(p, g, m, v, hz, z, new_curvature, temps=COLD):
    """One AdaHessian step with torch._foreach_* ops; D^(s) = |mean of z * Hz| over conv kernels
    (mean of |z * Hz| with ABS_FIRST)."""
    torch._foreach_mul_(m, B1)
    torch._foreach_add_(m, g, alpha=1 - B1)
    if new_curvature:
        d = temps.new("mul", hz, z)
        if ABS_FIRST:
            torch._foreach_abs_(d)
        d = [x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x) if x.dim() >= 3 else x for x in d]
        if not ABS_FIRST:
            d = torch._foreach_abs(d)
        torch._foreach_mul_(v, B2)
        torch._foreach_addcmul_(v, d, d, value=1 - B2)
    den = temps.new("sqrt", v)
    torch._foreach_mul_(den, 1 / math.sqrt(BC2))
    torch._foreach_add_(den, EPS)
    if WD:
        torch._foreach_mul_(p, 1 - LR * WD)
    torch._foreach_addcdiv_(p, m, den, value=-LR / BC1)


def _step_inputs(new_curvature):
    def inputs(ts):
        z = [torch.empty_like(t) for t in ts]
        ops.rademacher_(z, SEED, OFFSET)
        hz = [torch.randn_like(t) for t in ts]
        return dict(p=ts, g=[torch.randn_like(t) for t in ts], m=[torch.zeros_like(t) for t in ts],
                    v=[torch.rand_like(t) for t in ts], hz=hz, z=z, gs=[aops.spatial_group_size(t.shape) for t in ts],
                    curv=hz if new_curvature else [], new=new_curvature,
                    mode=aops.CURV_HZ if new_curvature else aops.CURV_NONE)
    return inputs


def _step_fused(i):
    return ops.adahessian_step(i["p"], i["g"], i["m"], i["v"], i["curv"], i["gs"], curv_mode=i["mode"],
                               abs_first=ABS_FIRST, seed=SEED, offset=OFFSET, lr=LR, beta1=B1, beta2=B2, eps=EPS,
                               weight_decay=WD, bias_correction1=BC1, bias_correction2=BC2, fused=True)


def _step_form(i, temps):
    return adahessian_foreach(i["p"], i["g"], i["m"], i["v"], i["hz"], i["z"], i["new"], temps)


def _step_reference(i):
    return reference.adahessian_step(i["p"], i["g"], i["m"], i["v"], i["curv"], i["gs"], i["mode"], ABS_FIRST, SEED,
                                     OFFSET, LR, B1, B2, EPS, WD, 1.0, BC1, BC2)


def _hutchinson_form(i, temps):
    """Materialise z in the output, then multiply (no list-sized temporary)."""
    ops.rademacher_(i["d"], SEED, OFFSET)
    torch._foreach_mul_(i["d"], i["hz"])


def cases():
    out = op_cases("adahessian_step", 32, _step_inputs(True), _step_fused, _step_form, _step_reference)
    out += op_cases("adahessian_update", 24, _step_inputs(False), _step_fused, _step_form, _step_reference,
                    note="update_each step: second moment reused")
    out += op_cases("hutchinson_diag_", 8, lambda ts: dict(d=ts, hz=[torch.randn_like(t) for t in ts]),
                    fused=lambda i: ops.hutchinson_diag_(i["d"], i["hz"], SEED, OFFSET, fused=True),
                    form=_hutchinson_form,
                    reference=lambda i: reference.hutchinson_diag_(i["d"], i["hz"], SEED, OFFSET, 1.0, False))
    return out
