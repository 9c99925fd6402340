#!/usr/bin/env bash
# A change's before/after on one machine: run a command in a copy of this tree with PATCH reversed ("before") and in
# this tree ("after"), alternately ROUNDS times, each in a process of its own; logs under $OUT as ab_<before|after>_<round>.log.
#
#   git diff HEAD~1 HEAD -- hattn > ab.patch            # here, before the device call (ab.patch travels, untracked)
#   bash scripts/gpu_check.sh recheck                    # first: installs the carried wheels into /tmp/site
#   PATCH=ab.patch ROUNDS=2 bash scripts/tree_ab.sh python3 scripts/kernel_profile.py --modes full --prompts 128,1024
#
# Session 35 measured fla's chunk offsets so (docs/benchmarks.md): launches and device us per step of each log.
set -uo pipefail
OUT=${OUT:-/tmp/hattn-out}; mkdir -p "$OUT"
: "${PATCH:?PATCH=<a patch of the change, relative to this tree>}"
patch_file=$(realpath "$PATCH") before=/tmp/tree-ab-before
rm -rf "$before" && cp -r . "$before" && (cd "$before" && patch -s -R -p1 < "$patch_file") \
  || { echo "tree_ab: $PATCH does not reverse on this tree"; exit 2; }
for round in $(seq "${ROUNDS:-2}"); do
  for side in before after; do
    dir=$([ "$side" = before ] && echo "$before" || pwd)
    log="$OUT/ab_${side}_${round}.log"
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout "${BOX:-150}" "$@" > "$log" 2>&1); echo "== $side $round rc=$?"
    grep -E "^== |kernels:" "$log" || tail -n 5 "$log"
  done
done
