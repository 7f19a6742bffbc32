#!/usr/bin/env bash
# One prepared run on a bare GPU machine: build, verify, measure, reproduce.
#
#   tools/gpu_check.sh [--dry-run] [--stages LIST] [--bundle DIR] OUT_DIR
#
# Stages, in this order, each under its own time limit (`timeout`), each writing its log and
# results into OUT_DIR as soon as it ends; a failed stage never stops the next one:
#   build     build the extension in place for this GPU's architecture only
#             (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability(), MAX_JOBS = all cores),
#             against the installed torch, offline (python setup.py build_ext --inplace)
#   selftest  python -m natasha_ext --json OUT_DIR/selftest.json (every op and optimizer, cpu + cuda)
#   tests     the CUDA tests (pytest -k cuda: tests marked or parametrised cuda) with junit xml
#   memcheck  compute-sanitizer --tool memcheck on the quick CUDA self-test (a note when absent/refused)
#   bench     python -m benchmarks on cuda: every op, copy bandwidth, HVP engines, a step of every optimizer
#   repro     with the time left: the paper reproductions at full scale, one seed per run, each
#             finished seed appended to OUT_DIR/repro/*.csv (a cut-off run keeps its finished seeds)
# OUT_DIR/summary.md lists every stage's status and time; it is rewritten after each stage.
#
# --dry-run     the same stages on CPU with tiny sizes (CPU-only build, skipped when the built
#               extension is newer than csrc/ and setup.py; quick CPU self-test; the cuda tests
#               collected and skipped; a short benchmark; the smallest reproductions); CI runs it
#               so that this script cannot rot before the day a GPU is there.
# --stages L    comma list of the stages to run (default: all, in the order above)
# --bundle DIR  after every stage also write DIR/gpu_check.tar.gz (all of OUT_DIR) and DIR/summary.md:
#               two files, for a runner that returns only a few files (DIR must not be OUT_DIR)
# Environment:  PYTHON (default: $NATASHA_VENV/bin/python, .venv/bin/python, else python3);
#               GPU_CHECK_BUDGET_S: wall-clock budget of the whole run (default 530 s; dry run 330 s);
#               the datasets come from .gpu_data/ when tools/stage_gpu_data.sh put them there.
#
# On the project's lent GPU machine (device tool), with the data staged here first
# (tools/stage_gpu_data.sh):  command "bash tools/gpu_check.sh --bundle $OUT /tmp/gpu_check",
# carry [".gpu_data"], timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
BUNDLE=""
STAGES="build,selftest,tests,memcheck,bench,repro"
OUT_ARG=""
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages) STAGES=${2:?--stages needs a list}; shift ;;
    --bundle) BUNDLE=${2:?--bundle needs a folder}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$OUT_ARG" ] || { echo "gpu_check: one OUT_DIR only (got $OUT_ARG and $1)" >&2; exit 2; }
       OUT_ARG=$1 ;;
  esac
  shift
done
[ -n "$OUT_ARG" ] || { echo "gpu_check: OUT_DIR is required" >&2; usage >&2; exit 2; }
for s in ${STAGES//,/ }; do
  case ",build,selftest,tests,memcheck,bench,repro," in *",$s,"*) ;;
    *) echo "gpu_check: unknown stage '$s' (stages: build,selftest,tests,memcheck,bench,repro)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_ARG" || exit 2
OUT=$(cd "$OUT_ARG" && pwd)
if [ -n "$BUNDLE" ]; then
  mkdir -p "$BUNDLE" || exit 2
  BUNDLE=$(cd "$BUNDLE" && pwd)
  [ "$BUNDLE" != "$OUT" ] || { echo "gpu_check: --bundle must be another folder than OUT_DIR" >&2; exit 2; }
