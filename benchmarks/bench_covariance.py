"""C (MEMIT's key second moments) once per actor group: the corpus split across ZeRO-3 ranks, timed.

Per model (by default the packaged real models) and a MEMIT window of layers, from a cold cache each time:
  - core:     SecondMoments in this process, one pass over the whole corpus (the baseline)
  - N actors: the bulk-edit actors' own path (EditWorker.prepare_statistics): each of N ZeRO-3 ranks
              takes every N-th batch of the corpus and the sums are all-reduced, so each rank's share of
              the work is 1/N
Prints seconds, the ratio to the core and the largest relative difference of each group's C from the
core's (the split is exact up to summation order); no thresholds. On a CPU each actor and the core get
--cpus-per-actor threads, so N actors want N times that many cores to show the split's speed-up.

    python benchmarks/bench_covariance.py [--models gemma3-270m smollm2-135m] [--actors 1 2] [--layers 3]
                                          [--cov-tokens 100000] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the benchmark's private Ray: 127.0.0.1 only

import torch  # noqa: E402

from lga_dist.distributed.driver import ray_session, worker_env  # noqa: E402
from lga_dist.distributed.editing import EditWorker, EditWorkerSpec  # noqa: E402
from lga_dist.distributed.group import ActorGroup, ActorResources  # noqa: E402
from lga_dist.distributed.zero import load_deepspeed_config  # noqa: E402
from lga_dist.editing.covariance import SecondMoments  # noqa: E402
from lga_dist.editing.prepare import corpus_texts  # noqa: E402
from lga_dist.models import load_model  # noqa: E402
from lga_dist.models.sources import resolve_model  # noqa: E402

from benchmarks.tables import publish  # noqa: E402


def core(path: str, texts: list[str], layers: list[int], cov_tokens: int) -> tuple[float, dict[int, torch.Tensor]]:
    loaded = load_model(path)
    with tempfile.TemporaryDirectory() as stats:
        moments = SecondMoments(loaded.model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, texts, cov_tokens,
                                stats, progress=False)
        started = time.perf_counter()
        moments.prepare(layers)
        seconds = time.perf_counter() - started
        return seconds, {layer: moments(layer) for layer in layers}


def actors(path: str, texts: list[str], layers: list[int], cov_tokens: int, n: int,
           cpus: int) -> tuple[float, dict[int, torch.Tensor]]:
    with tempfile.TemporaryDirectory() as stats:
        spec = EditWorkerSpec(model=path, dtype="float32", deepspeed_config=load_deepspeed_config(None, torch.float32),
                              cov_tokens=cov_tokens, stats_dir=stats, use_gpu=False, threads=cpus)
        with ActorGroup(EditWorker, n, ActorResources(cpus=cpus, gpus=0), worker_env(False)) as group:
            rendezvous = group.call_one(EditWorker.rendezvous_address)
            group.call(EditWorker.setup, [(rendezvous, spec, texts)] * n)
            started = time.perf_counter()
            group.call(EditWorker.prepare_statistics, [(layers,)] * n)
            seconds = time.perf_counter() - started
            return seconds, {layer: group.call(EditWorker.driver_second_moment, [(layer,)] * n)[0] for layer in layers}


def largest_relative_difference(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()) for k in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=3, help="a MEMIT window of this many layers, mid-stack")
    parser.add_argument("--cov-tokens", type=int, default=100_000)
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="also the core's torch thread count")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()

    torch.set_num_threads(args.cpus_per_actor)
    texts = corpus_texts(None, "text")
    lines = [f"C over the default corpus ({len(texts):,} texts, up to {args.cov_tokens:,} tokens), float32, "
             f"cold cache; CPU ({os.cpu_count()} cores), {args.cpus_per_actor} thread(s) per actor and core", "",
             "| model | layers | config | seconds | time / core | C vs core (max rel. diff.) |",
             "| --- | --- | --- | --- | --- | --- |"]
    summary = {}
    with ray_session(None, max(args.actors) * args.cpus_per_actor):  # private, on 127.0.0.1, stopped after
        for model in args.models:
            path = resolve_model(model, progress=False)  # converted once, outside the timings
            n_layers = load_model(path).n_layers
            first = n_layers // 2 - args.layers // 2
            layers = list(range(first, first + args.layers))
            base_s, base_c = core(path, texts, layers, args.cov_tokens)
            rows = {"core": (base_s, 0.0)}
            for n in args.actors:
                seconds, c = actors(path, texts, layers, args.cov_tokens, n, args.cpus_per_actor)
                rows[f"{n} actor{'s' if n > 1 else ''}"] = (seconds, largest_relative_difference(c, base_c))
            span = f"{layers[0]}-{layers[-1]}"
            for name, (seconds, difference) in rows.items():
                lines.append(f"| {model} | {span} | {name} | {seconds:.1f} | {seconds / base_s:.2f} | "
                             f"{'' if name == 'core' else f'{difference:.1e}'} |")
            summary[model] = {name: {"seconds": round(s, 2), "ratio_vs_core": round(s / base_s, 3),
                                     "max_rel_diff": d} for name, (s, d) in rows.items()}
    publish(lines, args.markdown, summary)


if __name__ == "__main__":
    main()
