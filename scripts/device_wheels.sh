#!/usr/bin/env bash
# Fill .whl/ with what the GPU device lacks (carry=[".whl"] in the device call; scripts/gpu_check.sh installs them).
# The device runs Python 3.12 (hypothesis ships compiled wheels, so it is fetched for cp312); the rest are pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl fla-core==0.6.0 transformers==5.23.0 einops sortedcontainers pytest \
  iniconfig pluggy packaging rich pygments markdown-it-py mdurl pytest-xdist execnet
python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
  -d .whl hypothesis
grep -qxF .whl .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo .whl >> .git/info/exclude; }
ls .whl
