"""`python -m natasha_ext`: the self-test passes on CPU, its JSON is complete, and it fails (exit
status 1, the right rows) when a kernel returns a wrong result or silently takes the reference."""
import inspect
import json
import math
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import natasha_ext.ops
from natasha_ext.selftest import cli
from natasha_ext.selftest.compare import max_error
from natasha_ext.selftest.environment import FATBIN_MAGIC, fatbin_architectures
from natasha_ext.selftest.inputs import CHUNK, CUDA_BLOCKS_PER_LAUNCH, list_layouts, matrix_layouts
from natasha_ext.selftest.op_cases import ALIASES, OP_CASES
from natasha_ext.selftest.optimizer_cases import OPTIMIZER_CASES, OPTIMIZER_DTYPES
from natasha_ext.selftest.tolerances import tolerance

ROOT = Path(__file__).resolve().parents[2]
requires_fused = pytest.mark.skipif(not natasha_ext.ops.fused_available("cpu"), reason="compiled kernels not built")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.update(extra)
    return env


def _selftest(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "natasha_ext", *args], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _failed(report):
    return {(r["check"], r["name"], r["dtype"]) for r in report["results"] if r["status"] == "FAIL"}


# ------------------------------------------------------------------------------ the real run
@requires_fused
def test_selftest_passes_on_cpu_and_its_json_is_complete(tmp_path):
    out = tmp_path / "selftest.json"
    proc = _selftest("--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed, 0 failed, 0 skipped in [\d.]+ s: OK", proc.stdout)
    rep = json.loads(out.read_text())
    assert rep["schema"] == 1 and rep["summary"]["ok"] and rep["summary"]["failed"] == 0
    assert rep["summary"]["checks"] == len(rep["results"]) == rep["summary"]["passed"]
    env = rep["environment"]
    assert env["torch"] == torch.__version__ and env["extension"]["loaded"]
    assert {_base(k) for k in env["kernels"]} >= {_base(c.op) for c in OP_CASES}
    assert all(k["CPU"] for k in env["kernels"].values())
    rows = rep["results"]
    # every op x dtype x layout, each of which dispatched its own kernel
    for case in OP_CASES:
        layouts = (matrix_layouts if case.matrices else list_layouts)("cpu")
        for dtype in case.dtypes:
            got = [r for r in rows if r["check"] == "op" and r["name"] == case.op and r["dtype"] == str(dtype)[6:]]
            assert sorted(r["variant"] for r in got) == sorted(layouts), (case.op, dtype)
            assert all(_base(case.op) in map(_base, r["kernels"]) and r["max_error"] <= r["tolerance"] for r in got)
    # every optimizer family in both dtypes, each dispatching some natasha kernel
    for case in OPTIMIZER_CASES:
        got = {r["dtype"]: r for r in rows if r["check"] == "optimizer" and r["name"] == case.title}
        assert set(got) == {str(d)[6:] for d in OPTIMIZER_DTYPES} and all(r["kernels"] for r in got.values())
    kinds = {r["name"].split(":")[0] for r in rows if r["check"] == "stress"}
    assert kinds == {"groups", "philox offset", "chunks", "repeat", "layers"}
    assert [r["status"] for r in rows if r["check"] == "coverage"] == ["pass"]
    assert all(r["device"] == "cpu" and r["seconds"] >= 0 for r in rows)


def _base(name):
    """svrg_step and svrg_step_ name one op (the in-place spelling of a renamed schema)."""
    return name.rstrip("_")


def test_every_public_op_has_a_case():
    """A new op in natasha_ext.ops must get a self-test case (aliases: the same function under a
    second name, or a name in ALIASES)."""
    fns = {n: getattr(natasha_ext.ops, n) for n in natasha_ext.ops.__all__}
    ops = {_base(n) for n, f in fns.items() if inspect.isfunction(f) and "fused" in inspect.signature(f).parameters
           and n not in ALIASES}
    assert ops == {_base(c.op) for c in OP_CASES}


# ------------------------------------------------------------------------------ it can fail
@requires_fused
def test_a_wrong_kernel_result_fails_exactly_its_rows(monkeypatch, tmp_path):
    """global_norm's fused result 1e-4 too large: its fp32/fp64 rows fail (tolerances 4e-5, 1e-12),
    its fp16/bf16 rows still pass (2e-3, 2e-2), nothing else fails."""
    real = natasha_ext.ops.global_norm

    def wrong(tensors, *, fused=None):
        out = real(tensors, fused=fused)
        return out * (1 + 1e-4) if fused else out

    monkeypatch.setattr(natasha_ext.ops, "global_norm", wrong)
    threads = torch.get_num_threads()
    assert cli.main(["--device", "cpu", "--quick", "--json", str(tmp_path / "r.json")]) == 1
    assert torch.get_num_threads() == threads
    rep = json.loads((tmp_path / "r.json").read_text())
    assert not rep["summary"]["ok"]
    assert _failed(rep) == {("op", "global_norm", "float32"), ("op", "global_norm", "float64")}
    bad = [r for r in rep["results"] if r["status"] == "FAIL"]
    assert len(bad) == 8 and all("> tolerance" in r["message"] for r in bad)


