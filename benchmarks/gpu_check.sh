#!/usr/bin/env bash
# One-shot GPU check of memkd on a fresh GPU machine: build, CUDA tests, GPU benchmarks, in < 8 min.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Run from anywhere; it works in the repository that holds it. Writes under OUT_DIR:
#   env.json      GPU name / compute capability / memory, driver, CUDA runtime, nvcc, python, torch,
#                 triton versions, memkd build info and which backend serves each op
#   summary.json  exit code, seconds and log of every step, and the overall verdict
#   nvidia-smi.log, setup.log, build.log, tests.log (+ tests.xml, JUnit), bench.log (+ bench.json
#   when pytest-benchmark is installed)
# Exit code: that of the CUDA test run (0 = all passed), or of the first step that prevented it.
#
# What the machine needs:
#   * Python 3.11 or 3.12 with pip, an NVIDIA driver (nvidia-smi).
#   * torch 2.14.1 (CUDA build). If `python -c 'import torch'` fails, every wheel carried in the
#     repository's .whl/ directory is installed offline (pip --no-index --find-links .whl), e.g.
#     torch-2.14.1+cu130, triton, numpy, scipy, pytest, pytest-benchmark, cmake, ninja, setuptools;
#     only if that fails too, the package index is tried (it may be unreachable). Same for
#     pytest/numpy/scipy and the build tools (cmake, ninja, setuptools) when missing.
#   * nvcc for the "cuda" backend: from CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH or an installed
#     nvidia-cuda-nvcc wheel. Without it memkd._C is built with its CPU kernels only and the
#     "cuda"-backend tests skip, saying why; the "triton"-backend tests still run.
#   The build compiles only for this GPU's architecture (MEMKD_CUDA_ARCHS from nvidia-smi) with all
#   cores, and installs memkd editable (pip install --no-build-isolation --no-deps -e .; setuptools
#   builds under the repository's build/, so run it in a fresh checkout). Should pip fail before
#   CMake runs, memkd._C is built directly with CMake into memkd/ (the "triton" backend, which needs
#   the installed memkd.kernels package, then skips); should the CUDA compile fail, memkd._C is
#   rebuilt without CUDA kernels.
#
# Time: TOTAL_BUDGET seconds in all (default 480); every step runs under `timeout` with its own cap,
# cut to what is left of the budget, so a hang cannot eat the run. Override PYTHON to pick the
# interpreter.
set -uo pipefail

