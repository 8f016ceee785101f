#!/usr/bin/env bash
# GPU check of fastkd's CUDA kernels: run on a machine with an NVIDIA GPU (Python with a CUDA torch,
# nvcc, cmake, ninja, scikit-build-core, pybind11, pytest and hypothesis installed; no network
# needed). From the repository root:
#
#     bash scripts/gpu_check.sh            # the check (one sitting of at most 9 minutes)
#     bash scripts/gpu_check.sh --plan     # print the stages and their limits, run nothing
#
# The stages run in the order of what a first run must learn, each under its own time limit (a
# stage that hangs or runs long is stopped there and the next one starts): the stages up to the
# sanitizers are sized so that all of them run even when every one of them takes its whole limit;
# the benchmarks and the slow tests after them get what is left of GPU_CHECK_BUDGET (default 500 s),
# and the last of them are skipped when it is spent. A summary at the end says what ran, passed,
# failed, timed out or was skipped. The exit status is 1 when a stage failed or timed out.
#
#   env                 GPU, driver, torch, nvcc, cmake, compute-sanitizer, the Python packages
#   build               pip install --no-build-isolation --no-deps -e ., CUDA for sm_90 only
#   tests-first         pytest -m "cuda and not slow": the kernel the dispatcher picks (first), then
#                       every op x dtype x divergence against float64 at small shapes, the 128k
#                       vocabulary, masks, the CPU kernel, CUDA graphs and no host sync in-process
#   tests-capture       the first calls of a fresh process captured in a CUDA graph
#   smoke               scripts/cuda_smoke.py: each kernel reached (resident on one CTA and on a
#                       cluster, stream, stream-warp, the generic rows kernel, the sparse kernel)
#   memcheck            the smoke cases under compute-sanitizer --tool memcheck
#   racecheck           one small case per kernel under racecheck (shared memory), then
#   synccheck           under synccheck (block and cluster barriers)
#   bench               benchmarks/bench_loss.py, the headline (N=8192, V=128256, bf16, T=2,
#                       alpha=0.5) against torch.compile and Liger
#   tests-slow          pytest -m "cuda and slow": torch.compile, opcheck, device-side asserts
#   bench-fused-linear  benchmarks/bench_fused_linear.py at 8192 x 4096 -> 128256 bf16
#   bench-sparse        benchmarks/bench_sparse_teacher.py, a K=64 top-k teacher at the headline shape
#   bench-trl           benchmarks/bench_trl.py --mode loss: fastkd's fused linear loss against TRL's
#                       ChunkedDivergenceFunction (forward KL, JSD) at 8192 x 4096 -> 128256 bf16
#                       (skipped when trl does not import)
#   bench-extra         bf16 / fp32 at V=128256, 32000 and N=32768 against eager
#   bench-divergences   every divergence at the headline shape (the generic rows kernel) vs eager
#   fsdp2               scripts/fsdp2_gpu_smoke.py: DistillationTrainer(fused_linear=True) under
#                       accelerate's own FSDP2 plugin (accelerate launch, 1 process), 2 steps of a tiny
#                       Llama pair, loss and parameters against the same run without FSDP
#
# Everything lands in $OUT (default ./gpu-check-out): gpu_check.log (this output), one log per stage
# (<stage>.log), the pytest tiers' JUnit XML (<stage>.xml) and the benchmark results named after the
# GPU (h100.json / .md / .png, h100-fused-linear.*, h100-sparse-teacher.*, h100-extra.md,
# h100-divergences.*, h100-trl.*; "h200-..." on an H200), and the fsdp2 stage's accelerate config
# (fsdp2-accelerate.yaml) and reference run (fsdp2-reference.pt).
#
# Liger-Kernel for the comparison (optional): put its wheel (pure Python; it needs triton, which
# torch brings) in the git-ignored folder .whl/ at the repository root, e.g.
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel
#
# Dry runs without a GPU (check the script itself):
#     OUT=/tmp/gpu-check PYTHON=.venv/bin/python SKIP_BUILD=1 bash scripts/gpu_check.sh
# skips the GPU stages; with GPU_CHECK_FORCE=1 they run anyway: the pytest tiers collect their tests
# (all skipped), the smoke cases run on the CPU, the sanitizers need compute-sanitizer, and the
# benchmarks stop at their first CUDA call (failures that do not count without a GPU). Results of a
# dry run are labelled "no-gpu".
set -uo pipefail
export PYTHONUNBUFFERED=1

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-500}  # one 540 s sitting, less a margin for start-up and the summary
KILL_AFTER=5                     # seconds between a stage's SIGINT (pytest prints its summary) and SIGKILL
MIN_STAGE=15                     # a stage with less time left than this is skipped
START=$(date +%s)
DEADLINE=$((START + BUDGET))

