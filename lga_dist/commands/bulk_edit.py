"""bulk-edit: apply thousands of edit requests at the layer(s) a ranking names, resumably."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from typing import Iterator, Sequence

import torch

from lga_dist.workflows.bulk_progress import BatchRecord, BulkProgress
from lga_dist.config import ConfigError, option
from lga_dist.console import format_table
from lga_dist.editing import (METHODS, WINDOW_ALIGNS, EditRecord, EditResult, Method, edit_each, edit_window,
                              parse_layers)
from lga_dist.editing.deltas import make_result
from lga_dist.editing.prepare import corpus_texts, edit_context, method_hparams
from lga_dist.evaluation import aggregate, evaluation_table, headline
from lga_dist.models import DTYPES, describe_model, load_model
from lga_dist.models.packaged import DEFAULT_MODEL, MODEL_HELP
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.plots import pyplot, save_figure
from lga_dist.lga.ranking import golden_layer, read_ranking
from lga_dist.io.requests import CONFLICTING_TARGET, ON_CONFLICT, read_requests, requests_hash
from lga_dist.io.storage import exists, join, makedirs, read_parquet, write_parquet

log = logging.getLogger(__name__)

DESCRIPTION = """Edit a model with many requests at the layer(s) its LGA ranking names, and write the edited model.

