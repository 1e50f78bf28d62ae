"""rank_layers: LGA layer ranking of a model on a proxy set of edit requests."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
import torch

from lga_dist.config import ConfigError, option, to_dict
from lga_dist.console import format_table
from lga_dist.models import load_model
from lga_dist.models.demo import build_demo_model
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.proxy import select_proxy
from lga_dist.ranking import (RankingProvenance, golden_layer, matrix_table, read_ranking,
                              ranking_table, write_table)
from lga_dist.requests import read_requests, requests_hash
from lga_dist.scoring import PARAM_SETS, LayerGradientScorer, score_requests
from lga_dist.storage import exists, join, makedirs

log = logging.getLogger(__name__)

DESCRIPTION = """Rank a model's layers for knowledge editing with Layer Gradient Analysis (LGA).

For every request i of a proxy set and every layer l, s_il is the inner product of the
gradients of the true answer's loss and the new target's loss w.r.t. layer l's MLP output
projection (--param-set mlp: all MLP weights). Layer scores S_l = sum_i s_il; outlier layers
are excluded with Tukey fences (kappa); the rest are ranked by S_l, descending; rank 1 is the
golden layer. Writes OUT/ranking.parquet (and with --save-matrix OUT/request_scores.parquet)
and prints the ranking. With no --model the embedded demo model is used, with no --requests
its shipped CounterFact facts."""

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Config:
    model: str | None = option(None, "model directory or s3:// prefix (default: the embedded demo model)")
    requests: list[str] = option([], "edit request files/prefixes (default: the demo model's shipped facts)",
                                 metavar="PATH")
    out: str = option("out", "output directory (local or s3://)")
    actors: int = option(1, "Ray actors (ZeRO-3 ranks) to score with")
    proxy_size: int | None = option(None, "proxy set size (overrides --proxy-fraction)")
    proxy_fraction: float = option(0.1, "share of the valid requests used as the proxy set")
    param_set: str = option("out", "weights whose gradients are compared: 'out' = MLP output projection "
                            "(what ROME/MEMIT edit), 'mlp' = all MLP weights", choices=PARAM_SETS)
    score: str = option("dot", "per-request score: 'dot' = signed inner product (the paper), 'cosine'",
                        choices=("dot", "cosine"))
    kappa: float = option(1.0, "Tukey fence width: layers outside [Q1-k*IQR, Q3+k*IQR] are excluded")
    seed: int = option(0, "seed of the proxy sample")
    batch_size: int = option(16, "requests per forward/backward pass")
    dtype: str = option("float32", "model dtype", choices=tuple(DTYPES))
    device: str = option("auto", "torch device ('auto': the accelerator if there is one, else cpu)")
    save_matrix: bool = option(False, "also write the per-request x per-layer scores")
    overwrite: bool = option(False, "replace an existing ranking in OUT computed differently")
    progress: bool = option(True, "show progress bars")

    def validate(self) -> None:
        if self.actors < 1:
            raise ConfigError("--actors must be at least 1")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def resolve_inputs(config: Config) -> tuple[str, list[str]]:
    """The model and request paths, the embedded default for whichever is not given."""
    model = config.model or build_demo_model(show_progress=config.progress).path
    requests = config.requests or [str(demo_requests_path())]
    return model, requests


def layer_scores(dot: np.ndarray, norm_old: np.ndarray, norm_new: np.ndarray, score: str) -> np.ndarray:
    """S_l: the per-request scores summed over requests in float64."""
    if score == "cosine":
        with np.errstate(divide="ignore", invalid="ignore"):
            per_request = np.where(norm_old * norm_new > 0, dot / (norm_old * norm_new), 0.0)
    else:
        per_request = dot
    return per_request.astype(np.float64).sum(axis=0)


def print_ranking(table) -> None:
    rows = sorted(table.to_pylist(), key=lambda r: r["layer"])
    print(format_table([{"layer": r["layer"], "score": r["score"], "rank": r["rank"],
                         "excluded": r["excluded"], "golden": "<- golden" if r["is_golden"] else ""}
                        for r in rows]))


def run(config: Config) -> tuple[dict, int]:
    started = time.perf_counter()
    model_path, request_paths = resolve_inputs(config)
    ranking_path, matrix_path = join(config.out, "ranking.parquet"), join(config.out, "request_scores.parquet")
    makedirs(config.out)
    read = read_requests(request_paths, quarantine=join(config.out, "quarantine.jsonl"))
    if read.rejections:
        print(f"{len(read.rejections)} of {read.read} requests rejected ({read.by_reason}); "
              f"see {read.quarantine}")
    proxy = select_proxy(read.requests, size=config.proxy_size, fraction=config.proxy_fraction, seed=config.seed)
    device = resolve_device(config.device)
    loaded = load_model(model_path, dtype=DTYPES[config.dtype], device=device)
    provenance = RankingProvenance(model_id=loaded.model_id, model_fingerprint=loaded.fingerprint,
                                   param_set=config.param_set, proxy_hash=requests_hash(proxy),
                                   n_requests=len(proxy), config={**to_dict(config), "model": model_path,
                                                                   "requests": request_paths})
    if exists(ranking_path) and not config.overwrite:
        previous, metadata = read_ranking(ranking_path)
        same = (metadata.get("model_fingerprint"), metadata.get("proxy_hash"), metadata.get("param_set"),
                metadata.get("config", {}).get("score"), metadata.get("kappa")) == (
            loaded.fingerprint, provenance.proxy_hash, config.param_set, config.score, config.kappa)
        if not same:
            raise ConfigError(f"{ranking_path} exists and was computed from another model, proxy set or options; "
                              f"pass --overwrite to replace it or choose another --out")
        print(f"{ranking_path} already holds this ranking (same model fingerprint, proxy set and options)")
        print_ranking(previous)
        return _summary(previous, loaded, config, started, ranking_path, reused=True), 0
    print(f"ranking {loaded.n_layers} layers of {loaded.model_id} ({loaded.fingerprint[:19]}...) on "
          f"{len(proxy)} proxy requests, param set '{config.param_set}', {config.actors} actor(s), {device}")
    with LayerGradientScorer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers, config.param_set,
                             device) as scorer:
        scores = score_requests(scorer, proxy, config.batch_size, progress=config.progress)
    totals = layer_scores(scores.dot, scores.norm_old, scores.norm_new, config.score)
    table = ranking_table(totals, config.kappa, provenance)
    write_table(table, ranking_path)
    if config.save_matrix:
        write_table(matrix_table([r.case_id for r in proxy], scores.dot, scores.norm_old, scores.norm_new),
                    matrix_path)
    print_ranking(table)
    print(f"golden layer: {golden_layer(table)}   (written to {ranking_path})")
    return _summary(table, loaded, config, started, ranking_path, reused=False), 0


def _summary(table, loaded, config: Config, started: float, path: str, reused: bool) -> dict:
    rows = sorted((r for r in table.to_pylist() if r["rank"] is not None), key=lambda r: r["rank"])
    return {"ranking": [r["layer"] for r in rows], "golden_layer": golden_layer(table),
            "n_requests": int(table.column("n_requests")[0].as_py()), "actors": config.actors,
            "seconds": round(time.perf_counter() - started, 2), "model_id": loaded.model_id,
            "model_fingerprint": loaded.fingerprint, "out": path, "reused": reused}
