#!/usr/bin/env bash
# Cold and warm start per mode (issue 21), process start to first token, with hattn's startup breakdown.
#   cold: torch's caches (inductor, AOTAutograd, autotuning) and hattn's cache_dir (with Triton's cache in
#         cache_dir/triton: fla's kernels and autotuning results) all empty
#   warm: torch's caches empty again (a new machine), cache_dir kept from the cold run: everything from cache_dir
#   traced: as warm, but without cache_dir's Dynamo snapshots (cache_dir/dynamo set aside): Dynamo traces the model,
#           as every warm start did before the snapshots (the A/B of hattn.compiler.snapshot)
#   bash scripts/startup.sh        # modes bcg full pcg, qwen3.5-1b on cuda in bf16; MODES= PRESET= DEVICE= DTYPE=
#   RUNS="cold warm" PROFILE_RUNS="warm" bash scripts/startup.sh   # some runs; a run under cProfile (its top 45 by
#                                                                    # cumulative and 25 by own time, and who called
#                                                                    # Triton's compiles and torch's op registrations)
#   TRITON_COMPILES=1 bash scripts/startup.sh   # each run lists the Triton kernels it compiled and those from the cache
#   HATTN_COMPILE_AHEAD=0 bash scripts/startup.sh   # captures compile their Triton kernels one by one (on: ahead, in parallel)
#                                                   # (scripts/ahead_ab.sh: the A/B)
#   TRITON_PRINT_AUTOTUNING=1 bash scripts/startup.sh   # and $OUT/fla_configs.json: fla's choices in the model's runs
#                                                       # (file name -> content; ship them as fla_configs/<GPU>/)
# The summary lines at the end: mode, run, process start to first token, process wall seconds.
set -uo pipefail
unset TRITON_CACHE_DIR
OUT=${OUT:-/tmp/hattn-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
PRESET=${PRESET:-qwen3.5-1b} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16}
WORK=$(mktemp -d)
# Python's bytecode where a read-only install cannot keep it (the device's torch has no .pyc: ~9 s of compile per
# process). It is written before the first run, as an install would have (PYC_FIRST=0: the first run writes it, and
# pays for it: ~12 s of the H100's first cold run in the thirty-first session)
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$WORK/pycache}
unset PYTHONDONTWRITEBYTECODE  # the H100's warm run still compiled ~4000 modules from source with the prefix alone
# bytecode settings and the versions it runs under (run alone on the device, not from gpu_check.sh: its own transformers)
python3 -c "import sys, torch, transformers; print('bytecode written:', not sys.dont_write_bytecode, 'prefix:', \
sys.pycache_prefix, '| torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "${PYC_FIRST:-1}" != 0 ]; then
  pyc_start=$(date +%s.%N)
  python3 -m compileall -q -j 0 $(python3 -c "import importlib.util as u, os; print(' '.join(os.path.dirname( \
u.find_spec(m).origin) for m in ('torch', 'transformers', 'triton', 'fla', 'hattn') if u.find_spec(m)))") >/dev/null 2>&1
  echo "bytecode compiled before the runs in $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $pyc_start }") s"
fi
summary=() logs=()
for mode in ${MODES:-bcg full pcg}; do
  for run in ${RUNS:-cold warm traced}; do
    export TORCHINDUCTOR_CACHE_DIR=$WORK/$mode-$run-inductor  # TRITON_CACHE_DIR unset: hattn puts it in cache_dir
    [ "$run" = traced ] && mv "$WORK/$mode-cache/dynamo" "$WORK/$mode-cache/dynamo.off" 2>/dev/null
    start=$(date +%s.%N)
    py=(python3); [[ " ${PROFILE_RUNS:-} " == *" $run "* ]] && py=(python3 -m cProfile -o "$WORK/$mode-$run.prof")
    [ "${TRITON_COMPILES:-0}" != 0 ] && py+=(scripts/triton_compiles.py)  # Triton's cache hits and misses by kernel
    "${py[@]}" -m hattn.cli generate --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --prompt-ids 1,2,3,4,5,6,7,8 \
      --max-new-tokens 16 --mode "$mode" --cache-dir "$WORK/$mode-cache" --timing 2>&1 | tee "$OUT/startup-$mode-$run.log"
    logs+=("$OUT/startup-$mode-$run.log")
    [ -f "$WORK/$mode-$run.prof" ] && python3 -c "import pstats, sys; s = pstats.Stats(sys.argv[1]); \
s.sort_stats('cumulative').print_stats(45); s.sort_stats('tottime').print_stats(25); \
s.print_callers(r'triton.compiler.compiler.py:[0-9]+.compile.|_register_to_dispatcher|_jit_internal.py.*_overload|make_prim')" \
      "$WORK/$mode-$run.prof" \
      >> "$OUT/startup-$mode-$run.log"
    wall=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $start }")
    first=$(grep -o 'process start to first token [0-9.]*' "$OUT/startup-$mode-$run.log" | grep -o '[0-9.]*$')
    summary+=("$mode $run first-token ${first:-?} s wall ${wall} s")
    if [ "$run" = traced ] && [ -d "$WORK/$mode-cache/dynamo.off" ]; then
      rm -rf "$WORK/$mode-cache/dynamo" && mv "$WORK/$mode-cache/dynamo.off" "$WORK/$mode-cache/dynamo"
    fi
  done
done
printf '%s\n' "${summary[@]}" | tee "$OUT/startup-summary.txt"
# fla's autotuning choices the runs printed (TRITON_PRINT_AUTOTUNING=1), as files to ship for this GPU
# (this run's logs only: $OUT may hold older ones)
if [ -n "${TRITON_PRINT_AUTOTUNING:-}" ] && [ ${#logs[@]} -gt 0 ] && grep -q "best config selected" "${logs[@]}" 2>/dev/null; then
  python3 scripts/fla_configs.py --out "$WORK/fla_configs" --bundle "$OUT/fla_configs.json" --from-logs "${logs[@]}"
fi
