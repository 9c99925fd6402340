#!/usr/bin/env bash
# One device call: install the carried wheels, then run the parts named (default: all) under $OUT, each in its own
# time box so a slow part cannot starve the rest. The last lines printed are a summary: part, exit code, seconds.
#
#   bash scripts/gpu_check.sh                       # tests kernels-tests runtime-tests faults-tests models-tests demo rt-bench k-bench bench
#   (rt-bench, k-bench and bench are suites of the one bench, `python3 -m hattn.bench --suite runtime|kernels|model`)
#   bash scripts/gpu_check.sh tests demo            # a subset
#   bash scripts/gpu_check.sh startup host-profile  # issue 21: cold/warm/traced start (MODES="full bcg"); pcg's and full's host
#                                                   # time under cProfile (run each first in a call: a fresh GPU)
#   bash scripts/gpu_check.sh dispatch-ab           # decode steps through Dynamo vs hattn's dispatch, per mode
#                                                   # (DA_ARGS="--modes pcg,bcg --switch plans": pcg's plans off/on)
#   bash scripts/gpu_check.sh kernel-profile        # every kernel of full mode's prefill and decode (GPU- vs host-bound;
#                                                   # KP_ARGS="--prompts 16,4096 --host 30": cProfile's rows too)
#   bash scripts/gpu_check.sh conv-ab               # the packed conv kernel's tile sizes against its bytes
#   bash scripts/gpu_check.sh graph-launch          # a CUDA graph's launch cost to the host by node count, PDL or not
#   bash scripts/gpu_check.sh seq-buckets           # full mode's prefill with packed graphs per sequence bucket, A/B
#   bash scripts/gpu_check.sh packed-steps          # pcg's and bcg's prefill with call-site graphs, A/B (PS_ARGS)
#   bash scripts/gpu_check.sh aot-key-diff          # why a warm start's piece misses torch's cache: its key vs the cold's
#   bash scripts/gpu_check.sh ahead-ab              # cold starts with HATTN_COMPILE_AHEAD=0 and =1 per mode (MODES)
#   bash scripts/gpu_check.sh pool-profile          # what each graph pool holds at its peak, by allocating code (PP_ARGS)
#   bash scripts/gpu_check.sh attn-ab               # packed prefill attention: hattn's Triton kernel vs FlashAttention-2
#   bash scripts/gpu_check.sh step-host             # a decode step's host time by stage, per mode (SH_ARGS="--modes pcg
#                                                   # --batches 1"); pcg's and bcg's stitched path too
#   bash scripts/gpu_check.sh ttft-trace            # the first token's host path by wall-clock stamps (TT_ARGS)
#   bash scripts/gpu_check.sh decode-layer           # a model decode layer: weights prefetched into L2; PDL triggers early
#   bash scripts/gpu_check.sh pdl-micro pdl-model   # PDL at kernel boundaries: GEMV chains; the model, variants in one
#                                                   # process (PDL_ARGS="--modes full --variants off,hattn+inductor")
#   bash scripts/gpu_check.sh fla-configs           # fla's cold autotuning vs its shipped configs; writes new ones
#                                                   # to $OUT/fla_configs.json (copy them into gated_delta/fla_configs)
#   bash scripts/gpu_check.sh all-tests             # every GPU test in 10 xdist workers (~5.5 min on the H200, over 6.3 on an H100: run it alone; -v
#                                                   # lines name each result even when the box cuts the summary)
#   SECONDS_TESTS=200 bash scripts/gpu_check.sh ... # a part's time box (SECONDS_<PART>, dashes as underscores)
#   RECHECK="tests/a.py::test_b tests/c.py" bash scripts/gpu_check.sh recheck  # some GPU tests alone (node ids, no spaces)
#   PATCH=ab.patch bash scripts/tree_ab.sh CMD...   # after a part (the wheels): CMD before and after a change, alternated
#   BENCH_BUDGET=300 BENCH_ARGS="--modes full,tc-ro" bash scripts/gpu_check.sh bench  # a --budget and more arguments
#
# Wheels (carry=[".whl"]; scripts/device_wheels.sh fetches them): fla-core, einops, hypothesis (cp312: the device's Python is 3.12), sortedcontainers, pytest
# and its deps, pytest-xdist and execnet, rich and its deps,
# and transformers 5.23 (the device's 5.17 lacks bailing_hybrid). Files under $OUT (the device tool returns 8 at
# most): gpu_tests.log demo.log runtime_bench.log kernels_bench.log bench.log bench/{bench.json,bench.txt,bench.png};
# rt-bench and k-bench write their reports under $OUT/runtime and $OUT/kernels (listed, not all returned).
set -uo pipefail
OUT=${OUT:-/tmp/hattn-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
  # byte-compile them as pip does by default (--no-compile above keeps the install short): without .pyc files every
  # process compiles transformers' sources again, ~7 s of each model build on the H200 (scripts/startup.sh measures it)
  python3 -m compileall -q -j 0 /tmp/site > /dev/null
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 MODES="${MODES:-full}"
nvidia-smi -L
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"

PYTEST=(python3 -m pytest -m gpu -v -p no:warnings -p no:cacheprovider -rfE --durations=8)
declare -A CMD=(
  [all-tests]="${PYTEST[*]} -n 10 --dist load tests"
  [tests]="${PYTEST[*]} tests --ignore=tests/kernels --ignore=tests/runtime --ignore=tests/models --ignore=tests/test_fuzz_modes.py"
  [kernels-tests]="${PYTEST[*]} tests/kernels"
  [runtime-tests]="${PYTEST[*]} tests/runtime --ignore=tests/runtime/test_gpu_faults.py"
  [faults-tests]="${PYTEST[*]} tests/runtime/test_gpu_faults.py tests/test_fuzz_modes.py"
  [models-tests]="${PYTEST[*]} tests/models"
  [demo]="python3 -m hattn.cli demo"
  [rt-bench]="python3 -m hattn.bench --suite runtime --preset qwen3.5-1b --out $OUT/runtime --no-progress --budget 140"
  [k-bench]="python3 -m hattn.bench --suite kernels --out $OUT/kernels --no-progress --budget 140"
  [bench]="python3 -m hattn.bench --preset qwen3.5-1b --out $OUT/bench --no-progress ${BENCH_BUDGET:+--budget $BENCH_BUDGET} ${BENCH_ARGS:-}"
  [recheck]="${PYTEST[*]} ${RECHECK:-tests}"
  [host-profile]="python3 scripts/host_profile.py ${HP_ARGS:---modes pcg,full}"
  [startup]="bash scripts/startup.sh"  # MODES comes through the environment: a command string keeps quotes literal
  [kernel-profile]="python3 scripts/kernel_profile.py --modes full ${KP_ARGS:-}"
  [bound-ab]="python3 scripts/host_profile.py --modes pcg,bcg --ab-only"
  [gemv-sweep]="python3 scripts/gemv_sweep.py --budget ${GEMV_BUDGET:-150}"
  [dispatch-ab]="python3 scripts/dispatch_ab.py ${DA_ARGS:-}"
  [pdl-micro]="python3 scripts/pdl_ab.py"
  [fla-configs]="python3 scripts/fla_configs.py --out /tmp/fla_configs --bundle $OUT/fla_configs.json"
  [pdl-model]="python3 scripts/pdl_model_ab.py ${PDL_ARGS:-}"
  [conv-ab]="python3 scripts/conv_ab.py"
  [graph-launch]="python3 scripts/graph_launch_ab.py"
  [decode-layer]="python3 scripts/decode_layer_ab.py"
  [seq-buckets]="python3 scripts/seq_buckets_ab.py ${SB_ARGS:-}"
  [packed-steps]="python3 scripts/packed_steps_ab.py ${PS_ARGS:-}"
  [pool-profile]="python3 scripts/pool_profile.py ${PP_ARGS:-}"
  [ttft-trace]="python3 scripts/ttft_trace.py ${TT_ARGS:-}"
  [sampling-ab]="python3 scripts/sampling_ab.py ${SA_ARGS:-}"
  [aot-key-diff]="python3 scripts/aot_key_diff.py"
  [ahead-ab]="bash scripts/ahead_ab.sh"  # MODES through the environment, as startup's
  [attn-ab]="python3 scripts/prefill_attention_ab.py"
  [step-host]="python3 scripts/step_host.py ${SH_ARGS:---modes pcg,bcg,full}"
)
declare -A LOG=([all-tests]=gpu_tests [tests]=gpu_tests [kernels-tests]=gpu_tests [runtime-tests]=gpu_tests [faults-tests]=gpu_tests [models-tests]=gpu_tests
                [demo]=demo [rt-bench]=runtime_bench [k-bench]=kernels_bench [bench]=bench [host-profile]=host_profile
                [startup]=startup [kernel-profile]=kernel_profile [gemv-sweep]=gemv_sweep [bound-ab]=bound_ab [recheck]=gpu_tests [dispatch-ab]=dispatch_ab
                [pdl-micro]=pdl_ab [pdl-model]=pdl_ab [fla-configs]=fla_configs [conv-ab]=conv_ab [graph-launch]=graph_launch [decode-layer]=decode_layer [seq-buckets]=seq_buckets [packed-steps]=packed_steps [pool-profile]=pool_profile [ttft-trace]=ttft_trace [sampling-ab]=sampling_ab [aot-key-diff]=aot_key_diff [ahead-ab]=ahead_ab [attn-ab]=attn_ab [step-host]=step_host)
declare -A BOX=([all-tests]=540 [tests]=120 [kernels-tests]=240 [runtime-tests]=200 [faults-tests]=200 [models-tests]=300 [demo]=200 [rt-bench]=150
                [k-bench]=150 [bench]=560 [host-profile]=240 [startup]=300 [kernel-profile]=180 [gemv-sweep]=200 [bound-ab]=150 [recheck]=120 [dispatch-ab]=220
                [pdl-micro]=120 [pdl-model]=330 [fla-configs]=150 [conv-ab]=120 [graph-launch]=90 [decode-layer]=120
                [seq-buckets]=200 [packed-steps]=240 [pool-profile]=240 [ttft-trace]=200 [sampling-ab]=90 [aot-key-diff]=90
                [ahead-ab]=400 [attn-ab]=90 [step-host]=330)
for part in "${!CMD[@]}"; do  # a part without its log or time box would run as `timeout "" ...`: nothing at all
  [ -n "${LOG[$part]:-}" ] && [ -n "${BOX[$part]:-}" ] || { echo "part $part lacks its LOG or BOX entry"; exit 2; }
done
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests kernels-tests runtime-tests faults-tests models-tests demo rt-bench k-bench bench)
summary=()
for part in "${parts[@]}"; do
  [ -n "${CMD[$part]:-}" ] || { echo "unknown part $part; parts: ${!CMD[*]}"; exit 2; }
  var="SECONDS_${part//-/_}"; var=${var^^}; box=${!var:-${BOX[$part]}}
  log="$OUT/${LOG[$part]}.log"; start=$(date +%s)
  echo "== $part (time box ${box}s)" | tee -a "$log"
  timeout "$box" ${CMD[$part]} >>"$log" 2>&1; rc=$?
  summary+=("$part rc=$rc $(( $(date +%s) - start ))s")
  grep -vE '^\[transformers\]' "$log" | tail -n 15
done
printf '%s\n' "== summary (rc 124: the time box ran out)" "${summary[@]}"
