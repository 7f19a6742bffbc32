#!/usr/bin/env bash
# Copy MNIST and Fashion-MNIST (their four idx files each) from wherever natasha_ext.data finds
# them here into .gpu_data/ (ignored by git), so that they travel with the checkout to a GPU
# machine that can download nothing (device tool: carry [".gpu_data"]); tools/gpu_check.sh then
# points NATASHA_EXT_MNIST_DIR / NATASHA_EXT_FASHION_MNIST_DIR at them.
#   tools/stage_gpu_data.sh [DEST]        (default DEST: .gpu_data)
# PYTHON picks the interpreter (default: $NATASHA_VENV/bin/python, .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_data}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${NATASHA_VENV:-}" ] && [ -x "$NATASHA_VENV/bin/python" ]; then PY=$NATASHA_VENV/bin/python
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}

# prints the folder data.py reads a dataset from, after checking its files' md5
FIND='
import sys
from natasha_ext import data

for split in ("train", "test"):
    data.load_raw(sys.argv[1], split)
print(data.dataset_dir(sys.argv[1]))
'
missing=0
for name in mnist fashion-mnist; do
  if ! folder=$("$PY" -c "$FIND" "$name"); then
    echo "stage_gpu_data: $name not found here (see the error above); the runs that need it will fail there" >&2
    missing=1
    continue
  fi
  mkdir -p "$DEST/$name"
  n=0
  for f in "$folder"/*-idx?-ubyte "$folder"/*-idx?-ubyte.gz; do
    [ -f "$f" ] && cp -p "$f" "$DEST/$name/" && n=$((n + 1))
  done
  echo "$name: $n files, $(du -sh "$DEST/$name" | cut -f1) in $DEST/$name (from $folder)"
done
echo "total $(du -sh "$DEST" | cut -f1) (the device tool carries at most 64 MiB with the working tree)"
exit $missing
