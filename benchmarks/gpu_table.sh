#!/bin/bash
# The benchmark table on one GPU, timed on shape twins of the packaged models (benchmarks/shape_twin.py:
# their config and tokenizer, random weights), for a GPU machine the weights cannot reach.
#
#   python3 benchmarks/shape_twin.py gemma3-270m SKELETONS/gemma3-270m --skeleton   # where the model is
#   python3 benchmarks/shape_twin.py smollm2-135m SKELETONS/smollm2-135m --skeleton
#   bash benchmarks/gpu_table.sh SKELETONS OUT                                        # on the GPU machine
#
# Steps, most wanted first, each under its own time limit so that one failure leaves the rest:
# LGA pass vs training vs naive autograd with Gram products stacked vs per layer (bfloat16), one
# ZeRO-3 rank over NCCL vs the single-process core, MEMIT's phases and batched vs one-at-a-time
# targets, then the LGA table again in float32; zero3-knobs repeats the rank with DeepSpeed's persistence
# threshold raised and with larger batches. Environment: DEVICE (cuda), REQUESTS (64), REPEATS (3), STEPS
# (all: "scoring-bfloat16 zero3 zero3-knobs editing-bfloat16 scoring-float32"), LIMIT (seconds per step, 300).
set -uo pipefail
skeletons=${1:?folder of skeletons, one per model}
out=${2:?output folder}
device=${DEVICE:-cuda}
requests=${REQUESTS:-64}
repeats=${REPEATS:-3}
steps=${STEPS:-scoring-bfloat16 zero3 zero3-knobs editing-bfloat16 scoring-float32}
limit=${LIMIT:-300}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export LGA_DIST_CACHE=${LGA_DIST_CACHE:-$(mktemp -d)} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
twins=$(mktemp -d)
models=()
for skeleton in "$skeletons"/*/; do
    name=$(basename "$skeleton")
    python3 "$here/shape_twin.py" "$skeleton" "$twins/$name" || exit 1
    models+=("$twins/$name")
done
names=$(IFS="|"; echo "${models[*]##*/}")  # the table rows start with the model's name
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step() {  # step NAME GROUP COMMAND...: run if STEPS names GROUP, under LIMIT, the whole output into OUT/NAME.log
    local name=$1 group=$2
    shift 2
    [[ " $steps " == *" $group "* ]] || return 0
    echo "== $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? at ${SECONDS} s"
    grep -E -e "^(\||LGA scoring|model |core |MEMIT|$names|\{)" -e "requests in batches" -e "loaded on" -e "since the worker" "$out/$name.log" | grep -v -E "^\| ---"
}

step scoring-bfloat16 scoring-bfloat16 python3 "$here/bench_scoring.py" --models "${models[@]}" --device "$device" \
    --dtype bfloat16 --repeats "$repeats"
for model in "${models[@]}"; do
    step "zero3-$(basename "$model")" zero3 python3 "$here/profile_zero3.py" --model "$model" --device "$device" \
        --dtype bfloat16 --requests "$requests" --top 8
done
for model in "${models[@]}"; do  # DeepSpeed's knobs on the same rank: every matrix but the embedding kept
    # resident (persistence 2,000,000), then batches of 64 (fewer fetch/release rounds per request)
    step "zero3-persist-$(basename "$model")" zero3-knobs python3 "$here/profile_zero3.py" --model "$model" \
        --device "$device" --dtype bfloat16 --requests "$requests" --persistence 2000000 --top 8
    step "zero3-batch64-$(basename "$model")" zero3-knobs python3 "$here/profile_zero3.py" --model "$model" \
        --device "$device" --dtype bfloat16 --requests "$requests" --batch-size 64 --top 8
done
step editing-bfloat16 editing-bfloat16 python3 "$here/bench_editing.py" --models "${models[@]}" --device "$device" \
    --dtype bfloat16 --requests "$requests"
step scoring-float32 scoring-float32 python3 "$here/bench_scoring.py" --models "${models[@]}" --device "$device" \
    --dtype float32 --repeats "$repeats"
