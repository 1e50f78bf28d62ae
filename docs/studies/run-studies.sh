#!/usr/bin/env bash
# The four studies of docs/fidelity.md, on the edits as the reference code computes them: 30 proxy requests
# edited at every layer, 120 test requests edited at the layers some selector picks and the golden layers, 12 zsRE
# transfer requests, bfloat16, 2 actors. One at a time; each resumes from its committed grid tasks.
set -uo pipefail
cd "$(dirname "$0")/../.."
for study in "smollm2-135m rome" "gemma3-270m rome" "smollm2-135m memit" "gemma3-270m memit"; do
  set -- $study
  python3 jobs/validate_golden.py --model $1 --method $2 --window 3 --dtype bfloat16 --limit 150 \
      --proxy-fraction 0.2 --proxy-sizes 0.01 0.05 0.1 --new-facts-only --test-layers picks \
      --transfer-requests ../shared/data/zsre/zsre_mend_train-1k.json --transfer-limit 12 \
      --chunk-size 20 --actors 2 --no-progress --out docs/studies/$1-$2-bf16 > /tmp/study-$1-$2.log 2>&1
done
