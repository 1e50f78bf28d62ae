"""validate: is the layer a selector picks a good layer to edit? The request x layer edit grid answers it.

Every request is edited alone at every candidate layer (from the unedited model
each time); the golden layer (best fixed layer on the proxy split), the
sample-wise optimum and each selector's pick (LGA under every rule, causal
tracing) are compared on the test split, with costs, plots and a summary.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any, Sequence

import pyarrow as pa

from lga_dist.config import ConfigError, option, section, to_dict
from lga_dist.devices import resolve_device
from lga_dist.editing import window_size
from lga_dist.io.requests import EditRequest, read_requests
from lga_dist.io.storage import join, makedirs, write_parquet
from lga_dist.lga.ranking import SHARE_RESAMPLES
from lga_dist.lga.rules import REPLAY_KAPPAS, RULES, matrix_folder, read_matrix, rule_label, rule_views
from lga_dist.lga.scoring import PARAM_SETS
from lga_dist.models import ModelInfo, describe_model
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.resampling import RESAMPLES
from lga_dist.validation.golden import GridCell, best_layer, golden_report, layer_means
from lga_dist.validation.grid import PERFORMANCE_METRICS, GridSpec, performance, run_grid
from lga_dist.validation.rule_choice import MAIN_COMPARISON
from lga_dist.validation.report import markdown_summary, per_layer_rows, write_markdown, write_plots
from lga_dist.workflows.new_facts import NEW_FACTS_ONLY_HELP, not_yet_known
from lga_dist.workflows.options import (
    ClusterOptions,
    EditingOptions,
    ModelOptions,
    OutputOptions,
    ProxyOptions,
    ScoringOptions,
)
from lga_dist.workflows.rank import RankJob, rank


REPORTED_METRICS = ("score", "margin")  # every study reports its comparisons under both
TEST_LAYERS = ("all", "picks")


@dataclasses.dataclass
class ValidateJob:
    """The grid to run and the comparisons to make (the validate-golden flags)."""

    requests: list[str] = option([], "edit request files (default: the shipped CounterFact facts from the 501st on)",
                                 metavar="PATH")
    limit: int = option(100, "use the first N valid requests")
    new_facts_only: bool = option(False, NEW_FACTS_ONLY_HELP)
    layers: str = option("all", "candidate layers: 'all', 'A:B' (inclusive) or 'L1,L2,...'")
    metric: str = option("score", "per-edit performance that defines the golden layer, the optimum, the picks and "
                         "the regrets: 'score' = harmonic mean of efficacy, generalization and specificity "
                         "(CounterFact ES/PS/NS, 0 or 1 per shipped request), 'margin' = the graded counterpart "
                         "(mean of CounterFact's probability margins EM/PM/NM; zsRE: mean of its token "
                         "accuracies), or one of the three; golden_summary reports 'score' and 'margin' both",
                         choices=PERFORMANCE_METRICS)
    test_layers: str = option("all", "where the test split (and transfer set) is edited: 'all' candidate layers, "
                              "or 'picks': only the layers some selector picks (every LGA rule, parameter set and "
                              "--replay-kappas width, their bagged variants, causal tracing, the smaller proxies) "
                              "and the golden layer of the proxy and of each smaller proxy under each reported "
                              "metric; regrets need nothing else, "
                              "so the same edits buy more test requests (the per-layer curve and the optimum then "
                              "come from the proxy split)", choices=TEST_LAYERS)
    replay_kappas: list[float] = option(list(REPLAY_KAPPAS), "fence widths at which every LGA rule's pick is also "
                                        "taken (--test-layers picks covers them; choose-rule --kappa replays them)",
                                        metavar="K")
    resamples: int = option(RESAMPLES, "bootstrap resamples of the requests behind every interval")
    share_resamples: int = option(SHARE_RESAMPLES, "bootstrap resamples of the proxy behind each pick's share")
    proxy_fraction: float = option(0.5, "share of the requests in the proxy split (the rest is the test split)")
    proxy_sizes: list[float] = option([0.01, 0.05, 0.1, 0.25], "smaller proxies to try, as shares of --limit",
                                      metavar="FRACTION")
    transfer_requests: list[str] = option([], "a second request set to test the proxy's golden layer and LGA "
                                          "pick on (e.g. zsRE)", metavar="PATH")
    transfer_limit: int = option(50, "use the first N valid transfer requests")
    seed: int = option(0, "seed of the proxy/test split (and of causal tracing's noise)")
    cma_samples: int = option(3, "causal tracing's noise draws per proxy request, for its pick beside LGA's "
                              "(0: skip causal tracing)")
    rule: str = option("dot-desc", "the LGA rule whose pick the summary line reports (proxy sizes and transfer "
                       "too); every rule's pick is in golden_summary", choices=RULES)
    param_sets: list[str] = option(list(PARAM_SETS), "LGA parameter sets whose rules golden_summary compares, one "
                                   "LGA pass on the proxy each; the first is the one --rule, the proxy sizes and "
                                   "the transfer use", metavar="SET")
    chunk_size: int = option(25, "requests per grid task (their targets are optimised in one batch)")
    model: ModelOptions = section(ModelOptions, "model")
    editing: EditingOptions = section(EditingOptions, "editing (each candidate layer is edited as bulk-edit would "
                                      "edit it)", method="rome")
    cluster: ClusterOptions = section(ClusterOptions, "cluster (grid workers: each actor holds a full model copy "
                                      "and runs one grid task at a time)", actors=2)
    output: OutputOptions = section(OutputOptions, "output", out="out/validate")

    def validate(self) -> None:
        if self.limit < 4:
            raise ConfigError("--limit must be at least 4 (proxy and test splits need two requests each)")
        if not 0 < self.proxy_fraction < 1:
            raise ConfigError("--proxy-fraction must be between 0 and 1")
        if self.chunk_size < 1:
            raise ConfigError("--chunk-size must be at least 1")
        if not self.param_sets or len(set(self.param_sets)) != len(self.param_sets) or any(
                p not in PARAM_SETS for p in self.param_sets):
            raise ConfigError(f"--param-sets takes one or more of {', '.join(PARAM_SETS)}, each once; "
                              f"got {self.param_sets}")
        if any(not 0 < f <= self.proxy_fraction for f in self.proxy_sizes):
            raise ConfigError(f"--proxy-sizes must lie in (0, --proxy-fraction={self.proxy_fraction}]")
        if self.resamples < 100 or self.share_resamples < 1:
            raise ConfigError("--resamples must be at least 100 (an interval's tails need them) and "
                              "--share-resamples at least 1")
        if any(not k >= 0 for k in self.replay_kappas):
            raise ConfigError(f"--replay-kappas takes fence widths >= 0 (inf: no fences), got {self.replay_kappas}")


@dataclasses.dataclass
class ValidationResult:
    """The comparison rows of golden_summary.parquet, the cost figures, and the summary line's dict."""

    rows: list[dict[str, Any]]
    cost: dict[str, float]
    summary: dict[str, Any]


