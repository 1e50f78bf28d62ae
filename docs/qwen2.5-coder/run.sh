#!/usr/bin/env bash
# Qwen2.5-Coder 1.5B (packaged as qwen2.5-coder-1.5b) measured as docs/fidelity.md reports it: ranking time and
# memory per actor, MEMIT's update weight, the end-to-end rank -> bulk-edit runs with their contrasts, a reload
# check, and a ROME validate-golden study. Every step is skipped when its output is here already, so the script
# can be stopped and started again; one job at a time (the machine's two cores each run one thread).
#   lga-dist models --install qwen2.5-coder-1.5b && lga-dist models --prepare qwen2.5-coder-1.5b   # once, first
# STEPS (default all): any of bench ranking sweep e2e reload study, in that order.
set -uo pipefail
cd "$(dirname "$0")/../.."
M=qwen2.5-coder-1.5b
HERE=docs/qwen2.5-coder
OUT=out/$M
VAL=../shared/data/counterfact/counterfact-val.json
STEPS=${STEPS:-bench ranking sweep e2e reload study}
want() { [[ " $STEPS " == *" $1 "* ]]; }
last_json() { tail -n 1 "$1" > "$2"; }
mkdir -p "$HERE"

# 1. Ranking time and peak memory per actor (100 proxy requests, a fresh process per configuration).
if want bench; then
  [ -f "$HERE/ranking-memory-lga.md" ] || python3 benchmarks/bench_ranking_memory.py --models $M \
      --markdown "$HERE/ranking-memory-lga.md" > "$HERE/ranking-memory-lga.log" 2>&1
  [ -f "$HERE/ranking-memory-cma.md" ] || python3 benchmarks/bench_ranking_memory.py --models $M --selectors cma \
      --actors 0 2 --dtypes bfloat16 --markdown "$HERE/ranking-memory-cma.md" > "$HERE/ranking-memory-cma.log" 2>&1
fi

# 2. The model's own ranking, as a user runs it (one process, float32, 100 proxy requests).
if want ranking || want sweep || want e2e; then
  [ -f "$HERE/ranking.json" ] || { python3 jobs/rank_layers.py --model $M --actors 0 --no-progress \
      --out "$OUT/ranking" > "$HERE/ranking.log" 2>&1; last_json "$HERE/ranking.log" "$HERE/ranking.json"; }
  read -r GOLDEN WORST < <(python3 -c "import json; r = json.load(open('$HERE/ranking.json'))['ranking']; \
print(r[0], r[-1])")
  window() { echo "$(( $1 >= 2 ? $1 - 2 : 0 ))-$(( $1 >= 2 ? $1 : 2 ))"; }  # window of 3 ending at the layer
fi

# 3. MEMIT's mom2_update_weight on 30 validation requests the model does not know, at the ranked window.
if want sweep; then
  [ -f "$HERE/sweep/sweep.parquet" ] || lga-dist edit --model $M --method memit --layers "$(window "$GOLDEN")" \
      --requests $VAL --new-facts-only --limit 30 --sweep mom2_update_weight=100,300,1000,3000,15000 \
      --no-progress --out "$HERE/sweep" > "$HERE/sweep.log" 2>&1
fi

# 4. End to end: 100 new shipped facts bulk-edited where the ranking points (no --layers), at the worst-ranked
#    window the fences kept, and at EasyEdit's hard-coded MEMIT layers 4-8 (one batch, one process, float32).
if want e2e; then
  bulk() {
    local name=$1; shift
    [ -f "$HERE/e2e-$name.json" ] || { python3 jobs/bulk_edit.py --model $M --new-facts-only --limit 100 --actors 0 \
        --no-progress --out "$OUT/$name" "$@" > "$HERE/e2e-$name.log" 2>&1; \
        last_json "$HERE/e2e-$name.log" "$HERE/e2e-$name.json"; }
  }
  bulk golden --ranking "$OUT/ranking/ranking.parquet"
  bulk worst --layers "$(window "$WORST")"
  bulk easyedit --layers 4-8
fi

# 5. The saved golden-window model, reloaded, against the metrics the run recorded.
if want reload; then
  [ -f "$HERE/reload.json" ] || python3 benchmarks/check_reload.py "$OUT/golden" > "$HERE/reload.json"
fi

# 6. ROME validate-golden: 30 proxy requests at every layer, the test split at the layers some selector picks.
if want study; then
  python3 jobs/validate_golden.py --model $M --method rome --dtype bfloat16 --limit 90 --proxy-fraction 0.34 \
      --proxy-sizes 0.1 --new-facts-only --test-layers picks --chunk-size 10 --actors 2 --no-progress \
      --out docs/studies/$M-rome-bf16 > "$HERE/study.log" 2>&1
fi
