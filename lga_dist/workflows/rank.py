"""rank: a model's layers ranked on a proxy set of edit requests (LGA or causal tracing), written as Parquet.

The same call serves rank-layers, bulk-edit (which ranks when given no ranking),
validate-golden (which ranks its proxy split) and rerank (which ranks on a
schedule): it reuses a finished ranking of the same model, proxy and options,
resumes a checkpoint, and scores in this process or on ZeRO-3 actors.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pyarrow as pa

from lga_dist.config import ConfigError, section, to_dict
from lga_dist.devices import peak_rss_gb, resolve_device
from lga_dist.distributed.driver import cluster_gpus_per_actor, ray_session
from lga_dist.distributed.group import ActorResources
from lga_dist.distributed.run import GroupOptions, RunOptions, resume_state, score_in_process, score_with_actors
from lga_dist.distributed.worker import WorkerSpec
from lga_dist.distributed.zero import load_deepspeed_config
from lga_dist.io.requests import EditRequest, read_requests, requests_hash
from lga_dist.io.storage import exists, join, makedirs, remove, write_parquet
from lga_dist.lga.partial_scores import TRACE_SCORE, BatchPlan, PartialScores, open_scorer
from lga_dist.lga.proxy import select_proxy
from lga_dist.lga.ranking import (
    FIRM_SHARE,
    RankingProvenance,
    golden_layer,
    matrix_table,
    pick_shares,
    ranking_table,
    read_ranking,
)
from lga_dist.models import DTYPES, ModelInfo, describe_model, load_model
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.workflows.options import (
    ClusterOptions,
    ModelOptions,
    OutputOptions,
    ProxyOptions,
    ScoringOptions,
    ZeroOptions,
)


@dataclasses.dataclass
class RankJob:
    """Everything a ranking depends on, as option sections (the rank-layers flags, grouped)."""

    model: ModelOptions = section(ModelOptions, "model")
    proxy: ProxyOptions = section(ProxyOptions, "proxy set")
    scoring: ScoringOptions = section(ScoringOptions, "layer scoring")
    cluster: ClusterOptions = section(ClusterOptions, "cluster")
    zero: ZeroOptions = section(ZeroOptions, "ZeRO-3 group")
    output: OutputOptions = section(OutputOptions, "output")

    def request_paths(self) -> list[str]:
        return self.proxy.requests or [str(demo_requests_path())]


@dataclasses.dataclass
class RankResult:
    """A ranking and where it came from; ``summary()`` is what the CLI prints as its last line."""

    table: pa.Table
    path: str
    info: ModelInfo
    job: RankJob
    reused: bool
    seconds: float
    resumed_batches: int = 0
    restarts: int = 0
    peak_rss_gb: list[float] = dataclasses.field(default_factory=list)  # per actor; --actors 0: this process

    @property
    def golden_layer(self) -> int | None:
        return golden_layer(self.table)

    @property
    def golden_share(self) -> float | None:
        """The golden layer's share of the proxy resamples in which it is rank 1 (None: a ranking without it)."""
        rows = [r for r in self.table.to_pylist() if r["is_golden"]]
        share = rows[0].get("pick_share") if rows else None
        return None if share is None else float(share)

    @property
    def warnings(self) -> list[str]:
        share = self.golden_share
        if share is None or share >= FIRM_SHARE:
            return []
        return [f"the proxy does not settle the golden layer: layer {self.golden_layer} is rank 1 in only "
                f"{share:.0%} of {self.job.scoring.share_resamples} resamples of the proxy requests (pick_share); "
                f"rank on more proxy requests (--proxy-size), or check the pick with validate-golden"]

    @property
    def ranking(self) -> list[int]:
        rows = sorted((r for r in self.table.to_pylist() if r["rank"] is not None), key=lambda r: r["rank"])
        return [r["layer"] for r in rows]

    def layer_scores(self) -> dict[int, float]:
        return {r["layer"]: r["score"] for r in self.table.to_pylist()}

    def summary(self) -> dict[str, Any]:
        first = self.table.slice(0, 1).to_pylist()[0] if self.table.num_rows else {}
        return {"ranking": self.ranking, "golden_layer": self.golden_layer, "golden_share": self.golden_share,
                "warnings": self.warnings, "n_requests": int(first.get("n_requests", 0)),
                "actors": self.job.cluster.actors,
                "seconds": round(self.seconds, 2), "model_id": self.info.model_id,
                "model_fingerprint": self.info.fingerprint, "out": self.path, "reused": self.reused,
                "selector": first.get("selector", "lga"), "rule": first.get("rule", "dot-desc"),
                **({} if self.reused else {"resumed_batches": self.resumed_batches, "restarts": self.restarts,
                                           "peak_rss_gb": self.peak_rss_gb})}