def parse_candidate_layers(text: str, n_layers: int) -> list[int]:
    """--layers 'all', 'A:B' (inclusive) or 'L1,L2,...', checked against the model."""
    if text == "all":
        return list(range(n_layers))
    try:
        if ":" in text:
            first, last = (int(x) for x in text.split(":"))
            layers = list(range(first, last + 1))
        else:
            layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError as err:
        raise ConfigError(f"--layers {text!r}: use 'all', 'A:B' or 'L1,L2,...'") from err
    if not layers or not 0 <= layers[0] <= layers[-1] < n_layers:
        raise ConfigError(f"--layers {text!r}: the model has layers 0-{n_layers - 1}")
    return layers


def split(requests: list[EditRequest], proxy_fraction: float, seed: int) -> tuple[list[EditRequest], list[EditRequest]]:
    """A seeded shuffle cut into the proxy split (first) and the test split."""
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    cut = max(2, min(len(requests) - 2, round(len(requests) * proxy_fraction)))
    return [requests[i] for i in order[:cut]], [requests[i] for i in order[cut:]]


def read_inputs(config: ValidateJob, model: str, dtype: str) -> tuple[list[EditRequest], list[EditRequest]]:
    quarantine = join(config.output.out, "quarantine.jsonl")
    if config.requests:
        requests = read_requests(config.requests, quarantine=quarantine).requests
    else:
        requests = read_requests([str(demo_requests_path())], quarantine=quarantine).requests[500:]
    if config.new_facts_only:
        requests = not_yet_known(model, requests, config.limit, dtype, config.model.device,
                                 record=join(config.output.out, "new_facts.json"))
    requests = requests[:config.limit]
    if len(requests) < 4:
        raise ConfigError(f"only {len(requests)} valid requests; the grid needs at least 4")
    transfer = []
    if config.transfer_requests:
        transfer_quarantine = join(config.output.out, "quarantine-transfer.jsonl")
        transfer = read_requests(config.transfer_requests, quarantine=transfer_quarantine).requests
        transfer = transfer[:config.transfer_limit]
    return requests, transfer


