#!/usr/bin/env bash
# CI's second stack: the torch a GPU user already has, installed first (torch 2.11.0, torchvision
# 0.26.0, triton 3.6.0 on Python 3.12, the GPU machine's versions). memkd installed into it the
# README's way must keep that torch, load its compiled CPU kernels and pass the op, Triton
# interpreter and packaging tests; the portable baseline CPU build must pass the op tests; and the
# GPU check's rehearsal (benchmarks/gpu_check.sh --rehearsal) must pass against this stack.
set -euo pipefail
cd "$(dirname "$0")/.."
# pyenv's python3.12 shim exists even where 3.12 is not the active version, so try each candidate.
py312=""
for candidate in python3.12 "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then py312=$candidate; break; fi
done
[ -n "$py312" ] || { echo "no Python 3.12 interpreter found" >&2; exit 1; }
echo "+ Python 3.12: $py312"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py312" -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
# triton 3.6's CPU interpreter fails with numpy >= 2.4 ("only 0-dimensional arrays can be converted
# to Python scalars"; triton 3.8 fixed it), so this environment alone keeps numpy below 2.4.
echo "+ pip install torch==2.11.0 torchvision==0.26.0 triton==3.6.0 numpy<2.4"
python -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4"
before=$(python -c 'import torch; print(torch.__version__)')
echo "+ python3 -m pip install \".[test]\"   (into the existing torch $before)"
# The CUDA kernels are compiled against this torch by the rehearsal below; here only the CPU ones.
MEMKD_CUDA=OFF python -m pip install -q ".[test]"
after=$(python -c 'import torch; print(torch.__version__)')
[ "$before" = "$after" ] || { echo "memkd's install replaced torch $before with $after" >&2; exit 1; }
# From outside the checkout, whose memkd/ has no compiled modules.
(cd "$work" && python - <<'PY'
import memkd.ops as ops
cpu = ops.backends()["nr_recall"]["cpu"]
assert cpu.startswith("cpp (compiled kernels"), cpu
print("torch kept; CPU kernels:", cpu)
PY
)
memkd info
echo "+ pytest tests/test_ops_cpu.py tests/test_triton_kernels.py tests/test_packaging.py"
pytest tests/test_ops_cpu.py tests/test_triton_kernels.py tests/test_packaging.py -q -n 2 -p no:cacheprovider
echo "+ MEMKD_CPU_VARIANT=baseline pytest tests/test_ops_cpu.py"
MEMKD_CPU_VARIANT=baseline pytest tests/test_ops_cpu.py -q -n 2 -p no:cacheprovider
# The GPU machine has cmake and ninja beside its torch; so does this environment for the rehearsal.
python -m pip install -q "cmake>=3.26" ninja
echo "+ benchmarks/gpu_check.sh --rehearsal"
PYTHON="$work/venv/bin/python" bash benchmarks/gpu_check.sh --rehearsal "$work/gpu-check"
