"""rerank: re-rank the models of a list when, and only when, something they depend on changed.

Each model's ranking is filed in a registry under its key (weights fingerprint,
proxy hash, options hash): an unchanged model is skipped, a changed one ranked
with the rank workflow and compared with its previous ranking; a new golden
layer or a low rank correlation is drift, reported as markdown + PNG. A new golden
layer that already held a real share of the previous ranking's proxy resamples
(its ``pick_share`` there is at least --unsettled-share) is a coin toss between two
layers the proxy never separated: reported as 'unsettled', not as drift, so a
scheduled run does not page anyone over it (exit 3 stays for a firm change).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

import numpy as np
import yaml

from lga_dist.config import ConfigError, compose, mapping_values, option, to_dict
from lga_dist.io.registry import RankingKey, Registry, RegistryLock, options_hash
from lga_dist.io.requests import requests_hash
from lga_dist.io.storage import atomic_write, join, open_file, storage_errors
from lga_dist.lga.ranking import golden_layer, read_ranking, spearman
from lga_dist.models import describe_model
from lga_dist.plots import pyplot, save_figure
from lga_dist.workflows.rank import RankJob, rank, ranking_proxy

RANKING_OPTIONS = ("param_set", "score", "order", "kappa", "dtype")


@dataclasses.dataclass
class RerankJob:
    """The model list, the registry and the drift threshold (the rerank flags)."""

    models: str = option("models.yaml", "YAML list of models to keep ranked (local or s3://)")
    registry: str = option("registry", "registry directory or s3:// prefix")
    min_correlation: float = option(0.8, "Spearman correlation with the previous ranking below which it is drift")
    unsettled_share: float = option(0.2, "a new golden layer that was rank 1 in at least this share of the previous "
                                    "ranking's proxy resamples is 'unsettled' (exit 0), not drift")
    lock_wait: float = option(0.0, "seconds to wait for another run's lock before giving up")
    lock_ttl: float = option(6 * 3600.0, "seconds after which an abandoned lock may be broken")
    progress: bool = option(True, "show progress")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    ranking: RankJob


def read_models(path: str, progress: bool) -> list[ModelEntry]:
    with storage_errors(path), open_file(path, "rb") as handle:
        raw = yaml.safe_load(handle) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list) or not raw["models"]:
        raise ConfigError(f"{path}: expected 'models:' with a list of entries (and optional 'defaults:')")
    defaults = mapping_values(raw.get("defaults") or {}, RankJob, f"{path}: defaults")
    entries, names = [], set()
    for index, item in enumerate(raw["models"]):
        if not isinstance(item, dict) or not item.get("name"):
            raise ConfigError(f"{path}: models[{index}] needs a name")
        name = str(item["name"])
        if name in names or "/" in name:
            raise ConfigError(f"{path}: model name {name!r} is repeated or contains '/'")
        names.add(name)
        values = mapping_values({k: v for k, v in item.items() if k != "name"}, RankJob,
                                f"{path}: models[{index}] ({name})")
        if "model" not in values and "model" not in defaults:
            raise ConfigError(f"{path}: model {name!r} has no 'model:' path")
        entries.append(ModelEntry(name, compose(RankJob, {**defaults, **values, "progress": progress})))
    return entries


def verdict(previous_golden: int | None, previous_shares: dict[int, float], golden: int,
            correlation: float | None, config: "RerankJob") -> str:
    """'ranked' (nothing moved, or a first ranking), 'unsettled' (the golden layer moved to one the previous
    ranking already picked in a real share of its resamples, the layer profile still alike) or 'drift'."""
    if previous_golden is None:
        return "ranked"
    alike = correlation is not None and correlation >= config.min_correlation
    if not alike:
        return "drift"
    if golden == previous_golden:
        return "ranked"
    share = previous_shares.get(golden)
    return "unsettled" if share is not None and share >= config.unsettled_share else "drift"


def pick_share_of(path: str) -> dict[int, float]:
    """Layer -> pick share of a ranking file (empty for a ranking written before pick shares existed)."""
    table, _ = read_ranking(path)
    return {r["layer"]: r["pick_share"] for r in table.to_pylist() if r.get("pick_share") is not None}


def layer_profile(path: str) -> np.ndarray:
    table, _ = read_ranking(path)
    rows = sorted(table.to_pylist(), key=lambda r: r["layer"])
    return np.array([r["score"] for r in rows])


def drift_report(registry: str, name: str, previous: dict, current: dict, correlation: float) -> str:
    """Markdown table + PNG of the two rankings; returns the markdown path."""

    plt = pyplot()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = join(registry, "reports", f"{name}-{stamp}")
    old, _ = read_ranking(previous["ranking"])
    new, _ = read_ranking(current["ranking"])
    old_rows = {r["layer"]: r for r in old.to_pylist()}
    new_rows = sorted(new.to_pylist(), key=lambda r: r["layer"])
    lines = [f"# Golden-layer drift: {name}", "",
             f"- previous: golden layer {previous['golden_layer']}, fingerprint {previous['model_fingerprint']}",
             f"- now: golden layer {current['golden_layer']}, fingerprint {current['model_fingerprint']}",
             f"- Spearman correlation of layer scores: {correlation:.3f}", "",
             "| layer | previous score | previous rank | score | rank |", "| --- | --- | --- | --- | --- |"]
    for row in new_rows:
        before = old_rows.get(row["layer"], {})
        lines.append(f"| {row['layer']} | {before.get('score', float('nan')):.4g} | {before.get('rank') or '-'} | "
                     f"{row['score']:.4g} | {row['rank'] or '-'} |")
    figure, axis = plt.subplots(figsize=(8, 3.5))
    layers = [r["layer"] for r in new_rows]
    for label, rows, shift in (("previous", [old_rows.get(l, {}) for l in layers], -0.2), ("now", new_rows, 0.2)):
        scores = [r.get("score", np.nan) for r in rows]
        scale = np.nanmax(np.abs(scores)) or 1.0
        axis.bar(np.array(layers) + shift, np.array(scores) / scale, width=0.4, label=f"{label} (/ {scale:.3g})")
    axis.axvline(previous["golden_layer"], color="C0", linestyle="--", linewidth=1)
    axis.axvline(current["golden_layer"], color="C1", linestyle="--", linewidth=1)
    axis.set_xlabel("layer")
    axis.set_ylabel("LGA score (scaled)")
    axis.set_title(f"{name}: golden layer {previous['golden_layer']} -> {current['golden_layer']}")
    axis.legend()
    figure.tight_layout()
    save_figure(figure, base + ".png", dpi=100)
    lines += ["", f"![layer scores]({name}-{stamp}.png)", ""]
    with atomic_write(base + ".md", "w") as handle:
        handle.write("\n".join(lines))
    return base + ".md"


def rerank_one(entry: ModelEntry, registry: Registry, config: RerankJob) -> dict[str, Any]:
    job = entry.ranking
    info = describe_model(job.model.model)
    model_dir = join(registry.root, "rankings", entry.name)
    proxy = ranking_proxy(job, join(model_dir, "quarantine.jsonl"))
    flat = to_dict(job)
    options = {k: flat[k] for k in RANKING_OPTIONS}
    key = RankingKey(entry.name, info.fingerprint, requests_hash(proxy), options_hash(options))
    recorded = registry.entry_for(key)
    if recorded is not None:
        print(f"{entry.name}: unchanged (fingerprint {info.fingerprint[:19]}..., proxy {key.proxy_hash}); skipped")
        return {"name": entry.name, "status": "skipped", "golden_layer": recorded["golden_layer"],
                "previous_golden_layer": recorded["previous_golden_layer"], "ranking": recorded["ranking"]}
    previous = registry.last_entry(entry.name)
    out = key.directory(registry.root)
    started = time.perf_counter()
    print(f"{entry.name}: ranking started (fingerprint {info.fingerprint[:19]}..., proxy {key.proxy_hash})",
          flush=True)
    result = rank(dataclasses.replace(job, output=dataclasses.replace(job.output, out=out)), info, proxy=proxy)
    ranking_path = join(out, "ranking.parquet")
    table, _ = read_ranking(ranking_path, expected_fingerprint=info.fingerprint)
    golden = golden_layer(table)
    correlation = spearman(layer_profile(previous["ranking"]), layer_profile(ranking_path)) if previous else None
    previous_shares = pick_share_of(previous["ranking"]) if previous else {}
    status = verdict(previous["golden_layer"] if previous else None, previous_shares, golden, correlation, config)
    drift = status == "drift"
    row = {"name": entry.name, "model": job.model.model, "model_fingerprint": info.fingerprint,
           "proxy_hash": key.proxy_hash, "options": str(options), "options_hash": key.options_hash,
           "ranking": ranking_path, "golden_layer": golden,
           "previous_golden_layer": previous["golden_layer"] if previous else None,
           "rank_correlation": correlation, "drift": drift, "created_at": dt.datetime.now(dt.timezone.utc),
           "seconds": round(time.perf_counter() - started, 2)}
    registry.append(row)
    result = {"name": entry.name, "status": status, "golden_layer": golden,
              "previous_golden_layer": row["previous_golden_layer"], "rank_correlation": correlation,
              "previous_share": previous_shares.get(golden), "golden_share": result.golden_share,
              "ranking": ranking_path, "reused": result.reused}
    if status == "unsettled":
        print(f"{entry.name}: golden layer {previous['golden_layer']} -> {golden}, unsettled, not drift: layer "
              f"{golden} was already rank 1 in {previous_shares[golden]:.0%} of the previous ranking's proxy "
              f"resamples (--unsettled-share {config.unsettled_share:g}); rank on more proxy requests to settle it")
    if drift:
        result["report"] = drift_report(registry.root, entry.name, previous, row, correlation
                                        if correlation is not None else float("nan"))
        print(f"DRIFT {entry.name}: golden layer {previous['golden_layer']} -> {golden}, Spearman "
              f"{correlation if correlation is not None else float('nan'):.3f} (threshold {config.min_correlation}); "
              f"report: {result['report']}")
    return result


def rerank(config: RerankJob) -> RerankResult:
    """Every listed model checked, and re-ranked where its key changed, under the registry's lock."""
    entries = read_models(config.models, config.progress)
    registry = Registry(config.registry)
    results = []
    with RegistryLock(config.registry, ttl_s=config.lock_ttl, wait_s=config.lock_wait) as lock:
        for entry in entries:
            results.append(rerank_one(entry, registry, config))
            lock.renew()
    return RerankResult(results, config.registry)


@dataclasses.dataclass
class RerankResult:
    """One entry per model: skipped, ranked or drift, with golden layers and the ranking's path."""

    models: list[dict[str, Any]]
    registry: str

    @property
    def drift(self) -> bool:
        return any(r["status"] == "drift" for r in self.models)

    def summary(self) -> dict[str, Any]:
        return {"models": [{k: r.get(k) for k in ("name", "status", "golden_layer", "previous_golden_layer",
                                                   "rank_correlation", "golden_share", "previous_share", "ranking")}
                           for r in self.models],
                "drift": self.drift, "registry": self.registry}
