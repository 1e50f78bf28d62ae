"""Several bulk-edit runs side by side: their curves over the edits applied and their final figures.

Everything is read from what each run already wrote in its OUT folder (the committed batch records
with the metrics tracked after every batch, and summary.parquet), so runs compared here may come
from other machines or sessions and a run still going shows its batches so far.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import pyarrow.parquet as pq

from lga_dist.config import ConfigError
from lga_dist.io.storage import exists, join, open_file
from lga_dist.plots import pyplot, save_figure
from lga_dist.workflows.bulk_progress import BatchRecord, BulkProgress

CURVES = (("ES", "efficacy (ES), tracked"), ("PS", "paraphrase (PS), tracked"), ("NS", "neighborhood (NS), tracked"),
          ("held_out_retention", "held-out facts kept"), ("fluency", "fluency (n-gram entropy, bits)"))


@dataclasses.dataclass
class BulkRun:
    """One run's batches so far, and its before/after rows once it finished."""

    name: str
    out: str
    records: list[BatchRecord]
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.after is not None

    def row(self) -> dict[str, Any]:
        """The final figures (a run still going: its latest tracked ones), with its throughput."""
        seconds = sum(r.seconds for r in self.records)
        tracking = sum(r.tracking_seconds for r in self.records)
        peaks = [r.peak_rss_gb for r in self.records if r.peak_rss_gb is not None]
        applied = self.records[-1].edits_applied if self.records else 0
        last = self.records[-1].tracking if self.records else {}
        source = self.after or {}
        first = self.records[0].record if self.records else {}
        return {"run": self.name, "state": "finished" if self.finished else _so_far(len(self.records)),
                "method": first.get("method"), "layers": ",".join(str(x) for x in first.get("layers", [])),
                "edits": applied, "ES": source.get("ES", last.get("ES")), "PS": source.get("PS", last.get("PS")),
                "NS": source.get("NS", last.get("NS")),
                "held_out_kept": source.get("held_out_retention", last.get("held_out_retention")),
                "fluency_before": (self.before or {}).get("fluency"),
                "fluency_after": source.get("fluency", last.get("fluency")),
                "seconds": round(seconds, 1), "edits_per_s": round(applied / seconds, 4) if seconds else None,
                "tracking_share": round(tracking / seconds, 3) if seconds else None,
                "peak_rss_gb": max(peaks) if peaks else None}


def read_run(out: str, name: str | None = None) -> BulkRun:
    progress = BulkProgress(out)
    if not exists(progress.root):
        raise ConfigError(f"{out}: not a bulk-edit output (no progress/ folder)")
    records = progress.batch_records()
    summary = join(out, "summary.parquet")
    before = after = None
    if exists(summary):
        with open_file(summary, "rb") as handle:
            rows = {row["when"]: row for row in pq.read_table(handle).to_pylist()}
        before, after = rows.get("before"), rows.get("after")
    return BulkRun(name or out.rstrip("/").rsplit("/", 1)[-1], out, records, before, after)


def plot_runs(runs: Sequence[BulkRun], path: str, title: str) -> None:
    """One panel per curve, one line per run, over the edits applied (0: the unedited model)."""
    plt = pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(12, 7))
    panels = list(axes.flat)
    for axis, (key, label) in zip(panels, CURVES):
        for run in runs:
            start = _unedited(run, key)
            x = ([0] if start is not None else []) + [r.edits_applied for r in run.records]
            y = ([start] if start is not None else []) + [r.tracking.get(key, math.nan) for r in run.records]
            axis.plot(x, y, ".-", label=run.name)
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("edits applied")
        if key != "fluency":
            axis.set_ylim(-0.02, 1.02)
    handles, labels = panels[0].get_legend_handles_labels()
    panels[-1].axis("off")
    panels[-1].legend(handles, labels, loc="center", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def _unedited(run: BulkRun, key: str) -> float | None:
    """The curve's value before any edit, where the run recorded it (tracked ES/PS/NS start with the first batch)."""
    if run.before is None or key not in ("fluency", "held_out_retention"):
        return None
    value = run.before.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _so_far(batches: int) -> str:
    return f"running: {batches} batch{'' if batches == 1 else 'es'} so far"
