"""Results that survive an interrupt (issue 19 item 8): the output folder is checked first, rows
are kept as epochs finish, Ctrl-C writes the summary and exits 130, and --resume continues a run
bit-identically to an uninterrupted one."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from natasha_ext import cli_optimizers, data
from natasha_ext.training import Interrupted, TrainConfig, json_safe, main, run, train_one
from natasha_ext.training.checkpoint import RunCheckpoint
from tests.training.mnist_helpers import requires_mnist

pytestmark = requires_mnist

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(model="mlp", model_args={"hidden": (16,)}, subset="200/50/50", epochs=3, batch_size=50,
            progress=False, verbose=False, plot=False)
TIMING = ("wall_time", "epoch_time")
_REAL_BATCHES = data.batches


def _interrupt_at_step(monkeypatch, step):
    """Raise KeyboardInterrupt (as Ctrl-C would) when the training loop asks for minibatch ``step``."""
    real = data.batches
    seen = [0]

    def batches(*args, **kw):
        for b in real(*args, **kw):
            if kw.get("shuffle"):
                if seen[0] == step:
                    raise KeyboardInterrupt
                seen[0] += 1
            yield b
    monkeypatch.setattr(data, "batches", batches)


def _same_rows(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        ra = {k: v for k, v in ra.items() if k not in TIMING}
        rb = {k: v for k, v in rb.items() if k not in TIMING}
        assert ra.keys() == rb.keys()
        for k in ra:       # NaN == NaN here (an empty metric is NaN in both)
            assert ra[k] == rb[k] or (ra[k] != ra[k] and rb[k] != rb[k]), (ra["optimizer"], ra["epoch"], k)


class NoisySGD(torch.optim.SGD):
    """SGD plus gradient noise drawn from torch's global RNG (as dropout would draw)."""

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.add_(torch.randn_like(p), alpha=1e-2)
        super().step()
        return loss


@pytest.mark.parametrize("name", list(cli_optimizers.OPTIMIZERS) + ["noisy-sgd"])
def test_resume_is_bit_identical(tmp_path, monkeypatch, name):
    """Interrupted in epoch 2 of 3 and resumed from the epoch-1 checkpoint: the same final
    parameters and history as an uninterrupted run (noisy-sgd: the global RNG is restored too)."""
    monkeypatch.setitem(cli_optimizers.OPTIMIZERS, "noisy-sgd", cli_optimizers.OptimizerSpec(
        NoisySGD, flags={"lr": cli_optimizers.Flag("learning rate")}))
    cfg = TrainConfig(optimizers=[name], **TINY)
    splits = data.load_splits("mnist", cfg.subset, seed=0)
    torch.manual_seed(0)
    init = cfg.build_model().state_dict()

    def fresh():
        m = cfg.build_model()
        m.load_state_dict(init)
        return m

    ref_model = fresh()
    ref_rows = train_one(cfg, name, ref_model, splits, 0)
    ckpt = RunCheckpoint(tmp_path / "run.pt", resume=True)
    _interrupt_at_step(monkeypatch, 6)           # 4 steps per epoch: in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_one(cfg, name, fresh(), splits, 0, checkpoint=ckpt)
    monkeypatch.setattr(data, "batches", _REAL_BATCHES)
    assert [r["epoch"] for r in ckpt.load()["rows"]] == [0, 1]
    model = fresh()
    rows = train_one(cfg, name, model, splits, 0, checkpoint=ckpt)
    _same_rows(rows, ref_rows)
    for (k, p), q in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(p, q), k
    assert ckpt.load()["finished"] and "model" not in ckpt.load()     # a finished run keeps rows only


