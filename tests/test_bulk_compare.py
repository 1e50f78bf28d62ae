"""compare-bulk reads bulk-edit output folders: a finished run's final figures, a running one's latest tracked
figures, edits/s from the batches' own wall time, and the curves drawn."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import run_cli

from lga_dist.workflows.bulk_progress import BatchRecord, BulkProgress


def _run_folder(out, tracked: list[dict], seconds: list[float], after: dict | None) -> None:
    progress = BulkProgress(str(out))
    records = [BatchRecord(batch=i, case_ids=[f"{i}a", f"{i}b"], edits_applied=2 * (i + 1),
                           record={"method": "memit", "layers": [3, 4]}, tracking=t, seconds=s,
                           tracking_seconds=s / 4, peak_rss_gb=1.5 + i)
               for i, (t, s) in enumerate(zip(tracked, seconds))]
    for record in records:  # one commit per batch, as bulk-edit does
        progress.commit([record], {"w": torch.zeros(2)})
    if after is not None:
        before = {"when": "before", "ES": 0.0, "PS": 0.1, "NS": 0.9, "fluency": 5.0, "held_out_retention": 1.0}
        pq.write_table(pa.Table.from_pylist([before, {"when": "after", **after}]), out / "summary.parquet")


def test_compare_bulk_reads_finished_and_running_runs(tmp_path):
    tracked = [{"ES": 1.0, "PS": 0.5, "NS": 0.9, "held_out_retention": 1.0, "fluency": 4.9},
               {"ES": 0.75, "PS": 0.5, "NS": 0.8, "held_out_retention": 0.9, "fluency": 4.5}]
    _run_folder(tmp_path / "done", tracked, [3.0, 5.0],
                {"ES": 0.7, "PS": 0.4, "NS": 0.85, "fluency": 4.4, "held_out_retention": 0.8})
    _run_folder(tmp_path / "going", tracked[:1], [2.0], None)
    code, stdout, stderr, summary = run_cli("compare-bulk", str(tmp_path / "done"), str(tmp_path / "going"),
                                            "--names", "A", "B", "--plot", str(tmp_path / "c.png"),
                                            "--table", str(tmp_path / "c.md"))
    assert code == 0, stderr
    done, going = summary["runs"]
    assert (done["state"], done["edits"], done["ES"], done["held_out_kept"]) == ("finished", 4, 0.7, 0.8)
    assert done["edits_per_s"] == pytest.approx(4 / 8.0) and done["fluency_before"] == 5.0
    assert done["method"] == "memit" and done["layers"] == "3,4"
    assert done["tracking_share"] == 0.25 and done["peak_rss_gb"] == 2.5
    assert (going["state"], going["edits"], going["ES"]) == ("running: 1 batch so far", 2, 1.0)
    assert going["fluency_after"] == 4.9
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert "| A | finished | memit |" in (tmp_path / "c.md").read_text()


def test_compare_bulk_refuses_a_folder_that_is_no_bulk_edit(tmp_path):
    code, _, stderr, summary = run_cli("compare-bulk", str(tmp_path))
    assert code == 2 and "not a bulk-edit output" in summary["error"]
    code, _, _, summary = run_cli("compare-bulk", str(tmp_path), "--names", "a", "b")
    assert code == 2 and "2 labels for 1 runs" in summary["error"]
