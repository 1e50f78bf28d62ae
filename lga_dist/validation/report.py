"""The validation report: a markdown summary, the three plots people look at first, and the rule choice's map."""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from lga_dist.io.storage import atomic_write
from lga_dist.plots import pyplot, save_figure
from lga_dist.validation.golden import GridCell, layer_means, sample_optimal


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


SUMMARY_COLUMNS = ("comparison", "selector", "rule", "param_set", "proxy_size", "test_size", "golden_layer",
                   "golden_test", "optimal_test", "gap", "gap 95% CI", "lga_layer", "pick_share", "lga_test", "regret",
                   "regret 95% CI", "proxy_regret", "proxy_regret 95% CI", "lga_spearman", "lga_spearman 95% CI")


def interval_text(low: Any, high: Any) -> str:
    """'[low, high]' to three decimals; '-' where there is no interval (a pick not edited on the test split)."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
        return "-"
    return f"[{low:.3f}, {high:.3f}]"


def with_intervals(row: Mapping[str, Any]) -> dict[str, Any]:
    """A comparison row with its interval columns written as text, for the tables people read."""
    out = dict(row)
    for name in ("gap", "regret", "proxy_regret", "lga_spearman"):
        out[f"{name} 95% CI"] = interval_text(row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high"))
    if row.get("pick_on_test") is False:
        out["lga_test"] = out["regret"] = "not edited"
    return out


# the per-edit metrics a grid row may carry, by benchmark: CounterFact's, then zsRE's
METRIC_COLUMNS = ("score", "margin", "ES", "PS", "NS", "EM", "PM", "NM", "zsre_efficacy", "zsre_generalization",
                  "zsre_specificity")


def per_layer_rows(grid_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per edited layer of the grid's rows: what was edited, how many edits scored, and their means.

    Failed edits (NaN performance) are counted apart and left out of every mean, as in ``layer_means``."""
    metrics = [m for m in METRIC_COLUMNS if any(_finite(row.get(m)) for row in grid_rows)]
    by_layer: dict[int, list[Mapping[str, Any]]] = {}
    for row in grid_rows:
        by_layer.setdefault(int(row["layer"]), []).append(row)
    table = []
    for layer, rows in sorted(by_layer.items()):
        scored = [row for row in rows if _finite(row.get("performance"))]
        means = {name: float(np.mean([row[name] for row in scored if _finite(row.get(name))] or [math.nan]))
                 for name in ("performance", *metrics)}
        table.append({"layer": layer, "edited layers": rows[0].get("edited_layers", str(layer)),
                      "edits": len(scored), "failed": len(rows) - len(scored), **means})
    return table


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]


def markdown_summary(by_metric: Mapping[str, Sequence[Mapping[str, Any]]], header: Mapping[str, Any],
                     layers: Sequence[Mapping[str, Any]] = (), layer_splits: Sequence[str] = ("proxy", "test")) -> str:
    """The header, every comparison's row per metric (the study's own first), and (given ``per_layer_rows``)
    the per-layer table they come from."""
    lines = [f"# Golden-layer validation: {header['model_id']}", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in header.items() if key != "model_id"]
    for index, (metric, rows) in enumerate(by_metric.items()):
        title = "the study's metric" if index == 0 else "reported beside it"
        lines += ["", f"## Comparisons by `{metric}` ({title})", "",
                  *markdown_table([with_intervals(row) for row in rows], SUMMARY_COLUMNS)]
    lines += ["", "golden = best fixed layer on the proxy split; *_test = mean performance on the test split; "
              "gap = optimal - golden (on the test split, or on the proxy split when the test split was edited only "
              "at the picks); regret = golden - the selector's pick (test split; proxy_regret: the same on the proxy "
              "split, where a rule may be chosen); pick_share = the share of proxy resamples in which the selector "
              "puts its pick at rank 1; lga_spearman = the selector's layer scores, oriented by its rule, vs "
              "per-layer proxy performance; 95% CI = paired bootstrap over the split's requests. 'bagged:' rules "
              "pick the layer most often at rank 1 across the proxy resamples.", ""]
    if layers:
        lines += [f"## Per layer, every request of the {' and '.join(layer_splits)} split"
                  f"{'s' if len(layer_splits) > 1 else ''}", "", *markdown_table(layers, list(layers[0])), "",
                  "performance = the per-edit score the comparisons rank by; the metric columns are means over the "
                  "edits that scored (failed edits are counted apart).", ""]
    return "\n".join(lines)


