"""The paper reproduction programs (python/*.py) build a TrainConfig and run the training loop:
each one end to end at a tiny size (in-process: a subprocess would re-import torch for nothing)."""
import csv
import runpy
import sys
from pathlib import Path

import pytest

from tests.training.mnist_helpers import requires_mnist

pytestmark = requires_mnist

ROOT = Path(__file__).resolve().parents[2]


def _run(monkeypatch, program, argv):
    monkeypatch.setattr(sys, "argv", [program, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "python" / program), run_name="__main__")
    assert e.value.code in (0, None)


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_natasha_mnist(tmp_path, monkeypatch):
    _run(monkeypatch, "natasha_mnist.py", ["--epochs", "1", "--subset", "200/50/50", "--only",
                                           "sgd,natasha1.5-report", "--no-progress", "--out", str(tmp_path)])
    rows = _history(tmp_path / "history.csv")
    assert {r["optimizer"] for r in rows} == {"sgd", "natasha1.5-report"} and len(rows) == 4
    assert (tmp_path / "summary.md").read_text().count("natasha1.5-report") >= 2


def test_adahessian_table1(tmp_path, monkeypatch):
    _run(monkeypatch, "adahessian_table1.py", ["--epochs", "1", "--subset", "100/20/20", "--batch-size", "50",
                                               "--only", "sgd,hybrid", "--no-progress", "--out", str(tmp_path)])
    rows = _history(tmp_path / "history.csv")
    assert [r["optimizer"] for r in rows] == ["SGD", "SGD", "Hybrid", "Hybrid"]
    assert float(rows[1]["lr"]) == 0.01 and int(rows[-1]["steps"]) == 2
    assert "Table I" in (tmp_path / "summary.md").read_text()


def test_ang_table1_curves(tmp_path, monkeypatch):
    _run(monkeypatch, "ang_table1.py", ["--skip-timing", "--dataset", "mnist", "--curves-subset", "100/20/20",
                                        "--curves-epochs", "1", "--curves-batch-size", "50", "--no-progress",
                                        "--out", str(tmp_path)])
    rows = _history(tmp_path / "history.csv")
    assert {r["optimizer"] for r in rows} == {"SGD", "K-FAC", "ANG-linear", "ANG-exp", "ANG-cosine", "IFANG"}
    assert all(float(r["train_loss"]) == float(r["train_loss"]) for r in rows)


def test_trust_region_fig3(tmp_path, monkeypatch):
    _run(monkeypatch, "trust_region_fig3.py", ["--max-epochs", "1", "--subset", "100/0/50", "--seeds", "0",
                                               "--only", "tr-spherical,sgd", "--problems", "mnist-mlp",
                                               "--no-progress", "--no-plot", "--out", str(tmp_path)])
    runs = _history(tmp_path / "runs.csv")
    assert [r["optimizer"] for r in runs] == ["tr-spherical", "sgd"] and all(r["final_epoch"] == "1" for r in runs)


def test_demo_flags_override_its_defaults(tmp_path, monkeypatch):
    _run(monkeypatch, "demo.py", ["--optimizer", "sgd", "--epochs", "1", "--subset", "100/20/20", "--seeds", "0",
                                  "--no-plot", "--no-verbose", "--out", str(tmp_path)])
    rows = _history(tmp_path / "history.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"] and int(rows[-1]["steps"]) == 2    # the demo's batch 50
    assert '"model": "lenet5"' in (tmp_path / "config.json").read_text()
