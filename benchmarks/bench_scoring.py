"""LGA scoring cost on the packaged real models, measured side by side with two baselines in the same run.

For each model (by default the packaged real models gemma3-270m and smollm2-135m; also `demo`,
the demo fact model, and `llama130m`, a randomly initialised LLaMA: hidden 768, 12 layers) and
one batch of 16 CounterFact requests:
  - lga:   LayerGradientScorer.score (hooks + Gram identity, no parameter gradients) as jobs run
           it: Gram products one layer at a time on a CPU, every layer's stacked on an accelerator
  - lga-per-layer, lga-stacked: the same with each of the two forced (modules_per_gram), so the
           table shows what the stacking saves on this device (kernel launches on a GPU)
  - train: a training-style forward+backward of the same padded batch with parameter
           gradients and no hooks (the cost of "one forward+backward")
  - naive: per request, one forward, then torch.autograd.grad of L_old and of L_new on the
           selected layer weights (two gradient copies of every selected weight)
Each method runs in its own subprocess so its peak memory (max RSS, or CUDA peak allocation)
above the loaded model can be read. With --end-to-end, each packaged model is also converted
from its GGUF into an empty cache (conversion time) and ranked by the README's first command,
`python3 jobs/rank_layers.py --model NAME` (ranking time, the job's own `seconds`). Prints time
ratios and memory; no thresholds enforced.

    python benchmarks/bench_scoring.py [--models gemma3-270m smollm2-135m] [--repeats 3] [--device cuda]
                                       [--dtype bfloat16] [--end-to-end]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lga_dist.answers import answer_logits, answer_nll  # noqa: E402
from lga_dist.devices import synchronize  # noqa: E402
from lga_dist.lga.scoring import LayerGradientScorer, encode_request_pair, pair_batch  # noqa: E402
from lga_dist.models import DTYPES, adapter_for, get_module, load_model  # noqa: E402
from lga_dist.models.demo import build_tokenizer, demo_facts  # noqa: E402
from lga_dist.models.sources import resolve_model  # noqa: E402

BATCH = 16
METHODS = ("lga", "lga-per-layer", "lga-stacked", "train", "naive")
ALL_MODULES = 10**6  # more modules than any model has: every layer's Gram products in one stack


def load(kind: str, device: str, dtype: torch.dtype):
    if kind != "llama130m":  # a packaged name (gemma3-270m, smollm2-135m, demo) or a model directory
        loaded = load_model(kind, dtype=dtype, device=device)
        return loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers
    import transformers

    tokenizer = build_tokenizer(demo_facts(1000), 2048)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device, dtype).eval()
    return model, tokenizer, adapter_for("llama"), 12


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(kind: str, methods: list[str], repeats: int, device: str, dtype: str) -> dict[str, dict]:
    """Each method's median seconds and peak memory above the loaded model, in this process.

    On a CPU the peak is the process's max RSS, which only grows, so each method needs a process of
    its own; on an accelerator the allocator's peak is reset between methods.
    """
    started = time.perf_counter()
    model, tokenizer, adapter, n_layers = load(kind, device, DTYPES[dtype])
    print(f"{Path(kind).name}: loaded on {device} in {time.perf_counter() - started:.0f} s", file=sys.stderr,
          flush=True)
    requests = demo_facts(BATCH)
    batch = pair_batch([encode_request_pair(tokenizer, r) for r in requests], tokenizer.pad_token_id).to(device)
    weights = [get_module(model, adapter.mlp_out_name(l)).weight for l in range(n_layers)]

    def lga(modules_per_gram: int | None = None):
        with LayerGradientScorer(model, tokenizer, adapter, n_layers, "out", device, modules_per_gram) as scorer:
            scorer.score(requests)

    def train():
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        answer_nll(answer_logits(model, batch), batch).sum().backward()

    def naive():
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for i, request in enumerate(requests):
            pair = pair_batch([encode_request_pair(tokenizer, request)], tokenizer.pad_token_id).to(device)
            losses = answer_nll(answer_logits(model, pair), pair)
            old = torch.autograd.grad(losses[0], weights, retain_graph=True)
            new = torch.autograd.grad(losses[1], weights)
            [float((a * b).sum()) for a, b in zip(old, new)]

    runs = {"lga": lga, "lga-per-layer": lambda: lga(1), "lga-stacked": lambda: lga(ALL_MODULES), "train": train,
            "naive": naive}
    params = sum(p.numel() for p in model.parameters())
    results = {}
    for method in methods:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        base = peak_bytes(device)
        runs[method]()  # warm-up
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            runs[method]()
            synchronize(device)
            times.append(time.perf_counter() - start)
        results[method] = {"seconds": statistics.median(times), "peak_extra_bytes": max(0, peak_bytes(device) - base),
                           "params": params, "tokens": int(batch.attention_mask.sum())}
        print(f"{Path(kind).name} {method}: {results[method]['seconds']:.3f} s (median of {repeats}), "
              f"{time.perf_counter() - started:.0f} s since the worker started", file=sys.stderr, flush=True)
        for p in model.parameters():
            p.grad = None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"],
                        help="packaged names (gemma3-270m, smollm2-135m, demo), model directories, or llama130m")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time GGUF conversion into an empty cache and the README's ranking command")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--worker", nargs="+", metavar="MODEL METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1:], args.repeats, args.device, args.dtype)))
        return
    for kind in args.models:
        if kind != "llama130m":
            resolve_model(kind)  # convert a packaged model's GGUF once, outside the timed workers
    results = {}
    per_process = [[m] for m in METHODS] if args.device == "cpu" else [list(METHODS)]  # see worker()
    for kind in args.models:
        for methods in per_process:
            out = subprocess.run([sys.executable, __file__, "--worker", kind, *methods, "--repeats", str(args.repeats),
                                  "--device", args.device, "--dtype", args.dtype], stdout=subprocess.PIPE, text=True,
                                 check=True)  # the worker's stderr (its progress) passes through
            for method, result in json.loads(out.stdout.strip().splitlines()[-1]).items():
                results[(kind, method)] = result
    print(f"\nLGA scoring, {BATCH} requests per batch, device {args.device}, {args.dtype}, median of {args.repeats}")
    print(f"{'model':<14} {'params':>8} {'lga s':>8} {'train s':>8} {'naive s':>8} {'lga/train':>10} "
          f"{'naive/lga':>10} {'per-layer/stacked':>18} {'lga peak MiB':>13} {'train peak MiB':>15} "
          f"{'naive peak MiB':>15}")
    summary = {}
    for kind in args.models:
        lga, per_layer, stacked, train, naive = (results[(kind, m)] for m in METHODS)
        row = {"lga_over_train": lga["seconds"] / train["seconds"],
               "speedup_over_naive": naive["seconds"] / lga["seconds"],
               "per_layer_over_stacked": per_layer["seconds"] / stacked["seconds"],
               "lga_peak_mib": lga["peak_extra_bytes"] / 2**20,
               "per_layer_peak_mib": per_layer["peak_extra_bytes"] / 2**20,
               "stacked_peak_mib": stacked["peak_extra_bytes"] / 2**20,
               "train_peak_mib": train["peak_extra_bytes"] / 2**20, "naive_peak_mib": naive["peak_extra_bytes"] / 2**20}
        name = Path(kind).name
        summary[name] = {k: round(v, 3) for k, v in row.items()}
        print(f"{name:<14} {lga['params'] / 1e6:>7.1f}M {lga['seconds']:>8.3f} {train['seconds']:>8.3f} "
              f"{naive['seconds']:>8.3f} {row['lga_over_train']:>10.2f} {row['speedup_over_naive']:>9.2f}x "
              f"{row['per_layer_over_stacked']:>17.2f}x {row['lga_peak_mib']:>13.1f} {row['train_peak_mib']:>15.1f} "
              f"{row['naive_peak_mib']:>15.1f}")
    if args.end_to_end:
        for kind in args.models:
            if kind not in ("llama130m", "demo"):
                summary[kind].update(end_to_end(kind))
    if args.markdown:
        lines = [f"LGA pass vs a training forward+backward and naive per-request autograd: one batch of {BATCH} "
                 f"requests, {args.device} ({torch.get_num_threads()} thread(s)), {args.dtype}, median of "
                 f"{args.repeats}", "",
                 "| model | LGA / training fwd+bwd | naive / LGA | Grams per layer / stacked | LGA peak extra MiB "
                 "(per layer, stacked) | training peak extra MiB | naive peak extra MiB |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {row['lga_over_train']:.2f} | {row['speedup_over_naive']:.2f}x | "
                  f"{row['per_layer_over_stacked']:.2f}x | {row['lga_peak_mib']:.0f} ({row['per_layer_peak_mib']:.0f}, "
                  f"{row['stacked_peak_mib']:.0f}) | "
                  f"{row['train_peak_mib']:.0f} | {row['naive_peak_mib']:.0f} |"
                  for name, row in summary.items()]
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))


def end_to_end(name: str) -> dict:
    """GGUF conversion into an empty cache, then the README's first command on that model."""
    import os
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LGA_DIST_CACHE": cache}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lga_dist.cli", "models", "--prepare", name], env=env, check=True,
                       capture_output=True)
        conversion = time.perf_counter() - start
        ranked = subprocess.run([sys.executable, str(repo / "jobs" / "rank_layers.py"), "--model", name, "--out",
                                 str(Path(cache) / "out"), "--no-progress"], env=env, check=True, capture_output=True,
                                text=True)
    seconds = json.loads(ranked.stdout.strip().splitlines()[-1])["seconds"]
    print(f"{name}: GGUF conversion {conversion:.1f} s (process start included); README ranking command "
          f"{seconds:.1f} s")
    return {"conversion_s": round(conversion, 1), "ranking_s": seconds}


if __name__ == "__main__":
    main()