def test_run_interrupted_then_resumed(tmp_path, monkeypatch):
    """run(): the interrupt writes the finished epochs and the summary; resume completes the
    same history as an uninterrupted run, through the CLI (--resume)."""
    cfg = dict(TINY, optimizers=["sgd", "adahessian"], seeds=[0, 1])
    ref = run(TrainConfig(**cfg, out=str(tmp_path / "ref")))
    out = tmp_path / "run"
    _interrupt_at_step(monkeypatch, 4 * 3 * 2 + 4 * 3 + 5)   # seed 1, adahessian, epoch 2
    with pytest.raises(Interrupted) as e:
        run(TrainConfig(**cfg, out=str(out)))
    monkeypatch.undo()
    assert e.value.out == out
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    # seed 0: both runs (4 rows each); seed 1: sgd (4 rows), adahessian epochs 0-1
    assert [(r["optimizer"], r["seed"], r["epoch"]) for r in rows][-3:] == [("sgd", "1", "3"), ("adahessian", "1", "0"),
                                                                             ("adahessian", "1", "1")]
    assert len(rows) == 14
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "interrupted" and len(doc["history"]) == 14
    assert {s["optimizer"]: s["epochs"] for s in doc["summary"]} == {"sgd": 3, "adahessian": 3}
    assert "sgd" in (out / "summary.txt").read_text()
    assert main(["--resume", str(out), "--no-progress", "--no-verbose", "--no-plot"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "finished"
    _same_rows(doc["history"], json_safe(ref["history"]))
    with open(out / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == len(ref["history"]) == 16


def test_failed_run_keeps_the_finished_epochs(tmp_path, monkeypatch):
    """An exception in a later run (here: seed 1) still leaves seed 0's rows and a summary."""
    real = train_one.__globals__["make_optimizer"]

    def failing(name, model, params=None, *, seed=0, **kw):
        if seed == 1:
            raise RuntimeError("boom")
        return real(name, model, params, seed=seed, **kw)
    monkeypatch.setitem(train_one.__globals__, "make_optimizer", failing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        run(TrainConfig(optimizers=["sgd"], **dict(TINY, seeds=[0, 1]), out=str(out)))
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "failed" and [r["epoch"] for r in doc["history"]] == [0, 1, 2, 3]
    assert doc["summary"][0]["seeds"] == 1


def test_resume_refuses_changed_settings(tmp_path, capsys):
    out = tmp_path / "run"
    run(TrainConfig(optimizers=["sgd"], **dict(TINY, epochs=1), out=str(out)))
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(out), "--lr", "0.5"])
    assert e.value.code == 2 and "drop --lr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "not a training run folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="other settings .*epochs"):
        run(TrainConfig(optimizers=["sgd"], **dict(TINY, epochs=2), out=str(out)), resume=True)


def test_unwritable_out_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """--out under a regular file (unwritable even for root): an argparse error before any data
    is loaded, not a crash after training."""
    blocker = tmp_path / "file"
    blocker.write_text("")

    def no_data(*a, **kw):
        raise AssertionError("data loaded before the output folder was checked")
    monkeypatch.setattr(data, "load_splits", no_data)
    with pytest.raises(SystemExit) as e:
        main(["--optimizer", "sgd", "--model", "mlp", "--epochs", "1", "--out", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --out: cannot write results to" in err and "Traceback" not in err


def test_sigint_writes_finished_epochs_and_exits_130(tmp_path):
    """A real Ctrl-C (SIGINT) to the CLI process: exit status 130, the finished epochs' rows in
    history.csv, the summary written, a checkpoint to resume from."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "natasha_ext.train", "--optimizer", "sgd", "--model", "mlp", "--model-arg",
           "hidden=[16]", "--subset", "200/50/50", "--epochs", "100000", "--batch-size", "50", "--threads", "1",
           "--no-progress", "--no-plot", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    history = out / "history.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 4:   # header + epochs 0..2
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    running = json.loads((out / "results.json").read_text())        # rewritten whole per epoch
    assert running["status"] == "running" and len(running["history"]) >= 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"--resume {out}" in err
    with open(history) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 3
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "interrupted" and len(doc["history"]) == len(rows)
    assert doc["summary"][0]["epochs"] == epochs[-1]
    ckpt = RunCheckpoint(out / "checkpoints" / "sgd-seed0.pt", resume=True).load()
    assert ckpt["rows"][-1]["epoch"] in (epochs[-1], epochs[-1] + 1) and not ckpt["finished"]
