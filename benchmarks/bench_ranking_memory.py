"""Ranking time and peak memory per actor, in this process and on 1 and 2 ZeRO-3 actors, float32 and bfloat16.

Each configuration is a fresh `lga-dist rank-layers` process on the same proxy (--requests shipped
CounterFact requests, the default proxy sample), so no configuration's peak carries into the next:
  - wall s:        the ranking job's own time (loading the model or the shards, scoring, writing), from
                   its summary line; start-up of the Python process itself is not in it
  - peak per actor: each actor's peak resident memory (`peak_rss_gb` in the summary); in this process,
                   the process's own (model, activations and all)
  - --plan:        the per-actor memory `rank-layers --plan` predicts from config.json alone, for the
                   same actors and dtype (an accelerator's memory; on a CPU the host holds it instead)
  - same ranking:  the layer order equals the in-process ranking of the same dtype, and the largest
                   relative difference of a layer score from it
Models not installed are skipped with a line. Prints a Markdown table (and --markdown FILE).

    python benchmarks/bench_ranking_memory.py [--models gemma3-270m smollm2-135m qwen2.5-coder-1.5b]
        [--actors 0 1 2] [--dtypes float32 bfloat16] [--requests 100] [--selectors lga cma]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lga_dist.models.packaged import packaged_model  # noqa: E402

from benchmarks.tables import publish  # noqa: E402


def cli(*args: str) -> dict:
    """Run one lga-dist command in its own process; its last stdout line is the JSON summary."""
    process = subprocess.run([sys.executable, "-m", "lga_dist.cli", *args], capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"lga-dist {' '.join(args)} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def layer_scores(out: Path) -> dict[int, float]:
    return {r["layer"]: r["score"] for r in pq.read_table(out / "ranking.parquet").to_pylist()}


def same_ranking(reference: dict, scores: dict[int, float], ranking: list[int]) -> str:
    if reference is None:
        return "(reference)"
    worst = max(abs(scores[layer] - s) / max(abs(s), 1e-30) for layer, s in reference["scores"].items())
    return f"{'yes' if ranking == reference['ranking'] else 'NO'}, {worst:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m", "qwen2.5-coder-1.5b"])
    parser.add_argument("--actors", nargs="+", type=int, default=[0, 1, 2],
                        help="0 (in this process) first: it is the reference of 'same ranking'")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--selectors", nargs="+", default=["lga"], choices=("lga", "cma"))
    parser.add_argument("--requests", type=int, default=100, help="proxy size")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    lines = [f"Ranking on {args.requests} proxy requests, each configuration in a fresh process", "",
             "| model | selector | dtype | config | wall s | peak per actor GB | --plan per actor GB | same ranking |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for model in args.models:
        packaged = packaged_model(model)
        if packaged is not None and not packaged.installed():
            print(f"{model}: not installed, skipped ({packaged.install})")
            continue
        for selector in args.selectors:
            for dtype in args.dtypes:
                reference = None
                for actors in args.actors:
                    common = ("--model", model, "--dtype", dtype, "--actors", str(actors))
                    with tempfile.TemporaryDirectory() as tmp:
                        summary = cli("rank-layers", *common, "--selector", selector, "--proxy-size",
                                      str(args.requests), "--no-progress", "--out", tmp)
                        scores = layer_scores(Path(tmp))
                    planned = (cli("rank-layers", *common, "--plan")["device_bytes_per_actor"] / 1e9
                               if actors else None)
                    check = same_ranking(reference, scores, summary["ranking"])
                    if actors == 0:
                        reference = {"scores": scores, "ranking": summary["ranking"]}
                    config = "in process" if actors == 0 else f"{actors} actor{'s' if actors > 1 else ''}"
                    peaks = " / ".join(f"{p:.2f}" for p in summary["peak_rss_gb"])
                    plan = "" if planned is None else f"{planned:.2f}"
                    lines.append(f"| {model} | {selector} | {dtype} | {config} | {summary['seconds']:.1f} | {peaks} "
                                 f"| {plan} | {check} |")
                    print(lines[-1], flush=True)
                    rows.append({"model": model, "selector": selector, "dtype": dtype, "actors": actors,
                                 "seconds": summary["seconds"], "peak_rss_gb": summary["peak_rss_gb"],
                                 "plan_gb": planned, "golden_layer": summary["golden_layer"], "same_ranking": check})
    publish(lines, args.markdown, {"rows": rows})


if __name__ == "__main__":
    main()
