"""HVP engines as multiples of one forward+backward, per model.

Engines (each includes the gradient the optimizer needs anyway):
  fwd+bwd            loss + gradient (the unit)
  exact (double bwd) gradient with create_graph=True + one Hessian-vector product
  finite difference  gradient + one gradient at x + q v (natasha_ext.curvature default fallback)
  torch.func fwd-over-rev  jvp of the gradient function (exact, no graph kept)
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from benchmarks.common import time_fn
from natasha_ext.curvature import HVP, gradients


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

            def exact():
                h = HVP(closure, params, "exact")
                out = h(v)
                h.release()
                return out

            def fd():
                return HVP(closure, params, "finite_difference")(v)

            def func_fwd_over_rev():
                names = [n for n, _ in model.named_parameters()]
                base = {n: p.detach() for n, p in model.named_parameters()}

                def grad_fn(ps):
                    return torch.func.grad(lambda q: F.cross_entropy(torch.func.functional_call(model, q, (x,)), y))(ps)

                return torch.func.jvp(grad_fn, (base,), ({n: vi for n, vi in zip(names, v)},))[1]

            unit = time_fn(fwd_bwd, device, min_time)
            for engine, fn in (("fwd+bwd", fwd_bwd), ("exact (double backward)", exact),
                               ("finite difference", fd), ("torch.func fwd-over-rev", func_fwd_over_rev)):
                try:
                    t = unit if engine == "fwd+bwd" else time_fn(fn, device, min_time)
                    err = ""
                except Exception as exc:  # e.g. a model torch.func cannot transform
                    t, err = float("nan"), f"{type(exc).__name__}: {exc}"[:160]
                rows.append({"device": device, "model": name, "batch": shape[0], "engine": engine,
                             "ms": t * 1e3, "x_fwd_bwd": t / unit, "error": err})
    return rows


def print_hvp(rows):
    print(f"{'device':6} {'model':9} {'batch':>5} {'engine':26} {'ms':>9} {'x fwd+bwd':>9}")
    for r in rows:
        print(f"{r['device']:6} {r['model']:9} {r['batch']:5d} {r['engine']:26} {r['ms']:9.2f} {r['x_fwd_bwd']:9.2f}"
              + (f"  ({r['error']})" if r["error"] else ""))