def ranking_proxy(job: RankJob, quarantine: str) -> list[EditRequest]:
    """The valid requests' proxy sample this job ranks on (rejects quarantined)."""
    read = read_requests(job.request_paths(), quarantine=quarantine)
    if read.rejections:
        print(f"{len(read.rejections)} of {read.read} requests rejected ({read.by_reason}); see {read.quarantine}")
    return select_proxy(read.requests, size=job.proxy.proxy_size, fraction=job.proxy.proxy_fraction,
                        seed=job.proxy.seed)


def rank(job: RankJob, info: ModelInfo | None = None, proxy: list[EditRequest] | None = None) -> RankResult:
    """Rank ``job.model`` on its proxy into ``job.output.out``/ranking.parquet.

    ``info``: the model's description when the caller has read it already; ``proxy``: the
    requests to rank on when the caller has chosen them (validate-golden's proxy split)."""
    started = time.perf_counter()
    out, scoring = job.output.out, job.scoring
    ranking_path, checkpoint_path = join(out, "ranking.parquet"), join(out, "ranking.checkpoint.npz")
    proxy = proxy if proxy is not None else ranking_proxy(job, join(out, "quarantine.jsonl"))
    makedirs(out)  # only now: a run that fails on its input leaves no empty OUT behind
    info = info or describe_model(job.model.model, progress=job.output.progress)
    provenance = RankingProvenance(model_id=info.model_id, model_fingerprint=info.fingerprint,
                                   param_set=scoring.param_set, proxy_hash=requests_hash(proxy),
                                   n_requests=len(proxy), selector=scoring.selector, rule=scoring.rule,
                                   config={**to_dict(job), "requests": job.request_paths()})
    if exists(ranking_path) and not job.output.overwrite:
        return _reuse(ranking_path, info, provenance, job, started)
    if job.output.overwrite:
        remove(checkpoint_path)
    state, resumed, restarts, peaks = _score(job, info, proxy, checkpoint_path)
    score = scoring.score if scoring.selector == "lga" else TRACE_SCORE
    layer_scores = state.layer_scores(score)
    if scoring.selector == "cma":  # the average indirect effect
        layer_scores = layer_scores / len(proxy)
    shares = pick_shares(state.per_request(score), scoring.fence_kappa, provenance.order, scoring.share_resamples,
                         job.proxy.seed)
    table = ranking_table(layer_scores, scoring.fence_kappa, provenance, shares)
    write_parquet(table, ranking_path)
    if scoring.save_matrix:
        rows = state.request_scores()
        write_parquet(matrix_table([r.case_id for r in proxy], rows.dot, rows.norm_old, rows.norm_new),
                      join(out, "request_scores.parquet"))
    remove(checkpoint_path)
    return RankResult(table, ranking_path, info, job, reused=False, seconds=time.perf_counter() - started,
                      resumed_batches=resumed, restarts=restarts, peak_rss_gb=peaks)


