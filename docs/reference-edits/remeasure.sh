#!/usr/bin/env bash
# What depends on the edits, measured again after the target optimisation, ROME's update and MEMIT's keys and
# residuals follow the authors' reference code (docs/reference-edits/README.md has the figures). Before = a
# checkout of 909848b, the last commit with the earlier edits (git worktree add "$BEFORE" 909848b).
# Runs one job at a time; every job resumes or reuses what an earlier run of this script finished.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT=docs/reference-edits
BEFORE=${BEFORE:-/tmp/before}
VAL=../shared/data/counterfact/counterfact-val.json
ROME="--method rome --dtype bfloat16 --limit 60 --new-facts-only --cma-samples 0 --param-sets out --proxy-sizes 0.5
      --chunk-size 20 --no-progress"
log() { tail -n 1 "$1" > "$2"; }

# 1. ROME at layers 0, 3 and 10 on the 60 requests of the studies (bfloat16), before and after.
for M in smollm2-135m gemma3-270m; do
  for L in 0 3 10; do
    [ -f "$OUT/rome-$M-before-layer$L/golden_summary.md" ] || (cd "$BEFORE" && python3 jobs/validate_golden.py \
      --model $M $ROME --layers $L:$L --actors 0 --out "$ROOT/$OUT/rome-$M-before-layer$L" > /tmp/remeasure.log 2>&1)
  done
  [ -f "$OUT/rome-$M-after/golden_summary.md" ] || python3 jobs/validate_golden.py --model $M $ROME --layers 0,3,10 \
      --actors 2 --out "$OUT/rome-$M-after" > /tmp/remeasure.log 2>&1
done

# 2. MEMIT's update weight per packaged model, on 30 validation requests the model does not know, at the window its
#    ranking names (float32, one process).
for spec in "smollm2-135m 8-10" "gemma3-270m 0-2"; do
  set -- $spec
  [ -f "$OUT/sweep-$1/sweep.parquet" ] || lga-dist edit --model $1 --method memit --layers $2 --requests $VAL \
      --new-facts-only --limit 30 --sweep mom2_update_weight=100,300,1000,3000,15000 --no-progress \
      --out "$OUT/sweep-$1" > "$OUT/sweep-$1.log" 2>&1
done

# 3. End to end: the model's own ranking, then 100 new facts bulk-edited where it points, and at the worst-ranked
#    window its fences kept (one process, float32, the registry's update weight).
for spec in "smollm2-135m 24-26" "gemma3-270m 13-15"; do
  set -- $spec
  python3 jobs/rank_layers.py --model $1 --out out/e2e-$1/ranking --no-progress > "$OUT/e2e-$1-ranking.log" 2>&1
  python3 jobs/bulk_edit.py --model $1 --ranking out/e2e-$1/ranking/ranking.parquet --new-facts-only --limit 100 \
      --actors 0 --no-progress --out out/e2e-$1/golden > /tmp/remeasure.log 2>&1; log /tmp/remeasure.log "$OUT/e2e-$1-golden.json"
  python3 jobs/bulk_edit.py --model $1 --layers $2 --new-facts-only --limit 100 --actors 0 --no-progress \
      --out out/e2e-$1/worst > /tmp/remeasure.log 2>&1; log /tmp/remeasure.log "$OUT/e2e-$1-worst.json"
done
