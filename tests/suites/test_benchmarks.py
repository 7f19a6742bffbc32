"""The benchmark machinery (benchmarks/): interleaved rounds, the row set every op gets (fused,
foreach warm/cold, compiled, per-tensor), best_unfused, and the noise flags; the end-to-end rows
(fused beside reference, the fused/ref flag) and the memory / leak probe."""
import functools
import math
import types
import statistics

import pytest
import torch

from benchmarks import end_to_end, rounds
from benchmarks.common import Case
from benchmarks.end_to_end import Spec, fused_vs_reference, time_rows
from benchmarks.memory import memory_probe
from benchmarks.noise import flag_noise, summarize
from benchmarks.ops_natasha import svrg_foreach
from benchmarks.rounds import interleaved
from benchmarks.run import run_ops, time_op
from benchmarks.variants import Temps, compiled_case
from natasha_ext import ops

TINY = {"tiny": [(6, 5), (7,), (3, 2, 3, 3)]}


def _row(spread, variant="v"):
    return {"device": "cpu", "model": "tiny", "op": "op", "variant": variant, "spread": spread}


def test_noise_flags_fire_above_the_thresholds_and_not_below():
    rows = [_row(0.26, "wide"), _row(0.24, "narrow"), _row(float("nan"), "error")]
    noisy, reasons = flag_noise({"cpu a": (10.0, 11.4)}, rows)  # drift 14 %, a row at 26 %
    assert noisy and [r["noisy"] for r in rows] == [True, False, False]
    assert len(reasons) == 1 and reasons[0].startswith("1 of 3 rows") and "op/wide" in reasons[0]
    noisy, reasons = flag_noise({"cpu a": (10.0, 11.6)}, [_row(0.24)])  # drift 16 %, rows fine
    assert noisy and len(reasons) == 1 and "copy bandwidth cpu a" in reasons[0]
    noisy, reasons = flag_noise({"cpu a": (11.4, 10.0), "cpu b": (5.0, 5.0)}, [_row(0.24), _row(0.0)])
    assert not noisy and reasons == []
    # spread from planted samples: (1.3 - 1.0) / 1.1
    st = summarize([1.1, 1.3, 1.0])
    assert (st["min"], st["median"], st["max"]) == (1.0, 1.1, 1.3)
    assert st["spread"] == pytest.approx(0.3 / 1.1)
    assert flag_noise({}, [_row(st["spread"])])[0]
    assert math.isnan(summarize([])["median"])


def test_rounds_rotate_the_order_of_the_variants():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = interleaved(fns, "cpu", rounds=4, sample_s=0.0)  # one call per sample
    assert calls[:3] == list("abc")  # calibration: one call each
    assert calls[3:] == list("abc" "bca" "cab" "abc")
    assert all(len(s) == 4 for s in samples.values())
    with pytest.raises(ValueError, match="rounds"):
        interleaved(fns, "cpu", rounds=0, sample_s=0.0)


def test_warm_foreach_form_reuses_its_temporaries_and_computes_what_the_cold_form_does():
    gen = torch.Generator().manual_seed(3)
    mk = lambda: [torch.randn(s, generator=gen) for s in TINY["tiny"]]
    base = [mk() for _ in range(5)]
    cold = [[t.clone() for t in ts] for ts in base] + [[torch.zeros(s) for s in TINY["tiny"]]]
    warm = [[t.clone() for t in ts] for ts in base] + [[torch.zeros(s) for s in TINY["tiny"]]]
    temps = Temps(warm=True)
    run = temps.bind(lambda: svrg_foreach(*warm, 0.1, 0.7, temps))
    for _ in range(3):
        out_warm, out_cold = run(), svrg_foreach(*cold, 0.1, 0.7)
        torch.testing.assert_close(out_warm, out_cold)
    for a, b in zip(warm, cold):
        torch.testing.assert_close(a, b)
    assert len(temps._bufs) == 2  # d and x - a, allocated once over three calls


