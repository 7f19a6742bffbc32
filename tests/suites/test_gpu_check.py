"""tools/gpu_check.sh's plumbing (CI runs its whole --dry-run in .ci/run): usage errors, the
summary rewritten after each stage, the bundle, and a skipped stage that does not fail the run."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _run(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_usage_errors_exit_2(tmp_path):
    assert _run().returncode == 2
    bad = _run("--stages", "build,magic", str(tmp_path / "o"))
    assert bad.returncode == 2 and "unknown stage 'magic'" in bad.stderr
    assert _run("--frobnicate", str(tmp_path)).returncode == 2
    same = _run("--bundle", str(tmp_path), str(tmp_path))
    assert same.returncode == 2 and "another folder" in same.stderr


def test_a_skipped_stage_is_summarised_and_bundled(tmp_path):
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    proc = _run("--dry-run", "--stages", "memcheck", "--bundle", str(bundle), str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["memcheck"][0] == "skipped" and rows["memcheck"][4] == "no GPU in a dry run"
    assert all(rows[s][0] == "not run" for s in ("build", "selftest", "tests", "bench", "repro"))
    assert (bundle / "summary.md").read_text() == (out / "summary.md").read_text()
    with tarfile.open(bundle / "gpu_check.tar.gz") as tar:
        assert {"out/summary.md", "out/memcheck.log", "out/machine.txt"} <= set(tar.getnames())
