"""Golden-layer bookkeeping on a hand-made grid whose answers are worked out by hand."""

import dataclasses
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


def _enumerated_interval(differences: list[float], level: float = 0.95) -> tuple[float, float]:
    """The exact bootstrap interval: every one of the n^n equally likely resamples enumerated, and the
    distribution of their means cut at its (1 - level) / 2 tails (inverse CDF)."""
    import itertools

    n = len(differences)
    means = sorted(sum(differences[i] for i in draw) / n for draw in itertools.product(range(n), repeat=n))
    tail = (1 - level) / 2
    return means[math.ceil(tail * len(means)) - 1], means[math.ceil((1 - tail) * len(means)) - 1]


def test_bootstrap_intervals_match_the_enumerated_bootstrap():
    """Three test requests, the pick one request worse: paired differences (0, 0, 1). The resampled regret
    is k/3 with k ~ Binomial(3, 1/3): P(0) = 8/27, P(1) = 1/27 > 2.5%, so the 95% interval is exactly
    [0, 1]; the gap to the optimum (0, 0, 0.5) likewise [0, 0.5]. The golden layer is the same in
    every resample (it comes from the proxy split): the intervals move only with the test requests."""
    from lga_dist.resampling import mean_interval

    grid = {"p1": [1.0, 0.5, 0.0], "p2": [1.0, 0.0, 0.0],            # proxy: golden layer 0
            "t1": [1.0, 1.0, 1.0], "t2": [1.0, 1.0, 1.0], "t3": [0.5, 0.0, 1.0]}
    cells = [GridCell(case, layer, value) for case, row in grid.items() for layer, value in enumerate(row)]
    report = golden_report(cells, {"p1", "p2"}, {"t1", "t2", "t3"}, {0: 0.0, 1: 1.0, 2: -1.0})
    assert report.golden_layer == 0 and report.lga_layer == 1
    assert report.regret == pytest.approx(0.5 / 3)  # differences 0, 0, 0.5
    assert (report.regret_ci_low, report.regret_ci_high) == pytest.approx(_enumerated_interval([0, 0, 0.5]))
    assert (report.gap_ci_low, report.gap_ci_high) == pytest.approx(_enumerated_interval([0, 0, 0.5]))
    assert _enumerated_interval([0, 0, 1]) == (0, 1)
    assert mean_interval(np.array([0.0, 0.0, 1.0])) == pytest.approx((0.0, 1.0))
    # proxy regret over the proxy requests: differences 0.5 and 1.0, means 0.5, 0.75, 1 with P 1/4, 1/2, 1/4
    assert (report.proxy_regret_ci_low, report.proxy_regret_ci_high) == pytest.approx((0.5, 1.0))
    assert report.regret_ci_low <= report.regret <= report.regret_ci_high


def test_bootstrap_intervals_are_seeded_and_narrow_with_more_requests():
    rng = np.random.default_rng(3)
    from lga_dist.resampling import mean_interval

    small, large = rng.integers(0, 2, 30).astype(float), rng.integers(0, 2, 480).astype(float)
    assert mean_interval(small) == mean_interval(small)  # the same seed, the same interval
    graded = rng.normal(size=30)
    assert mean_interval(graded, seed=1) != mean_interval(graded, seed=2)  # 0/1 values land on the same steps
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(mean_interval(large)) < 0.5 * width(mean_interval(small))  # about 1/4 at 16x the requests


def test_a_pick_not_edited_on_the_test_split_has_no_test_figure():
    """--test-layers picks: the test split edited at the golden layer and one pick only; another rule's pick
    has no regret (NaN, flagged), the optimum is taken on the proxy split, where every layer was edited."""
    cells = [c for c in CELLS if c.case_id in ("a", "b") or c.layer in (1, 2)]
    on_test = golden_report(cells, {"a", "b"}, {"c", "d"}, {0: -5.0, 1: 2.0, 2: 3.0, 3: 1.0})
    full = golden_report(CELLS, {"a", "b"}, {"c", "d"}, {0: -5.0, 1: 2.0, 2: 3.0, 3: 1.0})
    assert on_test.pick_on_test and on_test.lga_layer == 2
    for field in ("regret", "regret_ci_low", "regret_ci_high", "proxy_regret", "lga_spearman", "golden_test"):
        assert getattr(on_test, field) == pytest.approx(getattr(full, field))
    assert on_test.optimum_split == "proxy" and full.optimum_split == "test"
    assert on_test.optimal_test == pytest.approx(0.85)  # proxy optima 0.9 and 0.8
    missed = golden_report(cells, {"a", "b"}, {"c", "d"}, {0: 9.0, 1: 2.0, 2: 3.0, 3: 1.0})
    assert missed.lga_layer == 0 and not missed.pick_on_test and math.isnan(missed.regret)


