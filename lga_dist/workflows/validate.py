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
from typing import Any

import pyarrow as pa

from lga_dist.config import ConfigError, option, section, to_dict
from lga_dist.devices import resolve_device
from lga_dist.editing import window_size
from lga_dist.io.requests import EditRequest, read_requests
from lga_dist.io.storage import join, makedirs, write_parquet
from lga_dist.lga.rules import RULES, matrix_folder, read_matrix, rule_label, rule_views
from lga_dist.lga.scoring import PARAM_SETS
from lga_dist.models import ModelInfo, describe_model
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.validation.golden import GridCell, golden_report
from lga_dist.validation.grid import PERFORMANCE_METRICS, GridSpec, run_grid
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


@dataclasses.dataclass
class ValidateJob:
    """The grid to run and the comparisons to make (the validate-golden flags)."""

    requests: list[str] = option([], "edit request files (default: the shipped CounterFact facts from the 501st on)",
                                 metavar="PATH")
    limit: int = option(100, "use the first N valid requests")
    new_facts_only: bool = option(False, NEW_FACTS_ONLY_HELP)
    layers: str = option("all", "candidate layers: 'all' or 'A:B' (inclusive)")
    metric: str = option("score", "per-edit performance: 'score' = harmonic mean of efficacy, generalization "
                         "and specificity (CounterFact ES/PS/NS, zsRE accuracies), or one of them",
                         choices=PERFORMANCE_METRICS)
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


@dataclasses.dataclass
class ValidationResult:
    """The comparison rows of golden_summary.parquet, the cost figures, and the summary line's dict."""

    rows: list[dict[str, Any]]
    cost: dict[str, float]
    summary: dict[str, Any]


def parse_candidate_layers(text: str, n_layers: int) -> list[int]:
    if text == "all":
        return list(range(n_layers))
    try:
        first, last = (int(x) for x in text.split(":"))
    except ValueError as err:
        raise ConfigError(f"--layers {text!r}: use 'all' or 'A:B'") from err
    if not 0 <= first <= last < n_layers:
        raise ConfigError(f"--layers {text!r}: the model has layers 0-{n_layers - 1}")
    return list(range(first, last + 1))


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
        requests = not_yet_known(model, requests, config.limit, dtype, config.model.device)
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

    For LGA also the layer scores every rule derives from the same per-request matrix (``rule_views``);
    causal tracing's scores are its average indirect effects, none fenced out."""
    score, order = config.rule.rsplit("-", 1)
    job = RankJob(model=config.model, proxy=ProxyOptions(requests=config.requests, proxy_size=len(proxy),
                                                         seed=config.seed),
                  scoring=ScoringOptions(selector=selector, param_set=param_set or config.param_sets[0], score=score,
                                         order=order, save_matrix=selector == "lga",
                                         cma_samples=max(config.cma_samples, 1)),
                  cluster=ClusterOptions(actors=0),
                  output=OutputOptions(out=join(config.output.out, name), overwrite=True, progress=False))
    started = time.perf_counter()
    result = rank(job, info, proxy=proxy)
    seconds = time.perf_counter() - started
    if selector == "cma":
        return {"scores": result.layer_scores(), "excluded": [], "golden_layer": result.golden_layer,
                "seconds": seconds}
    views = rule_views(read_matrix(join(job.output.out, "request_scores.parquet")), job.scoring.kappa)
    return {**views[config.rule], "rules": views, "golden_layer": result.golden_layer, "seconds": seconds}


