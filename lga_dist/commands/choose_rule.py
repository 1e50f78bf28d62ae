"""choose-rule: the LGA score rule chosen on the proxy split of validate-golden studies, judged on their test split."""

from __future__ import annotations

import dataclasses

from lga_dist.config import ConfigError, option
from lga_dist.console import format_table
from lga_dist.io.storage import StorageError
from lga_dist.validation.report import studies_table, write_markdown, write_rule_plot
from lga_dist.validation.rule_choice import choose_rule, fenced_evidence, read_evidence, study_name, summary_rows

DESCRIPTION = """Choose LGA's score rule by evidence from validate-golden studies (one per model and method).

Every study's OUT/golden_summary.parquet holds, per rule ('dot', 'cosine' or 'norm_new', ranked
'desc' or 'asc'; 'bagged:' variants pick the layer most often at rank 1 across proxy resamples)
and for causal tracing, the layer picked from the proxy split and its regret against the golden
layer on the proxy split (proxy_regret) and on the held-out test split (regret, with its 95%
paired bootstrap interval). The rule with the lowest mean proxy regret over all studies is
chosen (ties: the paper's dot-desc); the test split only reports what the choice is worth: its
regret per study, and whether the upper end of its interval is at most --target on every one.
Prints one row per rule, causal tracing last; a pick a study's test split was not edited at
(validate-golden --test-layers picks, a width it did not replay) shows as 'not edited'.

A study scored through more than one parameter set (validate-golden --param-sets) offers each
set's rules as candidates ('dot-desc params=mlp'). With --kappa, Tukey's fence width is chosen
with the rule: every LGA rule is replayed at each width from the study's saved LGA matrices
(OUT/lga*/request_scores.parquet) and grid (OUT/grid.parquet), without loading a model. A choice
'R params=P kappa=K' is used as rank-layers --score/--order R --param-set P --kappa K."""


@dataclasses.dataclass
class Config:
    studies: list[str] = option([], "validate-golden output directories (local or s3://), one per model and method",
                                positional=True, metavar="OUT")
    target: float = option(0.1, "the test regret a rule must stay within on every study")
    kappa: list[float] = option([], "fence widths to choose among with the rule (e.g. 1 1.5 3 inf); default: each "
                                "study's own", metavar="K")
    plot: str | None = option(None, "also write a PNG heat map of every rule's regrets (local or s3://)",
                              metavar="PATH.png")
    metric: str = option("score", "the per-edit metric whose comparisons are read (each study reports 'score' "
                         "and 'margin')", choices=("score", "margin"))
    table: str | None = option(None, "also write the one-table summary (per study: golden layer, each selector's "
                               "pick with regret, interval and pick share, the chosen rule's too, cost) as Markdown",
                               metavar="PATH.md")

    def validate(self) -> None:
        if not self.studies:
            raise ConfigError("name at least one validate-golden output directory")
        if any(not k >= 0 for k in self.kappa):
            raise ConfigError(f"--kappa takes fence widths >= 0 (inf: no fences), got {self.kappa}")


def run(config: Config) -> tuple[dict, int]:
    evidence, read_from = [], {}
    for directory in config.studies:
        found = read_evidence(directory, config.metric)
        if config.kappa:  # LGA's rules replayed at every width; causal tracing as the study measured it
            try:
                replayed = fenced_evidence(directory, config.kappa, config.metric)
            except StorageError as err:
                raise ConfigError(f"--kappa replays the rules from each study's grid.parquet and "
                                  f"lga*/request_scores.parquet: {err}") from err
            found = [e for e in found if e.selector != "lga"] + replayed
        for study in sorted({e.study for e in found}):
            if study in read_from:
                raise ConfigError(f"{read_from[study]} and {directory} are both studies of {study}: each study "
                                  f"must count once; pass one of them")
            read_from[study] = directory
        evidence += found
    choice = choose_rule(evidence, config.target)
    short = {study: f"S{index}" for index, study in enumerate(choice.studies, start=1)}  # keeps the table narrow
    print("\n".join(f"{short[study]} = {study} ({read_from[study]})" for study in choice.studies))
    print(format_table([{"rule": row["rule"], "mean proxy regret": row["mean_proxy_regret"],
                         **{f"regret {short[study]}": _regret_text(row, study) for study in choice.studies},
                         "worst upper": row["max_test_regret_high"],
                         **{f"pick {short[study]}": row["picks"].get(study) for study in choice.studies},
                         "mean Spearman": row["mean_spearman"]} for row in choice.rows]))
    print(f"regret Sn: the rule's pick against the golden layer on study n's test split, by '{config.metric}', "
          f"with the upper end of its 95% paired bootstrap interval (chosen on the proxy split's, not shown); "
          f"worst upper: the largest upper end over the studies")
    if config.plot:
        write_rule_plot(choice.rows, choice.studies, choice.chosen, config.target, config.plot)
        print(f"wrote {config.plot}")
    if config.table:
        lines = studies_table({study: [r for r in summary_rows(read_from[study], config.metric)
                                       if study_name(r, read_from[study]) == study] for study in choice.studies},
                              extra=[(f"chosen: {choice.chosen}", "lga", choice.chosen_row["score_rule"],
                                      choice.chosen_row["param_set"])] if choice.chosen_row["kappa"] is None else [])
        write_markdown(config.table, "\n".join(lines) + "\n")
        print(f"wrote {config.table}")
    verdict = "meets" if choice.meets_target else "does NOT meet"
    print(f"chosen on the proxy split: {choice.chosen}; on the test split it {verdict} regret <= {config.target:g} "
          f"(the interval's upper end) on every study ({len(choice.studies)}: {', '.join(choice.studies)})")
    return {**choice.summary(), "metric": config.metric}, 0


def _regret_text(row: dict, study: str) -> str:
    """'0.033 (<= 0.167)': a study's test regret and its interval's upper end; 'not edited' without a figure."""
    if study in row["not_edited"]:
        return "not edited"
    regret, high = row["test_regret"].get(study), row["test_regret_high"].get(study)
    if regret is None:
        return "-"
    return f"{regret:.3f} (<= {high:.3f})"