fi

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${NATASHA_VENV:-}" ] && [ -x "$NATASHA_VENV/bin/python" ]; then PY=$NATASHA_VENV/bin/python
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=$(command -v python3)
fi
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
export PY OUT ROOT DRY
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -d .gpu_data/mnist ] && export NATASHA_EXT_MNIST_DIR=${NATASHA_EXT_MNIST_DIR:-$ROOT/.gpu_data/mnist}
[ -d .gpu_data/fashion-mnist ] && \
  export NATASHA_EXT_FASHION_MNIST_DIR=${NATASHA_EXT_FASHION_MNIST_DIR:-$ROOT/.gpu_data/fashion-mnist}
NPROC=$(nproc)
export NPROC
if [ "$DRY" = 1 ]; then DEV=cpu; BUDGET=${GPU_CHECK_BUDGET_S:-330}; else DEV=cuda; BUDGET=${GPU_CHECK_BUDGET_S:-530}; fi
export DEV
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))

# ------------------------------------------------------------------------------ bookkeeping
ORDER=(build selftest tests memcheck bench repro)
declare -A STATUS SECONDS_USED LIMIT NOTE
# seconds kept free for the later stages (their floor), so an early stage cannot eat them all
declare -A FLOOR=([build]=0 [selftest]=45 [tests]=30 [memcheck]=0 [bench]=45 [repro]=0)
declare -A CAP
if [ "$DRY" = 1 ]; then CAP=([build]=900 [selftest]=150 [tests]=240 [memcheck]=60 [bench]=240 [repro]=300)
else CAP=([build]=280 [selftest]=150 [tests]=110 [memcheck]=75 [bench]=150 [repro]=600)
fi
for s in "${ORDER[@]}"; do STATUS[$s]="not run"; SECONDS_USED[$s]=""; LIMIT[$s]=""; NOTE[$s]=""; done
for s in ${STAGES//,/ }; do STATUS[$s]="pending"; done

floor_after() {  # seconds the selected stages after $1 keep in reserve
  local after=0 sum=0 s
  for s in "${ORDER[@]}"; do
    if [ "$after" = 1 ] && [ "${STATUS[$s]}" = pending ]; then sum=$((sum + ${FLOOR[$s]})); fi
    [ "$s" = "$1" ] && after=1
  done
  echo "$sum"
}

write_summary() {
  local now machine
  now=$(date +%s)
  machine=$(cat "$OUT/machine.txt" 2>/dev/null | tr '\n' ' ')
  {
    echo "# gpu_check $([ "$DRY" = 1 ] && echo "dry run (CPU, tiny sizes)" || echo "GPU run") — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$machine"
    echo
    echo "Elapsed $((now - T0)) s of a $BUDGET s budget. Logs and results: files named in the last column."
    echo
    echo "| stage | status | seconds | limit | output | note |"
    echo "|---|---|---:|---:|---|---|"
    for s in "${ORDER[@]}"; do
      echo "| $s | ${STATUS[$s]} | ${SECONDS_USED[$s]} | ${LIMIT[$s]} | $(stage_files "$s") | ${NOTE[$s]} |"
    done
  } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
  if [ -n "$BUNDLE" ]; then
    tar -czf "$BUNDLE/gpu_check.tar.gz.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>/dev/null &&
      mv "$BUNDLE/gpu_check.tar.gz.tmp" "$BUNDLE/gpu_check.tar.gz"
    cp "$OUT/summary.md" "$BUNDLE/summary.md"
  fi
}

stage_files() {
  case "$1" in
    build) echo "build.log" ;;
    selftest) echo "selftest.log, selftest.json" ;;
    tests) echo "tests.log, cuda_tests.xml" ;;
    memcheck) echo "memcheck.log, memcheck_selftest.json" ;;
    bench) echo "bench.log, benchmarks/" ;;
    repro) echo "repro.log, repro/" ;;
  esac
}