def _score(job: RankJob, info: ModelInfo, proxy: list[EditRequest], checkpoint_path: str
           ) -> tuple[PartialScores, int, int, list[float]]:
    """The summed scores of every proxy batch (resumed from the checkpoint where it matches); also how many
    batches the checkpoint held, how many times the actor group was restarted and the peak resident memory
    of each actor (in this process: of this process)."""
    scoring, cluster = job.scoring, job.cluster
    trace = scoring.trace_options(job.proxy.seed)
    plan = BatchPlan(len(proxy), scoring.batch_size)
    options = RunOptions(checkpoint_path, scoring.checkpoint_every, job.output.progress)
    what = (f"ranking {info.n_layers} layers of {info.model_id} ({info.fingerprint[:19]}...) on {len(proxy)} "
            f"proxy requests, {scoring.describe()}")

    def resume(dtype: str) -> PartialScores:
        key = {"model_fingerprint": info.fingerprint, "proxy_hash": requests_hash(proxy),
               "param_set": scoring.param_set, "batch_size": scoring.batch_size, "dtype": dtype,
               "rows": True, "selector": scoring.selector,
               **({"trace": dataclasses.asdict(trace)} if scoring.selector == "cma" else {})}
        return resume_state(checkpoint_path, key, info.n_layers)

    if cluster.actors == 0:
        device = resolve_device(job.model.device)
        dtype = job.model.resolve_dtype(info.config, on_accelerator=device.type != "cpu")
        state = resume(dtype)
        resumed = len(state.finished)
        print(f"{what}, in this process on {device} ({dtype})")
        loaded = load_model(job.model.model, dtype=DTYPES[dtype], device=device)
        with open_scorer(loaded.model, loaded.tokenizer, loaded.adapter, loaded.n_layers, scoring.selector,
                         scoring.param_set, trace, proxy, device) as scorer:
            state = score_in_process(scorer, proxy, plan, state, options)
        return state, resumed, 0, [peak_rss_gb()]
    with ray_session(cluster.ray_address, cluster.actors * cluster.cpus_per_actor):
        gpus = cluster.gpus_per_actor if cluster.gpus_per_actor is not None else cluster_gpus_per_actor()
        dtype = job.model.resolve_dtype(info.config, on_accelerator=gpus > 0)
        state = resume(dtype)
        resumed = len(state.finished)
        spec = WorkerSpec(model=job.model.model, dtype=dtype, param_set=scoring.param_set,
                          deepspeed_config=load_deepspeed_config(job.zero.deepspeed_config, DTYPES[dtype]),
                          plan=plan, use_gpu=gpus > 0, threads=cluster.threads,
                          selector=scoring.selector, trace=trace)
        print(f"{what}, {cluster.actors} ZeRO-3 actor(s) ({cluster.cpus_per_actor:g} CPU, {gpus:g} GPU each, "
              f"{dtype})")
        group = GroupOptions(cluster.actors, ActorResources(cluster.cpus_per_actor, gpus), job.zero.max_restarts)
        state, restarts, peaks = score_with_actors(spec, proxy, state, group, options, info.fingerprint)
        return state, resumed, restarts, peaks


def _reuse(path: str, info: ModelInfo, provenance: RankingProvenance, job: RankJob, started: float) -> RankResult:
    """An existing ranking of the same model, proxy and options is the answer; a different one is protected."""
    previous, metadata = read_ranking(path)
    scoring = job.scoring
    same = (metadata.get("model_fingerprint"), metadata.get("proxy_hash"), metadata.get("param_set"),
            metadata.get("rule"), metadata.get("kappa"), metadata.get("selector")) == (
        info.fingerprint, provenance.proxy_hash, scoring.param_set, provenance.rule, scoring.fence_kappa,
        scoring.selector)
    if not same:
        raise ConfigError(f"{path} exists and was computed from another model, proxy set or options; "
                          f"pass --overwrite to replace it or choose another --out")
    print(f"{path} already holds this ranking (same model fingerprint, proxy set and options)")
    return RankResult(previous, path, info, job, reused=True, seconds=time.perf_counter() - started)
