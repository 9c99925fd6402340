bash scripts/gpu_check.sh none >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
T=tests/runtime/test_gpu_runtimes.py::test_graph_pools_hold_no_blas_workspace
for m in pcg bcg full; do
  timeout 60 python3 -m pytest -m gpu -q -p no:warnings -p no:cacheprovider "$T[$m]" > $OUT/alone_$m.log 2>&1; echo "alone $m rc=$?"
done
for order in "full bcg pcg" "bcg pcg full"; do
  ids=""; for m in $order; do ids="$ids $T[$m]"; done
  timeout 90 python3 -m pytest -m gpu -v -p no:warnings -p no:cacheprovider -p no:randomly $ids > "$OUT/together_${order// /_}.log" 2>&1; echo "together $order rc=$?"
  grep -E "PASSED|FAILED" "$OUT/together_${order// /_}.log" | head -6
done
grep -h -A3 "AssertionError: \[" $OUT/*.log | head -40
[ "${STARTUP:-0}" = 1 ] && OUT=$OUT/startup MODES=full RUNS="cold warm" PROFILE_RUNS=warm SECONDS_STARTUP=200 bash scripts/gpu_check.sh startup 2>&1 | tail -12