def test_spearman_ties_and_degenerate_inputs():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties share their average rank: [1, 1, 2] -> ranks [1.5, 1.5, 3]
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
    assert math.isnan(spearman([1, 1], [1, 2])) and math.isnan(spearman([1, 2], [1, 2, 3]))


def test_spearman_of_every_bootstrap_row_at_once_is_spearman_row_by_row():
    from lga_dist.lga.ranking import spearman_each

    rng = np.random.default_rng(0)
    scores, rows = rng.normal(size=9), rng.integers(0, 3, size=(200, 9)).astype(float)  # many ties
    rows[0] = 1.0  # constant: undefined
    each = spearman_each(scores, rows)
    assert math.isnan(each[0])
    np.testing.assert_allclose(each[1:], [spearman(scores, row) for row in rows[1:]], rtol=1e-12, atol=1e-12)


def _study(directory, model: str, rules: dict[str, tuple[int, float, float]], **recorded) -> str:
    """A golden_summary.parquet as validate-golden writes it: rule -> (pick, proxy_regret, test regret)."""
    import pyarrow as pa

    from lga_dist.io.storage import write_parquet

    rows = [{"comparison": "proxy -> test", "selector": "cma" if rule == "aie-desc" else "lga", "rule": rule,
             "lga_layer": pick, "proxy_regret": proxy, "regret": test, "lga_spearman": 0.5, "model_id": model,
             "method": "rome", **recorded} for rule, (pick, proxy, test) in rules.items()]
    rows.append({**rows[0], "comparison": "proxy of 2 -> test", "proxy_regret": 0.0, "regret": 0.9})  # not the main
    directory.mkdir()
    write_parquet(pa.Table.from_pylist(rows), str(directory / "golden_summary.parquet"))
    return str(directory)


def test_the_rule_is_chosen_on_the_proxy_split_and_judged_on_the_test_split(tmp_path):
    from lga_dist.validation.rule_choice import choose_rule, read_evidence

    # cosine-desc is best on the test split of both studies, but the choice may only look at the proxy split:
    # there norm_new-desc wins (mean 0.05 against dot-desc's 0.10 and cosine-desc's 0.20).
    a = _study(tmp_path / "a", "gemma", {"dot-desc": (0, 0.1, 0.2), "cosine-desc": (4, 0.2, 0.0),
                                          "norm_new-desc": (1, 0.0, 0.05), "aie-desc": (4, 0.0, 0.0)})
    b = _study(tmp_path / "b", "smollm2", {"dot-desc": (3, 0.1, 0.3), "cosine-desc": (5, 0.2, 0.0),
                                            "norm_new-desc": (2, 0.1, 0.15), "aie-desc": (6, 0.3, 0.1)})
    choice = choose_rule(read_evidence(a) + read_evidence(b), target=0.1)
    assert choice.chosen == "norm_new-desc" and choice.studies == ["gemma rome", "smollm2 rome"]
    assert choice.chosen_row["test_regret"] == {"gemma rome": 0.05, "smollm2 rome": 0.15}
    assert not choice.meets_target  # 0.15 > 0.1 on smollm2: said, not hidden
    assert [row["rule"] for row in choice.rows][-1] == "cma aie-desc"  # causal tracing beside, never chosen
    # a tie on the proxy split goes to the paper's reading
    tie = choose_rule(read_evidence(a) + read_evidence(b), target=0.5)
    assert tie.meets_target
    c = _study(tmp_path / "c", "gemma", {"dot-desc": (0, 0.1, 0.2), "cosine-asc": (4, 0.1, 0.0)})
    assert choose_rule(read_evidence(c)).chosen == "dot-desc"


