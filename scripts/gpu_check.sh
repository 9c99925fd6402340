#!/usr/bin/env bash
# One device call: install the carried wheels, run the GPU tests and the benchmarks, write logs under $OUT.
# Usage (device tool, carry .whl): bash scripts/gpu_check.sh [pytest args...]
set -uo pipefail
OUT=${OUT:-/tmp/hattn-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
python3 -m pytest -m gpu -q -p no:warnings -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$OUT/gpu_tests.log"
