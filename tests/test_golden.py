"""Golden-layer bookkeeping on a hand-made grid whose answers are worked out by hand."""

import math

import numpy as np
import pytest

from lga_dist.lga.ranking import spearman
from lga_dist.validation.golden import GridCell, best_layer, golden_report, layer_means, sample_optimal

# performance[request][layer]; proxy = a, b; test = c, d.
GRID = {
    "a": [0.1, 0.9, 0.5, 0.2],
    "b": [0.3, 0.7, 0.8, 0.1],
    "c": [0.0, 0.6, 0.4, 1.0],
    "d": [0.2, 0.8, 0.9, 0.0],
}
CELLS = [GridCell(case, layer, value) for case, row in GRID.items() for layer, value in enumerate(row)]


def test_layer_means_and_sample_optimal():
    assert layer_means(CELLS, {"a", "b"}) == pytest.approx({0: 0.2, 1: 0.8, 2: 0.65, 3: 0.15})
    assert sample_optimal(CELLS) == {"a": (1, 0.9), "b": (2, 0.8), "c": (3, 1.0), "d": (2, 0.9)}
    assert best_layer({0: 0.5, 1: 0.5, 2: 0.4}) == 0  # ties go to the earlier layer


def test_golden_report_by_hand():
    lga = {0: -5.0, 1: 2.0, 2: 3.0, 3: 1.0}  # picks layer 2, one off the golden layer 1
    report = golden_report(CELLS, {"a", "b"}, {"c", "d"}, lga)
    assert report.golden_layer == 1
    assert report.golden_test == pytest.approx(0.7)          # (0.6 + 0.8) / 2
    assert report.optimal_test == pytest.approx(0.95)        # (1.0 + 0.9) / 2
    assert report.gap == pytest.approx(0.25)
    assert report.lga_layer == 2 and report.lga_test == pytest.approx(0.65)
    assert report.regret == pytest.approx(0.05)
    assert report.proxy_regret == pytest.approx(0.15)         # proxy means: layer 1 0.8, layer 2 0.65
    # proxy means 0.2, 0.8, 0.65, 0.15 have ranks 2, 4, 3, 1; LGA scores ranks 1, 3, 4, 2
    expected = np.corrcoef([2, 4, 3, 1], [1, 3, 4, 2])[0, 1]
    assert report.lga_spearman == pytest.approx(expected)
    assert (report.proxy_size, report.test_size) == (2, 2)


def test_excluded_layers_are_never_the_lga_pick():
    lga = {0: 9.0, 1: 2.0, 2: 3.0, 3: 1.0}
    report = golden_report(CELLS, {"a", "b"}, {"c", "d"}, lga, excluded_layers=[0])
    assert report.lga_layer == 2


def test_failed_cells_are_skipped_not_counted_as_zero():
    cells = CELLS + [GridCell("e", 0, math.nan)]
    assert layer_means(cells) == layer_means(CELLS)
    with pytest.raises(ValueError, match="no results"):
        golden_report(CELLS, {"zzz"}, {"c"})


def test_spearman_ties_and_degenerate_inputs():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties share their average rank: [1, 1, 2] -> ranks [1.5, 1.5, 3]
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
    assert math.isnan(spearman([1, 1], [1, 2])) and math.isnan(spearman([1, 2], [1, 2, 3]))
