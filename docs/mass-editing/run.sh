#!/usr/bin/env bash
# The mass-editing study of docs/mass-editing.md: 1,000 CounterFact facts SmolLM2-135M does not already
# predict (from counterfact-edit.json, disjoint from the shipped facts the held-out set comes from), in
# batches of 100, tracked after every batch (100 of the edited requests, 50 held-out facts, fluency):
#   memit-ranked      MEMIT at the window of 3 ending at the model's golden layer (its own ranking)
#   alphaedit-ranked  AlphaEdit at the same window, sequential (the keys of every earlier batch preserved)
#   memit-easyedit    MEMIT at EasyEdit's hard-coded LLaMA layers, 4-8
#   memit-one-batch   MEMIT, all 1,000 in one batch (the reference the sequential runs are measured against)
# One run at a time, in this process (one thread per core); each resumes from its committed batches, so the
# script can be stopped and started again. Outputs: out/mass-M/<run>/ (the edited models stay there), the
# logs and summaries here, and the comparison (compare-bulk) in table.md and curves.png.
set -uo pipefail
cd "$(dirname "$0")/../.."
M=${MODEL:-smollm2-135m}
N=${EDITS:-1000}
HERE=docs/mass-editing
OUT=out/mass-$M
REQUESTS=../shared/data/counterfact/counterfact-edit.json
COMMON=(--model "$M" --requests "$REQUESTS" --new-facts-only --limit "$N" --probe 100 --held-out 50
        --fluency-tokens 50 --actors 0 --no-progress)
python3 jobs/rank_layers.py --model "$M" --out "$OUT/ranking" --no-progress > "$HERE/$M-ranking.log" 2>&1
run() {
  local name=$1; shift
  python3 jobs/bulk_edit.py "${COMMON[@]}" "$@" --out "$OUT/$name" > "$HERE/$M-$name.log" 2>&1
  tail -n 1 "$HERE/$M-$name.log" > "$HERE/$M-$name.json"
}
run memit-ranked --ranking "$OUT/ranking/ranking.parquet" --method memit --batch-size 100
run alphaedit-ranked --ranking "$OUT/ranking/ranking.parquet" --method alphaedit --batch-size 100
run memit-easyedit --layers 4-8 --method memit --batch-size 100
run memit-one-batch --ranking "$OUT/ranking/ranking.parquet" --method memit --batch-size "$N"
python3 -m lga_dist.cli compare-bulk "$OUT/memit-ranked" "$OUT/alphaedit-ranked" "$OUT/memit-easyedit" \
    "$OUT/memit-one-batch" --title "$M: $N new CounterFact facts (counterfact-edit.json), batches of 100" \
    --plot "$HERE/$M-curves.png" --table "$HERE/$M-table.md" > "$HERE/$M-compare.log" 2>&1
