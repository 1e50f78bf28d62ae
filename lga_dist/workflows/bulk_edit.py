"""bulk_edit: thousands of edit requests applied at the layer(s) a ranking names, resumably, on ZeRO-3 actors.

Batches are applied one after another (later batches see earlier edits); each
is committed to OUT/progress/ with the edited weights, so a killed run continues
from the last finished batch. The result holds the metrics before and after,
the edited model's fingerprint, and warnings when the edits did not take.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from lga_dist.config import ConfigError, option, section
from lga_dist.console import Progress
from lga_dist.devices import peak_rss_gb, resolve_device
from lga_dist.distributed.driver import GroupSpec, cluster_gpus_per_actor, ray_session, run_on_group
from lga_dist.distributed.editing import EditWorker, EditWorkerSpec, ShardedEditContext
from lga_dist.distributed.group import ActorResources
from lga_dist.distributed.zero import load_deepspeed_config
from lga_dist.editing import (
    EDIT_VERSION,
    METHODS,
    EditRecord,
    Method,
    PreservedKeys,
    apply_batch,
    edit_window,
    parse_layers,
    prepare_statistics,
)
from lga_dist.editing.prepare import corpus_texts, edit_context, method_hparams
from lga_dist.evaluation import aggregate, evaluation_table, headline
from lga_dist.io.requests import CONFLICTING_TARGET, ON_CONFLICT, read_requests, requests_hash
from lga_dist.fluency import NEW_TOKENS, fluency_prompts
from lga_dist.io.storage import atomic_write, exists, join, makedirs, open_file, read_parquet, write_parquet
from lga_dist.lga.ranking import golden_layer, read_ranking
from lga_dist.models import DTYPES, describe_model, load_model
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.plots import pyplot, save_figure
from lga_dist.workflows.bulk_progress import BatchRecord, BulkProgress
from lga_dist.workflows.new_facts import NEW_FACTS_ONLY_HELP, not_yet_known
from lga_dist.workflows.options import ClusterOptions, EditingOptions, ModelOptions, OutputOptions, ZeroOptions
from lga_dist.workflows.rank import RankJob, rank

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BulkEditJob:
    """What to apply, where, and how (the bulk-edit flags)."""

    ranking: str | None = option(None, "ranking.parquet from rank-layers for this model (default: rank it "
                                 "into OUT/ranking/ first, in this process)")
    requests: list[str] = option([], "edit request files or directories/prefixes (local or s3://; default: 500 "
                                 "of the shipped CounterFact facts)", metavar="PATH")
    layers: str | None = option(None, "edit these layers instead of the ranking's ('L', 'L1,L2' or 'A-B'), e.g. "
                                "the golden layer validate-golden measured; --ranking is then not needed")
    batch_size: int = option(100, "requests per update; batches are applied one after another")
    on_conflict: str = option("reject", "requests giving one subject and prompt different targets: 'reject' "
                              "quarantines them all, 'last' keeps the last one read", choices=ON_CONFLICT)
    limit: int = option(0, "apply only the first N valid requests (0: all)")
    new_facts_only: bool = option(False, NEW_FACTS_ONLY_HELP)
    strict: bool = option(False, "exit 1 before editing if any request was rejected")
    probe: int = option(100, "requests whose metrics are tracked after every batch (for OUT/edit_curve.png)")
    held_out: int = option(50, "shipped CounterFact facts the unedited model knows (P(true) > P(new)) and that are "
                           "never edited, whose retention is tracked after every batch: the collateral damage "
                           "(0: none)")
    fluency_tokens: int = option(NEW_TOKENS, "greedy tokens generated per fluency prompt after every batch (the "
                                 "n-gram entropy of ROME/MEMIT; 0: no fluency figure)")
    checkpoint_every: int = option(1, "commit the edited weights to OUT/progress/ after every K batches (and the "
                                   "last): a killed run redoes at most K-1 batches; the summary's "
                                   "checkpoint_seconds says what committing cost")
    model: ModelOptions = section(ModelOptions, "model")
    editing: EditingOptions = section(EditingOptions, "editing")
    cluster: ClusterOptions = section(ClusterOptions, "cluster (--actors N: N DeepSpeed ZeRO-3 ranks, each holding "
                                      "1/N of every weight)")
    zero: ZeroOptions = section(ZeroOptions, "ZeRO-3 group")
    output: OutputOptions = section(OutputOptions, "output", out="out/bulk_edit")

    def validate(self) -> None:
        if self.layers is not None:
            parse_layers(self.layers)
        if self.batch_size < 1 or self.checkpoint_every < 1:
            raise ConfigError("--batch-size and --checkpoint-every must be at least 1")
        if self.limit < 0 or self.probe < 0 or self.held_out < 0 or self.fluency_tokens < 0:
            raise ConfigError("--limit, --probe, --held-out and --fluency-tokens cannot be negative")
        if self.editing.method == "ft" and self.cluster.actors > 0:
            raise ConfigError("FT-L needs the whole layer in one process: use --actors 0 with --method ft")


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
    held_out_pool: list  # candidates for the held-out set, in order (none of them edited)
    held_out: int
    fluency_prompts: list[str]
    fluency_tokens: int


def run_batches(config: BulkEditJob, plan: BulkPlan, progress: BulkProgress, model_path: str, info,
                texts: list[str]) -> tuple[list[BatchRecord], list[dict], list[dict], str, float, dict, int]:
    """Apply every batch not yet committed, evaluate, save; on actors, survive up to --max-restarts lost ones
    (a new group continues from the last committed batch)."""
    if config.cluster.actors == 0:
        device = resolve_device(config.model.device)
        dtype = config.model.resolve_dtype(info.config, on_accelerator=device.type != "cpu")
        loaded = load_model(model_path, dtype=DTYPES[dtype], device=device)
        ctx = edit_context(loaded, texts, config.editing.cov_tokens, config.editing.stats_dir, device,
                           config.output.progress)
        return (*apply_batches(ctx, plan, progress, config, DTYPES[dtype]), 0)
    import ray

    cluster = config.cluster
    with ray_session(cluster.ray_address, cluster.actors * cluster.cpus_per_actor):
        gpus = cluster.gpus_per_actor if cluster.gpus_per_actor is not None else cluster_gpus_per_actor()
        dtype = config.model.resolve_dtype(info.config, on_accelerator=gpus > 0)
        spec = EditWorkerSpec(model=model_path, dtype=dtype,
                              deepspeed_config=load_deepspeed_config(config.zero.deepspeed_config, DTYPES[dtype]),
                              cov_tokens=config.editing.cov_tokens, stats_dir=config.editing.stats_dir,
                              use_gpu=gpus > 0, threads=cluster.threads)
        group = GroupSpec(EditWorker, cluster.actors, ActorResources(cluster.cpus_per_actor, gpus), info.fingerprint,
                          config.zero.max_restarts)
        outcome, restarts = run_on_group(
            group, (spec, ray.put(texts)),
            lambda actors: apply_batches(ShardedEditContext(actors, info.adapter, info.fingerprint), plan, progress,
                                         config, DTYPES[dtype]),
            "rerun the same command to continue from the last committed batch")
    return (*outcome, restarts)


def apply_batches(ctx, plan: BulkPlan, progress: BulkProgress, config: BulkEditJob, dtype: torch.dtype):
    """From the last committed batch on: edit, apply, track, commit; then evaluate everything and save.

    ``dtype`` is the one the model was loaded in, which committed weights must match to be resumed."""
    done = progress.finished()
    pre = _pre_edit_metrics(ctx, plan.requests, join(progress.root, "pre.parquet"), resumed=bool(done))
    baseline = _baseline(ctx, plan, join(progress.root, "baseline.json"), resumed=bool(done))
    held_out = [r for r in plan.held_out_pool if r.case_id in set(baseline["held_out"])]
    # AlphaEdit keeps the keys of every earlier batch (its sequential mode); the others start each batch afresh
    preserved = PreservedKeys() if plan.method.sequential else None
    if done:
        ctx.write_weights(progress.load_weights(done[-1].batch, dtype))
        if preserved is not None:
            preserved.grams = progress.load_preserved(done[-1].batch)
        print(f"resuming after batch {done[-1].batch}: {done[-1].edits_applied} edits already applied")
    if len(done) < len(plan.batches):
        prepare_statistics(plan.method_name, ctx, plan.layers)
    bar = Progress(len(plan.requests), "editing", "req", config.output.progress,
                   initial=sum(len(r.case_ids) for r in done))
    pending: list[BatchRecord] = []
    checkpoint_s = 0.0
    for number in range(len(done), len(plan.batches)):
        started = time.perf_counter()
        batch = plan.batches[number]
        result = apply_batch(plan.method_name, ctx, batch, plan.layers, plan.hparams, number, preserved)
        applied = sum(len(b) for b in plan.batches[:number + 1])
        tracked = [plan.requests[i] for i in plan.probes if i < applied]
        evaluated = time.perf_counter()
        tracking = headline(aggregate(ctx.evaluate(tracked))) if tracked else {}
        tracking.update(_collateral(ctx, plan, held_out))
        finished = time.perf_counter()
        record = BatchRecord(batch=number, case_ids=[r.case_id for r in batch], edits_applied=applied,
                             record=dataclasses.asdict(result.record), tracking=tracking,
                             seconds=round(finished - started, 2), tracking_seconds=round(finished - evaluated, 2),
                             peak_rss_gb=peak_rss_gb())
        pending.append(record)
        if len(pending) == config.checkpoint_every or number == len(plan.batches) - 1:
            started = time.perf_counter()
            progress.commit(pending, ctx.read_weights(plan.modules), preserved.grams if preserved is not None else None)
            checkpoint_s += time.perf_counter() - started
            done += pending
            pending = []
        es, ns = tracking.get("ES", math.nan), tracking.get("NS", math.nan)
        bar.update(len(batch), f"batch {number + 1}/{len(plan.batches)}: {applied} edits applied, tracked ES "
                               f"{es:.3f} NS {ns:.3f}", {"ES": f"{es:.2f}", "NS": f"{ns:.2f}"})
    bar.close()
    post = ctx.evaluate(plan.requests)
    saved = ctx.save(join(config.output.out, "model"), [EditRecord(**r.record) for r in done])
    return done, pre, post, saved, checkpoint_s, baseline


def resolve_ranking(config: BulkEditJob, info) -> str:
    """--ranking, or the model's own ranking on the default proxy (computed once into OUT/ranking/, in this process)."""
    if config.ranking:
        return config.ranking
    job = RankJob(model=config.model, cluster=ClusterOptions(actors=0),
                  output=OutputOptions(out=join(config.output.out, "ranking"), progress=config.output.progress))
    return rank(job, info).path