def selector_ranking(config: ValidateJob, info: ModelInfo, proxy: list[EditRequest], name: str,
                     selector: str = "lga", param_set: str | None = None) -> dict[str, Any]:
    """The rank workflow on exactly these proxy requests (into OUT/NAME/), with its time.

    For LGA also the layer scores every rule derives from the same per-request matrix (``rule_views``),
    with each layer's pick share and the rules' bagged variants, at the study's fence width and at every
    --replay-kappas width (``at_kappa``); causal tracing's scores are its average indirect effects, none fenced
    out, with the pick shares of its own ranking."""
    score, order = config.rule.rsplit("-", 1)
    job = RankJob(model=config.model, proxy=ProxyOptions(requests=config.requests, proxy_size=len(proxy),
                                                         seed=config.seed),
                  scoring=ScoringOptions(selector=selector, param_set=param_set or config.param_sets[0], score=score,
                                         order=order, save_matrix=selector == "lga",
                                         cma_samples=max(config.cma_samples, 1),
                                         share_resamples=config.share_resamples),
                  cluster=ClusterOptions(actors=0),
                  output=OutputOptions(out=join(config.output.out, name), overwrite=True, progress=False))
    started = time.perf_counter()
    result = rank(job, info, proxy=proxy)
    seconds = time.perf_counter() - started
    if selector == "cma":
        shares = {r["layer"]: r["pick_share"] for r in result.table.to_pylist()}
        return {"scores": result.layer_scores(), "excluded": [], "shares": shares, "golden_layer": result.golden_layer,
                "seconds": seconds}
    matrix = read_matrix(join(job.output.out, "request_scores.parquet"))
    views = rule_views(matrix, job.scoring.kappa, config.share_resamples, config.seed)
    at_kappa = {kappa: rule_views(matrix, kappa, config.share_resamples, config.seed)
                for kappa in config.replay_kappas}
    return {**views[config.rule], "rules": views, "at_kappa": at_kappa, "golden_layer": result.golden_layer,
            "seconds": seconds}


def candidate_picks(views: Sequence[dict[str, Any]]) -> set[int]:
    """Every layer some view would pick: its best-scored layer outside its fences."""
    picks = set()
    for view in views:
        kept = {layer: score for layer, score in view["scores"].items() if layer not in set(view["excluded"])}
        if kept:
            picks.add(best_layer(kept))
    return picks


def metric_cells(rows: Sequence[dict[str, Any]], metric: str, splits: Sequence[str]) -> list[GridCell]:
    """The grid's rows of these splits as cells of one per-edit metric (``performance``)."""
    return [GridCell(r["case_id"], r["layer"], performance(r, metric, r["source_format"]))
            for r in rows if r["split"] in splits]