# ---------------------------------------------------------------- the plan
# name, limit in seconds, guaranteed (1: sized into the budget; 0: gets what is left), what it runs
STAGES=(
  "env 25 1 versions: GPU, driver, torch, nvcc, cmake, compute-sanitizer, Python packages"
  "build 170 1 pip install -e . with the CUDA kernels"
  "tests-first 75 1 pytest -m 'cuda and not slow': kernel choice, every op x dtype x divergence, graphs"
  "tests-capture 35 1 pytest -m 'cuda and slow' -k capture: a fresh process's first calls captured"
  "smoke 30 1 scripts/cuda_smoke.py: every kernel reached, errors vs float64"
  "memcheck 70 1 compute-sanitizer memcheck on the smoke cases"
  "racecheck 45 1 compute-sanitizer racecheck, one small case per kernel"
  "synccheck 30 1 compute-sanitizer synccheck, one small case per kernel"
  "bench 100 0 bench_loss.py headline 8192x128256 bf16 vs torch.compile and Liger"
  "tests-slow 70 0 pytest -m 'cuda and slow' -k 'not capture': compile, opcheck, device asserts"
  "bench-fused-linear 70 0 bench_fused_linear.py 8192 x 4096 -> 128256 bf16"
  "bench-sparse 35 0 bench_sparse_teacher.py K=64 at 8192x128256 bf16"
  "bench-trl 45 0 bench_trl.py --mode loss: fastkd vs TRL's chunked loss, 8192 x 4096 -> 128256 bf16"
  "bench-extra 45 0 bench_loss.py bf16 / fp32 at 8192x128256, 4096x32000, 32768x128256 vs eager"
  "bench-divergences 45 0 bench_loss.py every divergence at 8192x128256 bf16 vs eager"
  "fsdp2 40 0 scripts/fsdp2_gpu_smoke.py: DistillationTrainer under accelerate's FSDP2, vs no FSDP"
)
declare -A LIMIT=() GUARANTEED=() PURPOSE=()
ORDER=()
for entry in "${STAGES[@]}"; do
  read -r name seconds sure purpose <<<"$entry"
  ORDER+=("$name")
  LIMIT[$name]=$seconds
  GUARANTEED[$name]=$sure
  PURPOSE[$name]=$purpose
done
declare -A STATUS=() DETAIL=()

print_plan() {
  local name sure_total=0
  echo "== plan: budget ${BUDGET}s; each stage runs under min(its limit, what is left), in this order"
  for name in "${ORDER[@]}"; do
    printf "   %-19s %4ss %-6s %s\n" "$name" "${LIMIT[$name]}" "$(plan_mark "$name")" "${PURPOSE[$name]}"
    ((GUARANTEED[$name])) && sure_total=$((sure_total + LIMIT[$name]))
  done
  echo "   stages up to synccheck: ${sure_total}s at most, so all of them run; the rest get what is left"
  [[ ${SKIP_BUILD:-0} == 1 ]] || echo "   build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}"
  ((RUN_GPU)) || echo "   skip: $GPU_SKIP_REASON"
  ((sure_total > BUDGET)) && echo "   WARNING: GPU_CHECK_BUDGET=${BUDGET}s is below the guaranteed stages' ${sure_total}s"
  return 0
}

# "run" or "skip" for the plan
plan_mark() {
  case $1 in
    env) echo run ;;
    build) [[ ${SKIP_BUILD:-0} == 1 ]] && echo skip || echo run ;;
    *) ((RUN_GPU)) && echo run || echo skip ;;
  esac
}

# ---------------------------------------------------------------- running a stage
now() { date +%s; }

# seconds stage NAME may take now: its limit, or what is left of the budget
stage_limit() {
  local want=${LIMIT[$1]} left=$((DEADLINE - $(now) - KILL_AFTER))
  ((left < want)) && want=$left
  echo "$want"
}

skip() {
  STATUS[$1]="SKIPPED ($2)"
  echo "== $1: skipped ($2)"
}

