"""compare-bulk: bulk-edit runs side by side, their curves over the edits applied and their final figures."""

from __future__ import annotations

import dataclasses

from lga_dist.config import ConfigError, option
from lga_dist.console import format_table
from lga_dist.validation.report import markdown_table, write_markdown
from lga_dist.workflows.bulk_compare import plot_runs, read_run

DESCRIPTION = """Compare bulk-edit runs (each one's --out folder, local or s3://): for example MEMIT at the
ranking's layers against AlphaEdit at the same layers and MEMIT at hard-coded ones, on the same
requests in the same batches.

Prints one row per run: method, layers, edits applied, ES/PS/NS over all its edits (a run still
going: the tracked requests' latest), the share of held-out facts still known, fluency before and
after, edits per second (the batches' wall time: edit, apply, tracking), the share of that time the
evaluation after each batch took, and the peak resident memory the run recorded (with --actors 0
the whole job's; on actors the driver's). --plot draws ES, PS,
NS of the tracked requests, held-out retention and fluency after every batch, one line per run."""

COLUMNS = ("run", "state", "method", "layers", "edits", "ES", "PS", "NS", "held_out_kept", "fluency_before",
           "fluency_after", "seconds", "edits_per_s", "tracking_share", "peak_rss_gb")


@dataclasses.dataclass
class Config:
    runs: list[str] = option([], "bulk-edit output directories (local or s3://)", positional=True, metavar="OUT")
    names: list[str] = option([], "a label per run for the table and plot (default: each folder's name)",
                              metavar="NAME")
    plot: str | None = option(None, "write the curves as PNG (local or s3://)", metavar="PATH.png")
    table: str | None = option(None, "also write the table as Markdown", metavar="PATH.md")
    title: str = option("bulk edits compared", "the plot's title (say the model and the requests)")

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("name at least one bulk-edit output directory")
        if self.names and len(self.names) != len(self.runs):
            raise ConfigError(f"--names gives {len(self.names)} labels for {len(self.runs)} runs")


def run(config: Config) -> tuple[dict, int]:
    runs = [read_run(out, name) for out, name in zip(config.runs, config.names or [None] * len(config.runs))]
    rows = [r.row() for r in runs]
    print(format_table(rows, COLUMNS))
    if config.plot:
        plot_runs(runs, config.plot, config.title)
        print(f"curves: {config.plot}")
    if config.table:
        write_markdown(config.table, "\n".join(markdown_table(rows, COLUMNS)) + "\n")
    return {"runs": rows, "plot": config.plot, "table": config.table}, 0
