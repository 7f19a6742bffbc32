"""``torch.library.opcheck`` over every registered ``natasha::`` op: the schema (declared
mutations and aliasing match what the kernel does), the fake kernel (same output metadata as the
real one), the autograd registration (inputs that require grad) and AOT dispatch (the op traced
through AOTAutograd, static and dynamic shapes).

The ops are enumerated from the dispatcher, so a new op without a sample fails here; each sample
names the op's arguments and is bound to the live schema (positional or keyword-only), so a
schema that moves or makes an argument keyword-only needs no edit here."""
import pytest
import torch

from natasha_ext import ops
from natasha_ext.precision import accumulation_dtype
from tests.helpers import devices

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="compiled kernels not built")


class Inputs:
    """Deterministic sample tensors on one device: values of ``dtype``, state in its
    accumulation dtype (as the optimizers keep it)."""

    def __init__(self, device, dtype):
        self.device, self.dtype, self.acc = device, dtype, accumulation_dtype(dtype)
        self.gen = torch.Generator().manual_seed(0)

    def t(self, *shape, dtype=None):
        x = torch.randn(*shape, generator=self.gen, dtype=torch.float64)
        return x.to(device=self.device, dtype=dtype or self.dtype)

    def vec(self, dtype=None, positive=False):
        """A list with a 1-D, a 2-D and an empty tensor."""
        ts = [self.t(5, dtype=dtype), self.t(3, 4, dtype=dtype), self.t(0, dtype=dtype)]
        return [x.abs() + 0.1 for x in ts] if positive else ts

    def state(self, positive=False):
        return self.vec(self.acc, positive)

    def spd(self, n):
        x = self.t(n, 2 * n)
        return x @ x.T / (2 * n) + torch.eye(n, device=self.device, dtype=self.dtype)


def _layers(m):
    """Two K-FAC layers' gradients (out x in)."""
    return [m.t(3, 4), m.t(2, 5)]


def _adahessian(m, mode):
    """curv_mode 1: Hz of the probe at (seed, offset); 2: a diagonal; 0: no new curvature."""
    curv = {1: lambda: m.vec(), 2: lambda: m.state(True), 0: lambda: []}[mode]()
    return dict(params=m.vec(), grads=m.vec(), exp_avg=m.state(), exp_hess_sq=m.state(True), curv=curv,
                group_sizes=[1, 2, 1], curv_mode=mode, abs_first=mode != 2, seed=4, offset=1, lr=0.1, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.01, hessian_power=0.5 if mode == 2 else 1.0,
                bias_correction1=0.1, bias_correction2=0.001)


# op name -> samples, each a function Inputs -> the op's arguments by schema name (bound to the
# live schema: positional or keyword-only, in its order).
# Issue 15 item 7 renames svrg_step -> svrg_step_, oja_step -> oja_step_ and adahessian_step ->
# adahessian_step_ (the Python wrappers keep their names): rename these keys with the schema.
SAMPLES = {
    "rademacher_": [lambda m: dict(tensors=m.vec(), seed=3, offset=7)],
    "global_norm": [lambda m: dict(tensors=m.vec())],
    "svrg_step_": [  # a plain SGD step; variance reduced, with the proximal centre and a finalize
        lambda m: dict(params=m.vec(), grads=m.vec(), snapshot_grads=None, mu=None, anchor=m.state(),
                       avg_sum=m.state(), center=None, lr=0.1, reg=0.2, finalize=0, prox_L=1.0, prox_radius=0.0),
        lambda m: dict(params=m.vec(), grads=m.vec(), snapshot_grads=m.vec(), mu=m.state(), anchor=m.state(),
                       avg_sum=m.state(), center=m.state(), lr=0.1, reg=0.2, finalize=3, prox_L=1.5, prox_radius=0.5),
    ],
    "oja_step_": [lambda m: dict(v=m.state(), hv=m.state(), scale=torch.tensor(0.5, device=m.device, dtype=m.acc),
                                eta=0.1)],
    "hutchinson_diag_": [lambda m, acc=acc: dict(diag=m.state(), hz=m.vec(), seed=5, offset=2, alpha=0.5, accumulate=acc)
                         for acc in (False, True)],
    "adahessian_step_": [lambda m, mode=mode: _adahessian(m, mode) for mode in (1, 2, 0)],
    "kfac_factor_ema_": [lambda m: dict(factors=[m.spd(4), m.spd(3)], rows=[m.t(6, 4), m.t(6, 3)], scales=[1.0, 0.5],
                                        decay=0.9)],
    "kfac_precondition": [lambda m: dict(grads=_layers(m), g_inv=[m.spd(3), m.spd(2)], a_inv=[m.spd(4), m.spd(5)])],
    "kfac_smw_apply": [lambda m: dict(grads=_layers(m), ya=[m.t(2, 4), m.t(2, 5)], yg=[m.t(2, 3), m.t(2, 2)],
                                      damping=[0.1, 0.2])],
    "ang_combine_": [lambda m, lam=lam, per_layer=per_layer: dict(
        nat=_layers(m), grads=_layers(m), reductions=m.t(2, 3, dtype=m.acc).abs() + 0.1,
        scale=torch.tensor(0.7, device=m.device, dtype=m.acc), lam=lam, per_layer=per_layer)
        for lam, per_layer in ((0.5, False), (0.3, True))],
    "tr_cg_init_": [lambda m, mode=mode: dict(v=m.state(True), a=m.state(), s=m.state(), r=m.state(), p=m.state(),
                                              grads=m.vec(), beta=0.9, eps=1e-8, norm_mode=mode) for mode in (0, 1, 2)],
    "cg_dots": [lambda m: dict(p=m.state(), Bp=m.state(), r=m.state(), a=m.state(True))],
    "cg_step_": [lambda m: dict(s=m.state(), r=m.state(), p=m.state(), Bp=m.state(), a=m.state(True), alpha=0.1,
                                beta=0.2)],
}