# stage NAME COMMAND...: COMMAND under the stage's limit, its output to $OUT/NAME.log (and a tail here)
stage() {
  local name=$1 log=$OUT/$1.log
  shift
  local t
  t=$(stage_limit "$name")
  if ((t < MIN_STAGE)); then
    skip "$name" "budget spent"
    return 0
  fi
  echo "== $name (limit ${t}s): $(printf '%q ' "$@")"
  echo "\$ $(printf '%q ' "$@")" >"$log"
  local began rc
  began=$(now)
  timeout --signal=INT --kill-after="$KILL_AFTER" "$t" "$@" >>"$log" 2>&1
  rc=$?
  record "$name" "$rc" $(($(now) - began)) "$t"
  echo "-- $name: ${STATUS[$name]}; last lines of $(basename "$log"):"
  tail -n 12 "$log" | sed 's/^/   /'
  return 0
}

# record NAME EXIT_CODE SECONDS LIMIT: the stage's status ("no GPU" failures of a forced dry run do not count)
record() {
  local name=$1 rc=$2 took=$3 limit=$4 status
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMEOUT" ;;
    5) [[ $name == tests-* ]] && status="FAILED (no test selected)" || status="FAILED (exit 5)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  STATUS[$name]="$status in ${took}s of ${limit}s"
  [[ $status != ok ]] && ((!HAS_GPU)) && STATUS[$name]+="; expected without a GPU"
  DETAIL[$name]=$(stage_detail "$name")
  return 0
}

failed_stages() {
  local name n=0
  for name in "${ORDER[@]}"; do
    [[ ${STATUS[$name]:-} =~ ^(FAILED|TIMEOUT) && ! ${STATUS[$name]} =~ "without a GPU" ]] && n=$((n + 1))
  done
  echo "$n"
}

# one line on what a stage's log says: test counts, the smoke verdict, sanitizer errors, result files
stage_detail() {
  local name=$1 log=$OUT/$1.log
  case $name in
    tests-*) pytest_detail "$log" ;;
    smoke) grep -E "^smoke:|MISSED|TOO LARGE|no CUDA device" "$log" | tail -n 4 | paste -sd ';' - ;;
    memcheck | racecheck | synccheck) grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^smoke:" "$log" | paste -sd ';' - ;;
    bench*) bench_detail "$name" ;;
    fsdp2) grep -E "^fsdp2 smoke:|^FAILED:|^fsdp2 \(accelerate" "$log" | tail -n 4 | paste -sd ';' - ;;
  esac
}

# counts from pytest -v lines (they survive a stopped run), and the test that was running when stopped
pytest_detail() {
  local log=$1 counts="" outcome n running
  for outcome in PASSED FAILED ERROR SKIPPED XFAIL; do
    n=$(grep -cE "::[^ ]+ ${outcome}( |$)" "$log")
    ((n)) && counts+="${counts:+, }$n ${outcome,,}"
  done
  echo -n "${counts:-no test ran}"
  running=$(grep -E "^tests/[^ ]+::[^ ]+ *$" "$log" | tail -n 1)
  [[ -n $running ]] && echo -n "; stopped in $running"
  echo
}

# the results files of a benchmark stage
bench_detail() {
  local stem=$LABEL files
  case $1 in
    bench-sparse) stem+=-sparse-teacher ;;
    bench-*) stem+=${1#bench} ;;
  esac
  files=$(cd "$OUT" && ls "$stem".* 2>/dev/null | paste -sd ' ' -)
  echo "${files:-no result files}"
}

# ---------------------------------------------------------------- the stages
env_stage() {
  local began
  began=$(now)
  echo "== env ($(date -u +%FT%TZ))"
  version nvidia-smi 40 nvidia-smi
  version nvcc 2 nvcc --version
  version cmake 3 cmake --version
  version compute-sanitizer 2 ${SANITIZER:-compute-sanitizer} --version
  git log --oneline -1 2>/dev/null || true
  timeout 30 "$PY" - <<'EOF' || echo "python: the package check failed"
import importlib.metadata as md
import sys
print("python", sys.version.split()[0])
for dist in ("torch", "triton", "numpy", "pytest", "hypothesis", "scikit-build-core", "pybind11", "ninja", "cmake",
             "liger-kernel", "transformers", "trl"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist}: not installed")
EOF
  STATUS[env]="ok in $(($(now) - began))s of ${LIMIT[env]}s"
  DETAIL[env]="GPU: ${GPU_NAME:-none}; results labelled $LABEL"
}