@pytest.mark.skipif(not ops.fused_available(), reason="compiled kernels not built")
def test_every_op_row_gets_compiled_warm_cold_and_a_best_unfused_headline():
    rows, copy, noisy, reasons = run_ops(["cpu"], TINY, rounds=3, sample_s=0.001, only=["svrg_step"])
    assert set(copy) == {"cpu tiny"} and all(f > 0 for f in copy["cpu tiny"])
    svrg = {r["variant"]: r for r in rows if r["op"] == "svrg_step"}
    assert list(svrg) == ["fused", "foreach-warm", "foreach-cold", "compiled", "per-tensor"]
    adam = {r["variant"]: r for r in rows if r["op"] == "adam (torch.optim)"}
    assert set(adam) == {"torch-fused", "torch-foreach"} and {r["bytes_per_param"] for r in adam.values()} == {28}
    for r in rows:
        assert isinstance(r["noisy"], bool) and r["run_noisy"] is noisy
        if r["variant"] == "compiled" and r["error"]:
            continue  # a form that does not compile is an error cell, not a crash
        assert not r["error"], r
        assert r["rounds"] == 3 and 0 < r["ms_min"] <= r["ms"] <= r["ms_max"]
    assert svrg["compiled"]["error"] or svrg["compiled"]["ms"] > 0
    timed = [v for v in ("foreach-warm", "foreach-cold", "compiled") if not svrg[v]["error"]]
    best = min(timed, key=lambda v: svrg[v]["ms"])
    fused = svrg["fused"]
    assert fused["best_unfused"] == best
    assert fused["speedup_vs_best_unfused"] == pytest.approx(svrg[best]["ms"] / fused["ms"])
    assert fused["GBps"] == pytest.approx(32 * fused["params"] / fused["ms"] * 1e-6)
    assert noisy == bool(reasons)


def test_a_form_that_does_not_compile_is_an_error_cell():
    def breaks(ts):
        def call():
            torch._dynamo.graph_break()
            return torch._foreach_add(ts, 1.0)
        return call

    cases = [Case("op", "eager", 4, breaks, role="baseline"), compiled_case("op", 4, breaks)]
    samples, errors = time_op("cpu", cases, [torch.ones(3)], rounds=2, sample_s=0.0)
    assert len(samples["eager"]) == 2 and "compiled" not in samples
    assert errors["compiled"]  # dynamo's fullgraph refusal, as text


def test_fused_over_reference_flag_fires_beyond_the_noise_and_not_below():
    ref = [1.0, 1.0, 1.0, 1.0]
    ratio, slower = fused_vs_reference([1.10, 1.12, 1.09, 1.11], ref)
    assert slower and ratio == pytest.approx(1.105)
    ratio, slower = fused_vs_reference([1.02, 1.02, 1.02, 1.02], ref)  # slower every round, within FUSED_TOL
    assert not slower and ratio == pytest.approx(1.02)
    ratio, slower = fused_vs_reference([1.10, 1.12, 0.95, 1.11], ref)  # median 10 % slower, one round faster
    assert not slower and ratio > 1 + end_to_end.FUSED_TOL
    assert not fused_vs_reference([1.2, 1.2], [1.0, 1.0])[1]  # too few rounds to call it
    assert not fused_vs_reference([0.8, 0.7, 0.9], [1.0, 1.0, 1.0])[1]
    ratio, slower = fused_vs_reference([], ref)
    assert math.isnan(ratio) and not slower


@pytest.mark.skipif(not ops.fused_available(), reason="compiled kernels not built")
def test_end_to_end_rows_put_every_optimizer_s_fused_path_beside_its_reference(monkeypatch):
    fwd = "adahessian hvp=forward_over_reverse"
    monkeypatch.setitem(end_to_end.PEERS, "missing-peer", ("no_such_peer_package", "AdaHessian", (), ("adahessian", fwd)))
    saved = torch.get_num_threads()
    rows_spec = end_to_end.specs(["adahessian", fwd, "kfac", "ifang", "natasha15", "missing-peer"])
    rows = time_rows("cpu", "small-cnn", 8, 1, rows_spec, rounds=3, sample_s=0.0)
    torch.set_num_threads(saved)
    by = {(r["optimizer"], r["path"]): r for r in rows}
    assert set(by) == {("sgd", "torch"), ("missing-peer", "peer")} | {
        (n, p) for n in ("adahessian", fwd, "kfac", "ifang", "natasha15") for p in ("fused", "reference")}
    assert "no_such_peer_package" in by[("missing-peer", "peer")]["error"]
    assert math.isnan(by[("missing-peer", "peer")]["ms"])
    for name in ("adahessian", fwd, "kfac", "ifang", "natasha15"):
        f, r = by[(name, "fused")], by[(name, "reference")]
        assert not f["error"] and not r["error"], (f, r)
        assert f["rounds"] == r["rounds"] == 3 and 0 < f["ms_min"] <= f["ms"] <= f["ms_max"]
        assert f["fused_over_ref"] == pytest.approx(f["ms"] / r["ms"]) == r["fused_over_ref"]
        assert f["fused_slower"] == fused_vs_reference(f["samples"], r["samples"])[1]
        assert f["x_sgd"] == pytest.approx(f["ms"] / by[("sgd", "torch")]["ms"])
    # x peer: only our AdaHessian rows, against the peer of the same schedule (planted times)
    planted = [dict(r, samples=list(r["samples"])) for r in rows]
    for r in planted:
        if r["optimizer"] == "missing-peer":
            r.update(ms=50.0, error="")
    end_to_end.derive(planted)
    peer_x = {(r["optimizer"], r["path"]): r["x_best_peer"] for r in planted if r["x_best_peer"] == r["x_best_peer"]}
    assert set(peer_x) == {(n, p) for n in ("adahessian", fwd) for p in ("fused", "reference")}
    assert peer_x[("adahessian", "fused")] == pytest.approx(by[("adahessian", "fused")]["ms"] / 50.0)
    assert peer_x[(fwd, "fused")] == pytest.approx(by[(fwd, "fused")]["ms"] / 50.0)
    # samples span whole periods: natasha15's epoch of 27 steps, K-FAC's inverse refresh (inv_every 100,
    # a multiple of cov_every 10), IFANG's statistics every step
    assert by[("natasha15", "fused")]["period"] == 27 and by[("kfac", "reference")]["period"] == 100
    assert by[("ifang", "fused")]["period"] == 1
    # the switch reached the optimizer: the reference path never enters the compiled ops
    steps = {}
    for path in ("fused", "reference"):
        step, _ = end_to_end.build("small-cnn", 8, "cpu", Spec("adahessian", "ours", path))
        with torch.profiler.profile() as prof:
            step()
        steps[path] = {e.key for e in prof.key_averages() if e.key.startswith("natasha::")}
    assert steps["fused"] and not steps["reference"], steps


