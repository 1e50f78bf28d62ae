"""Choosing LGA's score rule by evidence: on the proxy split across studies, reported on the test split.

Each validate-golden run (a study: one model, one method) writes, per LGA rule and for causal
tracing, the layer the rule picks from the proxy split and its regret against the golden layer,
measured on the proxy split itself (``proxy_regret``) and on the held-out test split
(``regret``). A rule is chosen by its mean proxy regret over every study, never by the test
split; its test regrets are then what it is worth, each with the upper end of its 95% paired
bootstrap interval: a rule meets the target only if that upper end is within it on every study.
Ties go to the paper's reading (``dot-desc``), then by name. Causal tracing's pick is reported
beside the rules for comparison. A study whose test split was edited only at the picks
(validate-golden --test-layers picks) has no test figure for a pick it did not edit (a width it
did not replay): that rule is reported as not edited there, never silently dropped.

A rule has two more settings: the parameter set LGA's gradients go through (a study scored
through several offers each set's rules) and Tukey's fence width (kappa), which decides which
layers a rule may pick at all. Each study keeps every set's per-request matrix and its grid, so
every rule can be replayed at other widths (``fenced_evidence``) and all settings chosen the same
way, on the proxy split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from lga_dist.errors import UserError
from lga_dist.io.storage import join, read_parquet
from lga_dist.lga.ranking import PAPER_KAPPA, SHARE_RESAMPLES
from lga_dist.lga.rules import matrix_folder, read_matrix, rule_label, rule_views
from lga_dist.lga.scoring import DEFAULT_PARAM_SET
from lga_dist.validation.golden import GridCell, golden_report

PAPER_RULE = "dot-desc"
MAIN_COMPARISON = "proxy -> test"


class RuleChoiceError(UserError, ValueError):
    """The studies cannot decide: no LGA rule has a figure from every one."""


@dataclasses.dataclass(frozen=True)
class RuleEvidence:
    """One selector rule's pick in one study."""

    study: str
    selector: str
    rule: str
    lga_layer: int | None
    proxy_regret: float
    regret: float
    spearman: float
    kappa: float | None = None  # the fence width it was replayed at; None: as the study ran it
    param_set: str | None = None  # LGA's weights (None: the default, or not LGA)
    regret_ci_high: float = math.nan  # the upper end of the test regret's 95% interval
    pick_on_test: bool = True  # False: the study's test split was not edited at this pick

    @property
    def label(self) -> str:
        return rule_label(self.rule, self.param_set, self.kappa)

    @property
    def name(self) -> str:
        return f"{self.selector} {self.label}"


@dataclasses.dataclass
class RuleChoice:
    """The chosen LGA rule, every candidate's figures, and whether the choice meets the regret target."""

    chosen: str
    target: float
    studies: list[str]
    rows: list[dict[str, Any]]

    @property
    def chosen_row(self) -> dict[str, Any]:
        return next(row for row in self.rows if row["rule"] == self.chosen)

    @property
    def meets_target(self) -> bool:
        """Every study's upper interval end within the target (a missing test figure fails it)."""
        return all(high <= self.target for high in self.chosen_row["test_regret_high"].values())

    def summary(self) -> dict[str, Any]:
        kappa = self.chosen_row["kappa"]  # JSON has no infinity: no fences is written "inf"
        return {"chosen": self.chosen, "param_set": self.chosen_row["param_set"],
                "kappa": "inf" if kappa == math.inf else kappa,
                "meets_target": self.meets_target, "target": self.target, "studies": self.studies,
                "rules": {row["rule"]: row for row in self.rows}}


def study_name(row: dict[str, Any], directory: str) -> str:
    """A study's label: its model, method and (when recorded) the dtype it ran in."""
    return " ".join(str(part) for part in (row.get("model_id", directory), row.get("method"), row.get("dtype"))
                    if part)


def summary_rows(directory: str, metric: str) -> list[dict[str, Any]]:
    """The main comparison's rows of one study under ``metric`` (a study from before the metric was recorded
    holds ``score`` rows only)."""
    rows = read_parquet(join(directory, "golden_summary.parquet")).to_pylist()
    return [row for row in rows if row.get("comparison") == MAIN_COMPARISON and row.get("metric", "score") == metric]


def read_evidence(directory: str, metric: str = "score") -> list[RuleEvidence]:
    """The main comparison's rows of one validate-golden output (OUT/golden_summary.parquet)."""
    evidence = []
    for row in summary_rows(directory, metric):
        study = study_name(row, directory)
        evidence.append(RuleEvidence(study, row.get("selector", "lga"), row["rule"], row.get("lga_layer"),
                                     _number(row.get("proxy_regret")), _number(row.get("regret")),
                                     _number(row.get("lga_spearman")), param_set=row.get("param_set"),
                                     regret_ci_high=_number(row.get("regret_ci_high", row.get("regret"))),
                                     pick_on_test=row.get("pick_on_test", True) is not False))
    return evidence