@requires_fused
def test_a_fused_call_that_runs_the_reference_fails(monkeypatch, capsys):
    real = natasha_ext.ops.cg_dots
    monkeypatch.setattr(natasha_ext.ops, "cg_dots", lambda *a, fused=None: real(*a, fused=False))
    assert cli.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "dispatched no natasha:: kernel" in out
    assert re.search(r"op cg_dots +cpu +float32 .* FAIL", out)
    assert "FAILED" in out.splitlines()[-1]


SITECUSTOMIZE = """
    # test-only fault injection: cg_step_'s fused path moves one element of s by 0.1
    import natasha_ext.ops as ops
    _real = ops.cg_step_
    def cg_step_(s, r, p, Bp, a, *args, fused=None, **kw):
        out = _real(s, r, p, Bp, a, *args, fused=fused, **kw)
        if fused:
            for t in s:
                if t.numel():
                    t.view(-1)[0] += 0.1
                    break
        return out
    ops.cg_step_ = cg_step_
"""


@requires_fused
def test_python_m_natasha_ext_exits_nonzero_on_a_wrong_kernel(tmp_path):
    """The real entry point in a fresh process, the fault planted by a sitecustomize module that
    only this test writes; --json - prints the JSON alone on stdout."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    proc = _selftest("--device", "cpu", "--quick", "--json", "-", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rep = json.loads(proc.stdout)
    # the op in every dtype, and the optimizer built on it (quick: fp32 optimizers only)
    assert _failed(rep) == {("op", "cg_step_", d) for d in ("float32", "float64", "float16", "bfloat16")} | {
        ("optimizer", "TrustRegion", "float32")}
    assert "FAILED" in proc.stderr


def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    assert cli.main(["--device", "cuda"]) == 2
    assert "--device cuda but torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("argv, text", [(["--json", "/nonexistent-folder/r.json"], "--json /nonexistent-folder/r.json"),
                                        (["--threads", "0"], "--threads must be >= 1"),
                                        (["--device", "tpu"], "--device: invalid choice")])
def test_usage_errors_name_the_argument_before_anything_runs(argv, text, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and text in capsys.readouterr().err


# ------------------------------------------------------------------------------ the parts
def test_chunk_constants_match_the_kernels():
    cpu = (ROOT / "csrc/cpu/chunks.h").read_text()
    cuda = (ROOT / "csrc/cuda/multi_tensor_apply.cuh").read_text()
    assert f"constexpr int64_t kChunk = {CHUNK['cpu']};" in cpu
    assert f"constexpr int64_t kChunk = {CHUNK['cuda']};" in cuda
    assert f"constexpr int kMaxBlocks = {CUDA_BLOCKS_PER_LAUNCH};" in cuda


def test_max_error_is_relative_above_one_and_checks_nonfinite_places():
    ref = [torch.tensor([1000.0, 0.0, float("inf")]), torch.tensor([float("nan")])]
    near = [torch.tensor([1000.5, 1e-5, float("inf")]), torch.tensor([float("nan")])]
    err, why = max_error(near, ref)
    assert why == "" and math.isclose(err, 0.5 / 1001, rel_tol=1e-9)
    assert max_error([torch.tensor([1.0, float("nan")])], [torch.tensor([float("nan"), 1.0])])[0] == math.inf
    assert max_error([torch.tensor([-float("inf")])], [torch.tensor([float("inf")])])[0] == math.inf
    assert max_error([torch.zeros(2)], [torch.zeros(3)])[0] == math.inf
    assert max_error([torch.zeros(2, dtype=torch.float64)], [torch.zeros(2)])[0] == math.inf


def test_tolerances_grow_with_the_dtype_and_reject_unknown_kinds():
    tols = [tolerance(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    assert tols == sorted(tols) and tolerance(torch.float32, "bitwise") == 0
    with pytest.raises(ValueError, match="kind"):
        tolerance(torch.float32, "loose")
    with pytest.raises(ValueError, match="dtype"):
        tolerance(torch.int32)


def _fatbin(entries):
    """A fat binary container as nvcc embeds it: header, then entries of (kind, arch, payload)."""
    body = b""
    for kind, arch, payload in entries:
        head = struct.pack("<HHIQ", kind, 0x0101, 64, len(payload)) + bytes(12) + struct.pack("<I", arch)
        body += head + bytes(64 - len(head)) + payload
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def test_fatbin_architectures_reads_cubins_and_ptx():
    blob = b"\x7fELF junk" + _fatbin([(2, 80, b"x" * 40), (2, 90, b"y" * 8), (1, 90, b".target sm_90")]) + b"tail"
    assert fatbin_architectures(blob) == ["sm_80", "compute_90", "sm_90"]
    assert fatbin_architectures(b"no cuda code here") == []
