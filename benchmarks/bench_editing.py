"""Where MEMIT's time goes: covariance vs target optimisation vs keys and solve, per edit.

Per model (by default the packaged real models gemma3-270m and smollm2-135m; `demo` is the demo
fact model), MEMIT on N shipped CounterFact requests (default 64) at the window of 3 layers
ending in the middle of the model:
  covariance   C = E[k k^T] of every window layer in one pass over the corpus (computed fresh,
               the cache bypassed), against one pass per layer (what each layer cost alone)
  targets      the batched target optimisation (one delta row per request)
  keys+solve   keys at every window layer, the current block outputs, the float64 solves
Prints seconds per edit and each phase's share; the batched targets are also timed against one
request at a time on the first --loop-requests requests (extrapolated to N), with the largest
relative difference of their deltas. Writes a Markdown table with --markdown FILE.

    python benchmarks/bench_editing.py [--models gemma3-270m smollm2-135m] [--requests 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lga_dist.editing import EditContext, edit_window  # noqa: E402
from lga_dist.editing.context import context_prefixes  # noqa: E402
from lga_dist.editing.covariance import compute_second_moments  # noqa: E402
from lga_dist.editing.memit import MemitHyperParams, memit_solve, spread_over_layers  # noqa: E402
from lga_dist.editing.prepare import corpus_texts  # noqa: E402
from lga_dist.editing.targets import compute_targets  # noqa: E402
from lga_dist.io.requests import read_requests  # noqa: E402
from lga_dist.models import load_model  # noqa: E402
from lga_dist.models.demo_data import demo_requests_path  # noqa: E402


def timed(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def measure(model: str, n_requests: int, loop_requests: int, cov_tokens: int) -> dict:
    loaded = load_model(model)
    requests = read_requests([str(demo_requests_path())]).requests[500:500 + n_requests]
    texts = corpus_texts(None, "text")  # the default corpus every edit job uses
    layers = edit_window(loaded.n_layers // 2, "memit", 3, loaded.n_layers)
    hparams = MemitHyperParams()
    prefixes = context_prefixes(loaded.model, loaded.tokenizer, loaded.fingerprint)

    def moments_of(which):
        return compute_second_moments(loaded.model, loaded.tokenizer, loaded.adapter, which, texts, cov_tokens,
                                      progress=False)[0]

    moments, covariance_s = timed(lambda: moments_of(layers))
    per_layer_s = sum(timed(lambda: moments_of([layer]))[1] for layer in layers)

    site = loaded.adapter.layer_name(layers[-1])

    def targets_of(batch):
        return compute_targets(loaded.model, loaded.tokenizer, loaded.adapter, batch, prefixes, site, hparams)

    batched, targets_s = timed(lambda: targets_of(requests))
    alone, loop_s = timed(lambda: [targets_of([request]) for request in requests[:loop_requests]])
    loop_s *= len(requests) / loop_requests
    difference = max(float((batched.delta[i] - one.delta[0]).norm() / one.delta[0].norm().clamp(min=1e-30))
                     for i, one in enumerate(alone))

    ctx = EditContext(loaded.model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, prefixes,
                      lambda layer: moments[layer])
    _, keys_solve_s = timed(lambda: spread_over_layers(
        ctx, requests, layers, hparams,
        lambda layer, residual, keys: memit_solve(residual, keys, moments[layer], hparams.mom2_update_weight),
        targets=batched))
    total = covariance_s + targets_s + keys_solve_s
    return {"model": model, "layers": layers, "requests": len(requests), "covariance_s": covariance_s,
            "covariance_per_layer_s": per_layer_s, "targets_s": targets_s, "keys_solve_s": keys_solve_s,
            "seconds_per_edit": total / len(requests), "loop_s": loop_s, "batched_speedup": loop_s / targets_s,
            "max_relative_delta_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--cov-tokens", type=int, default=100_000)
    parser.add_argument("--loop-requests", type=int, default=8)
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    rows = [measure(model, args.requests, args.loop_requests, args.cov_tokens) for model in args.models]
    lines = [f"MEMIT phases: {args.requests} requests, window of 3 ending mid-model, {torch.get_num_threads()} "
             f"threads; C over {args.cov_tokens:,} tokens", "",
             "| model | layers | C, one pass | C, a pass per layer | targets (batched) | targets, one at a time "
             "(extrapolated) | batched speed-up | max rel. delta diff | keys+solve | s per edit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {','.join(map(str, r['layers']))} | {r['covariance_s']:.1f} s | "
                     f"{r['covariance_per_layer_s']:.1f} s | {r['targets_s']:.1f} s | {r['loop_s']:.1f} s | "
                     f"{r['batched_speedup']:.2f}x | {r['max_relative_delta_difference']:.1e} | "
                     f"{r['keys_solve_s']:.1f} s | {r['seconds_per_edit']:.3f} |")
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    print(json.dumps([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]))


if __name__ == "__main__":
    main()