def bulk_edit(config: BulkEditJob) -> BulkEditResult:
    """Read, validate and apply the requests batch by batch; evaluate before and after; save the edited model."""
    started = time.perf_counter()
    method = METHODS[config.editing.method]
    model_path = config.model.model
    info = describe_model(model_path, progress=config.output.progress)
    paths = config.requests or [str(demo_requests_path())]
    read = read_requests(paths, on_conflict=config.on_conflict, quarantine=join(config.output.out, "quarantine.jsonl"))
    requests = read.requests if config.requests else read.requests[500:]
    if config.new_facts_only:
        requests = not_yet_known(model_path, requests, config.limit or len(requests),
                                 config.model.resolve_dtype(info.config, on_accelerator=False), config.model.device,
                                 record=join(config.output.out, "new_facts.json"))
    requests = requests[:config.limit] if config.limit else requests
    conflicts = sum(r.reason == CONFLICTING_TARGET for r in read.rejections)
    counts = {"read": read.read if config.requests else len(requests) + len(read.rejections),
              "applied": 0, "quarantined": len(read.rejections) - conflicts, "conflicts": conflicts,
              "not_selected": len(read.requests) - len(requests) if config.requests else 0}
    print(f"{counts['read']} requests read from {len(read.files)} file(s): {len(requests)} to apply, "
          f"{counts['quarantined']} quarantined, {conflicts} conflicting ({read.by_reason or 'none'})")
    if config.strict and read.rejections:
        return BulkEditResult(counts=counts, rejected={"by_reason": read.by_reason, "quarantine": read.quarantine})
    if not requests:
        raise ConfigError("no valid requests to apply; see " + join(config.output.out, "quarantine.jsonl"))
    makedirs(config.output.out)  # only now: a run that fails on its input leaves no empty OUT behind
    if config.layers is not None:
        ranking_path, golden, rule = None, None, None
        layers = parse_layers(config.layers, info.n_layers, info.model_id)
        source = "given by --layers"
    else:
        ranking_path = resolve_ranking(config, info)
        ranking, _ = read_ranking(ranking_path, expected_fingerprint=info.fingerprint)
        golden = golden_layer(ranking)
        first = ranking.slice(0, 1).to_pylist()[0]
        rule = f"{first.get('selector', 'lga')} {first.get('rule', 'dot-desc')}"
        layers = edit_window(golden, config.editing.method, config.editing.window, info.n_layers,
                             config.editing.window_align)
        source = f"golden layer {golden} from {ranking_path}, {rule}"

    hparams = method_hparams(config.editing.method, config.editing.hparam, model=config.model.model)
    texts = corpus_texts(config.editing.corpus, config.editing.corpus_column)
    progress = BulkProgress(config.output.out)
    progress.check_key({"model_fingerprint": info.fingerprint, "ranking": ranking_path, "layers": layers,
                        "method": config.editing.method, "hparams": dataclasses.asdict(hparams), "batch_size":
                        config.batch_size, "requests": requests_hash(requests), "dtype": config.model.dtype,
                        "edit_version": EDIT_VERSION, "keeps_earlier_keys": method.sequential,
                        "held_out": config.held_out, "fluency_tokens": config.fluency_tokens},
                       config.output.overwrite)
    batches = [requests[i:i + config.batch_size] for i in range(0, len(requests), config.batch_size)]
    probes = probe_indices(len(requests), config.probe)
    modules = [info.adapter.mlp_out_name(layer) for layer in layers]
    print(f"{config.editing.method} at layer(s) {layers} of {info.model_id} ({source}): "
          f"{len(requests)} requests in {len(batches)} batch(es) of up to {config.batch_size}")

    edited = {r.case_id for r in requests} | {r.subject for r in requests}
    pool = [r for r in read_requests([str(demo_requests_path())]).requests
            if r.case_id not in edited and r.subject not in edited] if config.held_out else []
    plan = BulkPlan(method, config.editing.method, hparams, layers, requests, batches, probes, modules, pool,
                    config.held_out, fluency_prompts(requests) if config.fluency_tokens else [],
                    config.fluency_tokens)
    done, pre, post, saved_fingerprint, checkpoint_s, baseline, restarts = run_batches(config, plan, progress,
                                                                                       model_path, info, texts)

    counts["applied"] = len(requests)
    context = {"method": config.editing.method, "layers": ",".join(map(str, layers)), "model_id": info.model_id,
               "model_fingerprint": info.fingerprint, "edited_fingerprint": saved_fingerprint}
    write_parquet(evaluation_table(requests, pre, post, context), join(config.output.out, "eval.parquet"))
    before, after = aggregate(pre), aggregate(post)
    final = done[-1].tracking if done else {}
    collateral = {"before": {"fluency": baseline.get("fluency"), "held_out_retention": 1.0 if plan.held_out else None},
                  "after": {"fluency": final.get("fluency"), "held_out_retention": final.get("held_out_retention")}}
    write_parquet(pa.Table.from_pylist([{"when": when, **metrics, **collateral[when], **context, **counts,
                                         "batches": len(batches), "held_out": len(baseline["held_out"])}
                                        for when, metrics in (("before", before), ("after", after))]),
                  join(config.output.out, "summary.parquet"))
    write_edit_curve(done, join(config.output.out, "edit_curve.png"),
                     f"{config.editing.method} at layers {layers} of {info.model_id}")
    warnings = edits_that_did_not_take(before, after, layers)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    return BulkEditResult(counts=counts, batches=len(batches), method=config.editing.method, layers=layers,
                          golden_layer=golden, ranking_rule=rule, model=model_path, model_id=info.model_id,
                          model_fingerprint=info.fingerprint, saved=join(config.output.out, "model"),
                          saved_fingerprint=saved_fingerprint, before=before, after=after, out=config.output.out,
                          restarts=restarts, seconds=time.perf_counter() - started, checkpoint_seconds=checkpoint_s,
                          warnings=warnings, collateral={**collateral, "held_out": len(baseline["held_out"]),
                                                         "fluency_prompts": len(plan.fluency_prompts)})


