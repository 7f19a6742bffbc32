"""HVP engines as multiples of one forward+backward, per model.

Engines (each includes the gradient the optimizer needs anyway):
  fwd+bwd            loss + gradient (the unit)
  exact (double bwd) gradient with create_graph=True + one Hessian-vector product
  finite difference  gradient + one gradient at x + q v (natasha_ext.curvature default fallback)
  forward over reverse  natasha_ext's hvp='forward_over_reverse' (gradient_and_hvp: the closure
                     run with the parameters carrying v as forward-mode tangents; exact, no graph kept)
  torch.func fwd-over-rev  jvp of the gradient function (exact, no graph kept)
  Gauss-Newton       gradient + one J^T H_out J v product (curvature.GaussNewton; B >= 0)
  ... each further   the marginal cost of one more product on the same graph (what every CG /
                     Lanczos / Oja iteration after the first pays): (t(1 + 4 products) - t(1 + 1)) / 3
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from benchmarks.common import time_fn
from natasha_ext.curvature import HVP, GaussNewton, gradients
from natasha_ext.curvature.hvp import gradient_and_hvp


def _models(quick: bool):
    import torchvision

    class LeNet5(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.Conv2d(6, 16, 5)
            self.f1, self.f2, self.f3 = torch.nn.Linear(400, 120), torch.nn.Linear(120, 84), torch.nn.Linear(84, 10)

        def forward(self, x):
            x = F.max_pool2d(torch.relu(self.c1(x)), 2)
            x = F.max_pool2d(torch.relu(self.c2(x)), 2).flatten(1)
            return self.f3(torch.relu(self.f2(torch.relu(self.f1(x)))))

    out = [("lenet5", LeNet5(), (128, 1, 28, 28))]
    if not quick:
        r18 = torchvision.models.resnet18(num_classes=10)
        # BatchNorm without running-stat updates (batch statistics only): torch.func cannot
        # transform the in-place buffer updates, and every engine then does the same work.
        torch.func.replace_all_batch_norm_modules_(r18)
        out.append(("resnet18", r18, (128, 3, 32, 32)))
    return out


def run_hvp(devices: List[str], quick: bool, min_time: float) -> List[Dict]:
    rows = []
    for device in devices:
        for name, model, shape in _models(quick):
            model = model.to(device)
            x = torch.randn(shape, device=device)
            y = torch.randint(0, 10, (shape[0],), device=device)
            params = [p for p in model.parameters()]
            closure = lambda: F.cross_entropy(model(x), y)
            v = [torch.randn_like(p) for p in params]

            def fwd_bwd():
                return gradients(closure(), params)

            def products(engine, k):
                def run():
                    h = engine()
                    for _ in range(k):
                        out = h(v)
                    h.release()
                    return out
                return run

            exact = products(lambda: HVP(closure, params, "exact"), 1)
            exact4 = products(lambda: HVP(closure, params, "exact"), 4)
            gn_closure = lambda: (lambda out: (F.cross_entropy(out, y), out))(model(x))
            gn = products(lambda: GaussNewton(gn_closure, params), 1)
            gn4 = products(lambda: GaussNewton(gn_closure, params), 4)

            def fd():
                return HVP(closure, params, "finite_difference")(v)

            def fwd_over_rev():
                return gradient_and_hvp(closure, params, v)[2]

            def func_fwd_over_rev():
                names = [n for n, _ in model.named_parameters()]
                base = {n: p.detach() for n, p in model.named_parameters()}

                def grad_fn(ps):
                    return torch.func.grad(lambda q: F.cross_entropy(torch.func.functional_call(model, q, (x,)), y))(ps)

                return torch.func.jvp(grad_fn, (base,), ({n: vi for n, vi in zip(names, v)},))[1]

            unit = time_fn(fwd_bwd, device, min_time)
            timed = {}
            for engine, fn in (("fwd+bwd", fwd_bwd), ("exact (double backward)", exact),
                               ("exact: each further HVP", exact4), ("finite difference", fd),
                               ("forward over reverse", fwd_over_rev),
                               ("torch.func fwd-over-rev", func_fwd_over_rev), ("Gauss-Newton", gn),
                               ("Gauss-Newton: each further product", gn4)):
                try:
                    t = unit if engine == "fwd+bwd" else time_fn(fn, device, min_time)
                    err = ""
                except Exception as exc:  # e.g. a model torch.func cannot transform
                    t, err = float("nan"), f"{type(exc).__name__}: {exc}"[:160]
                timed[engine] = t
                if "each further" in engine:   # marginal cost from the 1- and 4-product timings
                    first = timed["exact (double backward)" if engine.startswith("exact") else "Gauss-Newton"]
                    t = (t - first) / 3
                rows.append({"device": device, "model": name, "batch": shape[0], "engine": engine,
                             "ms": t * 1e3, "x_fwd_bwd": t / unit, "error": err})
    return rows


def print_hvp(rows):
    print(f"{'device':6} {'model':9} {'batch':>5} {'engine':36} {'ms':>9} {'x fwd+bwd':>9}")
    for r in rows:
        print(f"{r['device']:6} {r['model']:9} {r['batch']:5d} {r['engine']:36} {r['ms']:9.2f} {r['x_fwd_bwd']:9.2f}"
              + (f"  ({r['error']})" if r["error"] else ""))
