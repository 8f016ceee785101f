#!/usr/bin/env bash
# GPU check of fastkd's CUDA kernels: run on a machine with an NVIDIA GPU (Python with a CUDA torch,
# nvcc, cmake, ninja, scikit-build-core and pybind11 installed; no network needed). From the
# repository root:
#
#     bash scripts/gpu_check.sh
#
# Stages, each time-limited, the next one running whatever the last one did:
#   env        nvidia-smi and versions
#   build      pip install --no-build-isolation --no-deps -e . into the current python, sm_90 only
#   tests      pytest -m cuda (tests/test_cuda.py: float64 reference, gradcheck, opcheck, compile,
#              CUDA graphs, ...; tests/test_cuda_rows.py and tests/test_cuda_sparse.py: the distill_rows
#              and sparse_distill_rows kernels)
#   sanitizer  scripts/cuda_smoke.py alone, then under compute-sanitizer --tool memcheck; then
#              racecheck (shared memory) and synccheck (barriers) on its small cases, which include
#              the thread-block cluster path with the KL refinement
#   bench      benchmarks/bench_loss.py on the headline case (N=8192, V=128256, bf16, T=2,
#              alpha=0.5) against torch.compile and Liger; benchmarks/bench_fused_linear.py at
#              8192 x 4096 -> 128256 bf16 against the matmuls alone and Liger; the top-k teacher
#              (K=64) against the dense teacher and scatter-to-dense; then fp32 / V=32000 /
#              N=32768 vs eager, then every divergence at the headline shape (the generic rows
#              kernel) vs eager
# Logs and results go to $OUT: gpu_check.log (this output), build.log, tests.log, sanitizer.log,
# h200.json / .md / .png, h200-fused-linear.json / .md / .png, h200-sparse-teacher.json / .md and
# h200-extra.md. The whole run stays under 8 minutes (GPU_CHECK_BUDGET seconds, default 465).
#
# Liger-Kernel for the comparison (optional): put its wheel (pure Python; it needs triton, which
# torch brings) in the git-ignored folder .whl/ at the repository root, e.g.
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel
#
# A dry run without a GPU (checks the script itself; GPU stages are skipped):
#     OUT=/tmp/gpu-check PYTHON=.venv/bin/python SKIP_BUILD=1 bash scripts/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-465}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
declare -a SUMMARY=()

exec > >(tee -a "$OUT/gpu_check.log") 2>&1

# seconds a stage may take: its own limit, or what is left of the budget
limit() {
  local want=$1 left=$((DEADLINE - $(date +%s)))
  ((left < want)) && want=$left
  echo "$want"
}

# stage NAME LIMIT LOG COMMAND...: runs COMMAND under timeout, its output to LOG (and a tail here)
stage() {
  local name=$1 want=$2 log=$3
  shift 3
  local t
  t=$(limit "$want")
  if ((t < 15)); then
    SUMMARY+=("$name: SKIPPED (budget spent)")
    echo "== $name: skipped, budget spent"
    return 0
  fi
  echo "== $name (limit ${t}s): $*"
  local s=$(date +%s) rc
  timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1
  rc=$?
  local took=$(($(date +%s) - s))
  local status="ok"
  ((rc == 124 || rc == 137)) && status="TIMEOUT"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
  SUMMARY+=("$name: $status in ${took}s, log $(basename "$log")")
  echo "-- $name: $status in ${took}s; last lines of $(basename "$log"):"
  tail -n 25 "$log"
  return 0
}

echo "== env ($(date -u +%FT%TZ))"
nvidia-smi || echo "nvidia-smi: not available"
$PY --version
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || echo "torch: import failed"
nvcc --version | tail -n 2 || echo "nvcc: not found"
cmake --version | head -n 1 || echo "cmake: not found"
compute-sanitizer --version | head -n 2 || echo "compute-sanitizer: not found"
git log --oneline -1 2>/dev/null || true

HAS_GPU=${GPU_CHECK_FORCE:-0}  # GPU_CHECK_FORCE=1: run the GPU stages anyway (dry runs of this script)
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && HAS_GPU=1

# Liger-Kernel wheels in .whl/ (see the top of this file)
if compgen -G ".whl/*.whl" >/dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "liger: installed from .whl into /tmp/site"
  else
    echo "liger: install from .whl failed; the benchmark will skip it"
  fi