@dataclasses.dataclass
class BulkEditResult:
    """What a bulk edit did; ``rejected`` is set (and nothing applied) when --strict refused rejected input."""

    counts: dict[str, int]
    rejected: dict | None = None
    batches: int = 0
    method: str = ""
    layers: list[int] = dataclasses.field(default_factory=list)
    golden_layer: int | None = None
    ranking_rule: str | None = None  # the selector and rule of the ranking the layers came from
    model: str = ""
    model_id: str = ""
    model_fingerprint: str = ""
    saved: str = ""
    saved_fingerprint: str = ""
    before: dict[str, float] = dataclasses.field(default_factory=dict)
    after: dict[str, float] = dataclasses.field(default_factory=dict)
    out: str = ""
    restarts: int = 0
    seconds: float = 0.0
    checkpoint_seconds: float = 0.0  # committing weights to OUT/progress/ (in ``seconds``)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # fluency (n-gram entropy) and held-out retention before and after, the held-out set's and prompts' sizes
    collateral: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        if self.rejected is not None:
            return {"status": "rejected", **self.counts, **self.rejected}
        return {**self.counts, **({"warnings": self.warnings} if self.warnings else {}), "batches": self.batches,
                "method": self.method, "layers": self.layers, "golden_layer": self.golden_layer,
                "ranking_rule": self.ranking_rule, "model": self.model,
                "model_id": self.model_id, "model_fingerprint": self.model_fingerprint, "saved": self.saved,
                "saved_fingerprint": self.saved_fingerprint, "pre": headline(self.before),
                "post": headline(self.after), **self.collateral, "out": self.out, "restarts": self.restarts,
                "seconds": round(self.seconds, 2), "checkpoint_seconds": round(self.checkpoint_seconds, 2)}


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
    rows = ctx.evaluate(requests)
    write_parquet(pa.Table.from_pylist(rows), path)
    return rows