OUT_ARG=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT_ARG"
OUT=$(cd "$OUT_ARG" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
START=$(date +%s)
BUDGET=${TOTAL_BUDGET:-480}
RESERVE=20  # seconds kept for env.json and summary.json
STEPS="$OUT/.steps.tsv"
: >"$STEPS"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  for candidate in python3 python python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1; then PY=$(command -v "$candidate"); break; fi
  done
fi
[[ -n "$PY" ]] || { echo "no python found" >&2; exit 2; }

now() { date +%s; }
left() { echo $((BUDGET - ($(now) - START))); }
log() { echo "[gpu_check $(($(now) - START))s] $*" | tee -a "$OUT/setup.log"; }

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with its output in OUT/NAME.log (appended) under a
# timeout of min(CAP, time left - RESERVE - KEEP), and records its exit code and duration. KEEP
# (default 0) is time held back for the steps after this one.
step() {
  local name=$1 cap=$2
  shift 2
  local avail=$(($(left) - RESERVE - ${KEEP:-0}))
  local limit=$((cap < avail ? cap : avail))
  if ((limit < 5)); then
    log "$name: skipped, out of time"
    printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "skipped: out of time" >>"$STEPS"
    return 124
  fi
  log "$name: start (limit ${limit}s): $*"
  local t0
  t0=$(now)
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note="timed out after ${limit}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(now) - t0))" "$note" >>"$STEPS"
  log "$name: exit $rc after $(($(now) - t0))s $note"
  return "$rc"
}

# step NAME CAP bash -c "$PIP_GET" WHEEL_DIR PYTHON PACKAGE...: offline from .whl/ first, then the index.
PIP_GET='if [[ -d "$0" ]] && "$1" -m pip install --no-index --find-links "$0" "${@:2}"; then exit 0; fi
exec "$1" -m pip install "${@:2}"'

# ---- 1. the GPU ------------------------------------------------------------------------------
step nvidia-smi 30 nvidia-smi
step nvidia-smi 15 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
GPU_CC=$(timeout 15 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
[[ "$GPU_CC" =~ ^[0-9]+$ ]] || GPU_CC=""

# ---- 2. python packages ----------------------------------------------------------------------
if ! timeout 120 "$PY" -c 'import torch' >>"$OUT/setup.log" 2>&1; then
  log "torch is not importable: installing torch==2.14.1 (.whl/ first, then the index)"
  if [[ -d "$ROOT/.whl" ]] && compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    step setup 240 "$PY" -m pip install --no-index --find-links "$ROOT/.whl" "$ROOT"/.whl/*.whl
  fi
  timeout 60 "$PY" -c 'import torch' >>"$OUT/setup.log" 2>&1 || step setup 240 "$PY" -m pip install torch==2.14.1
fi
for module in pytest numpy scipy; do
  if ! timeout 60 "$PY" -c "import $module" >/dev/null 2>&1; then
    log "$module is missing: installing it"
    step setup 90 bash -c "$PIP_GET" "$ROOT/.whl" "$PY" "$module"
  fi
done
# cmake >= 3.26 and ninja, preferring those of the interpreter's environment (pip's cmake/ninja).
SCRIPTS=$(timeout 30 "$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
[[ -n "$SCRIPTS" ]] && export PATH="$SCRIPTS:$PATH"
cmake_ok() {
  local v
  v=$(cmake --version 2>/dev/null | head -n1 | awk '{print $3}')
  [[ -n "$v" && "$(printf '%s\n3.26\n' "$v" | sort -V | head -n1)" == "3.26" ]] && command -v ninja >/dev/null 2>&1
}
if ! cmake_ok; then
  log "cmake >= 3.26 or ninja missing ($(cmake --version 2>/dev/null | head -n1)): installing the pip packages"
  step setup 90 bash -c "$PIP_GET" "$ROOT/.whl" "$PY" 'cmake>=3.26' ninja
  hash -r
fi
log "cmake: $(command -v cmake) $(cmake --version 2>/dev/null | head -n1); ninja: $(command -v ninja)"
timeout 30 "$PY" -c 'import setuptools' >/dev/null 2>&1 || step setup 60 bash -c "$PIP_GET" "$ROOT/.whl" "$PY" 'setuptools>=69' wheel

# ---- 3. build --------------------------------------------------------------------------------
NVCC=""
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [[ -n "$home" && -x "$home/bin/nvcc" ]]; then NVCC="$home/bin/nvcc"; break; fi
done
[[ -z "$NVCC" ]] && NVCC=$(command -v nvcc 2>/dev/null || true)
if [[ -z "$NVCC" ]]; then  # an nvidia-cuda-nvcc wheel
  NVCC=$(timeout 60 "$PY" - <<'EOF' 2>/dev/null
import pathlib
try:
    import nvidia
except ImportError:
    raise SystemExit
for base in map(pathlib.Path, nvidia.__path__):
    for nvcc in sorted(base.glob("*/bin/nvcc")):
        print(nvcc)
        raise SystemExit
EOF
  )
fi
if [[ -n "$NVCC" ]]; then
  export CUDA_HOME
  CUDA_HOME=$(cd "$(dirname "$NVCC")/.." && pwd)
  export PATH="$CUDA_HOME/bin:$PATH"
  log "nvcc: $NVCC ($("$NVCC" --version 2>/dev/null | tail -n1))"
else
  log "nvcc not found: memkd._C will have CPU kernels only; the 'cuda' backend tests will skip"
fi
[[ -n "$GPU_CC" ]] && export MEMKD_CUDA_ARCHS="$GPU_CC"
MAX_JOBS=$(nproc 2>/dev/null || echo 8)
export MAX_JOBS
# The build keeps 4 minutes for a fallback build and the tests; the fallback keeps 3 for the tests.
if ! KEEP=240 step build 300 env MEMKD_CUDA=AUTO "$PY" -m pip install -v --no-build-isolation --no-deps -e "$ROOT"; then
  # If CMake ran (its configure line is in the log), the compile itself failed: rebuild without the
  # CUDA kernels so the Triton backend can still be tested. Otherwise pip/setuptools failed first:
  # build memkd._C directly with CMake into memkd/ (tests import memkd from the repository root).
  MODE=AUTO
  grep -q "memkd: torch at" "$OUT/build.log" && MODE=OFF
  log "pip build failed; building memkd._C directly with CMake, MEMKD_CUDA=$MODE"
  CMAKE_DIR=$(mktemp -d)/cmake
  KEEP=180 step build 240 bash -c 'cmake -S "$0" -B "$1" -GNinja -DPython_EXECUTABLE="$2" -DMEMKD_CUDA="$3" \
      -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$0/memkd" ${CUDA_HOME:+-DCMAKE_CUDA_COMPILER=$CUDA_HOME/bin/nvcc} \
      ${MEMKD_CUDA_ARCHS:+-DMEMKD_CUDA_ARCHS=$MEMKD_CUDA_ARCHS} && cmake --build "$1" -j "$MAX_JOBS"' \
    "$ROOT" "$CMAKE_DIR" "$PY" "$MODE"
fi

# ---- 4. environment report -------------------------------------------------------------------
timeout 60 "$PY" - "$OUT/env.json" "$NVCC" >>"$OUT/setup.log" 2>&1 <<'EOF'
import json, platform, subprocess, sys

out, nvcc = sys.argv[1], sys.argv[2]
env = {"python": sys.version.split()[0], "platform": platform.platform()}

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"

query = run("nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader")
env["nvidia_smi"] = [dict(zip(("name", "driver", "compute_cap", "memory"), (f.strip() for f in line.split(","))))
                     for line in query.splitlines() if line.strip()]
env["nvcc"] = run(nvcc, "--version").splitlines()[-1] if nvcc else None
try:
    import torch
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        env["gpus"] = [{"name": torch.cuda.get_device_name(i),
                        "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                       for i in range(torch.cuda.device_count())]
except Exception as exc:  # noqa: BLE001
    env["torch"] = f"unavailable: {exc}"
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    env["triton"] = f"unavailable: {exc}"
try:
    import memkd.ops as ops
    from memkd.ops import _library
    ext = _library.EXTENSION
    env["memkd_extension"] = {"loaded": ext.loaded, "reason": ext.reason, "cuda_kernels": ext.cuda_kernels,
                              "build_info": ext.build_info}
    env["memkd_backends"] = ops.backends()
except Exception as exc:  # noqa: BLE001
    env["memkd_extension"] = f"import failed: {exc}"
with open(out, "w") as f:
    json.dump(env, f, indent=2)
print(json.dumps(env, indent=2))
EOF

# ---- 5. tests and benchmarks -----------------------------------------------------------------
step tests 240 "$PY" -m pytest -m cuda tests/ -q -rs --durations=15 -p no:cacheprovider --junitxml="$OUT/tests.xml"
TESTS_RC=$?
if compgen -G "benchmarks/*.py" >/dev/null || compgen -G "benchmarks/**/*.py" >/dev/null; then
  BENCH_ARGS=(-q -p no:cacheprovider)
  timeout 30 "$PY" -c 'import pytest_benchmark' >/dev/null 2>&1 && BENCH_ARGS+=(--benchmark-json="$OUT/bench.json")
  step bench 400 "$PY" -m pytest benchmarks/ "${BENCH_ARGS[@]}"
  BENCH_RC=$?
  ((BENCH_RC == 5)) && log "bench: no benchmarks collected"
else
  log "bench: no benchmarks/*.py, nothing to run"
  printf '%s\t%s\t%s\t%s\n' bench 0 0 "absent" >>"$STEPS"
fi

# ---- 6. summary ------------------------------------------------------------------------------
timeout 30 "$PY" - "$STEPS" "$OUT/summary.json" "$TESTS_RC" "$(($(now) - START))" <<'EOF' || true
import json, sys

steps_path, out, tests_rc, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
steps = []
for line in open(steps_path):
    name, rc, secs, note = (line.rstrip("\n").split("\t") + [""])[:4]
    steps.append({"step": name, "exit_code": int(rc), "seconds": int(secs), "note": note, "log": f"{name}.log"})
summary = {"tests_passed": tests_rc == 0, "tests_exit_code": tests_rc, "total_seconds": seconds, "steps": steps}
json.dump(summary, open(out, "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
rm -f "$STEPS"
log "done in $(($(now) - START))s; tests exit code $TESTS_RC; results in $OUT"
exit "$TESTS_RC"