def test_the_verdict_reads_the_upper_end_of_each_interval_and_names_picks_without_a_test_figure(tmp_path):
    """A rule whose test regret is 0.05 but whose interval reaches 0.2 does not meet a target of 0.1; a study
    whose test split was not edited at a rule's pick (a width it did not replay) is named, and fails it too."""
    from lga_dist.validation.rule_choice import choose_rule, read_evidence

    a = _study(tmp_path / "a", "gemma", {"dot-desc": (0, 0.0, 0.05), "cosine-desc": (4, 0.1, 0.0)},
               regret_ci_high=0.2)
    b = _study(tmp_path / "b", "smollm2", {"dot-desc": (3, 0.0, 0.0), "cosine-desc": (5, 0.1, math.nan)},
               regret_ci_high=0.08, pick_on_test=True)
    evidence = read_evidence(a) + read_evidence(b)
    evidence = [dataclasses.replace(e, pick_on_test=False, regret_ci_high=math.nan)
                if e.study == "smollm2 rome" and e.rule == "cosine-desc" else e for e in evidence]
    choice = choose_rule(evidence, target=0.1)
    assert choice.chosen == "dot-desc" and choice.chosen_row["max_test_regret"] == pytest.approx(0.05)
    assert choice.chosen_row["max_test_regret_high"] == pytest.approx(0.2) and not choice.meets_target
    cosine = next(row for row in choice.rows if row["rule"] == "cosine-desc")
    assert cosine["not_edited"] == ["smollm2 rome"] and math.isnan(cosine["max_test_regret_high"])


def test_choose_rule_command(tmp_path):
    from helpers import run_cli

    a = _study(tmp_path / "a", "gemma", {"dot-desc": (0, 0.0, 0.05), "dot-asc": (5, 0.2, 0.0)})
    code, stdout, stderr, summary = run_cli("choose-rule", a)
    assert code == 0, stderr
    assert summary["chosen"] == "dot-desc" and summary["meets_target"] is True
    assert "chosen on the proxy split: dot-desc" in stdout
    code, _, _, summary = run_cli("choose-rule")
    assert code == 2 and "at least one" in summary["error"]
    # the same model and method in another dtype is another study; the same study twice is refused
    b = _study(tmp_path / "b", "gemma", {"dot-desc": (1, 0.1, 0.1), "dot-asc": (5, 0.0, 0.3)}, dtype="bfloat16")
    code, stdout, stderr, summary = run_cli("choose-rule", a, b)
    assert code == 0, stderr
    assert summary["studies"] == ["gemma rome", "gemma rome bfloat16"] and summary["chosen"] == "dot-desc"
    only_cma = _study(tmp_path / "cma", "gemma", {"aie-desc": (3, 0.0, 0.0)})
    for extra in ((), ("--kappa", "1")):  # the study cannot decide anything: one line, not a traceback
        code, _, stderr, summary = run_cli("choose-rule", only_cma, *extra)
        assert code == 2 and "no LGA" in summary["error"] and "Traceback" not in stderr
    again = _study(tmp_path / "a-again", "gemma", {"dot-desc": (0, 0.0, 0.05)})
    code, _, _, summary = run_cli("choose-rule", a, b, again)
    assert code == 2 and "both studies of gemma rome:" in summary["error"]