def _baseline(ctx, plan: BulkPlan, path: str, resumed: bool) -> dict:
    """What the collateral damage is measured against, fixed before the first edit and kept for a resumed run:
    the held-out facts (the first ``plan.held_out`` of the pool the unedited model knows: P(true) > P(new))
    and the unedited model's fluency on the run's prompts."""
    if resumed:
        if not exists(path):
            raise ConfigError(f"{path} is missing, so the held-out set and the fluency before are lost; pass "
                              f"--overwrite")
        with open_file(path, "rb") as handle:
            return json.load(handle)
    known: list[str] = []
    for start in range(0, len(plan.held_out_pool), 64):
        if len(known) >= plan.held_out:
            break
        chunk = plan.held_out_pool[start:start + 64]
        known += [r.case_id for r, row in zip(chunk, ctx.evaluate(chunk)) if row["ES"] == 0.0]
    fluency = ctx.fluency(plan.fluency_prompts, plan.fluency_tokens) if plan.fluency_prompts else []
    baseline = {"held_out": known[:plan.held_out], "fluency": float(np.mean(fluency)) if fluency else None,
                "fluency_prompts": plan.fluency_prompts, "fluency_tokens": plan.fluency_tokens}
    with atomic_write(path, "w") as handle:
        json.dump(baseline, handle)
    return baseline


