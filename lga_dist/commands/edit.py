"""edit: apply ROME, MEMIT, AlphaEdit or FT-L at the layer(s) you name, evaluate before and after."""

from __future__ import annotations

from lga_dist.console import format_table
from lga_dist.models.packaged import DEFAULT_MODEL
from lga_dist.workflows.edit import EditJob, edit

DESCRIPTION = f"""Edit a model at the layer(s) you name and measure what changed.

Reads edit requests (any supported format), keeps the first --limit valid ones, evaluates
them on the unedited model (CounterFact ES/PS/NS/Score; zsRE accuracies for zsRE records),
edits, and evaluates again. --mode single edits each request alone from the unedited model
and restores it afterwards (the papers' per-request protocol); --mode batch applies the
requests in batches of --batch-size one after another and keeps the result (--save writes it
to OUT/model with an edits.jsonl manifest). Writes OUT/eval.parquet (one row per request,
metrics before and after). Hyper-parameters default to each method's paper; override with
--hparam NAME=VALUE. C = E[k k^T] is computed over --corpus (any datasets-loadable text file;
by default the shipped CounterFact facts written out as sentences, which need no network) and
cached. --sweep NAME=V1,V2,... compares values of one hyper-parameter on the same requests
(each value's update made from the unedited model and undone after it is evaluated); choose
them on requests you will not report on. With no --model it edits the packaged real model {DEFAULT_MODEL}."""

Config = EditJob


def run(config: Config) -> tuple[dict, int]:
    report = edit(config)
    rows = [("before", report.before)]
    if report.swept is None:
        rows.append(("after", report.after))
    else:
        name = report.summary["sweep"]
        rows += [(f"{name}={value}", metrics) for value, metrics in report.swept.items()]
    print(format_table([{"": when, **{k: round(v, 3) for k, v in metrics.items()}} for when, metrics in rows]))
    if report.swept is not None:
        tied = report.summary["best_tied_with"]
        print(f"best Score: {report.summary['sweep']}={report.summary['best']}"
              + (f" (the first given of those tied: also {', '.join(map(str, tied))})" if tied else ""))
    return report.summary, 0