Layers come from --ranking (checked against the model's fingerprint): the golden layer for ROME
and FT-L; for MEMIT and AlphaEdit a window of --window layers ending at (or, with --window-align
center, around) it; --layers names them instead. Requests are read from every JSON/JSONL/Parquet
file under --requests (local or s3:// prefixes, formats mixed), validated, and quarantined with
reasons in OUT/quarantine.jsonl;
requests that give one subject and prompt different targets follow --on-conflict. The valid
requests are applied in batches of --batch-size, one batch after another, so later batches see
earlier edits (ROME: the batch's independent rank-one updates are applied together).

With --actors N the model is sharded over N Ray actors with DeepSpeed ZeRO-3: each batch's
per-request work (target optimisation, keys, evaluation) is split across them, and each layer's
update is solved once in float64 and applied to every shard. Every batch is committed to
OUT/progress/ (edited weights + manifest), so a killed job rerun with the same command continues
from the last finished batch and ends with the same weights.

Writes OUT/model/ (safetensors, tokenizer, edits.jsonl), OUT/eval.parquet (every request's
metrics before and after), OUT/summary.parquet, OUT/edit_curve.png (efficacy and neighborhood
success of --probe requests over the number of edits applied) and OUT/quarantine.jsonl.
With no arguments it edits the packaged real model gemma3-270m with 500 of the shipped CounterFact
facts at the layers of its own ranking (computed into OUT/ranking/ first); --model demo is the
small demo fact model for quick trials."""


@dataclasses.dataclass
class Config:
    model: str = option(DEFAULT_MODEL, MODEL_HELP)
    ranking: str | None = option(None, "ranking.parquet from rank-layers for this model (default: rank it "
                                 "into OUT/ranking/ first, in this process)")
    requests: list[str] = option([], "edit request files or directories/prefixes (local or s3://; default: 500 "
                                 "of the shipped CounterFact facts)", metavar="PATH")
    layers: str | None = option(None, "edit these layers instead of the ranking's ('L', 'L1,L2' or 'A-B'), e.g. "
                                "the golden layer validate-golden measured; --ranking is then not needed")
    method: str = option("memit", "editing method", choices=tuple(METHODS))
    window: int = option(3, "MEMIT/AlphaEdit: number of layers edited")
    window_align: str = option("end", "MEMIT/AlphaEdit: the window ends at the golden layer, or is centred on it",
                               choices=WINDOW_ALIGNS)
    batch_size: int = option(100, "requests per update; batches are applied one after another")
    on_conflict: str = option("reject", "requests giving one subject and prompt different targets: 'reject' "
                              "quarantines them all, 'last' keeps the last one read", choices=ON_CONFLICT)
    limit: int = option(0, "apply only the first N valid requests (0: all)")
    strict: bool = option(False, "exit 1 before editing if any request was rejected")
    probe: int = option(100, "requests whose metrics are tracked after every batch (for OUT/edit_curve.png)")
    hparam: list[str] = option([], "override a hyper-parameter of the method, NAME=VALUE", metavar="NAME=VALUE")
    corpus: str | None = option(None, "text for C = E[k k^T] (default: the 1,000 shipped CounterFact facts as "
                                 "sentences, available offline)")
    corpus_column: str = option("text", "the corpus's text column")
    cov_tokens: int = option(100_000, "tokens averaged into C")
    stats_dir: str | None = option(None, "where C is cached (default: the lga_dist cache; s3:// works)")
    actors: int = option(1, "Ray actors, each one DeepSpeed ZeRO-3 rank holding 1/N of every weight; "
                         "0 edits in this process without Ray or DeepSpeed")
    cpus_per_actor: float = option(1.0, "CPUs per actor (also its torch thread count)")
    gpus_per_actor: float | None = option(None, "GPUs per actor (default: 1 if the Ray cluster has GPUs, else 0)")
    deepspeed_config: str | None = option(None, "DeepSpeed ZeRO-3 config JSON (default: cluster/deepspeed/zero3.json)")
    ray_address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS, else a private local one)")
    max_restarts: int = option(3, "actor groups to start again after losing an actor before giving up")
    dtype: str = option("float32", "model dtype", choices=tuple(DTYPES))
    device: str = option("auto", "--actors 0: torch device ('auto': the accelerator if any, else cpu)")
    out: str = option("out/bulk_edit", "output directory (local or s3://)")
    overwrite: bool = option(False, "start over instead of continuing the run in OUT/progress")
    progress: bool = option(True, "show progress")

    def validate(self) -> None:
        if self.layers is not None:
            parse_layers(self.layers)
        if self.window < 1 or self.batch_size < 1:
            raise ConfigError("--window and --batch-size must be at least 1")
        if self.limit < 0 or self.probe < 0 or self.actors < 0:
            raise ConfigError("--limit, --probe and --actors cannot be negative")
        if self.method == "ft" and self.actors > 0:
            raise ConfigError("FT-L needs the whole layer in one process: use --actors 0 with --method ft")


def edit_batch(method: Method, name: str, ctx, batch: Sequence, layers: Sequence[int], hparams,
               number: int) -> EditResult:
    """One update for the batch (ROME: its independent rank-one updates, summed)."""
    if method.batched:
        result = method.apply(ctx, batch, layers, hparams)
    else:
        deltas: dict[str, torch.Tensor] = {}
        for single in edit_each(method, ctx, batch, layers, hparams):
            for module, delta in single.deltas.items():
                deltas[module] = deltas[module] + delta if module in deltas else delta
        result = make_result(name, ctx.fingerprint, batch, layers, hparams, deltas)
    result.record.batch = number
    return result


def probe_indices(n: int, probe: int) -> list[int]:
    """``probe`` request positions spread evenly over the run (all of them when n <= probe)."""
    if probe >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(probe - 1, 1)) for i in range(probe)})


@dataclasses.dataclass(frozen=True)
class BulkPlan:
    """What the job applies: the method, where, and the requests in their batches."""

    method: Method
    method_name: str
    hparams: object
    layers: list[int]
    requests: list
    batches: list[list]
    probes: list[int]
    modules: list[str]


def run_batches(config: Config, plan: BulkPlan, progress: BulkProgress, model_path: str, info,
                texts: list[str]) -> tuple[list[BatchRecord], list[dict], list[dict], str, int]:
    """Apply every batch not yet committed, evaluate, save; on actors, survive up to --max-restarts lost ones."""
    if config.actors == 0:
        from lga_dist.devices import resolve_device

        device = resolve_device(config.device)
        loaded = load_model(model_path, dtype=DTYPES[config.dtype], device=device)
        ctx = edit_context(loaded, texts, config.cov_tokens, config.stats_dir, device, config.progress)
        return (*apply_batches(ctx, plan, progress, config), 0)
    from lga_dist.distributed.run import next_restart, ray_session

    restarts = 0
    with ray_session(config.ray_address, config.actors * config.cpus_per_actor):
        while True:
            try:
                with actor_context(config, model_path, info, texts) as ctx:
                    return (*apply_batches(ctx, plan, progress, config), restarts)
            except Exception as err:  # noqa: BLE001 - only a lost actor is retried, the rest re-raised
                restarts, reason = next_restart(err, restarts, config.max_restarts,
                                                "rerun the same command to continue from the last committed batch")
                log.warning("lost an actor (%s); starting a new group (restart %d/%d) and continuing from the "
                            "last committed batch", reason, restarts, config.max_restarts)


def apply_batches(ctx, plan: BulkPlan, progress: BulkProgress, config: Config):
    """From the last committed batch on: edit, apply, track, commit; then evaluate everything and save."""
    from tqdm.auto import tqdm

    done = progress.finished()
    pre = _pre_edit_metrics(ctx, plan.requests, join(progress.root, "pre.parquet"), resumed=bool(done))
    if done:
        ctx.write_weights(progress.load_weights(done[-1].batch))
        print(f"resuming after batch {done[-1].batch}: {done[-1].edits_applied} edits already applied")
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(plan.requests), initial=sum(len(r.case_ids) for r in done), desc="editing", unit="req",
               disable=not (config.progress and tty))
    for number in range(len(done), len(plan.batches)):
        started = time.perf_counter()
        batch = plan.batches[number]
        result = edit_batch(plan.method, plan.method_name, ctx, batch, plan.layers, plan.hparams, number)
        ctx.apply(result.deltas)
        applied = sum(len(b) for b in plan.batches[:number + 1])
        tracked = [plan.requests[i] for i in plan.probes if i < applied]
        tracking = headline(aggregate(ctx.evaluate(tracked))) if tracked else {}
        record = BatchRecord(batch=number, case_ids=[r.case_id for r in batch], edits_applied=applied,
                             record=dataclasses.asdict(result.record), tracking=tracking,
                             seconds=round(time.perf_counter() - started, 2))
        progress.commit(record, ctx.read_weights(plan.modules))
        done.append(record)
        bar.update(len(batch))
        bar.set_postfix(ES=f"{tracking.get('ES', math.nan):.2f}", NS=f"{tracking.get('NS', math.nan):.2f}")
        if config.progress and not tty:  # job logs: a line per batch instead of a bar
            print(f"batch {number + 1}/{len(plan.batches)}: {applied} edits applied, tracked ES "
                  f"{tracking.get('ES', math.nan):.3f} NS {tracking.get('NS', math.nan):.3f}", flush=True)
    bar.close()
    post = ctx.evaluate(plan.requests)
    saved = ctx.save(join(config.out, "model"), [EditRecord(**r.record) for r in done])
    return done, pre, post, saved


@contextlib.contextmanager
def actor_context(config: Config, model_path: str, info, texts: list[str]) -> Iterator:
    """A ZeRO-3 actor group holding the model, as a ShardedEditContext; torn down on exit."""
    import ray

    from lga_dist.distributed.run import cluster_gpus_per_actor
    from lga_dist.distributed.editing import EditWorker, EditWorkerSpec, ShardedEditContext
    from lga_dist.distributed.group import ActorGroup, ActorResources, ClusterError
    from lga_dist.distributed.run import worker_env
    from lga_dist.distributed.zero import load_deepspeed_config

    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else cluster_gpus_per_actor()
    spec = EditWorkerSpec(model=model_path, dtype=config.dtype,
                          deepspeed_config=load_deepspeed_config(config.deepspeed_config, DTYPES[config.dtype]),
                          cov_tokens=config.cov_tokens, stats_dir=config.stats_dir, use_gpu=gpus > 0,
                          threads=max(1, int(config.cpus_per_actor)))
    with ActorGroup(EditWorker, config.actors, ActorResources(config.cpus_per_actor, gpus),
                    worker_env(gpus > 0)) as group:
        host, port = ray.get(group.actors[0].rendezvous_address.remote())
        ranks = group.call("setup", [(host, port, spec, ray.put(texts))] * config.actors)
        if {r["fingerprint"] for r in ranks} != {info.fingerprint}:
            raise ClusterError(f"actors loaded {sorted({r['fingerprint'] for r in ranks})}, the driver read "
                               f"{info.fingerprint}: the model changed during the run or nodes see different files")
        print(f"{config.actors} ZeRO-3 actor(s) ready: " + ", ".join(
            f"rank {r['rank']} pid {r['pid']} on {r['device']}" for r in ranks), flush=True)
        yield ShardedEditContext(group, info.adapter, info.fingerprint)


def resolve_ranking(config: Config) -> str:
    """--ranking, or the model's own ranking on the default proxy (computed once into OUT/ranking/)."""
    if config.ranking:
        return config.ranking
    from lga_dist.commands import rank_layers

    rank_config = rank_layers.Config(model=config.model, out=join(config.out, "ranking"), actors=0,
                                     progress=config.progress)
    summary, _ = rank_layers.run(rank_config)
    return summary["out"]


def run(config: Config) -> tuple[dict, int]:
    started = time.perf_counter()
    method = METHODS[config.method]
    model_path = config.model
    info = describe_model(model_path, progress=config.progress)
    makedirs(config.out)
    if config.layers is not None:
        ranking_path, golden = None, None
        layers = parse_layers(config.layers, info.n_layers, info.model_id)
        source = "given by --layers"
    else:
        ranking_path = resolve_ranking(config)
        ranking, _ = read_ranking(ranking_path, expected_fingerprint=info.fingerprint)
        golden = golden_layer(ranking)
        layers = edit_window(golden, config.method, config.window, info.n_layers, config.window_align)
        source = f"golden layer {golden} from {ranking_path}"

    paths = config.requests or [str(demo_requests_path())]
    read = read_requests(paths, on_conflict=config.on_conflict, quarantine=join(config.out, "quarantine.jsonl"))
    requests = read.requests if config.requests else read.requests[500:]
    requests = requests[:config.limit] if config.limit else requests
    conflicts = sum(r.reason == CONFLICTING_TARGET for r in read.rejections)
    counts = {"read": read.read if config.requests else len(requests) + len(read.rejections),
              "applied": 0, "quarantined": len(read.rejections) - conflicts, "conflicts": conflicts,
              "not_selected": len(read.requests) - len(requests) if config.requests else 0}
    print(f"{counts['read']} requests read from {len(read.files)} file(s): {len(requests)} to apply, "
          f"{counts['quarantined']} quarantined, {conflicts} conflicting ({read.by_reason or 'none'})")
    if config.strict and read.rejections:
        return {"status": "rejected", **counts, "by_reason": read.by_reason, "quarantine": read.quarantine}, 1
    if not requests:
        raise ConfigError("no valid requests to apply; see " + join(config.out, "quarantine.jsonl"))

    hparams = method_hparams(method, config.hparam)
    texts = corpus_texts(config.corpus, config.corpus_column)
    progress = BulkProgress(config.out)
    progress.check_key({"model_fingerprint": info.fingerprint, "ranking": ranking_path, "layers": layers,
                        "method": config.method, "hparams": dataclasses.asdict(hparams), "batch_size":
                        config.batch_size, "requests": requests_hash(requests), "dtype": config.dtype},
                       config.overwrite)
    batches = [requests[i:i + config.batch_size] for i in range(0, len(requests), config.batch_size)]
    probes = probe_indices(len(requests), config.probe)
    modules = [info.adapter.mlp_out_name(layer) for layer in layers]
    print(f"{config.method} at layer(s) {layers} of {info.model_id} ({source}): "
          f"{len(requests)} requests in {len(batches)} batch(es) of up to {config.batch_size}")

    plan = BulkPlan(method, config.method, hparams, layers, requests, batches, probes, modules)
    done, pre, post, saved_fingerprint, restarts = run_batches(config, plan, progress, model_path, info, texts)

    counts["applied"] = len(requests)
    context = {"method": config.method, "layers": ",".join(map(str, layers)), "model_id": info.model_id,
               "model_fingerprint": info.fingerprint, "edited_fingerprint": saved_fingerprint}
    write_parquet(evaluation_table(requests, pre, post, context), join(config.out, "eval.parquet"))
    before, after = aggregate(pre), aggregate(post)
    import pyarrow as pa

    write_parquet(pa.Table.from_pylist([{"when": when, **metrics, **context, **counts, "batches": len(batches)}
                                      for when, metrics in (("before", before), ("after", after))]),
                join(config.out, "summary.parquet"))
    write_edit_curve(done, join(config.out, "edit_curve.png"),
                     f"{config.method} at layers {layers} of {info.model_id}")
    print(format_table([{"": when, **{k: round(v, 3) for k, v in metrics.items()}}
                        for when, metrics in (("before", before), ("after", after))]))
    print(f"edited model written to {join(config.out, 'model')} (fingerprint {saved_fingerprint[:19]}...)")
    warnings = edits_that_did_not_take(before, after, layers)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    return {**counts, **({"warnings": warnings} if warnings else {}), "batches": len(batches), "method": config.method, "layers": layers, "golden_layer": golden,
            "model": model_path, "model_id": info.model_id, "model_fingerprint": info.fingerprint,
            "saved": join(config.out, "model"), "saved_fingerprint": saved_fingerprint,
            "pre": headline(before), "post": headline(after), "out": config.out, "restarts": restarts,
            "seconds": round(time.perf_counter() - started, 2)}, 0


def edits_that_did_not_take(before: dict, after: dict, layers: Sequence[int]) -> list[str]:
    """A bulk edit whose efficacy did not rise has edited weights that do not carry the facts: say so."""
    pre, post = before.get("ES", math.nan), after.get("ES", math.nan)
    if math.isnan(post) or post > max(pre, 0.0) + 0.05:
        return []
    return [f"efficacy did not rise ({pre:.2f} -> {post:.2f}): the edits did not take at layers {list(layers)}; "
            f"check the ranking's rule (validate-golden on a sample) or pass --layers where validate-golden "
            f"measured edits to take"]


def _pre_edit_metrics(ctx, requests: Sequence, path: str, resumed: bool) -> list[dict[str, float]]:
    """Metrics of the unedited model, kept beside the progress so a resumed run still has them."""
    if resumed:
        if not exists(path):
            raise ConfigError(f"{path} is missing, so the unedited metrics are lost; pass --overwrite")
        return read_parquet(path).to_pylist()
    import pyarrow as pa

    rows = ctx.evaluate(requests)
    write_parquet(pa.Table.from_pylist(rows), path)
    return rows


def write_edit_curve(records: Sequence[BatchRecord], path: str, title: str) -> None:
    """Efficacy, paraphrase and neighborhood success of the tracked requests over the edits applied."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    x = [r.edits_applied for r in records]
    for key, label, style in (("ES", "efficacy (ES)", "o-"), ("PS", "paraphrase (PS)", "^-"),
                              ("NS", "neighborhood (NS)", "s-")):
        axis.plot(x, [r.tracking.get(key, math.nan) for r in records], style, label=label)
    axis.set_xlabel("edits applied")
    axis.set_ylabel("success rate on tracked requests applied so far")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title, fontsize=9)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


