"""A bulk edit's saved model, reloaded from disk, against the metrics the run recorded for it.

bulk-edit evaluates the edited requests on the model it holds in memory (OUT/eval.parquet, post_*), then
writes OUT/model. This loads OUT/model as a user would (`load_model`, float32 unless --dtype), evaluates the
same requests again (read from --requests, the shipped CounterFact file by default, and picked by the case ids
of eval.parquet) and prints one JSON line: per metric the mean after the run and after the reload and the
largest per-request difference, and whether every request's ES/PS/NS outcome is the same.

    python benchmarks/check_reload.py OUT [--requests FILE ...] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from lga_dist.evaluation import evaluate_requests  # noqa: E402
from lga_dist.io.requests import read_requests  # noqa: E402
from lga_dist.models import DTYPES, load_model  # noqa: E402
from lga_dist.models.demo_data import demo_requests_path  # noqa: E402

OUTCOMES = ("ES", "PS", "NS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a finished bulk-edit --out folder (eval.parquet and model/)")
    parser.add_argument("--requests", nargs="+", default=[str(demo_requests_path())],
                        help="the request files the run read (default: the shipped CounterFact facts)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args()
    recorded = pq.read_table(Path(args.out) / "eval.parquet").to_pylist()
    by_id = {str(r.case_id): r for r in read_requests(args.requests).requests}
    missing = [row["case_id"] for row in recorded if str(row["case_id"]) not in by_id]
    if missing:
        sys.exit(f"error: {len(missing)} edited requests are not in {args.requests} (first: {missing[0]})")
    requests = [by_id[str(row["case_id"])] for row in recorded]
    loaded = load_model(str(Path(args.out) / "model"), dtype=DTYPES[args.dtype])
    again = evaluate_requests(loaded.model, loaded.tokenizer, requests)
    report: dict = {"out": args.out, "requests": len(requests), "fingerprint": loaded.fingerprint}
    for metric in (*OUTCOMES, "EM", "PM", "NM"):
        before = [row[f"post_{metric}"] for row in recorded]
        after = [row[metric] for row in again]
        report[metric] = {"run": sum(before) / len(before), "reloaded": sum(after) / len(after),
                          "max_abs_diff": max(abs(a - b) for a, b in zip(before, after))}
    report["same_outcomes"] = all(row[f"post_{m}"] == new[m] for row, new in zip(recorded, again) for m in OUTCOMES)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
