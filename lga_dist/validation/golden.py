"""The golden-layer evidence computed from a request x layer grid of edit results.

A grid row says how well editing one request at one layer worked (``performance``,
higher is better). From it:

- the sample-wise optimal layer of each request (an upper bound no fixed layer beats);
- the golden layer: the best fixed layer on the proxy split, judged on the test split;
- the LGA pick (best-scored kept layer of a ranking) and its regret against the
  golden layer on the test split;
- Spearman's correlation between LGA layer scores and per-layer mean performance.

Everything here is plain arithmetic on rows so it can be checked on a hand-made grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from lga_dist.lga.ranking import spearman


@dataclasses.dataclass(frozen=True)
class GridCell:
    case_id: str
    layer: int
    performance: float


def layer_means(cells: Iterable[GridCell], case_ids: set[str] | None = None) -> dict[int, float]:
    """Mean performance of each layer over the given requests (all when None); NaN cells are skipped."""
    sums: dict[int, list[float]] = {}
    for cell in cells:
        if (case_ids is None or cell.case_id in case_ids) and not math.isnan(cell.performance):
            sums.setdefault(cell.layer, []).append(cell.performance)
    return {layer: float(np.mean(values)) for layer, values in sorted(sums.items())}


def best_layer(means: Mapping[int, float]) -> int:
    """The layer with the highest mean; ties go to the earlier layer (cheaper to reach, and deterministic)."""
    return max(sorted(means), key=lambda layer: (means[layer], -layer))


def sample_optimal(cells: Iterable[GridCell], case_ids: set[str] | None = None) -> dict[str, tuple[int, float]]:
    """Each request's best layer and its performance there (ties: the earlier layer)."""
    per_request: dict[str, dict[int, float]] = {}
    for cell in cells:
        if (case_ids is None or cell.case_id in case_ids) and not math.isnan(cell.performance):
            per_request.setdefault(cell.case_id, {})[cell.layer] = cell.performance
    out = {}
    for case_id, by_layer in per_request.items():
        layer = best_layer(by_layer)
        out[case_id] = (layer, by_layer[layer])
    return out


@dataclasses.dataclass
class GoldenReport:
    """The numbers of one proxy -> test comparison."""

    golden_layer: int
    golden_test: float       # the golden layer's mean performance on the test split
    optimal_test: float      # mean of each test request's sample-wise optimum
    gap: float               # optimal_test - golden_test: what a fixed layer gives up
    lga_layer: int | None
    lga_test: float          # the LGA pick's mean performance on the test split
    regret: float            # golden_test - lga_test: what trusting LGA costs
    lga_spearman: float      # LGA layer scores vs per-layer proxy performance
    proxy_regret: float      # the same regret measured on the proxy split (what a rule may be chosen on)
    proxy_size: int
    test_size: int

    def row(self) -> dict:
        return dataclasses.asdict(self)


def golden_report(cells: Sequence[GridCell], proxy_ids: set[str], test_ids: set[str],
                  lga_scores: Mapping[int, float] | None = None,
                  excluded_layers: Iterable[int] = ()) -> GoldenReport:
    """Golden layer from the proxy split, judged on the test split, with the LGA pick beside it.

    ``lga_scores`` maps layer -> LGA score (higher = better edit site); layers the
    ranking excluded as outliers are never its pick but still count in the correlation.
    """
    proxy_means = layer_means(cells, proxy_ids)
    test_means = layer_means(cells, test_ids)
    if not proxy_means or not test_means:
        raise ValueError("the grid has no results for the proxy or the test split")
    golden = best_layer(proxy_means)
    optimal = sample_optimal(cells, test_ids)
    optimal_test = float(np.mean([value for _, value in optimal.values()]))
    lga_layer, lga_test, rho, proxy_regret = None, math.nan, math.nan, math.nan
    if lga_scores:
        excluded = set(excluded_layers)
        kept = {layer: score for layer, score in lga_scores.items() if layer not in excluded and layer in test_means}
        lga_layer = best_layer(kept) if kept else None
        lga_test = test_means[lga_layer] if lga_layer is not None else math.nan
        if lga_layer is not None and lga_layer in proxy_means:
            proxy_regret = proxy_means[golden] - proxy_means[lga_layer]
        shared = [layer for layer in proxy_means if layer in lga_scores]
        rho = spearman([lga_scores[layer] for layer in shared], [proxy_means[layer] for layer in shared])
    golden_test = test_means[golden]
    return GoldenReport(golden_layer=golden, golden_test=golden_test, optimal_test=optimal_test,
                        gap=optimal_test - golden_test, lga_layer=lga_layer, lga_test=lga_test,
                        regret=golden_test - lga_test, lga_spearman=rho, proxy_regret=proxy_regret,
                        proxy_size=len({c.case_id for c in cells if c.case_id in proxy_ids}),
                        test_size=len({c.case_id for c in cells if c.case_id in test_ids}))