def _replayable_study(directory, mlp_dot: list[float] | None = None) -> str:
    """A study with its grid and LGA matrix: dot sums 1, 2, 3, 4, 100 over layers 0-4.

    With the paper's fences (kappa 1: Q1 2, Q3 4, upper fence 6) layer 4 is fenced out and dot-desc
    picks layer 3, the best layer on both splits; with no fences it picks layer 4, the worst. ``mlp_dot``:
    the per-request dot scores of a second parameter set, kept in lga-mlp/ as validate-golden keeps it."""
    import pyarrow as pa

    from lga_dist.io.storage import write_parquet
    from lga_dist.lga.ranking import matrix_table

    performance = {"a": [0.2, 0.3, 0.4, 0.9, 0.0], "b": [0.2, 0.5, 0.4, 0.7, 0.2],   # proxy: layer 3 (0.8)
                   "c": [0.1, 0.3, 0.5, 0.6, 0.1], "d": [0.3, 0.3, 0.5, 0.8, 0.3]}   # test: 0.7 at 3, 0.2 at 4
    split = {"a": "proxy", "b": "proxy", "c": "test", "d": "test"}
    grid = [{"group": "main", "case_id": case, "layer": layer, "performance": value, "split": split[case]}
            for case, row in performance.items() for layer, value in enumerate(row)]
    grid.append({**grid[0], "group": "transfer", "split": "transfer", "performance": 1.0})  # never counted
    directory.mkdir()
    (directory / "lga").mkdir()
    write_parquet(pa.Table.from_pylist(grid), str(directory / "grid.parquet"))
    dot = np.array([[0.5, 1.0, 1.5, 2.0, 50.0]] * 2)
    ones = np.ones_like(dot)
    write_parquet(matrix_table(["a", "b"], dot, ones, ones), str(directory / "lga" / "request_scores.parquet"))
    summary = [{"comparison": "proxy -> test", "selector": selector, "rule": rule, "lga_layer": pick,
                "proxy_regret": 0.0, "regret": regret, "lga_spearman": 0.5, "model_id": "tiny", "method": "rome"}
               for selector, rule, pick, regret in (("lga", "dot-desc", 3, 0.0), ("cma", "aie-desc", 2, 0.2))]
    if mlp_dot is not None:
        (directory / "lga-mlp").mkdir()
        write_parquet(matrix_table(["a", "b"], np.array([mlp_dot] * 2), ones, ones),
                      str(directory / "lga-mlp" / "request_scores.parquet"))
        summary = [{**row, "param_set": "out" if row["selector"] == "lga" else None} for row in summary]
        summary.insert(1, {**summary[0], "param_set": "mlp", "lga_layer": None})
    write_parquet(pa.Table.from_pylist(summary), str(directory / "golden_summary.parquet"))
    return str(directory)


def test_rules_are_replayed_at_other_fence_widths(tmp_path):
    from lga_dist.validation.rule_choice import choose_rule, fenced_evidence

    study = _replayable_study(tmp_path / "s")
    evidence = {e.label: e for e in fenced_evidence(study, [1.0, math.inf])}
    assert len(evidence) == 24 and {e.study for e in evidence.values()} == {"tiny rome"}  # 6 rules, bagged too
    fenced, open_ = evidence["dot-desc kappa=1"], evidence["dot-desc kappa=inf"]
    assert (fenced.lga_layer, fenced.regret, fenced.proxy_regret) == (3, pytest.approx(0.0), pytest.approx(0.0))
    assert open_.lga_layer == 4
    assert open_.regret == pytest.approx(0.7 - 0.2) and open_.proxy_regret == pytest.approx(0.8 - 0.1)
    assert evidence["dot-asc kappa=1"].lga_layer == 0 and evidence["dot-asc kappa=inf"].lga_layer == 0
    choice = choose_rule(list(evidence.values()))
    assert choice.chosen == "dot-desc kappa=1" and choice.summary()["kappa"] == 1.0 and choice.meets_target


def test_the_rule_map_holds_the_chosen_on_and_the_judged_on_figures(tmp_path):
    from lga_dist.validation.report import regret_grid
    from lga_dist.validation.rule_choice import choose_rule, read_evidence

    a = _study(tmp_path / "a", "gemma", {"dot-desc": (0, 0.1, 0.2), "cosine-desc": (4, 0.3, 0.0)})
    b = _study(tmp_path / "b", "smollm2", {"dot-desc": (3, 0.2, 0.3)})  # no cosine-desc here: a hole
    choice = choose_rule(read_evidence(a) + read_evidence(b))
    grid = regret_grid(choice.rows, choice.studies)
    assert [row["rule"] for row in choice.rows] == ["dot-desc", "cosine-desc"]
    np.testing.assert_allclose(grid[0], [0.15, 0.2, 0.3])
    assert grid[1][:2].tolist() == [0.3, 0.0] and math.isnan(grid[1][2])


