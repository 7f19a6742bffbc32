"""The tuned comparison (python/compare.py): a tiny real run's files, the selection rule, a
diverging grid point, Ctrl-C, Natasha2's kick probe, and the tuned table the demo reads."""
import csv
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from natasha_ext import data
from natasha_ext.training import TrainConfig, train_one
from natasha_ext.training import compare as C
from natasha_ext.training.config import ConfigError
from natasha_ext.training.kicks import KickProbe
from natasha_ext.training.tuning import TunedTableError, grid, read_tuned, select_best
from tests.training.mnist_helpers import requires_mnist

ROOT = Path(__file__).resolve().parents[2]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _program(name):
    return runpy.run_path(str(ROOT / "python" / name))


# ---- selection rule and grid (no data) ----------------------------------------------------------
def test_select_best_takes_the_planted_best_and_breaks_ties_by_loss():
    res = [dict(val_acc=0.80, val_loss=0.5, diverged=False), dict(val_acc=0.90, val_loss=0.40, diverged=False),
           dict(val_acc=0.90, val_loss=0.30, diverged=False), dict(val_acc=0.85, val_loss=0.1, diverged=False)]
    assert select_best(res) == 2
    res[2]["val_loss"] = 0.40                                     # a full tie: the earlier grid point
    assert select_best(res) == 1


def test_select_best_never_takes_a_diverged_point():
    res = [dict(val_acc=0.2, val_loss=2.0, diverged=False), dict(val_acc=0.99, val_loss=0.01, diverged=True),
           dict(val_acc=math.nan, val_loss=math.nan, diverged=False), dict(val_acc=0.3, val_loss=math.inf)]
    assert select_best(res) == 0
    assert select_best([dict(val_acc=None, val_loss=None, diverged=True)] * 2) == 0   # all diverged: first
    with pytest.raises(ValueError, match="no tuning results"):
        select_best([])


def test_grid_is_log_spaced_around_the_default_and_tunes_the_right_flag():
    g = grid("sgd", 5, 3.0)
    assert [round(math.log10(p["lr"]), 9) for p in g] == [-3.5, -2.75, -2.0, -1.25, -0.5]   # default lr 0.01
    assert grid("trust-region", 3, 2.0)[0] == {"radius": pytest.approx(1e-5)}
    assert list(grid("arc", 2)[1]) == ["sigma"]
    h = grid("hybrid", 3, 2.0)
    assert h[0] == {"sgd_lr": pytest.approx(5e-4), "lr": pytest.approx(1e-4)}     # both phases scaled alike
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="points"):
            grid("sgd", bad)


def test_per_optimizer_hyperparameters_rank_below_explicit_ones():
    cfg = TrainConfig(model="mlp", optimizers=["sgd", "adam"], per_optimizer={"sgd": {"lr": 0.05}})
    assert cfg.hyperparameters("sgd")["lr"] == 0.05 and cfg.hyperparameters("adam")["lr"] == 0.001
    cfg = TrainConfig(model="mlp", optimizers=["sgd"], per_optimizer={"sgd": {"lr": 0.05}}, hparams={"lr": 0.2})
    assert cfg.hyperparameters("sgd")["lr"] == 0.2
    with pytest.raises(ConfigError, match="sgd has no hyperparameter"):
        TrainConfig(model="mlp", per_optimizer={"sgd": {"betas": 0.5}})
    with pytest.raises(ConfigError, match="per_optimizer: sgd rejects lr=-1"):
        TrainConfig(model="mlp", per_optimizer={"sgd": {"lr": -1}})


