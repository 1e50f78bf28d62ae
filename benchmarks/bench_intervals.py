"""How much a study can tell apart: the regret interval under 'score' and under 'margin', and the bootstrap's cost.

For a committed validate-golden folder (its grid.parquet and LGA matrix), for each per-edit metric:
the per-layer means on the proxy split and their range across layers (the signal a pick is judged
against), and for every LGA rule's pick the width of its test regret's 95% paired bootstrap interval
(the noise), at the study's own number of test requests. The ratio width / range says how many
distinguishable steps the metric resolves: lower is sharper. Then the time of B = 200 proxy
resamples for pick shares on a 30 x 30 matrix, against one ranking of the same matrix.

    python benchmarks/bench_intervals.py docs/archive/edit-version-1/smollm2-135m-memit-bf16 [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lga_dist.io.storage import join, read_parquet  # noqa: E402
from lga_dist.lga.ranking import pick_shares, rank_scores  # noqa: E402
from lga_dist.lga.rules import read_matrix, rule_views  # noqa: E402
from lga_dist.validation.golden import GridCell, golden_report, layer_means  # noqa: E402
from lga_dist.validation.grid import performance  # noqa: E402

from benchmarks.tables import publish  # noqa: E402

METRICS = ("score", "margin")
DEFAULT_STUDY = Path(__file__).resolve().parents[1] / "docs" / "archive" / "edit-version-1" / "smollm2-135m-memit-bf16"


def measure_study(directory: str) -> list[dict]:
    grid = [r for r in read_parquet(join(directory, "grid.parquet")).to_pylist() if r["split"] in ("proxy", "test")]
    matrix = read_matrix(join(directory, "lga", "request_scores.parquet"))
    views = rule_views(matrix, 1.0)
    splits = {name: {r["case_id"] for r in grid if r["split"] == name} for name in ("proxy", "test")}
    rows = []
    for metric in METRICS:
        cells = [GridCell(r["case_id"], r["layer"], performance(r, metric, r.get("source_format", "counterfact_flat")))
                 for r in grid]
        means = layer_means(cells, splits["proxy"])
        spread = max(means.values()) - min(means.values())
        widths = []
        for view in views.values():
            report = golden_report(cells, splits["proxy"], splits["test"], view["scores"], view["excluded"])
            if np.isfinite(report.regret_ci_high):
                widths.append(report.regret_ci_high - report.regret_ci_low)
        rows.append({"metric": metric, "test_requests": len(splits["test"]), "layer_range": spread,
                     "median_width": statistics.median(widths), "width_over_range": statistics.median(widths) / spread})
    return rows


def time_pick_shares(repeats: int = 5) -> tuple[float, float]:
    """Seconds for B = 200 resamples of a 30 x 30 matrix, and for one ranking of it (median of ``repeats``)."""
    matrix = np.random.default_rng(0).normal(size=(30, 30))
    shares, one = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        pick_shares(matrix, resamples=200)
        shares.append(time.perf_counter() - started)
        started = time.perf_counter()
        rank_scores(matrix.sum(axis=0))
        one.append(time.perf_counter() - started)
    return statistics.median(shares), statistics.median(one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", default=str(DEFAULT_STUDY),
                        help="a validate-golden output folder (default: %(default)s)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    rows = measure_study(args.study)
    shares_s, one_s = time_pick_shares()
    lines = [f"Regret intervals by metric, {args.study} ({rows[0]['test_requests']} test requests; every LGA rule's "
             f"pick at kappa 1)", "",
             "| metric | per-layer range on the proxy | median 95% interval width of a test regret | width / range |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['metric']} | {r['layer_range']:.3f} | {r['median_width']:.3f} | {r['width_over_range']:.2f} |"
              for r in rows]
    lines += ["", f"pick shares, B = 200 on a 30 x 30 matrix: {shares_s * 1000:.1f} ms "
                  f"({shares_s / one_s:.0f}x one ranking of it, {one_s * 1e6:.0f} us)"]
    publish(lines, args.markdown, {"study": args.study, "metrics": rows, "pick_shares_seconds": round(shares_s, 4),
                                   "over_one_ranking": round(shares_s / one_s, 1)})


if __name__ == "__main__":
    main()
