"""What the packaged models know before any edit: the figures behind the default model's choice.

On N CounterFact val prompts (../shared/data, or --requests), per packaged model:
  top1_true   share of prompts whose next token is the true answer's first token
  true_over_new  share with P(true) > P(new target) (1 - ES of the unedited model; mean answer NLL)
  NS          neighborhood success of the unedited model
A model that knows more of the facts gives edits something to move and LGA a real old answer.

    python benchmarks/bench_model_knowledge.py [--models gemma3-270m smollm2-135m] [--n 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lga_dist.evaluation import aggregate, evaluate_requests  # noqa: E402
from lga_dist.io.requests import read_requests  # noqa: E402
from lga_dist.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def top1_true(model, tokenizer, requests, batch_size: int = 32) -> float:
    """Next-token argmax after the prompt equals the first token of " " + true answer."""
    hits = []
    tokenizer.padding_side = "left"
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        encoded = tokenizer([r.prompt for r in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**encoded).logits[:, -1]
        for request, predicted in zip(chunk, logits.argmax(-1).tolist()):
            first = tokenizer(" " + request.target_true, add_special_tokens=False).input_ids[0]
            hits.append(predicted == first)
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--requests",
                        default=str(REPO.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"))
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    requests = read_requests([args.requests]).requests[:args.n]
    summary = {}
    for name in args.models:
        started = time.perf_counter()
        loaded = load_model(name)
        metrics = aggregate(evaluate_requests(loaded.model, loaded.tokenizer, requests))
        row = {"top1_true": top1_true(loaded.model, loaded.tokenizer, requests),
               "true_over_new": 1.0 - metrics["ES"], "NS": metrics["NS"]}
        summary[name] = {k: round(v, 3) for k, v in row.items()}
        print(f"{name:<14} top-1 true first token {row['top1_true']:.3f}   P(true) > P(new) "
              f"{row['true_over_new']:.3f}   NS {row['NS']:.3f}   ({len(requests)} prompts, "
              f"{time.perf_counter() - started:.0f} s)", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
