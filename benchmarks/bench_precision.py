"""float32 against bfloat16 on what a validation grid pays for: the same grid task in each dtype, per model.

For each model (by default the packaged real models gemma3-270m and smollm2-135m): --requests
shipped CounterFact facts (from the 501st on) edited alone at --layer (default: the middle layer)
with --method and evaluated, exactly as one validate-golden grid task does, in this process on one
thread; once with the model in float32 and once in bfloat16. Each dtype's C comes from its own
cache entry (computed before the timing when missing) and a one-request task warms each up
untimed. Prints, per model: both wall times and their ratio, each dtype's mean per-edit
performance, the share of requests whose performance is the same in both dtypes, and the rate of
the MLP output projection's GEMM in each dtype (bfloat16 is fast on a GPU and on CPUs with AMX;
elsewhere it can be slower than float32).

    python benchmarks/bench_precision.py [--models gemma3-270m smollm2-135m] [--requests 8] [--method rome]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench_editing import linear_gflops  # noqa: E402
from lga_dist.editing import edit_window  # noqa: E402
from lga_dist.io.requests import read_requests  # noqa: E402
from lga_dist.models import get_module  # noqa: E402
from lga_dist.models.demo_data import demo_requests_path  # noqa: E402
from lga_dist.validation.grid import GridSpec, GridTask, GridWorker, performance  # noqa: E402

COMPARED = ("float32", "bfloat16")


def grid_task(model: str, dtype: str, method: str, window: int, layer: int | None, payload: list[dict]) -> dict:
    """One grid task (every request edited alone at one layer, then evaluated), timed after a warm-up."""
    torch.manual_seed(0)
    worker = GridWorker(in_actor=False)
    worker.setup(None, GridSpec(model=model, method=method, window=window, dtype=dtype, threads=1),
                 {"main": payload}, progress=False)
    loaded = worker.state["loaded"]
    layer = loaded.n_layers // 2 if layer is None else layer
    worker.prepare_statistics(edit_window(layer, method, window, loaded.n_layers))
    worker.run(GridTask("main", layer, 0, (0,)))
    started = time.perf_counter()
    _, rows = worker.run(GridTask("main", layer, 0, tuple(range(len(payload)))))
    seconds = time.perf_counter() - started
    weight = get_module(loaded.model, loaded.adapter.mlp_out_name(layer)).weight.detach()
    return {"layer": layer, "seconds": seconds,
            "performance": [performance(row, "score", row["source_format"]) for row in rows],
            "gflops": linear_gflops(weight, rows=2048)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--requests", type=int, default=8, help="requests in the timed grid task")
    parser.add_argument("--method", default="rome", choices=("rome", "memit"))
    parser.add_argument("--window", type=int, default=1, help="layers per edit (MEMIT: 3 or more)")
    parser.add_argument("--layer", type=int, default=None, help="edit layer (default: the middle one)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    payload = [r.to_dict() for r in read_requests([str(demo_requests_path())]).requests[500:500 + args.requests]]
    header = ("| model | layer | float32 s | bfloat16 s | float32 / bfloat16 | mean performance f32 / bf16 "
              "| same outcome | GEMM GFLOP/s f32 / bf16 |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [header]
    for model in args.models:
        runs = {dtype: grid_task(model, dtype, args.method, args.window, args.layer, payload) for dtype in COMPARED}
        full, half = runs["float32"], runs["bfloat16"]
        same = sum(a == b for a, b in zip(full["performance"], half["performance"])) / len(payload)
        mean = {dtype: sum(run["performance"]) / len(payload) for dtype, run in runs.items()}
        lines.append(f"| {model} | {full['layer']} | {full['seconds']:.1f} | {half['seconds']:.1f} "
                     f"| {full['seconds'] / half['seconds']:.2f}x | {mean['float32']:.3f} / {mean['bfloat16']:.3f} "
                     f"| {same:.0%} | {full['gflops']:.0f} / {half['gflops']:.0f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + (f"\n\n{args.method}, {args.requests} requests edited alone per task, one thread, "
                                f"torch {torch.__version__}, "
                                f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