# version NAME LINES COMMAND...: the last LINES lines of COMMAND's output, or that NAME is missing
version() {
  local name=$1 lines=$2
  shift 2
  if command -v "$1" >/dev/null; then
    timeout 15 "$@" 2>&1 | tail -n "$lines"
  else
    echo "$name: not found"
  fi
}

# "available|name|major.minor" of the CUDA device torch sees (empty fields without one)
probe_gpu() {
  timeout 60 "$PY" -c "
import torch
ok = torch.cuda.is_available()
print(f'{int(ok)}|{torch.cuda.get_device_name() if ok else \"\"}|{\".\".join(map(str, torch.cuda.get_device_capability())) if ok else \"\"}')
" 2>/dev/null || echo "0||"
}

# "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H200" -> h200, "NVIDIA A100-SXM4-80GB" -> a100
machine_label() {
  local name=${1,,} word
  [[ -z $name ]] && { echo "no-gpu"; return; }
  for word in ${name//[-_]/ }; do
    [[ $word == nvidia || $word == geforce || $word == tesla ]] && continue
    [[ $word =~ [0-9] ]] && { echo "${word//[^a-z0-9]/}"; return; }
  done
  echo "gpu"
}

# the GPU's HBM bandwidth (GB/s, datasheet) for the benchmark's roofline; empty: its default (H200)
peak_gbps() {
  case ${1,,} in
    *h100*pcie*) echo 2000 ;;
    *h100*nvl*) echo 3900 ;;
    *h100*) echo 3350 ;;
  esac
}

# compute-sanitizer on the PATH or in the CUDA toolkit (empty: not found)
find_sanitizer() {
  local dir
  command -v compute-sanitizer && return
  for dir in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(command -v nvcc 2>/dev/null || echo .)")/.."; do
    [[ -n $dir && -x $dir/bin/compute-sanitizer ]] && { echo "$dir/bin/compute-sanitizer"; return; }
  done
  echo ""
}

install_liger() {
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "liger: no .whl/ folder; the benchmark will skip Liger-Kernel"
  elif timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "liger: installed from .whl into /tmp/site"
  else
    echo "liger: install from .whl failed; the benchmark will skip it"
  fi
}

build_stage() {
  if [[ ${SKIP_BUILD:-0} == 1 ]]; then
    skip build "SKIP_BUILD=1"
    return
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTKD_CUDA=on
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  stage build "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e .
}

# whether fastkd imports with its CUDA kernels; prints build_info()
fastkd_has_cuda() {
  timeout 60 "$PY" -c "
import sys, fastkd
info = fastkd.build_info()
print('build_info', info)
sys.exit(0 if info['cuda'] else 3)"
}

# tier NAME MARKERS [KEYWORDS]: a pytest run over the CUDA tests (tests/test_cuda.py first)
tier() {
  local name=$1 markers=$2 keywords=${3:-}
  stage "$name" "$PY" -m pytest -v -rfE -p no:cacheprovider -o faulthandler_timeout=60 --durations=10 \
    --junitxml="$OUT/$name.xml" -m "$markers" ${keywords:+-k "$keywords"} tests/test_cuda.py tests
}

# sanitizer TOOL ARGS...: compute-sanitizer --tool TOOL, one cudaMalloc per tensor (no caching
# allocator) so that memcheck sees each tensor's exact bounds
sanitizer() {
  local tool=$1
  shift
  if [[ -z $SANITIZER ]]; then
    skip "$tool" "compute-sanitizer not found"
    return
  fi
  stage "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 "$@"
}