# ---- a tiny real run ---------------------------------------------------------------------------
TINY = ["--problems", "lenet5-mnist", "--optimizers", "sgd,natasha2", "--grid-points", "2", "--span", "16",
        "--seeds", "1", "--subset", "300/100/100", "--epochs", "1", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    tuned = out / "tuned.json"
    code = _program("compare.py")["main"](TINY + ["--out", str(out), "--write-tuned", str(tuned)])
    return code, out, tuned


@requires_mnist
def test_tiny_run_writes_every_file_with_its_structure(tiny_run):
    code, out, _ = tiny_run
    assert code == 0
    tune = _csv(out / "tuning.csv")
    assert [(r["optimizer"], float(r["value"])) for r in tune] == [
        ("sgd", pytest.approx(1e-10)), ("sgd", pytest.approx(1e6)),
        ("natasha2", pytest.approx(1e-10)), ("natasha2", pytest.approx(1e6))]
    assert all(r["flag"] == "lr" and r["seed"] == "0" for r in tune)
    final = _csv(out / "final.csv")
    assert [(r["optimizer"], r["seed"]) for r in final] == [("sgd", "1"), ("natasha2", "1")]
    assert float(final[1]["hvps"]) > 0 and float(final[0]["hvps"]) == 0 and final[1]["oja_runs"] not in ("", "nan")
    hist = _csv(out / "history.csv")
    assert len(hist) == 6 * 2 and {r["phase"] for r in hist} == {"tune", "final"}      # 6 runs x epochs 0, 1
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "finished" and len(doc["tuning"]) == 4 and len(doc["final"]) == 2
    assert doc["problems"]["lenet5-mnist"]["sizes"] == "300/100/100"
    assert (out / "tuning-lenet5-mnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    for part in ("## lenet5-mnist", "| sgd | lr | ", "## Natasha1.5 and Natasha2, characterised",
                 "At an equal budget of", f"Natasha2 (1 final run(s)): {int(float(final[1]['oja_runs']))} Oja runs",
                 "tuning-lenet5-mnist.png"):
        assert part in md


@requires_mnist
def test_a_diverging_grid_point_is_recorded_and_not_selected(tiny_run):
    _, out, _ = tiny_run
    tiny, huge = [r for r in _csv(out / "tuning.csv") if r["optimizer"] == "sgd"]
    assert huge["diverged"] == "True" and huge["selected"] == "False"          # SGD at lr 1e6 blows up
    assert huge["val_loss"] == "nan" and tiny["diverged"] == "False" and tiny["selected"] == "True"
    assert "x" in (out / "summary.md").read_text().split("| sgd | lr | ")[1].splitlines()[0]


@requires_mnist
def test_demo_runs_with_the_written_tuned_table(tiny_run, tmp_path, capsys):
    _, _, tuned = tiny_run
    doc = read_tuned(tuned)
    assert doc["problem"] == "lenet5-mnist" and doc["optimizers"]["sgd"] == {"lr": pytest.approx(1e-10)}
    demo = _program("demo.py")["main"]
    code = demo(["--optimizer", "sgd", "--epochs", "1", "--subset", "100/20/20", "--seeds", "0", "--no-plot",
                 "--no-verbose", "--out", str(tmp_path)], tuned_path=tuned)
    assert code == 0
    assert f"tuned values from {tuned}" in capsys.readouterr().out
    rows = _csv(tmp_path / "history.csv")
    assert float(rows[-1]["lr"]) == pytest.approx(1e-10)
    assert float(rows[-1]["train_loss"]) == pytest.approx(float(rows[0]["train_loss"]), rel=1e-6)  # lr 1e-10: no move


def test_demo_without_a_table_says_it_uses_the_defaults(tmp_path, capsys, monkeypatch):
    demo = _program("demo.py")
    monkeypatch.setattr(sys, "argv", ["demo.py"])
    cfg = demo["demo_config"](None)
    assert cfg.per_optimizer == {} and cfg.hyperparameters("sgd")["lr"] == 0.01
    doc, line = demo["load_table"](tmp_path / "absent.json")
    assert doc is None and "CLI default" in line and "absent.json" in line


@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ('{"format": "natasha_ext tuned hyperparameters", "version": 1, "problem": "p", "setting": "s", '
     '"source": "c", "optimizers": {"sgd": {"lr": -0.1}}}', "sgd.lr must be a positive finite number"),
    ('{"format": "natasha_ext tuned hyperparameters", "version": 1, "problem": "p", "setting": "s", '
     '"source": "c", "optimizers": {"sgdd": {"lr": 0.1}}}', "unknown optimizer 'sgdd'"),
    ('{"format": "natasha_ext tuned hyperparameters", "version": 1, "problem": "p", "setting": "s", '
     '"source": "c", "optimizers": {"sgd": {"betas": 0.1}}}', "sgd has no hyperparameter 'betas'"),
    ('[1, 2]', "'format' must be"),
])
def test_demo_refuses_a_malformed_table_naming_the_file(tmp_path, capsys, text, why):
    bad = tmp_path / "tuned.json"
    bad.write_text(text)
    with pytest.raises(TunedTableError, match=why):
        read_tuned(bad)
    assert _program("demo.py")["main"](["--epochs", "1"], tuned_path=bad) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and why in err


# ---- Ctrl-C and bad arguments ------------------------------------------------------------------
@requires_mnist
def test_ctrl_c_exits_130_and_keeps_what_finished(tmp_path, monkeypatch, capsys):
    calls = []
    real = C.train_one

    def interrupting(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(C, "train_one", interrupting)
    code = _program("compare.py")["main"](TINY + ["--out", str(tmp_path)])
    assert code == 130 and "interrupted: 2 finished runs" in capsys.readouterr().err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["status"] == "interrupted" and len(doc["tuning"]) == 2 and doc["final"] == []
    assert len(_csv(tmp_path / "history.csv")) == 4 and "Status: interrupted" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("argv, flag", [(["--optimizers", "sgd,nope"], "--optimizers"),
                                        (["--problems", "cifar"], "--problems"),
                                        (["--grid-points", "0"], "--grid-points"),
                                        (["--seeds", "0,1"], "--seeds"),
                                        (["--subset", "70000/0/0"], "--subset"),
                                        (["--problems", "mlp-mnist", "--write-tuned", "x.json"], "--write-tuned")])
def test_bad_arguments_are_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        _program("compare.py")["parse"](argv)
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


# ---- the kick probe ----------------------------------------------------------------------------
@requires_mnist
def test_kick_probe_records_kicks_without_changing_the_run():
    splits = data.load_splits("mnist", "500/100/100")
    cfg = TrainConfig(model="lenet5", subset="500/100/100", epochs=1, batch_size=50, progress=False,
                      verbose=False, plot=False, checkpoint=False).for_optimizer(
        "natasha2", delta=1e-3, oja_eta=0.01, oja_iters=10, epoch_size=18, snapshot_batches=1,
        kick_test_batches=0)      # tiny delta, quotient on Oja's own minibatch (biased low): the kick test fires
    runs = []
    for probe in (None, KickProbe(100)):
        torch.manual_seed(0)
        model = cfg.build_model()
        runs.append((train_one(cfg, "natasha2", model, splits, 0, observer=probe), probe, model))
    (plain, _, m0), (watched, probe, m1) = runs
    assert [r["train_loss"] for r in plain] == [r["train_loss"] for r in watched]     # parameters restored exactly
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters()))
    assert len(probe.kicks) == probe.counters["kicks"] >= 1 and len(probe.rayleighs) == probe.counters["oja_runs"]
    for k in probe.kicks:
        assert k["rayleigh"] <= -1e-3 / 2
        assert k["probe_loss_before"] != k["probe_loss_after"]                # the kick moved the weights