def comparison_rows(config: ValidateJob, rows: Sequence[dict[str, Any]], metric: str, proxy: list[EditRequest],
                    test: list[EditRequest], transfer: list[EditRequest], lga: dict[str, Any],
                    others: dict[str, dict[str, Any]], cma: dict[str, Any] | None,
                    sizes: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every comparison of one metric: the summary rule first, then transfer, the smaller proxies, every other
    LGA rule and parameter set (bagged variants included), causal tracing last."""
    main_cells = metric_cells(rows, metric, ("proxy", "test"))
    proxy_ids, test_ids = {r.case_id for r in proxy}, {r.case_id for r in test}
    main_set = config.param_sets[0]

    def compare(cells, proxy_of, test_of, view, **labels) -> dict[str, Any]:
        report = golden_report(cells, proxy_of, test_of, view["scores"], view["excluded"], config.resamples,
                               config.seed).row()
        share = view.get("shares", {}).get(report["lga_layer"]) if report["lga_layer"] is not None else None
        return {"comparison": "proxy -> test", "selector": "lga", "param_set": main_set, **labels, **report,
                "pick_share": share, "metric": metric}

    out = [compare(main_cells, proxy_ids, test_ids, lga, rule=config.rule)]
    if transfer:
        cells = [c for c in main_cells if c.case_id in proxy_ids] + [
            dataclasses.replace(c, case_id="transfer:" + c.case_id) for c in metric_cells(rows, metric, ("transfer",))]
        out.append(compare(cells, proxy_ids, {"transfer:" + r.case_id for r in transfer}, lga,
                           comparison="proxy -> transfer", rule=config.rule))
    for size, small in sizes.items():
        out.append(compare(main_cells, {r.case_id for r in proxy[:size]}, test_ids, small,
                           comparison=f"proxy of {size} -> test", rule=config.rule))
    out += [compare(main_cells, proxy_ids, test_ids, view, rule=rule) for rule, view in lga["rules"].items()
            if rule != config.rule]
    for param_set, other in others.items():
        out += [compare(main_cells, proxy_ids, test_ids, view, rule=rule, param_set=param_set)
                for rule, view in other["rules"].items()]
    if cma is not None:
        out.append(compare(main_cells, proxy_ids, test_ids, cma, selector="cma", rule="aie-desc", param_set=None))
    return out


def validate(config: ValidateJob) -> ValidationResult:
    """Rank the proxy with every selector, run (or resume) the grid, and write the comparison."""
    started = time.perf_counter()
    model = config.model.model
    info = describe_model(model, progress=config.output.progress)
    layers = parse_candidate_layers(config.layers, info.n_layers)
    # the grid's placement is known here only when given: GPU actors asked for, or this process's device
    on_accelerator = bool(config.cluster.gpus_per_actor) or (
        config.cluster.actors == 0 and resolve_device(config.model.device).type != "cpu")
    dtype = config.model.resolve_dtype(info.config, on_accelerator)
    requests, transfer = read_inputs(config, model, dtype)
    makedirs(config.output.out)  # only now: a run that fails on its input leaves no empty OUT behind
    proxy, test = split(requests, config.proxy_fraction, config.seed)
    groups = {"proxy": proxy, "test": test, **({"transfer": transfer} if transfer else {})}
    editing = config.editing
    spec = GridSpec(model=model, method=editing.method, hparams=tuple(editing.hparam),
                    window=window_size(editing.method, editing.window), window_align=editing.window_align,
                    corpus=editing.corpus, corpus_column=editing.corpus_column, cov_tokens=editing.cov_tokens,
                    dtype=dtype, device=config.model.device, stats_dir=editing.stats_dir)
    # what produced every row written below: the model, the method and its window, the precision
    context = {"model_id": info.model_id, "model_fingerprint": info.fingerprint, "method": editing.method,
               "window": spec.window, "dtype": dtype}
    print(f"validating {config.editing.method} on {info.model_id}: {len(requests)} requests ({len(proxy)} proxy, "
          f"{len(test)} test){f', {len(transfer)} transfer' if transfer else ''} x {len(layers)} layers")

    # 1. The selectors on the proxy split: they read the model and the proxy, not the grid.
    main_set = config.param_sets[0]
    lga = selector_ranking(config, info, proxy, "lga")
    others = {param_set: selector_ranking(config, info, proxy, matrix_folder(param_set, main_set), param_set=param_set)
              for param_set in config.param_sets[1:]}  # the same proxy scored through other weights
    cma = selector_ranking(config, info, proxy, "cma", selector="cma") if config.cma_samples else None
    sizes = {size: selector_ranking(config, info, proxy[:size], f"lga-proxy{size}")  # fractions rounding alike: one
             for size in sorted({max(1, round(fraction * len(requests))) for fraction in config.proxy_sizes})}

    # 2. The proxy split edited at every candidate layer: the golden layer, the per-layer curve, the optimum.
    grid_dir = join(config.output.out, "grid")
    grid = dict(spec=spec, info=info, groups=groups, chunk_size=config.chunk_size, directory=grid_dir,
                actors=config.cluster.actors, cpus_per_actor=config.cluster.cpus_per_actor,
                gpus_per_actor=config.cluster.gpus_per_actor, ray_address=config.cluster.ray_address,
                progress=config.output.progress)
    rows, proxy_run = run_grid(layers={"proxy": layers}, overwrite=config.output.overwrite, **grid)
    for row in rows:
        row["split"] = "proxy"
    # the golden layer of the proxy, and of each smaller proxy ("proxy of N -> test" is judged at its own), per metric
    proxies = [None, *({r.case_id for r in proxy[:size]} for size in sizes)]
    goldens = {best_layer(layer_means(metric_cells(rows, metric, ("proxy",)), ids))
               for metric in REPORTED_METRICS for ids in proxies}

    # 3. The test split (and the transfer set): every candidate layer, or only where some selector points.
    if config.test_layers == "picks":
        scored = [lga, *others.values()]
        views = [lga, *(v for o in scored for v in o["rules"].values()),
                 *(v for o in scored for by_kappa in o["at_kappa"].values() for v in by_kappa.values()),
                 *sizes.values(), *([cma, {"scores": cma["shares"], "excluded": []}] if cma else [])]
        tested = sorted((candidate_picks(views) | goldens) & set(layers))
        print(f"test split edited at the {len(tested)} layers some selector picks or the proxy's golden layer "
              f"names: {tested}")
    else:
        tested = layers
    test_rows, test_run = run_grid(layers={name: tested for name in groups if name != "proxy"}, **grid)
    for row in test_rows:
        row["split"] = row["group"]
    rows += test_rows
    for row in rows:
        row.update(score=performance(row, "score", row["source_format"]),
                   margin=performance(row, "margin", row["source_format"]),
                   performance=performance(row, config.metric, row["source_format"]), metric=config.metric, **context)
    write_table_rows(rows, join(config.output.out, "grid.parquet"))

    by_metric = {metric: comparison_rows(config, rows, metric, proxy, test, transfer, lga, others, cma, sizes)
                 for metric in dict.fromkeys((config.metric, *REPORTED_METRICS))}
    proxy_grid_seconds = sum(r["seconds"] for r in rows if r["split"] == "proxy")
    cost = {"lga_seconds": round(lga["seconds"], 2), "grid_seconds_on_proxy": round(proxy_grid_seconds, 1),
            "grid_over_lga": round(proxy_grid_seconds / lga["seconds"], 1),
            **({"cma_seconds": round(cma["seconds"], 2), "grid_over_cma": round(proxy_grid_seconds / cma["seconds"], 1)}
               if cma is not None else {})}
    summary_rows = [row for metric_rows in by_metric.values() for row in metric_rows]
    for row in summary_rows:
        row.update(**context, **cost, test_layers=config.test_layers, seed=config.seed, resamples=config.resamples,
                   share_resamples=config.share_resamples)
    write_table_rows(summary_rows, join(config.output.out, "golden_summary.parquet"))
    header = {"model_id": info.model_id, "model fingerprint": info.fingerprint, "method": config.editing.method,
              "layers per edit": spec.window, "dtype": dtype, "metric": config.metric,
              "candidate layers": f"{layers[0]}-{layers[-1]}",
              "requests": f"{len(requests)} ({len(proxy)} proxy, {len(test)} test)",
              "test split edited at": "every candidate layer" if config.test_layers == "all" else
              f"the selectors' picks and the golden layer: {', '.join(map(str, tested))}",
              "intervals": f"95% paired bootstrap over the split's requests, {config.resamples} resamples, "
                           f"seed {config.seed}",
              "LGA ranking on the proxy (s)": cost["lga_seconds"],
              "grid on the proxy (actor-s)": cost["grid_seconds_on_proxy"],
              "grid / LGA time": cost["grid_over_lga"]}
    per_layer_splits = ("proxy", "test") if config.test_layers == "all" else ("proxy",)
    layer_rows = per_layer_rows([row for row in rows if row["split"] in per_layer_splits])
    write_markdown(join(config.output.out, "golden_summary.md"),
                   markdown_summary(by_metric, header, layer_rows, per_layer_splits))
    main_rows = by_metric[config.metric]
    main = main_rows[0]
    cma_row = main_rows[-1] if cma is not None else None
    picks = {f"LGA {config.rule}": main["lga_layer"], **({"CMA": cma_row["lga_layer"]} if cma_row else {}),
             **{f"LGA {r['rule']}": r["lga_layer"] for r in main_rows if r["selector"] == "lga"
                and r["param_set"] == main_set and r["rule"] in ("dot-asc", "cosine-desc")}}
    main_cells = metric_cells(rows, config.metric, ("proxy", "test"))
    proxy_ids, test_ids = {r.case_id for r in proxy}, {r.case_id for r in test}
    size_rows = [r for r in main_rows if r["comparison"].startswith("proxy of")]
    write_plots(main_cells, proxy_ids, test_ids, main["golden_layer"], lga["scores"], picks,
                [{"proxy_size": r["proxy_size"], **{k: r[k] for k in ("golden_test", "lga_test", "optimal_test")}}
                 for r in size_rows + [main]],
                {name: join(config.output.out, f"{name}.png") for name in ("layers", "optimal", "proxy_size")},
                f"{config.editing.method} on {info.model_id} ({dtype}, {config.metric})")
    interval = ("regret", "regret_ci_low", "regret_ci_high", "proxy_regret", "proxy_regret_ci_low",
                "proxy_regret_ci_high", "lga_spearman", "pick_share", "lga_layer")
    grid_run = {key: proxy_run[key] + test_run[key] for key in ("tasks", "tasks_run", "resumed_tasks", "restarts",
                                                               "wall_seconds")}
    return ValidationResult(rows=summary_rows, cost=cost, summary={
            **context, "metric": config.metric, "golden_layer": main["golden_layer"], "lga_layer": main["lga_layer"],
            "gap": main["gap"], "gap_ci_low": main["gap_ci_low"], "gap_ci_high": main["gap_ci_high"],
            "regret": main["regret"], "regret_ci_low": main["regret_ci_low"],
            "regret_ci_high": main["regret_ci_high"], "proxy_regret": main["proxy_regret"],
            "lga_spearman": main["lga_spearman"], "pick_share": main["pick_share"],
            "optimal_mean": main["optimal_test"], "golden_mean": main["golden_test"], "lga_mean": main["lga_test"],
            "spearman": main["lga_spearman"], "spearman_ci_low": main["lga_spearman_ci_low"],
            "spearman_ci_high": main["lga_spearman_ci_high"], "rule": config.rule, "test_layers": tested,
            "rules": {rule_label(row["rule"], row.get("param_set")): {key: row[key] for key in interval}
                      for row in main_rows if row["comparison"] == MAIN_COMPARISON},
            "by_metric": {metric: {"golden_layer": metric_rows[0]["golden_layer"],
                                   **{key: metric_rows[0][key] for key in interval}}
                          for metric, metric_rows in by_metric.items()},
            **({"cma_layer": cma_row["lga_layer"], "cma_regret": cma_row["regret"],
                "cma_regret_ci_low": cma_row["regret_ci_low"], "cma_regret_ci_high": cma_row["regret_ci_high"],
                "cma_spearman": cma_row["lga_spearman"]} if cma_row else {}), **cost, **grid_run,
            "out": config.output.out, "config": to_dict(config), "seconds": round(time.perf_counter() - started, 1)})


def write_table_rows(rows: list[dict[str, Any]], path: str) -> None:
    """Rows with different metric columns (CounterFact, zsRE) in one table: every column, null where absent."""

    columns = list(dict.fromkeys(key for row in rows for key in row))
    write_parquet(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), path)