def test_a_cycle_function_is_timed_per_optimizer_step():
    from benchmarks.rounds import CycleSteps, per_call_seconds
    clock = {"t": 0.0}
    real = rounds.time.perf_counter
    try:
        rounds.time.perf_counter = lambda: clock["t"]
        def cycle():  # 4 steps of 1 s each in one call
            clock["t"] += 4.0
            return CycleSteps(4)
        def plain():
            clock["t"] += 4.0
            return 4  # an ordinary return value is not a step count
        assert per_call_seconds(cycle, 3, "cpu") == pytest.approx(1.0)
        assert per_call_seconds(plain, 3, "cpu") == pytest.approx(4.0)
    finally:
        rounds.time.perf_counter = real


@pytest.mark.skipif(not ops.fused_available(), reason="compiled kernels not built")
def test_natasha2_is_sampled_over_whole_outer_iterations():
    from benchmarks.rounds import CycleSteps
    step, period = end_to_end.build("small-cnn", 8, "cpu", Spec("natasha2", "ours", "fused"))
    assert period == 1
    n = step()
    # Oja's call, the kick test, then (no kick on this problem) mu from B = 27 minibatches and the
    # epoch of 27 inner steps, the call completing mu also taking the first step: 27 + 27 - 1 calls;
    # a kick would end the iteration after the kick test (2 calls)
    assert isinstance(n, CycleSteps) and int(n) in (2, 53)
    assert int(step()) in (2, 53)


def test_cost_period_is_the_least_common_multiple_of_the_refresh_intervals():
    hp = lambda **kw: types.SimpleNamespace(**kw)
    assert end_to_end.cost_period("kfac", hp(cov_every=10, inv_every=100)) == 100
    assert end_to_end.cost_period("kfac", hp(cov_every=4, inv_every=6)) == 12
    assert end_to_end.cost_period("adahessian", hp(update_each=4)) == 4
    assert end_to_end.cost_period("sgd", hp()) == 1


_HELD = []


def _loop(leak_mb):
    """A step that allocates and touches 1 MB; with leak_mb it also keeps leak_mb MB per step."""
    def step():
        x = torch.ones(256 * 1024)
        if leak_mb:
            _HELD.append(torch.ones(int(leak_mb * 256 * 1024)))
        return float(x.sum())
    return step


def test_memory_probe_measures_a_peak_and_flags_a_growing_loop_only():
    clean = memory_probe(functools.partial(_loop, 0), early=3, late=23)
    assert clean["peak_MB"] > 0.5 and ("VmHWM" in clean["method"] or "ru_maxrss" in clean["method"])
    assert not clean["leak"] and clean["growth_MB"] < 4
    leaky = memory_probe(functools.partial(_loop, 1), early=3, late=23)
    # 1 MB kept per step: at least the 17 steps between the two windows' edges show
    assert leaky["leak"] and leaky["growth_MB"] > 12, leaky
    assert leaky["peak_MB"] >= leaky["mem_late_MB"] > 12
    real = memory_probe(functools.partial(end_to_end.build_step, "small-cnn", 8, "cpu", Spec("sgd", "anchor", "torch")),
                        early=2, late=6)
    assert real["peak_MB"] > 0
    with pytest.raises(ValueError, match="early"):
        memory_probe(functools.partial(_loop, 0), early=5, late=6)
