"""validate-golden: is the layer LGA picks a good layer to edit? The request x layer grid answers it."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Any

import numpy as np

from lga_dist.config import ConfigError, option, to_dict
from lga_dist.console import format_table
from lga_dist.validation.grid import PERFORMANCE_METRICS, GridSpec, run_grid
from lga_dist.editing import METHODS
from lga_dist.validation.golden import GridCell, golden_report
from lga_dist.validation.report import markdown_summary, write_markdown, write_plots
from lga_dist.models import describe_model
from lga_dist.models.packaged import DEFAULT_MODEL, MODEL_HELP
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.lga.partial_scores import SCORES
from lga_dist.lga.ranking import ORDERS, read_ranking, tukey_fences
from lga_dist.io.requests import EditRequest, read_requests, to_counterfact_flat
from lga_dist.lga.scoring import RequestScores
from lga_dist.io.storage import atomic_write, join, makedirs, read_parquet, write_parquet

RULES = tuple(f"{score}-{order}" for score in SCORES for order in ORDERS)

DESCRIPTION = """Reproduce the golden-layer evidence for a model: edit every request at every candidate layer
(from the unedited model each time), then compare

  - the sample-wise optimal layer of each request (the upper bound),
  - the golden layer: the best fixed layer on the proxy split, judged on the held-out test split,
  - the LGA pick (rank-layers on the same proxy) and its regret against the golden layer,
  - the same for --transfer-requests (e.g. proxy from CounterFact, test on zsRE) and for smaller proxies,
  - the cost: LGA's wall time against the grid's.