def _collateral(ctx, plan: BulkPlan, held_out: Sequence) -> dict[str, float]:
    """After a batch: the share of held-out facts the model still knows, and its fluency."""
    out = {}
    if held_out:
        out["held_out_retention"] = round(1.0 - aggregate(ctx.evaluate(held_out))["ES"], 4)
    if plan.fluency_prompts:
        out["fluency"] = round(float(np.mean(ctx.fluency(plan.fluency_prompts, plan.fluency_tokens))), 4)
    return out


def write_edit_curve(records: Sequence[BatchRecord], path: str, title: str) -> None:
    """Efficacy, paraphrase and neighborhood success of the tracked requests, held-out retention and fluency,
    over the edits applied."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4))
    x = [r.edits_applied for r in records]
    for key, label, style in (("ES", "efficacy (ES)", "o-"), ("PS", "paraphrase (PS)", "^-"),
                              ("NS", "neighborhood (NS)", "s-"), ("held_out_retention", "held-out facts kept", "d-")):
        axis.plot(x, [r.tracking.get(key, math.nan) for r in records], style, label=label)
    axis.set_xlabel("edits applied")
    axis.set_ylabel("success rate (tracked edits applied so far)")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title, fontsize=9)
    fluency = [r.tracking.get("fluency", math.nan) for r in records]
    if any(math.isfinite(v) for v in fluency):
        twin = axis.twinx()
        twin.plot(x, fluency, "x--", color="tab:gray", label="fluency (n-gram entropy, bits)")
        twin.set_ylabel("fluency (bits)")
        twin.legend(loc="lower right", fontsize=8)
    axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


