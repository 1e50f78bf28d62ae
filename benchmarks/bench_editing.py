"""Where MEMIT's time goes: covariance vs target optimisation vs keys and solve, per edit.

On the demo model (or --model), MEMIT on N requests (default 200) at a window of layers:
  covariance   C = E[k k^T] per window layer over the corpus (computed fresh: the cache is bypassed)
  targets      the batched target optimisation (one delta row per request)
  keys+solve   keys at every window layer, the current block outputs, the float64 solves
Prints seconds per edit and each phase's share; the batched targets are also timed against the
reference code's loop (one request at a time) on the first --loop-requests requests.

    python benchmarks/bench_editing.py [--requests 200] [--layers 0,1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lga_dist.editing import EditContext  # noqa: E402
from lga_dist.editing.context import context_prefixes  # noqa: E402
from lga_dist.editing.covariance import compute_second_moments  # noqa: E402
from lga_dist.editing.memit import MemitHyperParams, memit_solve, spread_over_layers  # noqa: E402
from lga_dist.editing.targets import compute_targets  # noqa: E402
from lga_dist.models import load_model  # noqa: E402
from lga_dist.models.demo import build_demo_model, demo_facts, training_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--layers", default="0,1")
    parser.add_argument("--cov-tokens", type=int, default=100_000)
    parser.add_argument("--loop-requests", type=int, default=10)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    loaded = load_model(build_demo_model(show_progress=False).path)
    facts = demo_facts(1000)
    requests = facts[500:500 + args.requests]
    texts = training_text(1000)  # the corpus `lga-dist edit` uses for the demo model
    hparams = MemitHyperParams()
    prefixes = context_prefixes(loaded.model, loaded.tokenizer, loaded.fingerprint)

    started = time.perf_counter()
    moments, _ = compute_second_moments(loaded.model, loaded.tokenizer, loaded.adapter, layers, texts,
                                        args.cov_tokens, progress=False)
    covariance_s = time.perf_counter() - started

    site = loaded.adapter.layer_name(layers[-1])
    started = time.perf_counter()
    compute_targets(loaded.model, loaded.tokenizer, loaded.adapter, requests, prefixes, site, hparams)
    targets_s = time.perf_counter() - started

    started = time.perf_counter()
    for request in requests[:args.loop_requests]:
        compute_targets(loaded.model, loaded.tokenizer, loaded.adapter, [request], prefixes, site, hparams)
    loop_s = (time.perf_counter() - started) / args.loop_requests * len(requests)

    ctx = EditContext(loaded.model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, prefixes,
                      lambda layer: moments[layer])
    started = time.perf_counter()
    spread_over_layers(ctx, requests, layers, hparams,
                       lambda layer, residual, keys: memit_solve(residual, keys, moments[layer],
                                                                 hparams.mom2_update_weight))
    total_memit_s = time.perf_counter() - started
    keys_solve_s = max(total_memit_s - targets_s, 0.0)  # spread_over_layers runs the targets again

    total = covariance_s + targets_s + keys_solve_s
    print(f"MEMIT, demo model, {len(requests)} requests, layers {layers}, {torch.get_num_threads()} threads")
    for name, seconds in (("covariance", covariance_s), ("targets", targets_s), ("keys+solve", keys_solve_s)):
        print(f"  {name:<11} {seconds:8.2f} s  {100 * seconds / total:5.1f} %")
    print(f"  per edit    {total / len(requests):8.3f} s")
    print(f"  batched targets vs one request at a time: {targets_s:.2f} s vs {loop_s:.2f} s (extrapolated), "
          f"{loop_s / targets_s:.1f}x")
    print(json.dumps({"requests": len(requests), "covariance_s": round(covariance_s, 2),
                      "targets_s": round(targets_s, 2), "keys_solve_s": round(keys_solve_s, 2),
                      "seconds_per_edit": round(total / len(requests), 4),
                      "batched_speedup": round(loop_s / targets_s, 2)}))


if __name__ == "__main__":
    main()
