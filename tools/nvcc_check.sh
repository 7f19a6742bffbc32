#!/usr/bin/env bash
# Compile-check CUDA sources alone (sm_90 only, object to /tmp), without relinking the extension:
#   bash tools/nvcc_check.sh csrc/cuda/foo.cu [more.cu ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TI=$($PY -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))" 2>/dev/null)
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
for f in "$@"; do
  echo "nvcc: $f"
  $NVCC -c "$f" -o /tmp/nvcc_check_$$.o -Icsrc/include -I"$SITE/nvidia/cu13/include" $TI \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC -O3 \
    -DNATASHA_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -gencode=arch=compute_90,code=sm_90 -std=c++20
done
rm -f /tmp/nvcc_check_$$.o
echo "nvcc check OK"