def fenced_evidence(directory: str, kappas: Sequence[float], metric: str = "score") -> list[RuleEvidence]:
    """Every LGA rule of one study, and its bagged variant, replayed at each fence width from its saved
    matrices and grid.

    Reads each parameter set's OUT/lga*/request_scores.parquet (the proxy's per-request LGA scores) and
    OUT/grid.parquet (every request edited at its layers, with its split), so no model is loaded."""
    summary = [row for row in summary_rows(directory, metric) if row.get("selector", "lga") == "lga"]
    if not summary:
        raise RuleChoiceError(f"{directory}: golden_summary.parquet has no LGA rows under '{metric}' to replay")
    study = study_name(summary[0], directory)
    seed, resamples = int(summary[0].get("seed") or 0), int(summary[0].get("share_resamples") or SHARE_RESAMPLES)
    param_sets = list(dict.fromkeys(row.get("param_set") or DEFAULT_PARAM_SET for row in summary))  # main set first
    grid = [row for row in read_parquet(join(directory, "grid.parquet")).to_pylist()
            if row["split"] in ("proxy", "test")]
    cells = [GridCell(row["case_id"], row["layer"], row[metric] if metric in row else row["performance"])
             for row in grid]
    splits = {name: {row["case_id"] for row in grid if row["split"] == name} for name in ("proxy", "test")}
    evidence = []
    for param_set in param_sets:
        matrix = read_matrix(join(directory, matrix_folder(param_set, param_sets[0]), "request_scores.parquet"))
        for kappa in kappas:
            for rule, view in rule_views(matrix, kappa, resamples, seed).items():
                report = golden_report(cells, splits["proxy"], splits["test"], view["scores"], view["excluded"],
                                       seed=seed)
                evidence.append(RuleEvidence(study, "lga", rule, report.lga_layer, report.proxy_regret, report.regret,
                                             report.lga_spearman, kappa=float(kappa), param_set=param_set,
                                             regret_ci_high=report.regret_ci_high, pick_on_test=report.pick_on_test))
    return evidence


def choose_rule(evidence: Sequence[RuleEvidence], target: float = 0.1) -> RuleChoice:
    """The LGA rule with the lowest mean proxy regret over the studies (causal tracing reported beside it)."""
    studies = sorted({e.study for e in evidence})
    by_rule: dict[str, list[RuleEvidence]] = {}
    for e in evidence:
        by_rule.setdefault(e.name, []).append(e)
    rows = []
    for name, items in by_rule.items():
        selector, label = name.split(" ", 1)
        rows.append({"rule": label if selector == "lga" else name, "selector": selector,
                     "score_rule": items[0].rule, "kappa": items[0].kappa,
                     "param_set": (items[0].param_set or DEFAULT_PARAM_SET) if selector == "lga" else None,
                     "studies": len({e.study for e in items}),
                     "mean_proxy_regret": _mean([e.proxy_regret for e in items]),
                     "test_regret": {e.study: e.regret for e in items},
                     "test_regret_high": {e.study: e.regret_ci_high for e in items},
                     "not_edited": sorted(e.study for e in items if not e.pick_on_test),
                     "max_test_regret": _worst([e.regret for e in items]),
                     "max_test_regret_high": _worst([e.regret_ci_high for e in items]),
                     "mean_spearman": _mean([e.spearman for e in items]),
                     "picks": {e.study: e.lga_layer for e in items}})
    candidates = [r for r in rows if r["selector"] == "lga" and r["studies"] == len(studies)]
    if not candidates:
        raise RuleChoiceError(f"no LGA rule has a figure from every study ({', '.join(studies)}); each "
                              f"study's golden_summary.parquet must hold the LGA rows validate-golden writes")
    chosen = min(candidates, key=_preference)
    rows.sort(key=lambda r: (r["selector"] != "lga", r["mean_proxy_regret"], r["rule"]))
    return RuleChoice(chosen["rule"], target, studies, rows)


def _preference(row: dict[str, Any]) -> tuple:
    """Lowest mean proxy regret; on a tie the paper's reading, its weights, its fence width, then narrower fences."""
    kappa = PAPER_KAPPA if row["kappa"] is None else row["kappa"]
    return (row["mean_proxy_regret"], row["score_rule"] != PAPER_RULE, row["param_set"] != DEFAULT_PARAM_SET,
            kappa != PAPER_KAPPA, kappa, row["rule"])


def _worst(values: Sequence[float]) -> float:
    """The largest value; NaN when one is missing (a pick with no test figure cannot be vouched for)."""
    return math.nan if not values or any(math.isnan(v) for v in values) else max(values)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
