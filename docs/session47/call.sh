#!/usr/bin/env bash
# Session 46's device calls. STEPS (default "lazy tests"): any of
#   lazy   - import hattn + the 1B preset's build on the GPU, HATTN_LAZY_FLA=1 and 0 alternated (LAZY_ROUNDS)
#   tests  - the GPU tests of the models and the CLI (every test imports hattn first: the lazy fla.ops on the GPU)
#   prof / noprof - the bench's decode rows with its profile pass (TEARDOWN_CUPTI=1 since session 44) / without
#   startup - full's cold and warm start (MODES, RUNS)
OUT0=${OUT:-/tmp/hattn-out}
nvidia-smi -L
bash scripts/gpu_check.sh none 2>/dev/null | tail -1  # installs the wheels into /tmp/site
export PYTHONPATH=/tmp/site:$PWD
for step in ${STEPS:-lazy tests}; do
  start=$(date +%s)
  case $step in
  lazy)
    for i in $(seq ${LAZY_ROUNDS:-1}); do for z in ${LAZY_ORDER:-1 0}; do
      HATTN_LAZY_FLA=$z timeout 90 python3 -W ignore -c "
import time; t = time.perf_counter()
import hattn
from hattn.models.presets import load
lm = load('qwen3.5-1b', device='cuda', dtype=__import__('torch').bfloat16)
import sys; print('lazy=$z import+build %.2f s' % (time.perf_counter() - t), sum(1 for k in sys.modules if k.startswith('fla.')), 'fla modules')
" 2>&1 | grep -E 'lazy=|Error'
    done; done | tee "$OUT0/lazy.log" ;;
  tests)
    timeout ${TESTS_BOX:-200} python3 -m pytest -m gpu -n ${WORKERS:-10} -q -p no:warnings -p no:cacheprovider -rfE \
      ${TESTS:-tests/models tests/test_cli.py} > "$OUT0/gpu_tests.log" 2>&1; echo "tests rc=$?"; tail -5 "$OUT0/gpu_tests.log" ;;
  prof|noprof)
    a="--modes ${BENCH_MODES:-full,pcg,bcg,tc-ro} --workloads decode"; [ $step = noprof ] && a="$a --no-profile"
    OUT=$OUT0/$step BENCH_BUDGET=${BUDGET:-200} BENCH_ARGS="$a" SECONDS_BENCH=$(( ${BUDGET:-200} + 30 )) \
      bash scripts/gpu_check.sh bench 2>&1 | tail -25 ;;
  guard)
    timeout 60 python3 -W ignore -c "
import time, torch
from hattn.passes.fuse_linears import FusedWeightsGuard
args = [torch.nn.Parameter(torch.empty(8, device='cuda')) for _ in range(350)]
fn = lambda *a: None
g = FusedWeightsGuard(fn, list(range(0, 350, 3)), args)
for f, name in ((fn, 'plain'), (g, 'guarded'), (fn, 'plain'), (g, 'guarded')):
    for _ in range(1000): f(*args)
    t = time.perf_counter()
    for _ in range(20000): f(*args)
    print(name, '%.2f us/call' % ((time.perf_counter() - t) / 20000 * 1e6))
" 2>&1 | tee "$OUT0/guard.log" ;;
  startup)
    OUT=$OUT0/startup SECONDS_STARTUP=${STARTUP_BOX:-250} MODES=${MODES:-full} RUNS=${RUNS:-"cold warm"} \
      bash scripts/gpu_check.sh startup 2>&1 | tail -8 ;;
  esac
  echo "== step $step $(( $(date +%s) - start )) s"
done