Writes OUT/grid.parquet (one row per request and layer), OUT/golden_summary.{parquet,md}, and
OUT/layers.png, OUT/optimal.png, OUT/proxy_size.png. Grid tasks (one layer, --chunk-size requests)
fan out over --actors Ray actors, each holding a full copy of the model; finished tasks are kept in
OUT/grid/, so rerunning a killed job resumes it. With no arguments it validates ROME on the packaged
real model gemma3-270m and 100 of the shipped CounterFact facts (--model demo: the demo fact model)."""


@dataclasses.dataclass
class Config:
    model: str = option(DEFAULT_MODEL, MODEL_HELP)
    requests: list[str] = option([], "edit request files (default: the shipped CounterFact facts from the 501st on)",
                                 metavar="PATH")
    limit: int = option(100, "use the first N valid requests")
    new_facts_only: bool = option(False, "keep only requests the unedited model does not already predict (its "
                                  "P(true) > P(new) on the rewrite prompt), as the papers' studies do; evaluates "
                                  "them with the whole model in this process first, so for models that need the "
                                  "actors to fit, filter the request file beforehand")
    method: str = option("rome", "editing method", choices=tuple(METHODS))
    window: int = option(1, "layers edited per candidate: the WINDOW layers ending at it (MEMIT/AlphaEdit)")
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
    seed: int = option(0, "seed of the proxy/test split")
    cma_samples: int = option(3, "causal tracing's noise draws per proxy request, for its pick beside LGA's "
                              "(0: skip causal tracing)")
    rule: str = option("dot-desc", "the LGA rule whose pick the summary line reports (proxy sizes and transfer "
                       "too); every rule's pick is in golden_summary", choices=RULES)
    hparam: list[str] = option([], "override a hyper-parameter of the method, NAME=VALUE", metavar="NAME=VALUE")
    corpus: str | None = option(None, "text for C = E[k k^T] (default: the 1,000 shipped CounterFact facts as "
                                 "sentences, available offline)")
    corpus_column: str = option("text", "the corpus's text column")
    cov_tokens: int = option(100_000, "tokens averaged into C")
    chunk_size: int = option(25, "requests per grid task (their targets are optimised in one batch)")
    actors: int = option(2, "Ray actors running grid tasks, each with a full model copy (0: this process)")
    cpus_per_actor: float = option(1.0, "CPUs per actor (also its torch thread count)")
    gpus_per_actor: float = option(0.0, "GPUs per actor")
    ray_address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS, else a private local one)")
    dtype: str = option("float32", "model dtype")
    out: str = option("out/validate", "output directory (local or s3://)")
    overwrite: bool = option(False, "start over instead of resuming the grid in OUT/grid")
    progress: bool = option(True, "show progress")

    def validate(self) -> None:
        if self.limit < 4:
            raise ConfigError("--limit must be at least 4 (proxy and test splits need two requests each)")
        if not 0 < self.proxy_fraction < 1:
            raise ConfigError("--proxy-fraction must be between 0 and 1")
        if self.window < 1 or self.chunk_size < 1:
            raise ConfigError("--window and --chunk-size must be at least 1")
        if any(not 0 < f <= self.proxy_fraction for f in self.proxy_sizes):
            raise ConfigError(f"--proxy-sizes must lie in (0, --proxy-fraction={self.proxy_fraction}]")


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


def read_inputs(config: Config, model: str) -> tuple[list[EditRequest], list[EditRequest]]:
    quarantine = join(config.out, "quarantine.jsonl")
    if config.requests:
        requests = read_requests(config.requests, quarantine=quarantine).requests
    else:
        requests = read_requests([str(demo_requests_path())], quarantine=quarantine).requests[500:]
    if config.new_facts_only:
        requests = not_yet_known(model, requests, config.limit, config.dtype)
    requests = requests[:config.limit]
    if len(requests) < 4:
        raise ConfigError(f"only {len(requests)} valid requests; the grid needs at least 4")
    transfer = []
    if config.transfer_requests:
        transfer = read_requests(config.transfer_requests, quarantine=join(config.out, "quarantine-transfer.jsonl")
                                 ).requests[:config.transfer_limit]
    return requests, transfer


def not_yet_known(model: str, requests: list[EditRequest], wanted: int, dtype: str) -> list[EditRequest]:
    """The first ``wanted`` requests the unedited model does not already answer with the new target
    (efficacy 0: P(true) > P(new) on the rewrite prompt), so an edit's success is the edit's doing."""
    from lga_dist.devices import resolve_device
    from lga_dist.evaluation import evaluate_requests
    from lga_dist.models import DTYPES, load_model

    device = resolve_device("auto")
    loaded = load_model(model, dtype=DTYPES[dtype], device=device)
    kept: list[EditRequest] = []
    for start in range(0, len(requests), 64):
        chunk = requests[start:start + 64]
        rows = evaluate_requests(loaded.model, loaded.tokenizer, chunk, device)
        kept += [request for request, row in zip(chunk, rows) if row["ES"] == 0.0]
        if len(kept) >= wanted:
            break
    print(f"{len(kept[:wanted])} requests the unedited model does not already predict (of the first "
          f"{min(len(requests), start + 64)} read)")
    return kept[:wanted]


def selector_ranking(config: Config, model: str, proxy: list[EditRequest], name: str,
                     selector: str = "lga") -> dict[str, Any]:
    """rank-layers on exactly these proxy requests (written to OUT/NAME/proxy.jsonl), with its time.

    For LGA also the layer scores every rule derives from the same per-request matrix (``rule_views``);
    causal tracing's scores are its average indirect effects, none fenced out."""
    from lga_dist.commands import rank_layers

    directory = join(config.out, name)
    makedirs(directory)
    path = join(directory, "proxy.jsonl")
    with atomic_write(path, "w") as handle:
        handle.writelines(json.dumps(to_counterfact_flat(r)) + "\n" for r in proxy)
    score, order = config.rule.rsplit("-", 1)
    rank_config = rank_layers.Config(model=model, requests=[path], proxy_size=len(proxy), out=directory, actors=0,
                                     batch_size=16, dtype=config.dtype, progress=False, overwrite=True,
                                     save_matrix=selector == "lga", score=score, order=order, selector=selector,
                                     cma_samples=config.cma_samples)
    started = time.perf_counter()
    summary, _ = rank_layers.run(rank_config)
    seconds = time.perf_counter() - started
    if selector == "cma":
        table, _ = read_ranking(join(directory, "ranking.parquet"))
        return {"scores": {r["layer"]: r["score"] for r in table.to_pylist()}, "excluded": [],
                "golden_layer": summary["golden_layer"], "seconds": seconds}
    views = rule_views(read_matrix(join(directory, "request_scores.parquet")), rank_config.kappa)
    return {**views[config.rule], "rules": views, "golden_layer": summary["golden_layer"], "seconds": seconds}


def read_matrix(path: str) -> RequestScores:
    """request_scores.parquet (long format) back as a requests x layers RequestScores."""
    frame = read_parquet(path).to_pandas()
    wide = {column: frame.pivot(index="case_id", columns="layer", values=column).to_numpy(dtype=np.float64)
            for column in ("score", "norm_old", "norm_new")}
    zeros = np.zeros(len(wide["score"]))
    return RequestScores(wide["score"], wide["norm_old"], wide["norm_new"], zeros, zeros)


