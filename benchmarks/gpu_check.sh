#!/usr/bin/env bash
# One-shot GPU check of memkd: build, CUDA correctness tests, GPU benchmarks, in at most 7 minutes.
#
#   benchmarks/gpu_check.sh OUT_DIR               on a machine with an NVIDIA GPU
#   benchmarks/gpu_check.sh --rehearsal OUT_DIR   on a CPU-only machine: the same steps with a
#                                                 stand-in nvidia-smi and tiny CPU benchmarks
#
# It uses only what the machine has (python3 with torch, triton, pytest; cmake, ninja, nvcc) and
# downloads nothing. PYTHON overrides the interpreter, TOTAL_BUDGET the time in seconds (420; 2400
# in a rehearsal), TEST_WORKERS the pytest-xdist workers (8), MIN_CUDA_TESTS the fewest CUDA tests
# that must run and pass (200).
#
# OUT_DIR receives three files, rewritten after every step, so a kill loses only the step in flight:
#   summary.md          what a person reads first: verdict, GPU, versions, test counts, benchmarks
#   summary.json        the same for programs: every step's exit code, seconds and note
#   gpu-results.tar.gz  benchmarks/results/<gpu>/...: every log, the JUnit XML, env.json and the
#                       benchmark JSON and Markdown; `tar xzf` at the repository root to commit it
# Exit code: 0 when the verdict is true (a GPU ran every CUDA test and all passed; in a rehearsal:
# every step worked and the verdict is false because no GPU ran), 1 otherwise.
set -uo pipefail

