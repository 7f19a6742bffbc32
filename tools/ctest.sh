#!/usr/bin/env bash
# Configure + build csrc/ against libtorch with CMake and run the C++ tests (ctest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
B=${NATASHA_CMAKE_BUILD:-build/cmake}
PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ARGS=(-DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release)
if $PY -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  # A CUDA build of torch makes its CMake config look for the toolkit; point it at a real one
  # (a /usr/local/bin/nvcc wrapper script misleads FindCUDA) and at pip's nvrtc when needed.
  HOME_CUDA=${CUDA_HOME:-}
  if [ -z "$HOME_CUDA" ]; then
    for d in /usr/local/cuda /usr/local/cuda-*; do [ -x "$d/bin/nvcc" ] && HOME_CUDA=$d && break; done
  fi
  [ -n "$HOME_CUDA" ] && ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="$HOME_CUDA" -DCMAKE_CUDA_COMPILER="$HOME_CUDA/bin/nvcc")
  NVRTC=$(ls "$SITE"/nvidia/cu*/lib/libnvrtc.so* 2>/dev/null | head -1 || true)
  [ -n "$NVRTC" ] && ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
  [ -d "$SITE/nvidia/cu13/include" ] && ARGS+=(-DCMAKE_CXX_FLAGS="-I$SITE/nvidia/cu13/include")
fi
mkdir -p "$B"
cmake -S . -B "$B" "${ARGS[@]}" > "$B.configure.log" 2>&1 || { cat "$B.configure.log"; exit 1; }
cmake --build "$B" -j"${MAX_JOBS:-2}"
ctest --test-dir "$B" --output-on-failure