def write_plots(cells: Sequence[GridCell], proxy_ids: set[str], test_ids: set[str], golden: int,
                lga_scores: Mapping[int, float], picks: Mapping[str, int | None],
                proxy_rows: Sequence[Mapping[str, Any]], paths: Mapping[str, str], title: str) -> None:
    """layers.png (per-layer performance; the golden layer and each selector's pick marked), optimal.png,
    proxy_size.png. ``picks`` maps a label ('LGA dot-desc', 'CMA') to the layer it picked."""
    plt = pyplot()

    proxy_means, test_means = layer_means(cells, proxy_ids), layer_means(cells, test_ids)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(proxy_means), list(proxy_means.values()), "o-", label="proxy split")
    ax.plot(list(test_means), list(test_means.values()), "s-", label="test split")
    ax.axvline(golden, color="tab:green", linestyle="--", label=f"golden layer {golden}")
    styles = [("tab:red", ":"), ("tab:purple", "-."), ("tab:orange", "--"), ("tab:brown", ":")]
    marked = [(label, layer) for label, layer in picks.items() if layer is not None]
    for index, ((label, layer), (color, style)) in enumerate(zip(marked, itertools.cycle(styles))):
        offset = 0.06 * (index - (len(marked) - 1) / 2)  # picks of the same layer stay visible side by side
        ax.axvline(layer + offset, color=color, linestyle=style, label=f"{label} pick {layer}")
    ax.set_xlabel("edited layer")
    ax.set_ylabel("mean edit performance")
    ax.set_title(title)
    if lga_scores:
        twin = ax.twinx()
        twin.bar(list(lga_scores), list(lga_scores.values()), alpha=0.2, color="tab:gray", label="LGA score")
        twin.set_ylabel("LGA layer score")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, paths["layers"])

    optimal = sample_optimal(cells, test_ids | proxy_ids)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = sorted({c.layer for c in cells})
    counts = [sum(1 for layer, _ in optimal.values() if layer == candidate) for candidate in layers]
    ax.bar(layers, counts)
    ax.set_xlabel("sample-wise optimal layer")
    ax.set_ylabel("requests")
    ax.set_title("where each request is best edited")
    fig.tight_layout()
    save_figure(fig, paths["optimal"])

    fig, ax = plt.subplots(figsize=(6, 3.5))
    sizes = [row["proxy_size"] for row in proxy_rows]
    ax.plot(sizes, [row["golden_test"] for row in proxy_rows], "o-", label="golden layer of the proxy")
    ax.plot(sizes, [row["lga_test"] for row in proxy_rows], "s-", label="LGA pick on the proxy")
    if proxy_rows:
        ax.axhline(proxy_rows[0]["optimal_test"], color="tab:gray", linestyle="--", label="sample-wise optimum")
    ax.set_xscale("log")
    ax.set_xlabel("proxy requests")
    ax.set_ylabel("test performance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, paths["proxy_size"])


# The selectors of the one-table summary: (label, selector, rule, parameter set)
TABLE_SELECTORS = (("LGA dot-desc", "lga", "dot-desc", "out"), ("LGA bagged:dot-desc", "lga", "bagged:dot-desc", "out"),
                   ("causal tracing", "cma", "aie-desc", None))


def studies_table(studies: Mapping[str, Sequence[Mapping[str, Any]]], extra: Sequence[tuple] = ()) -> list[str]:
    """One Markdown row per study: its golden layer, each selector's pick with its regret, interval and pick
    share, and the cost. ``studies``: label -> its main comparison rows under one metric; ``extra``: more
    (label, selector, rule, param_set) columns, e.g. the rule choose-rule chose."""
    selectors = [*TABLE_SELECTORS, *extra]
    lines = ["| study | golden layer (test mean) | " + " | ".join(f"{label}: pick, regret [95% CI], pick_share"
                                                                for label, *_ in selectors)
             + " | LGA s / CT s / grid actor-s on the proxy |",
             "| --- | --- | " + " | ".join("---" for _ in selectors) + " | --- |"]
    for study, rows in studies.items():
        def find(selector: str, rule: str, param_set: str | None):
            return next((r for r in rows if r.get("selector", "lga") == selector and r["rule"] == rule and
                         (selector != "lga" or (r.get("param_set") or "out") == param_set)), None)

        cells = []
        for _, selector, rule, param_set in selectors:
            row = find(selector, rule, param_set)
            if row is None:
                cells.append("-")
                continue
            regret = "not edited" if row.get("pick_on_test") is False else f"{_fmt(row['regret'])} " \
                f"{interval_text(row.get('regret_ci_low'), row.get('regret_ci_high'))}"
            cells.append(f"{_fmt(row['lga_layer'])}, {regret}, {_fmt(row.get('pick_share'))}")
        first = rows[0]
        cost = " / ".join(_fmt(first.get(key)) for key in ("lga_seconds", "cma_seconds", "grid_seconds_on_proxy"))
        lines.append(f"| {study} | {first['golden_layer']} ({_fmt(first['golden_test'])}) | " + " | ".join(cells)
                     + f" | {cost} |")
    return lines


def regret_grid(rows: Sequence[Mapping[str, Any]], studies: Sequence[str]) -> np.ndarray:
    """rows x (mean proxy regret, test regret per study): what a rule is chosen on, then what it is worth."""
    return np.array([[row["mean_proxy_regret"], *(row["test_regret"].get(study, math.nan) for study in studies)]
                     for row in rows], dtype=float)


def write_rule_plot(rows: Sequence[Mapping[str, Any]], studies: Sequence[str], chosen: str, target: float,
                    path: str) -> None:
    """A heat map of every rule's regrets, the chosen rule's label in bold, cells above the target outlined."""
    plt = pyplot()
    grid = regret_grid(rows, studies)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * grid.shape[1], 1.2 + 0.28 * grid.shape[0]))
    image = ax.imshow(grid, cmap="RdYlGn_r", vmin=0.0, vmax=max(0.5, float(np.nanmax(grid))), aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
            if j > 0 and value > target:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=0.8))
    ax.set_xticks(range(grid.shape[1]), ["mean proxy\nregret"] + [study.replace(" ", "\n") for study in studies],
                  fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [row["rule"] for row in rows], fontsize=7)
    for label in ax.get_yticklabels():
        if label.get_text() == chosen:
            label.set_fontweight("bold")
    ax.set_title(f"regret of each rule's pick (chosen on the proxy: {chosen}; outlined: test regret > {target:g})",
                 fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    save_figure(fig, path)


def write_markdown(path: str, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)
