#!/usr/bin/env bash
# Compiling ahead (hattn/kernels/ahead.py), A/B: cold starts with HATTN_COMPILE_AHEAD=0 and =1, each mode in turn
# (off then on, so neither always runs first on a fresh host), then a warm start with it on. Logs per side under
# $OUT/ahead-off and $OUT/ahead-on (startup.sh's), and the summary lines at the end.
#   MODES="full bcg" bash scripts/ahead_ab.sh      # gpu_check.sh ahead-ab
set -uo pipefail
OUT=${OUT:-/tmp/hattn-out}; mkdir -p "$OUT"
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$(mktemp -d)/pycache}  # one bytecode cache: compiled once, before all
summary=()
for mode in ${MODES:-full bcg}; do
  for side in off on; do
    if [ "$side" = on ]; then runs="cold warm" flag=1; else runs=cold flag=0; fi
    OUT=$OUT/ahead-$side MODES=$mode RUNS=$runs HATTN_COMPILE_AHEAD=$flag bash scripts/startup.sh \
      > "$OUT/ahead-$side-$mode.txt" 2>&1
    while read -r line; do summary+=("ahead $side: $line"); done < <(grep "first-token" "$OUT/ahead-$side-$mode.txt")
    grep -h "compiled ahead\|captured size" "$OUT/ahead-$side/startup-$mode-"*.log 2>/dev/null
  done
done
printf '%s\n' "${summary[@]}"
