"""Bulk edit throughput on the demo model, every figure measured side by side in this run.

  actors       edits/s of the bulk-edit job (MEMIT at blocks 0-1, where the demo model keeps its facts,
               lambda 100 as in tests/test_edit_efficacy.py) with 1 and 2 ZeRO-3 actors
  batched      the same job in one process, targets optimised as one batch vs one request at a time
               (the reference MEMIT code's loop), at the same final ES
  ROME         the same requests applied one after another with ROME (layer 1) in one process

Prints edits/s and the ratios. The first run also builds the demo model, its ranking and C
(cached afterwards), so it is a warm-up and not timed.

    python benchmarks/bench_bulk_edit.py [--requests 500] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lga_dist.config import compose  # noqa: E402
from lga_dist.editing.base import EditContext  # noqa: E402
from lga_dist.editing.targets import Targets  # noqa: E402
from lga_dist.workflows.bulk_edit import BulkEditJob, bulk_edit  # noqa: E402


def one_at_a_time_targets(self, requests, site, hparams) -> Targets:
    """EditContext.targets as the reference code computes them: a separate optimisation per request."""
    return Targets.concatenate([batched_targets(self, [request], site, hparams) for request in requests])


batched_targets = EditContext.targets


MEMIT = {"layers": "0-1", "hparam": ["mom2_update_weight=100"]}
ROME = {"layers": "1", "method": "rome"}


def timed_job(out: Path, requests: int, **options) -> tuple[float, dict]:
    job = compose(BulkEditJob, {"model": "demo", "limit": requests, "out": str(out), "progress": False, "probe": 0,
                                "overwrite": True, **options})
    started = time.perf_counter()
    summary = bulk_edit(job).summary()
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm, summary = timed_job(root / "warm", 4, actors=0, batch_size=args.batch_size, **MEMIT)
        rows = []
        for actors in (1, 2):
            seconds, s = timed_job(root / f"actors{actors}", n, actors=actors, batch_size=args.batch_size, **MEMIT)
            rows.append((f"MEMIT, {actors} ZeRO-3 actor(s)", seconds, s["post"]["ES"]))
        seconds, s = timed_job(root / "batched", n, actors=0, batch_size=args.batch_size, **MEMIT)
        rows.append(("MEMIT, one process, batched targets", seconds, s["post"]["ES"]))
        with mock.patch.object(EditContext, "targets", one_at_a_time_targets):
            seconds, s = timed_job(root / "loop", n, actors=0, batch_size=args.batch_size, **MEMIT)
        rows.append(("MEMIT, one process, one request at a time", seconds, s["post"]["ES"]))
        seconds, s = timed_job(root / "rome", n, actors=0, batch_size=1, **ROME)
        rows.append(("ROME, one process, one edit after another", seconds, s["post"]["ES"]))
    print(f"bulk edit, demo model {summary['model_id']}, {n} requests, batches of {args.batch_size}, "
          f"{torch.get_num_threads()} threads in this process (warm-up {warm:.0f} s)")
    for name, seconds, es in rows:
        print(f"  {name:<45} {seconds:8.1f} s  {n / seconds:7.2f} edits/s  ES {es:.3f}")
    by_name = {name: seconds for name, seconds, _ in rows}
    ratios = {"2 actors vs 1 actor": by_name["MEMIT, 1 ZeRO-3 actor(s)"] / by_name["MEMIT, 2 ZeRO-3 actor(s)"],
              "batched vs one-at-a-time targets": by_name["MEMIT, one process, one request at a time"]
              / by_name["MEMIT, one process, batched targets"],
              "batched MEMIT vs sequential ROME": by_name["ROME, one process, one edit after another"]
              / by_name["MEMIT, one process, batched targets"]}
    for name, ratio in ratios.items():
        print(f"  {name:<45} {ratio:6.2f}x edits/s")


if __name__ == "__main__":
    main()