gpu_stages() {
  local smoke=(scripts/cuda_smoke.py)
  ((HAS_GPU)) || smoke+=(--device cpu)
  tier tests-first "cuda and not slow"
  tier tests-capture "cuda and slow" "capture"
  stage smoke "$PY" "${smoke[@]}"
  sanitizer memcheck "$PY" "${smoke[@]}"
  sanitizer racecheck --racecheck-report all "$PY" "${smoke[@]}" --small
  sanitizer synccheck "$PY" "${smoke[@]}" --small
  local bench=("$PY" benchmarks/bench_loss.py --device cuda --results-dir "$OUT" --no-sweep)
  [[ -n $PEAK ]] && bench+=(--peak-gbps "$PEAK" --note "roofline: $PEAK GB/s, the HBM bandwidth of the $GPU_NAME (datasheet)")
  stage bench "${bench[@]}" --machine "$LABEL" --shapes 8192x128256 --dtypes bf16 --repeats 10
  tier tests-slow "cuda and slow" "not capture"
  # fused linear at an LLM head against the matmuls alone and Liger's fused-linear JSD (beta = 0)
  stage bench-fused-linear "$PY" benchmarks/bench_fused_linear.py --device cuda --dtype bf16 --n 8192 \
    --h-student 4096 --h-teacher 4096 --vocab 128256 --sweep 4096,8192,16384 --rounds 5 --sweep-rounds 3 \
    --no-liger-eager --no-liger-sweep --load-limit 1e9 --out "$OUT" --machine "$LABEL-fused-linear"
  stage bench-sparse "$PY" benchmarks/bench_sparse_teacher.py --device cuda --dtype bf16 --n 8192 --vocab 128256 \
    --k 64 --rounds 5 --load-limit 1e9 --out "$OUT" --machine "$LABEL-sparse-teacher"
  # the loss of TRL's DistillationTrainer (its Triton kernels) against fastkd's, forward KL and JSD
  if timeout 60 "$PY" -c "import trl" >/dev/null 2>&1; then
    stage bench-trl "$PY" benchmarks/bench_trl.py --mode loss --device cuda --dtype bf16 --n 8192 \
      --h-student 4096 --h-teacher 4096 --vocab 128256 --rounds 5 --load-limit 1e9 --out "$OUT" --machine "$LABEL-trl"
  else
    skip bench-trl "trl does not import"
  fi
  stage bench-extra "${bench[@]}" --machine "$LABEL-extra" \
    --shapes 8192x128256,4096x32000,32768x128256 --dtypes bf16,fp32 --no-compile --no-liger --repeats 5
  rm -f "$OUT/$LABEL-extra.json" "$OUT/$LABEL-extra.png"  # its table is enough
  stage bench-divergences "${bench[@]}" --machine "$LABEL-divergences" \
    --shapes 8192x128256 --dtypes bf16 --divergences all --no-compile --no-liger --repeats 5
  stage fsdp2 "$PY" scripts/fsdp2_gpu_smoke.py --out "$OUT"
}

skip_gpu_stages() {
  local name
  for name in "${ORDER[@]}"; do
    [[ $name == env || $name == build ]] || skip "$name" "$GPU_SKIP_REASON"
  done
}

summary() {
  local name
  echo "== summary ($(($(now) - START))s of ${BUDGET}s; $(failed_stages) stage(s) failed or timed out)"
  for name in "${ORDER[@]}"; do
    printf "   %-19s %s\n" "$name" "${STATUS[$name]:-not reached}"
    [[ -n ${DETAIL[$name]:-} ]] && printf "   %-19s   %s\n" "" "${DETAIL[$name]}"
  done
  echo "   files in $OUT:"
  (cd "$OUT" && ls -l | sed 's/^/     /')
}

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1
  OUT=${OUT:-$PWD/gpu-check-out}
  IFS="|" read -r HAS_GPU GPU_NAME GPU_CAPABILITY <<<"$(probe_gpu)"
  FORCE=${GPU_CHECK_FORCE:-0}
  RUN_GPU=$((HAS_GPU || FORCE))
  GPU_SKIP_REASON="no CUDA device (GPU_CHECK_FORCE=1 runs these stages anyway)"
  LABEL=$(machine_label "$GPU_NAME")
  PEAK=$(peak_gbps "$GPU_NAME")
  SANITIZER=$(find_sanitizer)
  if [[ ${1:-} == --plan ]]; then
    print_plan
    return 0
  fi
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  local tee_pid=$! failures
  echo "== gpu_check: ${GPU_NAME:-no CUDA device}${GPU_CAPABILITY:+ (compute capability $GPU_CAPABILITY)}; results in $OUT"
  print_plan
  env_stage
  install_liger
  build_stage
  if ! fastkd_has_cuda && ((!FORCE)); then
    RUN_GPU=0
    GPU_SKIP_REASON="fastkd has no CUDA kernels (see build.log)"
    ((HAS_GPU)) || GPU_SKIP_REASON="no CUDA device, and fastkd has no CUDA kernels"
  fi
  if ((RUN_GPU)); then gpu_stages; else skip_gpu_stages; fi
  summary
  failures=$(failed_stages)
  exec >&- 2>&-  # let tee finish the log before the script ends
  wait "$tee_pid"
  ((failures == 0))
}

# sourced (tests of the helpers above): define only
[[ ${BASH_SOURCE[0]} == "$0" ]] && main "$@"