# run_stage NAME FUNCTION: the function runs under `timeout` with its output in OUT/NAME.log
run_stage() {
  local name=$1 fn=$2 now left limit start rc
  case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
  now=$(date +%s)
  left=$((DEADLINE - now - $(floor_after "$name")))
  limit=${CAP[$name]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    STATUS[$name]="skipped"; NOTE[$name]="no time left in the $BUDGET s budget"
    write_summary; return 0
  fi
  LIMIT[$name]=$limit
  STATUS[$name]="running"
  write_summary
  echo "==> $name (limit $limit s)"
  start=$(date +%s)
  export STAGE_DEADLINE=$((start + limit))
  timeout --kill-after=10 "$limit" bash -c "$fn" > "$OUT/$name.log" 2>&1
  rc=$?
  SECONDS_USED[$name]=$(($(date +%s) - start))
  if [ "$rc" = 0 ]; then STATUS[$name]="ok"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then STATUS[$name]="TIMEOUT"
  elif [ "$rc" = 3 ]; then STATUS[$name]="skipped"
  else STATUS[$name]="FAILED (exit $rc)"
  fi
  local note
  note=$(grep -a '^NOTE: ' "$OUT/$name.log" | tail -3 | sed 's/^NOTE: //' | tr '\n' ' ' | tr '|' '/')
  NOTE[$name]=${note:-$(grep -av '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-160 | tr '|' '/')}
  echo "    ${STATUS[$name]} in ${SECONDS_USED[$name]} s: ${NOTE[$name]}"
  write_summary
}

# ------------------------------------------------------------------------------ the stages
# Each runs in its own bash (under timeout): they read PY, OUT, ROOT, DRY, DEV, NPROC, STAGE_DEADLINE.
stage_build() {
  set -e
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  if [ "$DRY" = 1 ]; then
    export NATASHA_EXT_NO_CUDA=1
  else
    nvidia-smi || true
    command -v nvcc >/dev/null && nvcc --version | tail -2
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}')")
    export TORCH_CUDA_ARCH_LIST
    echo "NOTE: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  fi
  local so
  so=$(ls natasha_ext/_C*.so 2>/dev/null | head -1)
  if [ "$DRY" = 1 ] && [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" | head -1)" ]; then
    # CI has just built it (tools/bootstrap.sh): rebuilding from scratch costs minutes on 2 cores
    echo "NOTE: $so is newer than csrc/ and setup.py: up to date, not rebuilt"
  else
    MAX_JOBS=$NPROC "$PY" setup.py build_ext --inplace
  fi
  "$PY" -c "
from natasha_ext import _backend
print('NOTE: fused devices', sorted(_backend.FUSED_DEVICES))
assert _backend.LOADED, _backend.LOAD_ERROR
assert $([ "$DRY" = 1 ] && echo "'cpu'" || echo "'cuda'") in _backend.FUSED_DEVICES, 'kernels for $DEV missing'"
}

stage_selftest() {
  if [ "$DRY" = 1 ]; then "$PY" -m natasha_ext --device cpu --quick --json "$OUT/selftest.json"
  else "$PY" -m natasha_ext --verbose --json "$OUT/selftest.json"
  fi
  local rc=$?
  echo "NOTE: $(grep -a ' passed, .* failed, ' "$OUT/selftest.log" | tail -1)"
  return $rc
}

stage_tests() {
  # -k matches test names, parametrisations and markers: every test marked or parametrised cuda
  # (a module that cannot be imported there, e.g. for want of a package, costs only its own tests)
  "$PY" -m pytest tests -q -rs -k cuda -p no:cacheprovider --continue-on-collection-errors \
    --junitxml "$OUT/cuda_tests.xml"
  local rc=$?
  echo "NOTE: $(grep -aE '[0-9]+ (passed|failed|skipped|error)' "$OUT/tests.log" | tail -1)"
  return $rc
}

stage_memcheck() {
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ "$DRY" = 1 ]; then echo "NOTE: no GPU in a dry run"; return 3; fi
  if [ -z "$cs" ]; then echo "NOTE: compute-sanitizer not found"; return 3; fi
  # without torch's caching allocator every tensor is its own allocation, so an overrun is seen
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 99 --print-limit 50 \
    "$PY" -m natasha_ext --device cuda --quick --json "$OUT/memcheck_selftest.json"
  local rc=$?
  if grep -aqE "Device not supported|not supported on this|error 999" "$OUT/memcheck.log"; then
    echo "NOTE: compute-sanitizer refused the device (see memcheck.log)"; return 3
  fi
  echo "NOTE: $(grep -aE 'ERROR SUMMARY|passed, .* failed' "$OUT/memcheck.log" | tail -2 | tr '\n' ' ')"
  return $rc
}

bench_args() {  # the wanted flags that this version of `python -m benchmarks` has
  local help want=() flag
  help=$("$PY" -m benchmarks --help 2>/dev/null)
  while [ $# -gt 0 ]; do
    flag=$1
    if [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; then  # a flag with a value
      grep -q -- "$flag" <<< "$help" && want+=("$flag" "$2") || echo "NOTE: benchmarks has no $flag" >&2
      shift 2
    else
      grep -q -- "$flag" <<< "$help" && want+=("$flag") || echo "NOTE: benchmarks has no $flag" >&2
      shift
    fi
  done
  echo "${want[@]}"
}

stage_bench() {
  local args
  if [ "$DRY" = 1 ]; then
    args=$(bench_args --quick --device cpu --models squeezenet1_1 --ops global_norm,svrg_step --out "$OUT/benchmarks")
  else
    args=$(bench_args --device cuda --hvp --e2e --out "$OUT/benchmarks")
  fi
  echo "python -m benchmarks $args"
  # shellcheck disable=SC2086  (the arguments hold no spaces)
  "$PY" -m benchmarks $args
}

append_csv() {  # append_csv SEED SRC DST: SRC's rows to DST with a leading run_seed column, the header once
  [ -f "$2" ] || return 0
  if [ -f "$3" ]; then tail -n +2 "$2" | sed "s/^/$1,/" >> "$3"
  else { head -1 "$2" | sed 's/^/run_seed,/'; tail -n +2 "$2" | sed "s/^/$1,/"; } > "$3"
  fi
}

# repro_seeds NAME SHARE_S "SEEDS" CSV... -- COMMAND...: one run per seed (the seed replaces {seed},
# its folder {out}) until SHARE_S seconds are spent; each finished run's CSVs are appended to
# OUT/repro/NAME_<csv> (a run cut off by the time limit adds nothing)
repro_seeds() {
  local name=$1 share=$2 seeds=$3 csvs=() cmd=() seed start until left rc dir
  shift 3
  while [ "$1" != "--" ]; do csvs+=("$1"); shift; done
  shift
  start=$(date +%s)
  until=$((start + share))
  [ "$until" -gt "$STAGE_DEADLINE" ] && until=$STAGE_DEADLINE
  for seed in $seeds; do
    left=$((until - $(date +%s)))
    if [ "$left" -lt 20 ]; then echo "$name: no time for seed $seed" | tee -a "$OUT/repro/seeds.txt"; break; fi
    dir="$OUT/repro/$name/seed$seed"
    mkdir -p "$dir"
    cmd=()
    for a in "$@"; do a=${a//\{seed\}/$seed}; cmd+=("${a//\{out\}/$dir}"); done
    local t=$(date +%s)
    timeout --kill-after=5 "$left" "$PY" "${cmd[@]}" > "$dir/log.txt" 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then
      for c in "${csvs[@]}"; do append_csv "$seed" "$dir/$c" "$OUT/repro/${name}_$c"; done
      echo "$name seed $seed: ok in $(($(date +%s) - t)) s" | tee -a "$OUT/repro/seeds.txt"
    else
      echo "$name seed $seed: exit $rc after $(($(date +%s) - t)) s (see $name/seed$seed/log.txt)" | tee -a "$OUT/repro/seeds.txt"
      [ "$rc" = 124 ] && break
    fi
  done
}

stage_repro() {
  mkdir -p "$OUT/repro"
  local total=$((STAGE_DEADLINE - $(date +%s)))
  if [ "$DRY" = 1 ]; then
    repro_seeds adahessian_table1 $((total * 4 / 10)) "0" history.csv summary.csv -- \
      python/adahessian_table1.py --device cpu --threads 1 --no-progress --seeds {seed} --epochs 1 \
      --subset 40/20/20 --batch-size 20 --only sgd,adahessian --out {out}
    repro_seeds ang_table1 $(((STAGE_DEADLINE - $(date +%s)) * 45 / 100)) "0" timing.csv -- \
      python/ang_table1.py --device cpu --threads 1 --no-progress --seed {seed} --skip-curves --timing-iters 2 \
      --width 4 --batch-size 4 --dataset mnist --out {out}
    repro_seeds trust_region_fig3 $((STAGE_DEADLINE - $(date +%s))) "0" runs.csv history.csv -- \
      python/trust_region_fig3.py --device cpu --threads 1 --no-progress --no-plot --seeds {seed} \
      --problems mnist-mlp --max-epochs 1 --subset 100/0/50 --only tr-ellipsoidal,sgd --out {out}
  else
    # the papers' settings: AdaHessian Table I/II (10 seeds x 15 epochs), ANG Table 1 timing on the
    # real ResNet-18 (a measured 391-iteration epoch), trust-region Fig. 3 on full MNIST/Fashion-MNIST
    # (MLP and CNN problems, one run per problem and seed)
    repro_seeds adahessian_table1 $((total * 4 / 10)) "0 1 2 3 4 5 6 7 8 9" history.csv summary.csv -- \
      python/adahessian_table1.py --device cuda --no-progress --seeds {seed} --out {out}
    repro_seeds ang_table1 $(((STAGE_DEADLINE - $(date +%s)) * 45 / 100)) "0 1 2" timing.csv -- \
      python/ang_table1.py --device cuda --no-progress --full --skip-curves --seed {seed} --out {out}
    local problem
    for seed in 0 1 2 3 4 5 6 7 8 9; do
      for problem in mnist-mlp mnist-cnn fashion-mlp fashion-cnn; do
        [ $((STAGE_DEADLINE - $(date +%s))) -ge 30 ] || break 2
        repro_seeds "trust_region_fig3_$problem" $((STAGE_DEADLINE - $(date +%s))) "$seed" runs.csv history.csv -- \
          python/trust_region_fig3.py --device cuda --no-progress --no-plot --full --problems "$problem" \
          --seeds {seed} --out {out}
      done
    done
  fi
  local done_runs other
  done_runs=$(grep -c ': ok in' "$OUT/repro/seeds.txt" 2>/dev/null)
  other=$(grep -vc ': ok in' "$OUT/repro/seeds.txt" 2>/dev/null)
  echo "NOTE: ${done_runs:-0} runs finished, ${other:-0} not (repro/seeds.txt)"
}

export -f stage_build stage_selftest stage_tests stage_memcheck stage_bench bench_args append_csv repro_seeds stage_repro

{
  echo "machine: $(hostname), $NPROC cores, $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
  echo "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1))"
} > "$OUT/machine.txt"
echo "gpu_check: $([ "$DRY" = 1 ] && echo "dry run" || echo "GPU run") into $OUT (budget $BUDGET s, stages $STAGES)"
cat "$OUT/machine.txt"
write_summary
run_stage build stage_build
run_stage selftest stage_selftest
run_stage tests stage_tests
run_stage memcheck stage_memcheck
run_stage bench stage_bench
run_stage repro stage_repro
echo
cat "$OUT/summary.md"
for s in "${ORDER[@]}"; do
  case "${STATUS[$s]}" in FAILED*|TIMEOUT) exit 1 ;; esac
done
exit 0