REHEARSAL=0
if [[ "${1:-}" == "--rehearsal" ]]; then REHEARSAL=1; shift; fi
OUT_ARG=${1:?usage: benchmarks/gpu_check.sh [--rehearsal] OUT_DIR}
mkdir -p "$OUT_ARG" || exit 2
OUT=$(cd "$OUT_ARG" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
START=$(date +%s)
# A rehearsal runs on a 2-core machine, so its steps may take several times as long.
if ((REHEARSAL)); then BUDGET=${TOTAL_BUDGET:-2400} CAP_SCALE=5; else BUDGET=${TOTAL_BUDGET:-420} CAP_SCALE=1; fi
RESERVE=15  # seconds kept for the last summary and archive
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check: interpreter '$PY' not found (set PYTHON)" >&2; exit 2; }
PY=$(command -v "$PY")
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Work in the build tree; only the archive and the summaries go to OUT.
WORK="$ROOT/build/gpu_check"
rm -rf "$WORK" "$ROOT"/memkd/_C.*.so "$ROOT"/memkd/_cpu_*.so  # never test an earlier run's build
mkdir -p "$WORK/logs" "$WORK/bench"
STEPS="$WORK/logs/steps.tsv"
: >"$STEPS"

now() { date +%s; }
left() { echo $((BUDGET - ($(now) - START))); }
log() { echo "[gpu_check $(($(now) - START))s] $*" | tee -a "$WORK/logs/check.log"; }

# The summaries and the archive, from whatever exists so far (atomically replaced).
pack() {
  timeout 60 "$PY" "$ROOT/benchmarks/gpu_check_report.py" --work "$WORK" --out "$OUT" \
    --rehearsal "$REHEARSAL" --seconds "$(($(now) - START))" --budget "$BUDGET" \
    --min-cuda-tests "${MIN_CUDA_TESTS:-200}" >>"$WORK/logs/check.log" 2>&1 ||
    log "pack: the report failed (see check.log in the archive, if any)"
}

# step NAME CAP COMMAND...: runs COMMAND with its output in logs/NAME.log under a timeout of
# min(CAP, time left - RESERVE - KEEP) (CAP and KEEP times CAP_SCALE), records exit code and
# seconds, then packs. KEEP (default 0) is time held back for later steps.
step() {
  local name=$1 cap=$(($2 * CAP_SCALE))
  shift 2
  local avail=$(($(left) - RESERVE - ${KEEP:-0} * CAP_SCALE))
  local limit=$((cap < avail ? cap : avail))
  if ((limit < 5)); then
    log "$name: skipped, out of time"
    printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "skipped: out of time" >>"$STEPS"
    return 124
  fi
  log "$name: start (limit ${limit}s): $*"
  local t0 rc note=""
  t0=$(now)
  timeout --kill-after=10 "$limit" "$@" >>"$WORK/logs/$name.log" 2>&1
  rc=$?
  ((rc == 124 || rc == 137)) && note="timed out after ${limit}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(now) - t0))" "$note" >>"$STEPS"
  log "$name: exit $rc after $(($(now) - t0))s $note"
  pack
  return "$rc"
}

# ---- 1. the GPU ------------------------------------------------------------------------------
if ((REHEARSAL)); then
  mkdir -p "$WORK/stand-in"
  cat >"$WORK/stand-in/nvidia-smi" <<'EOF'
#!/usr/bin/env bash
# Stand-in for nvidia-smi in a rehearsal: a GPU that torch will not see.
if [[ "$*" == *--query-gpu* ]]; then echo "Rehearsal stand-in GPU, 0.0, 9.0, 0 MiB"; else echo "nvidia-smi stand-in (rehearsal): no GPU"; fi
EOF
  chmod +x "$WORK/stand-in/nvidia-smi"
  export PATH="$WORK/stand-in:$PATH"
fi
step nvidia-smi 20 nvidia-smi
step nvidia-smi 20 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
GPU_CC=$(timeout 15 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
[[ "$GPU_CC" =~ ^[0-9]+$ ]] || GPU_CC=90

# ---- 2. build --------------------------------------------------------------------------------
NVCC=""
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [[ -n "$home" && -x "$home/bin/nvcc" ]]; then NVCC="$home/bin/nvcc"; break; fi
done
[[ -z "$NVCC" ]] && NVCC=$(command -v nvcc 2>/dev/null || true)
JOBS=$(nproc 2>/dev/null || echo 8)
# cmake >= 3.26 (CUDA 20) and ninja: the interpreter's own (pip's) first, then PATH.
SCRIPTS=$(timeout 30 "$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
[[ -n "$SCRIPTS" ]] && export PATH="$SCRIPTS:$PATH"
CMAKE_VERSION=$(cmake --version 2>/dev/null | head -n1 | awk '{print $3}')
if [[ -z "$CMAKE_VERSION" || "$(printf '%s\n3.26\n' "$CMAKE_VERSION" | sort -V | head -n1)" != "3.26" ]]; then
  log "cmake ${CMAKE_VERSION:-missing} at $(command -v cmake): 3.26 or later is needed; the build will fail"
fi
log "cmake $CMAKE_VERSION ($(command -v cmake)), ninja $(command -v ninja), nvcc ${NVCC:-none}"
# CMake directly, not pip: nothing to install, and the modules land in memkd/ of this checkout
# (the tests import memkd from here through PYTHONPATH). One CPU kernel build for this machine.
cmake_build() {  # cmake_build BUILD_DIR MEMKD_CUDA
  cmake -S "$ROOT" -B "$1" -GNinja -DPython_EXECUTABLE="$PY" -DMEMKD_CUDA="$2" \
    -DMEMKD_CUDA_ARCHS="$GPU_CC" -DMEMKD_CPU_ARCH_FLAGS=-march=native \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/memkd" ${NVCC:+-DCMAKE_CUDA_COMPILER="$NVCC"} &&
    cmake --build "$1" -j "$JOBS"
}
export -f cmake_build
export ROOT PY GPU_CC NVCC JOBS
if [[ -z "$NVCC" ]]; then
  log "nvcc not found: building without CUDA kernels (the cuda backend's tests will fail the verdict)"
  KEEP=200 step build 240 bash -c 'cmake_build "$0" OFF' "$WORK/cmake"
elif ! KEEP=200 step build 240 bash -c 'cmake_build "$0" ON' "$WORK/cmake"; then
  log "the CUDA build failed: building the CPU kernels alone so that the Triton backend is still tested"
  rm -f "$ROOT"/memkd/_C.*.so "$ROOT"/memkd/_cpu_*.so
  KEEP=180 step build-without-cuda 120 bash -c 'cmake_build "$0" OFF' "$WORK/cmake-cpu"
fi
# memkd.kernels is the kernels/ directory, installed under that name; from a checkout, link it.
[[ -e "$ROOT/memkd/kernels" ]] || ln -s ../kernels "$ROOT/memkd/kernels"

# ---- 3. environment --------------------------------------------------------------------------
step env 60 "$PY" "$ROOT/benchmarks/gpu_check_report.py" --environment "$WORK/env.json"

# ---- 4. CUDA correctness tests ---------------------------------------------------------------
TEST_ARGS=(-m cuda tests/ -p no:cacheprovider -o tmp_path_retention_policy=failed)
step collect 90 "$PY" -m pytest "${TEST_ARGS[@]}" --collect-only -q
RUN_ARGS=(-q -rs --durations=15 --junitxml="$WORK/logs/tests.xml")
if ((!REHEARSAL)) && timeout 30 "$PY" -c 'import xdist' >/dev/null 2>&1; then
  RUN_ARGS+=(-n "${TEST_WORKERS:-8}")  # each worker compiles its share of the Triton kernels
fi
timeout 30 "$PY" -c 'import pytest_timeout' >/dev/null 2>&1 && RUN_ARGS+=(--timeout=120)
KEEP=$((REHEARSAL ? 0 : 100)) step tests 200 "$PY" -m pytest "${TEST_ARGS[@]}" "${RUN_ARGS[@]}"

# ---- 5. benchmarks ---------------------------------------------------------------------------
DEADLINE=$((START + BUDGET - RESERVE - 10))
if ((REHEARSAL)); then BENCH_ARGS=(--tiny --device cpu); else BENCH_ARGS=(--device cuda); fi
step bench 600 "$PY" "$ROOT/benchmarks/gpu_bench.py" --out "$WORK/bench" --deadline "$DEADLINE" "${BENCH_ARGS[@]}"

# ---- 6. verdict ------------------------------------------------------------------------------
pack
log "done in $(($(now) - START))s; results in $OUT"
cat "$OUT/summary.md" 2>/dev/null | head -n 40
"$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); sys.exit(0 if s["exit_ok"] else 1)' "$OUT/summary.json"