def rule_views(matrix: RequestScores, kappa: float) -> dict[str, dict[str, Any]]:
    """Per rule: layer -> score oriented so that higher means 'pick this layer', and the fenced-out layers.

    Tukey fences are symmetric, so a rule and its reverse exclude the same layers."""
    views = {}
    for score in SCORES:
        sums = matrix.per_request(score).sum(axis=0)
        excluded = [int(layer) for layer in np.flatnonzero(tukey_fences(sums, kappa).excluded)]
        for order in ORDERS:
            sign = 1.0 if order == "desc" else -1.0
            views[f"{score}-{order}"] = {"scores": {layer: sign * float(value) for layer, value in enumerate(sums)},
                                         "excluded": excluded}
    return views


def run(config: Config) -> tuple[dict, int]:
    started = time.perf_counter()
    makedirs(config.out)
    model = config.model
    info = describe_model(model, progress=config.progress)
    layers = parse_candidate_layers(config.layers, info.n_layers)
    requests, transfer = read_inputs(config, model)
    proxy, test = split(requests, config.proxy_fraction, config.seed)
    groups = {"main": requests, **({"transfer": transfer} if transfer else {})}
    spec = GridSpec(model=model, method=config.method, hparams=tuple(config.hparam), window=config.window,
                    metric=config.metric, corpus=config.corpus, corpus_column=config.corpus_column,
                    cov_tokens=config.cov_tokens, dtype=config.dtype)
    print(f"validating {config.method} on {info.model_id}: {len(requests)} requests ({len(proxy)} proxy, "
          f"{len(test)} test){f', {len(transfer)} transfer' if transfer else ''} x {len(layers)} layers")
    rows, grid_run = run_grid(spec, info.fingerprint, groups, layers, config.chunk_size, join(config.out, "grid"),
                              actors=config.actors, cpus_per_actor=config.cpus_per_actor,
                              gpus_per_actor=config.gpus_per_actor, ray_address=config.ray_address,
                              overwrite=config.overwrite, progress=config.progress)
    for row in rows:
        row.update(model_id=info.model_id, model_fingerprint=info.fingerprint, method=config.method,
                   metric=config.metric)
    write_table_rows(rows, join(config.out, "grid.parquet"))

    main_cells = [GridCell(r["case_id"], r["layer"], r["performance"]) for r in rows if r["group"] == "main"]
    transfer_cells = [GridCell(r["case_id"], r["layer"], r["performance"]) for r in rows if r["group"] == "transfer"]
    proxy_ids, test_ids = {r.case_id for r in proxy}, {r.case_id for r in test}

    lga = selector_ranking(config, model, proxy, "lga")
    summary_rows = [{"comparison": "proxy -> test", "selector": "lga", "rule": config.rule, **golden_report(
        main_cells, proxy_ids, test_ids, lga["scores"], lga["excluded"]).row()}]
    rule_rows = [{"comparison": "proxy -> test", "selector": "lga", "rule": rule, **golden_report(
        main_cells, proxy_ids, test_ids, view["scores"], view["excluded"]).row()}
        for rule, view in lga["rules"].items() if rule != config.rule]
    cma = selector_ranking(config, model, proxy, "cma", selector="cma") if config.cma_samples else None
    if cma is not None:
        rule_rows.append({"comparison": "proxy -> test", "selector": "cma", "rule": "aie-desc", **golden_report(
            main_cells, proxy_ids, test_ids, cma["scores"], []).row()})
    if transfer_cells:
        cells = [c for c in main_cells if c.case_id in proxy_ids] + [
            dataclasses.replace(c, case_id="transfer:" + c.case_id) for c in transfer_cells]
        transfer_ids = {"transfer:" + r.case_id for r in transfer}
        summary_rows.append({"comparison": "proxy -> transfer", "selector": "lga", "rule": config.rule, **golden_report(
            cells, proxy_ids, transfer_ids, lga["scores"], lga["excluded"]).row()})
    size_rows = []
    for size in sorted({max(1, round(fraction * len(requests))) for fraction in config.proxy_sizes}):
        subset = proxy[:size]  # fractions that round to the same count are one row
        small = selector_ranking(config, model, subset, f"lga-proxy{size}")
        report = golden_report(main_cells, {r.case_id for r in subset}, test_ids, small["scores"], small["excluded"])
        size_rows.append({"comparison": f"proxy of {size} -> test", "selector": "lga", "rule": config.rule,
                          **report.row()})
    summary_rows += size_rows + rule_rows

    grid_cell_seconds = sum(r["seconds"] for r in rows if r["group"] == "main")
    proxy_grid_seconds = grid_cell_seconds * len(proxy) / len(requests)
    cost = {"lga_seconds": round(lga["seconds"], 2), "grid_seconds_on_proxy": round(proxy_grid_seconds, 1),
            "grid_over_lga": round(proxy_grid_seconds / lga["seconds"], 1),
            **({"cma_seconds": round(cma["seconds"], 2), "grid_over_cma": round(proxy_grid_seconds / cma["seconds"], 1)}
               if cma is not None else {})}
    for row in summary_rows:
        row.update(model_id=info.model_id, model_fingerprint=info.fingerprint, method=config.method,
                   metric=config.metric, **cost)
    write_table_rows(summary_rows, join(config.out, "golden_summary.parquet"))
    header = {"model_id": info.model_id, "model fingerprint": info.fingerprint, "method": config.method,
              "metric": config.metric, "candidate layers": f"{layers[0]}-{layers[-1]}",
              "requests": f"{len(requests)} ({len(proxy)} proxy, {len(test)} test)",
              "LGA ranking on the proxy (s)": cost["lga_seconds"],
              "grid on the proxy (actor-s)": cost["grid_seconds_on_proxy"],
              "grid / LGA time": cost["grid_over_lga"]}
    write_markdown(join(config.out, "golden_summary.md"), markdown_summary(summary_rows, header))
    main = summary_rows[0]
    picks = {f"LGA {config.rule}": main["lga_layer"], **({"CMA": rule_rows[-1]["lga_layer"]} if cma else {}),
             **{f"LGA {r['rule']}": r["lga_layer"] for r in rule_rows if r["selector"] == "lga"
                and r["rule"] in ("dot-asc", "cosine-desc")}}
    write_plots(main_cells, proxy_ids, test_ids, main["golden_layer"], lga["scores"], picks,
                [{"proxy_size": r["proxy_size"], **{k: r[k] for k in ("golden_test", "lga_test", "optimal_test")}}
                 for r in size_rows + [main]],
                {name: join(config.out, f"{name}.png") for name in ("layers", "optimal", "proxy_size")},
                f"{config.method} on {info.model_id}")
    print(format_table([{k: _short(row.get(k)) for k in ("comparison", "rule", "golden_layer", "golden_test",
                                                          "optimal_test", "gap", "lga_layer", "lga_test", "regret",
                                                          "proxy_regret", "lga_spearman")}
                        for row in summary_rows]))
    print(f"cost: LGA {cost['lga_seconds']} s vs grid {cost['grid_seconds_on_proxy']} actor-s on the same proxy "
          f"({cost['grid_over_lga']}x)" + (f"; causal tracing {cost['cma_seconds']} s ({cost['grid_over_cma']}x)"
                                         if cma else ""))
    return {"model_id": info.model_id, "model_fingerprint": info.fingerprint, "method": config.method,
            "metric": config.metric, "golden_layer": main["golden_layer"], "lga_layer": main["lga_layer"],
            "gap": main["gap"], "regret": main["regret"], "lga_spearman": main["lga_spearman"],
            "optimal_mean": main["optimal_test"], "golden_mean": main["golden_test"], "lga_mean": main["lga_test"],
            "spearman": main["lga_spearman"], "rule": config.rule,
            "rules": {row["rule"]: {key: row[key] for key in ("lga_layer", "regret", "proxy_regret", "lga_spearman")}
                      for row in [main] + rule_rows},
            **({"cma_layer": rule_rows[-1]["lga_layer"], "cma_regret": rule_rows[-1]["regret"],
                "cma_spearman": rule_rows[-1]["lga_spearman"]} if cma is not None else {}), **cost, **grid_run,
            "out": config.out, "config": to_dict(config), "seconds": round(time.perf_counter() - started, 1)}, 0


def _short(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def write_table_rows(rows: list[dict[str, Any]], path: str) -> None:
    """Rows with different metric columns (CounterFact, zsRE) in one table: every column, null where absent."""
    import pyarrow as pa

    columns = list(dict.fromkeys(key for row in rows for key in row))
    write_parquet(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), path)