def _registered():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("natasha::"))


def _overload(name):
    packet = getattr(torch.ops.natasha, name)
    (overload,) = packet.overloads()  # one overload per op
    return getattr(packet, overload)


def _bind(op, values):
    """Positional arguments in schema order, keyword-only ones by name."""
    schema = op._schema.arguments
    names = [a.name for a in schema]
    assert sorted(values) == sorted(names), f"{op}: sample arguments {sorted(values)}, schema {names}"
    args = tuple(values[a.name] for a in schema if not a.kwarg_only)
    kwargs = {a.name: values[a.name] for a in schema if a.kwarg_only}
    return args, kwargs


def _requiring_grad(op, values):
    """The read-only floating inputs require grad (the mutated ones cannot: they are updated in place)."""
    def leaf(x):
        return x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    written = {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    return {k: v if k in written else [leaf(x) for x in v] if isinstance(v, list) else leaf(v)
            for k, v in values.items()}


def test_every_registered_op_has_a_sample():
    registered = _registered()
    assert registered, "no natasha:: op registered"
    assert sorted(SAMPLES) == registered, (f"ops without a sample: {sorted(set(registered) - set(SAMPLES))}; "
                                           f"samples of no op: {sorted(set(SAMPLES) - set(registered))}")


def _cases():
    out = []
    for name in _registered():
        for k in range(len(SAMPLES.get(name, ()))):
            out.append(pytest.param(name, k, id=f"{name}-{k}"))
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,k", _cases())
def test_opcheck(name, k, dtype, device):
    if not ops.fused_available(device):
        pytest.skip(f"{device} kernels not built")
    op = _overload(name)
    values = SAMPLES[name][k](Inputs(device, dtype))
    torch.library.opcheck(op, *_bind(op, values))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", _registered())
def test_opcheck_autograd_registration(name, device):
    """Inputs that require grad (parameters passed straight to an op): the op either has an
    autograd kernel or leaves its outputs out of the graph."""
    if not ops.fused_available(device):
        pytest.skip(f"{device} kernels not built")
    op = _overload(name)
    for sample in SAMPLES[name]:
        values = _requiring_grad(op, sample(Inputs(device, torch.float32)))
        torch.library.opcheck(op, *_bind(op, values), test_utils="test_autograd_registration")


@pytest.mark.parametrize("name", _registered())
def test_every_op_has_the_not_implemented_autograd_kernel(name):
    """csrc/autograd.cpp registers each op at the Autograd key; an op missing there runs under the
    default fallback, which records its kernels' ATen calls into the caller's graph."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"natasha::{name}", "Autograd"), name


@pytest.mark.skipif(not ops.fused_available("cpu"), reason="cpu kernels not built")
def test_backward_through_an_op_raises_instead_of_returning_a_wrong_gradient():
    g = torch.randn(3, 4, requires_grad=True)
    out, _ = torch.ops.natasha.kfac_precondition([g], [torch.eye(3)], [torch.eye(4)])
    assert out[0].requires_grad  # marked, so backward cannot silently skip the op
    with pytest.raises(RuntimeError, match="not implemented"):
        out[0].sum().backward()