def test_every_parameter_set_is_replayed_from_its_own_matrix(tmp_path):
    from lga_dist.validation.rule_choice import choose_rule, fenced_evidence

    # through all MLP weights the dot sums fall with depth (4 .. 0 over layers 0-4): no outlier, dot-desc picks 0
    study = _replayable_study(tmp_path / "s", mlp_dot=[2.0, 1.5, 1.0, 0.5, 0.0])
    evidence = {e.label: e for e in fenced_evidence(study, [1.0])}
    assert len(evidence) == 24 and evidence["dot-desc kappa=1"].lga_layer == 3  # the main set: lga/
    mlp = evidence["dot-desc params=mlp kappa=1"]
    assert (mlp.lga_layer, mlp.param_set) == (0, "mlp") and mlp.regret == pytest.approx(0.7 - 0.2)
    assert evidence["dot-asc params=mlp kappa=1"].lga_layer == 4
    choice = choose_rule(list(evidence.values()))
    assert choice.chosen == "dot-desc kappa=1" and choice.summary()["param_set"] == "out"
    assert choice.summary()["rules"]["dot-desc params=mlp kappa=1"]["param_set"] == "mlp"


def test_choose_rule_command_chooses_the_fence_width(tmp_path):
    from helpers import run_cli

    study = _replayable_study(tmp_path / "s")
    plot = tmp_path / "rules.png"
    code, stdout, stderr, summary = run_cli("choose-rule", study, "--kappa", "inf", "--plot", str(plot))
    assert code == 0, stderr
    assert plot.read_bytes().startswith(b"\x89PNG")
    # with no fences every dot and cosine rule is pushed to a bad layer; norm_new's sums are all equal
    assert summary["kappa"] == "inf" and summary["rules"]["dot-desc kappa=inf"]["picks"] == {"tiny rome": 4}
    assert summary["rules"]["cma aie-desc"]["picks"] == {"tiny rome": 2}  # causal tracing as the study ran it
    assert "kappa=inf" in stdout and summary["chosen"] != "dot-desc kappa=inf"
    code, _, _, summary = run_cli("choose-rule", study, "--kappa", "-1")
    assert code == 2 and "--kappa" in summary["error"]
    (tmp_path / "s" / "lga" / "request_scores.parquet").unlink()  # a study run before the matrix was kept
    code, _, _, summary = run_cli("choose-rule", study, "--kappa", "1")
    assert code == 2 and "replays the rules" in summary["error"] and "request_scores.parquet" in summary["error"]


def test_per_layer_table_counts_failed_edits_apart():
    from lga_dist.validation.report import markdown_summary, per_layer_rows

    nan = math.nan
    rows = [{"layer": 2, "edited_layers": "1,2", "performance": 0.5, "ES": 1.0, "PS": 0.5, "NS": 0.5,
             "zsre_efficacy": nan},
            {"layer": 2, "edited_layers": "1,2", "performance": 0.25, "ES": 0.0, "PS": 0.5, "NS": 1.0,
             "zsre_efficacy": nan},
            {"layer": 2, "edited_layers": "1,2", "performance": nan, "ES": nan, "PS": nan, "NS": nan},  # failed
            {"layer": 1, "edited_layers": "0,1", "performance": 1.0, "ES": 1.0, "PS": 1.0, "NS": 1.0}]
    table = per_layer_rows(rows)
    assert [row["layer"] for row in table] == [1, 2]  # by layer, whatever the rows' order
    assert table[1] == {"layer": 2, "edited layers": "1,2", "edits": 2, "failed": 1, "performance": 0.375,
                        "ES": 0.5, "PS": 0.5, "NS": 0.75}  # no zsRE column: no row has a zsRE figure
    text = markdown_summary({}, {"model_id": "m"}, table)
    assert "| 2 | 1,2 | 2 | 1 | 0.375 | 0.500 | 0.500 | 0.750 |" in text