def validate(config: ValidateJob) -> ValidationResult:
    """Run (or resume) the grid, rank the proxy with every selector, and write the comparison."""
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
    groups = {"main": requests, **({"transfer": transfer} if transfer else {})}
    editing = config.editing
    spec = GridSpec(model=model, method=editing.method, hparams=tuple(editing.hparam),
                    window=window_size(editing.method, editing.window), window_align=editing.window_align,
                    metric=config.metric, corpus=editing.corpus, corpus_column=editing.corpus_column,
                    cov_tokens=editing.cov_tokens, dtype=dtype, device=config.model.device,
                    stats_dir=editing.stats_dir)
    # what produced every row written below: the model, the method and its window, the precision, the metric
    context = {"model_id": info.model_id, "model_fingerprint": info.fingerprint, "method": editing.method,
               "window": spec.window, "dtype": dtype, "metric": config.metric}
    print(f"validating {config.editing.method} on {info.model_id}: {len(requests)} requests ({len(proxy)} proxy, "
          f"{len(test)} test){f', {len(transfer)} transfer' if transfer else ''} x {len(layers)} layers")
    rows, grid_run = run_grid(spec, info, groups, layers, config.chunk_size, join(config.output.out, "grid"),
                              actors=config.cluster.actors, cpus_per_actor=config.cluster.cpus_per_actor,
                              gpus_per_actor=config.cluster.gpus_per_actor, ray_address=config.cluster.ray_address,
                              overwrite=config.output.overwrite, progress=config.output.progress)
    proxy_ids, test_ids = {r.case_id for r in proxy}, {r.case_id for r in test}
    for row in rows:
        row.update(split="transfer" if row["group"] == "transfer" else "proxy" if row["case_id"] in proxy_ids
                   else "test", **context)
    write_table_rows(rows, join(config.output.out, "grid.parquet"))

    main_cells = [GridCell(r["case_id"], r["layer"], r["performance"]) for r in rows if r["group"] == "main"]
    transfer_cells = [GridCell(r["case_id"], r["layer"], r["performance"]) for r in rows if r["group"] == "transfer"]

    def rule_row(rule: str, param_set: str, view: dict[str, Any]) -> dict[str, Any]:
        return {"comparison": "proxy -> test", "selector": "lga", "rule": rule, "param_set": param_set,
                **golden_report(main_cells, proxy_ids, test_ids, view["scores"], view["excluded"]).row()}

    main_set = config.param_sets[0]
    lga = selector_ranking(config, info, proxy, "lga")
    summary_rows = [rule_row(config.rule, main_set, lga)]
    rule_rows = [rule_row(rule, main_set, view) for rule, view in lga["rules"].items() if rule != config.rule]
    for param_set in config.param_sets[1:]:  # the same proxy scored through other weights: every rule again
        other = selector_ranking(config, info, proxy, matrix_folder(param_set, main_set), param_set=param_set)
        rule_rows += [rule_row(rule, param_set, view) for rule, view in other["rules"].items()]
    cma = selector_ranking(config, info, proxy, "cma", selector="cma") if config.cma_samples else None
    if cma is not None:
        rule_rows.append({"comparison": "proxy -> test", "selector": "cma", "rule": "aie-desc", **golden_report(
            main_cells, proxy_ids, test_ids, cma["scores"], []).row()})
    if transfer_cells:
        cells = [c for c in main_cells if c.case_id in proxy_ids] + [
            dataclasses.replace(c, case_id="transfer:" + c.case_id) for c in transfer_cells]
        transfer_ids = {"transfer:" + r.case_id for r in transfer}
        summary_rows.append({"comparison": "proxy -> transfer", "selector": "lga", "rule": config.rule,
                             "param_set": main_set, **golden_report(cells, proxy_ids, transfer_ids, lga["scores"],
                                                                    lga["excluded"]).row()})
    size_rows = []
    for size in sorted({max(1, round(fraction * len(requests))) for fraction in config.proxy_sizes}):
        subset = proxy[:size]  # fractions that round to the same count are one row
        small = selector_ranking(config, info, subset, f"lga-proxy{size}")
        report = golden_report(main_cells, {r.case_id for r in subset}, test_ids, small["scores"], small["excluded"])
        size_rows.append({"comparison": f"proxy of {size} -> test", "selector": "lga", "rule": config.rule,
                          "param_set": main_set, **report.row()})
    summary_rows += size_rows + rule_rows

    grid_cell_seconds = sum(r["seconds"] for r in rows if r["group"] == "main")
    proxy_grid_seconds = grid_cell_seconds * len(proxy) / len(requests)
    cost = {"lga_seconds": round(lga["seconds"], 2), "grid_seconds_on_proxy": round(proxy_grid_seconds, 1),
            "grid_over_lga": round(proxy_grid_seconds / lga["seconds"], 1),
            **({"cma_seconds": round(cma["seconds"], 2), "grid_over_cma": round(proxy_grid_seconds / cma["seconds"], 1)}
               if cma is not None else {})}
    for row in summary_rows:
        row.update(**context, **cost)
    write_table_rows(summary_rows, join(config.output.out, "golden_summary.parquet"))
    header = {"model_id": info.model_id, "model fingerprint": info.fingerprint, "method": config.editing.method,
              "layers per edit": spec.window, "dtype": dtype, "metric": config.metric,
              "candidate layers": f"{layers[0]}-{layers[-1]}",
              "requests": f"{len(requests)} ({len(proxy)} proxy, {len(test)} test)",
              "LGA ranking on the proxy (s)": cost["lga_seconds"],
              "grid on the proxy (actor-s)": cost["grid_seconds_on_proxy"],
              "grid / LGA time": cost["grid_over_lga"]}
    layer_rows = per_layer_rows([row for row in rows if row["group"] == "main"])
    write_markdown(join(config.output.out, "golden_summary.md"), markdown_summary(summary_rows, header, layer_rows))
    main = summary_rows[0]
    picks = {f"LGA {config.rule}": main["lga_layer"], **({"CMA": rule_rows[-1]["lga_layer"]} if cma else {}),
             **{f"LGA {r['rule']}": r["lga_layer"] for r in rule_rows if r["selector"] == "lga"
                and r["param_set"] == main_set and r["rule"] in ("dot-asc", "cosine-desc")}}
    write_plots(main_cells, proxy_ids, test_ids, main["golden_layer"], lga["scores"], picks,
                [{"proxy_size": r["proxy_size"], **{k: r[k] for k in ("golden_test", "lga_test", "optimal_test")}}
                 for r in size_rows + [main]],
                {name: join(config.output.out, f"{name}.png") for name in ("layers", "optimal", "proxy_size")},
                f"{config.editing.method} on {info.model_id} ({dtype})")
    return ValidationResult(rows=summary_rows, cost=cost, summary={
            **context, "golden_layer": main["golden_layer"], "lga_layer": main["lga_layer"],
            "gap": main["gap"], "regret": main["regret"], "lga_spearman": main["lga_spearman"],
            "optimal_mean": main["optimal_test"], "golden_mean": main["golden_test"], "lga_mean": main["lga_test"],
            "spearman": main["lga_spearman"], "rule": config.rule,
            "rules": {rule_label(row["rule"], row.get("param_set")): {
                key: row[key] for key in ("lga_layer", "regret", "proxy_regret", "lga_spearman")}
                for row in [main] + rule_rows},
            **({"cma_layer": rule_rows[-1]["lga_layer"], "cma_regret": rule_rows[-1]["regret"],
                "cma_spearman": rule_rows[-1]["lga_spearman"]} if cma is not None else {}), **cost, **grid_run,
            "out": config.output.out, "config": to_dict(config), "seconds": round(time.perf_counter() - started, 1)})


def write_table_rows(rows: list[dict[str, Any]], path: str) -> None:
    """Rows with different metric columns (CounterFact, zsRE) in one table: every column, null where absent."""

    columns = list(dict.fromkeys(key for row in rows for key in row))
    write_parquet(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), path)
