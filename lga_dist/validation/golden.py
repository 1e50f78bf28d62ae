"""The golden-layer evidence computed from a request x layer grid of edit results.

A grid row says how well editing one request at one layer worked (``performance``,
higher is better). From it:

- the sample-wise optimal layer of each request (an upper bound no fixed layer beats);
- the golden layer: the best fixed layer on the proxy split, judged on the test split;
- the LGA pick (best-scored kept layer of a ranking) and its regret against the
  golden layer on the test split;
- Spearman's correlation between LGA layer scores and per-layer mean performance;
- a 95% paired bootstrap interval for each of these differences (``lga_dist.resampling``).

Everything here is plain arithmetic on rows so it can be checked on a hand-made grid.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np

from lga_dist.lga.ranking import spearman, spearman_each
from lga_dist.resampling import RESAMPLES, mean_interval, percentile_interval, resample_indices


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
    """The numbers of one proxy -> test comparison, each difference with its 95% paired bootstrap interval."""

    golden_layer: int
    golden_test: float       # the golden layer's mean performance on the test split
    optimal_test: float      # mean of each request's sample-wise optimum (on ``optimum_split``)
    gap: float               # optimum - golden layer on ``optimum_split``: what a fixed layer gives up
    lga_layer: int | None
    lga_test: float          # the pick's mean performance on the test split (NaN: not edited there)
    regret: float            # golden_test - lga_test: what trusting the pick costs
    lga_spearman: float      # the selector's layer scores vs per-layer proxy performance
    proxy_regret: float      # the same regret measured on the proxy split (what a rule may be chosen on)
    proxy_size: int
    test_size: int
    regret_ci_low: float = math.nan
    regret_ci_high: float = math.nan
    gap_ci_low: float = math.nan
    gap_ci_high: float = math.nan
    proxy_regret_ci_low: float = math.nan
    proxy_regret_ci_high: float = math.nan
    lga_spearman_ci_low: float = math.nan
    lga_spearman_ci_high: float = math.nan
    optimum_split: str = "test"  # "proxy" when the test split was edited only at the picks
    pick_on_test: bool = True    # False: the pick's layer was not edited on the test split (regret unknown)

    def row(self) -> dict:
        return dataclasses.asdict(self)


def _performance_matrix(cells: Sequence[GridCell], case_ids: set[str], layers: Sequence[int]) -> np.ndarray:
    """(requests, layers) performance of the given requests, NaN where a request was not edited at a layer."""
    order = sorted({c.case_id for c in cells if c.case_id in case_ids})
    row_of, column_of = {case_id: i for i, case_id in enumerate(order)}, {layer: j for j, layer in enumerate(layers)}
    matrix = np.full((len(order), len(layers)), np.nan)
    for cell in cells:
        if cell.case_id in row_of and cell.layer in column_of:
            matrix[row_of[cell.case_id], column_of[cell.layer]] = cell.performance
    return matrix


def _paired(matrix: np.ndarray, columns: Sequence[int], first: int, second: int | None) -> np.ndarray:
    """Per request: performance at layer ``first`` minus at ``second`` (or minus its best layer, when None)."""
    column = {layer: j for j, layer in enumerate(columns)}
    a = matrix[:, column[first]]
    b = np.nanmax(np.where(np.isnan(matrix), -np.inf, matrix), axis=1) if second is None else (
        matrix[:, column[second]] if second in column else np.full(len(matrix), np.nan))
    return a - b


def golden_report(cells: Sequence[GridCell], proxy_ids: set[str], test_ids: set[str],
                  lga_scores: Mapping[int, float] | None = None,
                  excluded_layers: Iterable[int] = (), resamples: int = RESAMPLES, seed: int = 0) -> GoldenReport:
    """Golden layer from the proxy split, judged on the test split, with a selector's pick beside it.

    ``lga_scores`` maps layer -> score (higher = better edit site); layers the ranking excluded as
    outliers are never its pick but still count in the correlation. The candidate layers are the
    proxy split's (edited at every one); the test split may hold fewer (only the layers some
    selector picks, validate-golden --test-layers picks): a pick outside them has no test figure,
    and the sample-wise optimum is then taken on the proxy split. Intervals: 95%, ``resamples``
    paired bootstrap draws of the split's requests (``lga_dist.resampling``), seeded.
    """
    proxy_means = layer_means(cells, proxy_ids)
    test_means = layer_means(cells, test_ids)
    if not proxy_means or not test_means:
        raise ValueError("the grid has no results for the proxy or the test split")
    golden = best_layer(proxy_means)
    if golden not in test_means:
        raise ValueError(f"the golden layer {golden} was not edited on the test split")
    layers = sorted(proxy_means)
    proxy_matrix = _performance_matrix(cells, proxy_ids, layers)
    test_matrix = _performance_matrix(cells, test_ids, layers)
    optimum_split = "test" if set(layers) <= set(test_means) else "proxy"
    on_optimum = test_matrix if optimum_split == "test" else proxy_matrix
    ids = test_ids if optimum_split == "test" else proxy_ids
    optimal_mean = float(np.mean([value for _, value in sample_optimal(cells, ids).values()]))
    gap_low, gap_high = mean_interval(-_paired(on_optimum, layers, golden, None), resamples, seed)
    report = dict(golden_layer=golden, golden_test=test_means[golden], optimal_test=optimal_mean,
                  gap=optimal_mean - (test_means[golden] if optimum_split == "test" else proxy_means[golden]),
                  gap_ci_low=gap_low, gap_ci_high=gap_high, optimum_split=optimum_split,
                  lga_layer=None, lga_test=math.nan, lga_spearman=math.nan, proxy_regret=math.nan,
                  proxy_size=len(proxy_matrix), test_size=len(test_matrix))
    if lga_scores:
        excluded = set(excluded_layers)
        kept = {layer: score for layer, score in lga_scores.items() if layer not in excluded and layer in proxy_means}
        pick = best_layer(kept) if kept else None
        shared = [layer for layer in layers if layer in lga_scores]
        report.update(lga_layer=pick, lga_spearman=spearman([lga_scores[layer] for layer in shared],
                                                           [proxy_means[layer] for layer in shared]))
        if pick is not None:
            report.update(lga_test=test_means.get(pick, math.nan), pick_on_test=pick in test_means,
                          proxy_regret=proxy_means[golden] - proxy_means[pick])
            regret = _paired(test_matrix, layers, golden, pick)
            proxy_regret = _paired(proxy_matrix, layers, golden, pick)
            report.update(zip(("regret_ci_low", "regret_ci_high"), mean_interval(regret, resamples, seed)))
            report.update(zip(("proxy_regret_ci_low", "proxy_regret_ci_high"),
                              mean_interval(proxy_regret, resamples, seed)))
        if len(shared) >= 2:  # the proxy requests resampled: per-layer means, against the fixed layer scores
            columns = [layers.index(layer) for layer in shared]
            rows = resample_indices(len(proxy_matrix), resamples, seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a layer no resampled request was edited at
                means = np.nanmean(proxy_matrix[:, columns][rows], axis=1)
            draws = spearman_each([lga_scores[layer] for layer in shared], means)
            report.update(zip(("lga_spearman_ci_low", "lga_spearman_ci_high"), percentile_interval(draws)))
    report["regret"] = report["golden_test"] - report["lga_test"]
    return GoldenReport(**report)
