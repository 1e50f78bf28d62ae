"""What a layer choice costs: LGA, causal tracing and the exhaustive edit grid on the same proxy, per model.

For each model (by default the packaged real models gemma3-270m and smollm2-135m) and one proxy
of --requests shipped CounterFact facts (from the 501st on):
  - lga:  the rank workflow with LGA (in this process), the ranking's wall time
  - cma:  the same with causal tracing (--cma-samples noise draws per request)
  - grid: every request edited alone at every layer (--method, its window) and evaluated, as
          validate-golden does, in this process; C = E[k k^T] per layer comes from the cache
          when present (the first run on a machine computes it, once: --warm-c does that before
          the timing, so every grid figure is the edits and evaluations alone)
All three run here, one after another, on the same threads; the ratios grid/LGA and grid/CMA
are what LGA and causal tracing save over searching every layer. Prints a Markdown table.

    python benchmarks/bench_selectors.py [--models gemma3-270m smollm2-135m] [--requests 4] [--method rome]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lga_dist.editing.covariance import SecondMoments  # noqa: E402
from lga_dist.editing.prepare import corpus_texts  # noqa: E402
from lga_dist.io.requests import read_requests  # noqa: E402
from lga_dist.models import describe_model, load_model  # noqa: E402
from lga_dist.models.demo_data import demo_requests_path  # noqa: E402
from lga_dist.validation.grid import GridSpec, run_grid  # noqa: E402
from lga_dist.workflows.options import ClusterOptions, ModelOptions, OutputOptions, ScoringOptions  # noqa: E402
from lga_dist.workflows.rank import RankJob, rank  # noqa: E402

from benchmarks.tables import publish  # noqa: E402


def timed_rank(model: str, proxy: list, selector: str, samples: int, out: Path) -> float:
    job = RankJob(model=ModelOptions(model=model), scoring=ScoringOptions(selector=selector, cma_samples=samples),
                  cluster=ClusterOptions(actors=0), output=OutputOptions(out=str(out), progress=False))
    started = time.perf_counter()
    rank(job, proxy=proxy)
    return time.perf_counter() - started


def warm_c(model: str, n_layers: int, cov_tokens: int) -> None:
    """C of every layer into the cache, so the grid's timing is its edits alone."""
    loaded = load_model(model)
    texts = corpus_texts(None, "text")
    SecondMoments(loaded.model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, texts, cov_tokens,
                  progress=False).prepare(range(n_layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--requests", type=int, default=4, help="proxy size (the grid edits each at every layer)")
    parser.add_argument("--method", default="rome", choices=("rome", "memit"))
    parser.add_argument("--window", type=int, default=1, help="layers per edit (MEMIT: 3 or more)")
    parser.add_argument("--cma-samples", type=int, default=3)
    parser.add_argument("--cov-tokens", type=int, default=100_000)
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--no-warm-c", dest="warm_c", action="store_false",
                        help="time the grid with C computed inside it where the cache lacks it")
    args = parser.parse_args()
    proxy = read_requests([str(demo_requests_path())]).requests[500:500 + args.requests]
    rows = []
    for model in args.models:
        info = describe_model(model)
        if args.warm_c:
            warm_c(model, info.n_layers, args.cov_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            lga = timed_rank(model, proxy, "lga", args.cma_samples, root / "lga")
            cma = timed_rank(model, proxy, "cma", args.cma_samples, root / "cma")
            spec = GridSpec(model=model, method=args.method, window=args.window, cov_tokens=args.cov_tokens, threads=2)
            started = time.perf_counter()
            run_grid(spec, info, {"proxy": proxy}, {"proxy": list(range(info.n_layers))}, len(proxy),
                     str(root / "grid"), actors=0, progress=False)
            grid = time.perf_counter() - started
        rows.append((info.model_id, info.n_layers, lga, cma, grid))
        print(f"{info.model_id}: LGA {lga:.1f} s, causal tracing {cma:.1f} s, grid {grid:.1f} s", flush=True)
    lines = [f"Layer selection cost: {args.requests} proxy requests, {args.method} (window {args.window}), every "
             f"layer; causal tracing with {args.cma_samples} noise draws; one process, the same threads", "",
             "| model | layers | LGA (s) | causal tracing (s) | edit grid (s) | grid / LGA | grid / causal tracing |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {layers} | {lga:.1f} | {cma:.1f} | {grid:.0f} | {grid / lga:.0f}x | {grid / cma:.0f}x |"
              for name, layers, lga, cma, grid in rows]
    print()
    publish(lines, args.markdown)

if __name__ == "__main__":
    main()
