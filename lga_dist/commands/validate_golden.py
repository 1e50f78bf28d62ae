"""validate-golden: is the layer LGA picks a good layer to edit? The request x layer grid answers it."""

from __future__ import annotations

from typing import Any

from lga_dist.console import format_table
from lga_dist.models.packaged import DEFAULT_MODEL
from lga_dist.validation.report import interval_text
from lga_dist.workflows.validate import ValidateJob, validate

DESCRIPTION = f"""Reproduce the golden-layer evidence for a model: edit every request at every candidate layer
(from the unedited model each time), then compare

  - the sample-wise optimal layer of each request (the upper bound),
  - the golden layer: the best fixed layer on the proxy split, judged on the held-out test split,
  - the LGA pick (rank-layers on the same proxy) and its regret against the golden layer,
  - the same for --transfer-requests (e.g. proxy from CounterFact, test on zsRE) and for smaller proxies,
  - the cost: LGA's wall time against the grid's.

Every regret, gap and Spearman correlation comes with a 95% paired bootstrap interval over the
split's requests, every pick with its share of proxy resamples in which it is rank 1; every
comparison is reported under 'score' (0 or 1 per shipped request) and under 'margin' (the graded
mean of the probability margins), --metric naming the one the summary line reads. --test-layers
picks edits the test split only at the layers some selector picks and the golden layer, so the
same number of edits buys more test requests.

Writes OUT/grid.parquet (one row per request and layer), OUT/golden_summary.{{parquet,md}}, and
OUT/layers.png, OUT/optimal.png, OUT/proxy_size.png. Grid tasks (one layer, --chunk-size requests)
fan out over --actors Ray actors, each holding a full copy of the model; finished tasks are kept in
OUT/grid/, so rerunning a killed job resumes it. With no arguments it validates ROME on the packaged
real model {DEFAULT_MODEL} and 100 of the shipped CounterFact facts (--model demo: the demo fact model)."""

Config = ValidateJob


def run(config: Config) -> tuple[dict, int]:
    result = validate(config)
    print(format_table([{**{k: _short(row.get(k)) for k in ("comparison", "selector", "rule", "param_set",
                                                             "golden_layer", "lga_layer", "pick_share", "regret")},
                         "regret 95% CI": interval_text(row.get("regret_ci_low"), row.get("regret_ci_high")),
                         "proxy_regret": _short(row.get("proxy_regret")),
                         "lga_spearman": _short(row.get("lga_spearman"))}
                        for row in result.rows if row["metric"] == config.metric]))
    print(f"by '{config.metric}'; every comparison under 'score' and 'margin' is in "
          f"{config.output.out}/golden_summary.md")
    cost = result.cost
    print(f"cost: LGA {cost['lga_seconds']} s vs grid {cost['grid_seconds_on_proxy']} actor-s on the same proxy "
          f"({cost['grid_over_lga']}x)" + (f"; causal tracing {cost['cma_seconds']} s ({cost['grid_over_cma']}x)"
                                         if "cma_seconds" in cost else ""))
    return result.summary, 0


def _short(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value
