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
relative difference of their deltas, and again with early stopping off (a request that stops one
step apart in the two runs differs by one Adam step; without the stop rule they agree to
rounding). Writes a Markdown table with --markdown FILE.

    python benchmarks/bench_editing.py [--models gemma3-270m smollm2-135m] [--requests 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lga_dist.answers import encode_prompt_answer  # noqa: E402
from lga_dist.devices import synchronize  # noqa: E402
from lga_dist.editing import EditContext, edit_window  # noqa: E402
from lga_dist.editing.context import context_prefixes, prefixed_prompts  # noqa: E402
from lga_dist.editing.covariance import compute_second_moments  # noqa: E402
from lga_dist.editing.memit import MemitHyperParams, memit_solve, spread_over_layers  # noqa: E402
from lga_dist.editing.prepare import corpus_texts  # noqa: E402
from lga_dist.editing.targets import compute_targets  # noqa: E402
from lga_dist.io.requests import read_requests  # noqa: E402
from lga_dist.models import DTYPES, get_module, load_model  # noqa: E402
from lga_dist.models.demo_data import demo_requests_path  # noqa: E402

from benchmarks.tables import publish  # noqa: E402


def timed(work, device: torch.device):
    """``work()`` and its seconds, the device's queued kernels included."""
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - started


def largest_difference(batched, alone) -> float:
    """Largest relative difference between a batch's delta rows and the same requests' deltas alone."""
    return max(float((batched.delta[i] - one.delta[0]).norm() / one.delta[0].norm().clamp(min=1e-30))
               for i, one in enumerate(alone))


def linear_gflops(weight: torch.Tensor, rows: int, seconds: float = 2.0) -> float:
    """Arithmetic rate of the MLP's output projection on ``rows`` tokens at once (the step's dominant GEMM)."""
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    calls, started = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - started < seconds:
            torch.nn.functional.linear(x, weight)
            calls += 1
            if calls % 100 == 0:
                synchronize(weight.device)
    synchronize(weight.device)
    return 2 * rows * weight.numel() * calls / (time.perf_counter() - started) / 1e9


def measure(model: str, n_requests: int, loop_requests: int, cov_tokens: int, dtype: str, device: str) -> dict:
    device = torch.device(device)
    loaded = load_model(model, dtype=DTYPES[dtype], device=device)
    requests = read_requests([str(demo_requests_path())]).requests[500:500 + n_requests]
    texts = corpus_texts(None, "text")  # the default corpus every edit job uses
    layers = edit_window(loaded.n_layers // 2, "memit", 3, loaded.n_layers)
    hparams = MemitHyperParams()
    prefixes = context_prefixes(loaded.model, loaded.tokenizer, loaded.fingerprint, device=device)

    def moments_of(which):
        return compute_second_moments(loaded.model, loaded.tokenizer, loaded.adapter, which, texts, cov_tokens,
                                      device=device, progress=False)[0]

    moments, covariance_s = timed(lambda: moments_of(layers), device)
    per_layer_s = sum(timed(lambda: moments_of([layer]), device)[1] for layer in layers)

    site = loaded.adapter.layer_name(layers[-1])

    def targets_of(batch, options=hparams):
        return compute_targets(loaded.model, loaded.tokenizer, loaded.adapter, batch, prefixes, site, options, device)

    batched, targets_s = timed(lambda: targets_of(requests), device)
    alone, loop_s = timed(lambda: [targets_of([request]) for request in requests[:loop_requests]], device)
    loop_s *= len(requests) / loop_requests
    difference = largest_difference(batched, alone)
    # The stop rule (a request stops once its NLL is below stop_loss) is a threshold: a float-level
    # difference between a batch and a request alone can stop a request one step apart, one Adam step
    # of difference. Without it the two must agree to rounding.
    exact = dataclasses.replace(hparams, stop_loss=0.0)
    loop_part = requests[:loop_requests]
    difference_no_stop = largest_difference(targets_of(loop_part, exact), [targets_of([r], exact) for r in loop_part])

    ctx = EditContext(loaded.model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, prefixes,
                      lambda layer: moments[layer], device)
    _, keys_solve_s = timed(lambda: spread_over_layers(
        ctx, requests, layers, hparams,
        lambda layer, residual, keys: memit_solve(residual, keys, moments[layer], hparams.mom2_update_weight),
        targets=batched), device)
    total = covariance_s + targets_s + keys_solve_s
    # Why batching gains little on a CPU: one request alone is already a batch (its prompt after every
    # context prefix); if the GEMM runs as fast on one request's tokens as on all of them, only the
    # per-call overhead is left to save.
    tokens = [sum(len(encode_prompt_answer(loaded.tokenizer, t.text, r.target_new).input_ids)
                  for t in prefixed_prompts(r, prefixes, hparams.fact_token)) for r in requests]
    weight = get_module(loaded.model, loaded.adapter.mlp_out_name(layers[-1])).weight.detach()
    one_gflops = linear_gflops(weight, round(sum(tokens) / len(tokens)))
    all_gflops = linear_gflops(weight, sum(tokens))
    return {"model": Path(model).name, "layers": layers, "requests": len(requests), "covariance_s": covariance_s,
            "covariance_per_layer_s": per_layer_s, "targets_s": targets_s, "keys_solve_s": keys_solve_s,
            "seconds_per_edit": total / len(requests), "loop_s": loop_s, "batched_speedup": loop_s / targets_s,
            "max_relative_delta_difference": difference, "max_relative_difference_no_stop": difference_no_stop,
            "tokens_per_request": sum(tokens) / len(tokens), "gemm_gflops_one_request": one_gflops,
            "gemm_gflops_all_requests": all_gflops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--cov-tokens", type=int, default=100_000)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="float64 separates rounding from real differences between batched and one-at-a-time")
    parser.add_argument("--loop-requests", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (the model and every phase run there)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    rows = [measure(model, args.requests, args.loop_requests, args.cov_tokens, args.dtype, args.device)
            for model in args.models]
    where = f"{torch.get_num_threads()} threads" if args.device == "cpu" else args.device
    lines = [f"MEMIT phases: {args.requests} requests, window of 3 ending mid-model, {args.dtype}, "
             f"{where}; C over {args.cov_tokens:,} tokens", "",
             "| model | layers | C, one pass | C, a pass per layer | targets (batched) | targets, one at a time "
             "(extrapolated) | batched speed-up | max rel. delta diff | same, no early stop | keys+solve | "
             "s per edit | GEMM GFLOP/s: one request's tokens / all |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {','.join(map(str, r['layers']))} | {r['covariance_s']:.1f} s | "
                     f"{r['covariance_per_layer_s']:.1f} s | {r['targets_s']:.1f} s | {r['loop_s']:.1f} s | "
                     f"{r['batched_speedup']:.2f}x | {r['max_relative_delta_difference']:.1e} | "
                     f"{r['max_relative_difference_no_stop']:.1e} | "
                     f"{r['keys_solve_s']:.1f} s | {r['seconds_per_edit']:.3f} | "
                     f"{r['gemm_gflops_one_request']:.0f} ({r['tokens_per_request']:.0f} tokens) / "
                     f"{r['gemm_gflops_all_requests']:.0f} |")
    publish(lines, args.markdown, [{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()}
                                   for r in rows])


if __name__ == "__main__":
    main()