else
  echo "liger: no .whl/ folder; the benchmark will skip Liger-Kernel"
fi

# ---- build: in place, into the system python, for sm_90 only (fast); no build isolation, no network
if [[ ${SKIP_BUILD:-0} == 1 ]]; then
  SUMMARY+=("build: SKIPPED (SKIP_BUILD=1)")
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTKD_CUDA=on
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  stage build 240 "$OUT/build.log" $PY -m pip install -v --no-index --no-build-isolation --no-deps -e .
fi
$PY -c "import fastkd; print('build_info', fastkd.build_info())" || echo "fastkd: import failed"

if ((HAS_GPU)); then
  # ---- tests
  stage tests 150 "$OUT/tests.log" $PY -m pytest -q -m cuda -p no:cacheprovider --durations=15 tests

  # ---- the smoke case alone, then under memcheck (one cudaMalloc per tensor: exact bounds)
  stage smoke 40 "$OUT/sanitizer.log" $PY scripts/cuda_smoke.py
  stage sanitizer 70 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 1 $PY scripts/cuda_smoke.py
  # shared-memory races and barrier misuse (block and cluster barriers): slower checks, small cases
  stage racecheck 60 "$OUT/sanitizer.log" compute-sanitizer --tool racecheck --racecheck-report all \
    --error-exitcode 1 $PY scripts/cuda_smoke.py --small
  stage synccheck 40 "$OUT/sanitizer.log" compute-sanitizer --tool synccheck --error-exitcode 1 \
    $PY scripts/cuda_smoke.py --small

  # ---- benchmark: the headline case against every peer, then more shapes against eager only
  stage bench 130 "$OUT/bench.log" $PY benchmarks/bench_loss.py --device cuda --results-dir "$OUT" \
    --machine h200 --shapes 8192x128256 --dtypes bf16 --no-sweep --repeats 10
  # fused linear at an LLM head (8192 tokens, H 4096 -> V 128256, bf16) against the matmuls alone and
  # Liger's fused-linear JSD (beta = 0)
  stage bench-fused-linear 90 "$OUT/bench.log" $PY benchmarks/bench_fused_linear.py --device cuda --dtype bf16 \
    --n 8192 --h-student 4096 --h-teacher 4096 --vocab 128256 --sweep 4096,8192,16384 --rounds 5 \
    --sweep-rounds 3 --no-liger-eager --no-liger-sweep --load-limit 1e9 --out "$OUT" --machine h200-fused-linear
  stage bench-sparse 40 "$OUT/bench.log" $PY benchmarks/bench_sparse_teacher.py --device cuda --dtype bf16 \
    --n 8192 --vocab 128256 --k 64 --rounds 5 --load-limit 1e9 --out "$OUT" --machine h200-sparse-teacher
  stage bench-extra 50 "$OUT/bench.log" $PY benchmarks/bench_loss.py --device cuda --results-dir "$OUT" \
    --machine h200-extra --shapes 8192x128256,4096x32000,32768x128256 --dtypes bf16,fp32 --no-sweep \
    --no-compile --no-liger --repeats 5
  stage bench-divergences 45 "$OUT/bench.log" $PY benchmarks/bench_loss.py --device cuda --results-dir "$OUT" \
    --machine h200-divergences --shapes 8192x128256 --dtypes bf16 --divergences all --no-sweep \
    --no-compile --no-liger --repeats 5
  rm -f "$OUT/h200-extra.json" "$OUT/h200-extra.png"  # its table is enough
  # bench.log holds the printed tables, which the .md files repeat: fold it into gpu_check.log
  if [[ -f $OUT/bench.log ]]; then
    echo "== bench.log"
    cat "$OUT/bench.log"
    rm -f "$OUT/bench.log"
  fi
else
  SUMMARY+=("tests, sanitizer, bench: SKIPPED (no CUDA device)")
fi

echo "== summary ($(($(date +%s) - START))s of ${BUDGET}s)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [[ -f $OUT/tests.log ]]; then
  echo "  tests: $(grep -E '[0-9]+ (passed|failed|skipped|deselected|error)' "$OUT/tests.log" | tail -n 1)"
fi
echo "  files in $OUT:"
ls -la "$OUT"
