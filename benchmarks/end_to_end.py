"""End-to-end time per training step and optimizer-state memory for every optimizer the CLI
knows (natasha_ext.cli_optimizers), against torch.optim SGD/Adam (Adam also fused) and peers
(torch-optimizer's Adahessian when installed), on one fixed minibatch.

CPU: LeNet-5 on 28x28 MNIST-shaped input; CUDA: also ResNet-18 (1-channel stem), batch 100.
Memory: bytes of tensors the optimizer keeps in its state (plus torch.cuda.max_memory_allocated
of the step on GPU).
"""
from __future__ import annotations

import argparse
from typing import Dict, List

import torch
import torch.nn.functional as F

from benchmarks.common import time_fn


def _state_bytes(opt) -> int:
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(list(opt.state.values()))
    for v in vars(opt).values():  # factors, snapshots ... kept outside per-param state
        if isinstance(v, (dict, list, tuple, torch.Tensor)) and v is not opt.state and v is not opt.param_groups:
            walk(v)
    return total


# AdaHessian beside its CLI defaults (update_each 1, double-backward HVP): curvature amortised
# over 4 steps, and the finite-difference HVP engine (label -> (CLI name, overrides))
VARIANTS = {
    "adahessian update_each=4": ("adahessian", dict(update_each=4)),
    "adahessian hvp=fd": ("adahessian", dict(hvp="finite_difference")),
    "adahessian hvp=fd update_each=4": ("adahessian", dict(hvp="finite_difference", update_each=4)),
}


def _peers():
    out = {"adam-fused": lambda model, params: torch.optim.Adam(params, lr=1e-3, fused=True)}
    try:
        import torch_optimizer  # benchmark-only peer

        out["torch_optimizer.Adahessian"] = lambda model, params: torch_optimizer.Adahessian(params, lr=0.15)
    except Exception:
        pass
    try:
        import pytorch_optimizer  # benchmark-only peer

        out["pytorch_optimizer.AdaHessian"] = lambda model, params: pytorch_optimizer.AdaHessian(params, lr=0.15)
    except Exception:
        pass
    return out


def run_e2e(devices: List[str], quick: bool, min_time: float) -> List[Dict]:
    from natasha_ext import cli_optimizers, models, train

    rows = []
    for device in devices:
        configs = [("lenet5", dict(in_channels=1, image_size=28), 128)]
        if device == "cuda":
            configs.append(("resnet18", dict(in_channels=1, image_size=28), 100))
        for model_name, mkw, batch in configs:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 1, 28, 28, generator=g).to(device)
            y = torch.randint(0, 10, (batch,), generator=g).to(device)
            names = list(cli_optimizers.OPTIMIZERS) + list(VARIANTS) + list(_peers())
            for name in names:
                torch.manual_seed(0)
                model = models.get_model(model_name, **mkw).to(device)
                params = [p for p in model.parameters()]
                try:
                    if name in cli_optimizers.OPTIMIZERS or name in VARIANTS:
                        base, over = VARIANTS.get(name, (name, {}))
                        spec = cli_optimizers.get_spec(base)
                        args = train.TrainConfig(optimizers=[base], device=device, model=model_name)
                        hp = argparse.Namespace(**{**vars(args), **train.hyperparameters(args, base), **over, "seed": 0})
                        opt = spec.build(model, params, hp)
                        style = spec.closure
                    else:
                        opt = _peers()[name](model, params)
                        style = "create_graph" if "adahessian" in name.lower() else "backward"

                    def step():
                        if style == "loss":
                            opt.step(lambda: F.cross_entropy(model(x), y))
                        elif style == "create_graph":  # torch-optimizer's AdaHessian protocol
                            opt.zero_grad()
                            F.cross_entropy(model(x), y).backward(create_graph=True)
                            opt.step()
                        else:
                            def closure():
                                opt.zero_grad()
                                loss = F.cross_entropy(model(x), y)
                                loss.backward()
                                return loss
                            opt.step(closure)

                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t = time_fn(step, device, min_time)
                    peak = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
                    rows.append({"device": device, "model": model_name, "batch": batch, "optimizer": name,
                                 "ms_per_step": t * 1e3, "state_MB": _state_bytes(opt) / 2**20,
                                 "cuda_peak_MB": peak / 2**20, "error": ""})
                except Exception as exc:
                    rows.append({"device": device, "model": model_name, "batch": batch, "optimizer": name,
                                 "ms_per_step": float("nan"), "state_MB": float("nan"), "cuda_peak_MB": float("nan"),
                                 "error": f"{type(exc).__name__}: {exc}"[:160]})
            sgd = next((r["ms_per_step"] for r in rows if r["device"] == device and r["model"] == model_name
                        and r["optimizer"] == "sgd"), float("nan"))
            for r in rows:
                if r["device"] == device and r["model"] == model_name:
                    r["x_sgd"] = r["ms_per_step"] / sgd
    return rows


def print_e2e(rows):
    print(f"{'device':6} {'model':9} {'optimizer':28} {'ms/step':>9} {'x SGD':>7} {'state MB':>9}")
    for r in rows:
        print(f"{r['device']:6} {r['model']:9} {r['optimizer']:28} {r['ms_per_step']:9.2f} {r['x_sgd']:7.2f} "
              f"{r['state_MB']:9.2f}" + (f"  ({r['error']})" if r["error"] else ""))
