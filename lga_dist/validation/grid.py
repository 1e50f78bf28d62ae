"""The request x layer grid: edit every request at every candidate layer, from the unedited model each time.

The grid is split into tasks (one layer, a chunk of requests); each task's rows
are written as one Parquet part as soon as it finishes, so a killed run resumes
where it stopped. Tasks fan out over Ray actors (``--actors N``), each holding a
full copy of the model, or run in this process (``--actors 0``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import pyarrow as pa
import torch

from lga_dist.config import ConfigError, differing_fields
from lga_dist.console import Progress
from lga_dist.devices import resolve_device
from lga_dist.distributed.driver import GroupSpec, cluster_gpus_per_actor, ray_session, run_on_group
from lga_dist.distributed.group import ActorGroup, ActorResources, get_result
from lga_dist.distributed.worker import stdout_to_stderr
from lga_dist.editing import EDIT_VERSION, METHODS, edit_each, edit_window, prepare_statistics
from lga_dist.editing.prepare import corpus_texts, edit_context, evaluate_alone, method_hparams
from lga_dist.evaluation import harmonic_mean
from lga_dist.io.requests import EditRequest, requests_hash
from lga_dist.io.storage import (
    atomic_write,
    exists,
    join,
    list_files,
    open_file,
    read_parquet,
    remove,
    storage_errors,
    write_parquet,
)
from lga_dist.models import DTYPES, ModelInfo, load_model
from lga_dist.models.packaged import model_edit_hparams

PERFORMANCE_METRICS = ("score", "margin", "efficacy", "generalization", "specificity")
_COLUMNS = {  # metric -> (CounterFact column, zsRE column)
    "efficacy": ("ES", "zsre_efficacy"),
    "generalization": ("PS", "zsre_generalization"),
    "specificity": ("NS", "zsre_specificity"),
}
_MARGINS = ("EM", "PM", "NM")  # CounterFact's probability margins, each in [-1, 1]


def performance(metrics: dict[str, float], metric: str, source_format: str) -> float:
    """One number per edit, comparable across layers.

    ``score``: the harmonic mean of efficacy, generalization and specificity (CounterFact ES, PS, NS: with
    one rewrite, one paraphrase and one neighborhood prompt per shipped request, 0 or 1 per edit).
    ``margin``: the graded counterpart, the mean of CounterFact's probability margins EM, PM and NM
    (P(new) - P(true) on the rewrite and paraphrase prompts, P(true) - P(new) on the neighborhood
    prompts; each in [-1, 1], 0 where the two answers are equally likely); for zsRE, whose accuracies are
    already per token, the mean of its three accuracies. Or one of the three metrics alone."""

    column = 1 if source_format == "zsre" else 0
    if metric == "score":
        return harmonic_mean([metrics.get(_COLUMNS[m][column], float("nan")) for m in _COLUMNS])
    if metric == "margin":
        names = [_COLUMNS[m][1] for m in _COLUMNS] if source_format == "zsre" else _MARGINS
        values = [metrics.get(name, float("nan")) for name in names]
        finite = [v for v in values if not math.isnan(v)]
        return float(sum(finite) / len(finite)) if finite else float("nan")
    return float(metrics.get(_COLUMNS[metric][column], float("nan")))


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """What every grid worker needs; its hash (with the requests) names a resumable grid."""

    model: str
    method: str
    hparams: tuple[str, ...] = ()
    window: int = 1
    window_align: str = "end"
    corpus: str | None = None
    corpus_column: str = "text"
    cov_tokens: int = 100_000
    dtype: str = "float32"
    device: str = "auto"
    threads: int = 1
    stats_dir: str | None = None

    def key(self, fingerprint: str, groups: dict[str, Sequence[EditRequest]]) -> dict[str, Any]:
        """Everything the grid's edits depend on (not the metric: a row keeps every metric's inputs)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "threads", "stats_dir")}
        fields["edit_version"] = EDIT_VERSION
        if self.window_align == "end":  # the layout grids had before the option existed: same key
            del fields["window_align"]
        measured = model_edit_hparams(self.model, self.method)
        if measured:  # the model registry's values are part of what the grid measured
            fields["model_hparams"] = measured
        return {**fields, "hparams": list(self.hparams), "model_fingerprint": fingerprint,
                "requests": {name: requests_hash(reqs) for name, reqs in groups.items()}}


@dataclasses.dataclass(frozen=True)
class GridTask:
    group: str            # which request set ("main" or "transfer")
    layer: int
    chunk: int
    indices: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.group}-layer{self.layer:03d}-chunk{self.chunk:04d}"


def plan_tasks(groups: dict[str, Sequence[EditRequest]], layers: dict[str, Sequence[int]],
               chunk_size: int) -> list[GridTask]:
    """The tasks of the groups named in ``layers``, each at its own layers."""
    tasks = []
    for group, group_layers in layers.items():
        requests = groups[group]
        for layer in group_layers:
            for chunk, start in enumerate(range(0, len(requests), chunk_size)):
                indices = tuple(range(start, min(start + chunk_size, len(requests))))
                tasks.append(GridTask(group, layer, chunk, indices))
    return tasks


class GridWorker:
    """Loads the model once, then runs tasks: edit each request of the chunk, evaluate, restore.

    The same class runs in this process or as a Ray actor (``ActorGroup`` passes rank, world size).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, in_actor: bool = True):
        self.rank, self.world_size = rank, world_size
        self.state: dict[str, Any] = {}
        if in_actor:
            stdout_to_stderr()

    def pid(self) -> int:
        return os.getpid()

    def setup(self, rendezvous: None, spec: GridSpec, groups: dict[str, list[dict]],
              progress: bool = False) -> dict[str, Any]:
        """Load the model and the edit context (C per layer, lazily); ``rendezvous`` is None: no group to join."""


        torch.set_num_threads(max(1, spec.threads))
        device = resolve_device(spec.device)
        loaded = load_model(spec.model, dtype=DTYPES[spec.dtype], device=device)
        method = METHODS[spec.method]
        texts = corpus_texts(spec.corpus, spec.corpus_column)
        self.state = {
            "spec": spec, "loaded": loaded, "device": device, "method": method,
            "hparams": method_hparams(spec.method, list(spec.hparams), model=spec.model),
            "ctx": edit_context(loaded, texts, spec.cov_tokens, spec.stats_dir, device, progress),
            "groups": {name: [EditRequest.from_dict(r) for r in reqs] for name, reqs in groups.items()},
        }
        return {"rank": self.rank, "pid": os.getpid(), "fingerprint": loaded.fingerprint, "device": str(device)}

    def prepare_statistics(self, layers: Sequence[int]) -> None:
        """C of these layers into the cache in one pass over the corpus (tasks then read it)."""
        prepare_statistics(self.state["spec"].method, self.state["ctx"], layers)

    def run(self, task: GridTask) -> tuple[GridTask, list[dict[str, Any]]]:
        s = self.state
        spec = s["spec"]
        started = time.perf_counter()
        requests = [s["groups"][task.group][i] for i in task.indices]
        layers = edit_window(task.layer, spec.method, spec.window, s["loaded"].n_layers, spec.window_align)
        results = edit_each(s["method"], s["ctx"], requests, layers, s["hparams"])
        metrics = evaluate_alone(s["loaded"], requests, results, s["device"])
        seconds = (time.perf_counter() - started) / max(len(requests), 1)
        rows = [{"group": task.group, "case_id": request.case_id, "layer": task.layer,
                 "edited_layers": ",".join(map(str, layers)), "source_format": request.source_format,
                 **{k: float(v) for k, v in row.items()},
                 "delta_norm": float(sum(result.record.delta_norms.values())), "seconds": seconds}
                for request, result, row in zip(requests, results, metrics)]
        return task, rows


def _write_part(path: str, rows: list[dict[str, Any]]) -> None:
    write_parquet(pa.Table.from_pylist(rows), path)


def _check_grid_key(directory: str, key: dict[str, Any], overwrite: bool) -> None:
    """A grid directory belongs to one model, method, options and request set; refuse to mix."""

    meta = join(directory, "grid.json")
    text = json.dumps(key, sort_keys=True)
    if exists(meta) and not overwrite:
        with storage_errors(meta), open_file(meta, "rb") as handle:
            previous, current = json.loads(handle.read()), json.loads(text)
        if previous != current:
            raise ConfigError(f"{directory} holds a grid of another model, method, options or request set (differs "
                              f"in: {', '.join(differing_fields(previous, current))}); pass --overwrite to start "
                              f"over or choose another --out")
    elif overwrite and exists(directory):
        for part in list_files(directory, (".parquet",)):
            remove(part)
    with atomic_write(meta, "w") as handle:
        handle.write(text)


def run_grid(spec: GridSpec, info: ModelInfo, groups: dict[str, list[EditRequest]], layers: dict[str, Sequence[int]],
             chunk_size: int, directory: str, *, actors: int, cpus_per_actor: float = 1.0,
             gpus_per_actor: float | None = None, ray_address: str | None = None, overwrite: bool = False,
             progress: bool = True, max_restarts: int = 3) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of the groups named in ``layers``, each edited at its own layers (finished parts reused); also
    how many tasks ran now and the wall time.

    ``groups`` holds every request set of the study, also those edited by a later call (validate-golden edits
    the proxy split first, then the test split at the layers the proxy's selectors and golden layer name):
    they all name the grid, so the calls share one directory."""
    fingerprint = info.fingerprint
    _check_grid_key(directory, spec.key(fingerprint, groups), overwrite)
    # Layers whose edit window is the same (near the first layer, a MEMIT window is shifted to fit) make the
    # same edits: each window is run once, under the first layer that has it, and its rows stand for the others.
    every = sorted({layer for group_layers in layers.values() for layer in group_layers})
    windows = {layer: tuple(edit_window(layer, spec.method, spec.window, info.n_layers, spec.window_align))
               for layer in every}
    runs_as = {layer: min(other for other in every if windows[other] == windows[layer]) for layer in every}
    tasks = plan_tasks(groups, {group: sorted({runs_as[layer] for layer in group_layers})
                                for group, group_layers in layers.items()}, chunk_size)

    def statistics_layers(queue: Sequence[GridTask]) -> list[int]:
        """Every layer whose C the queued edits use (a MEMIT window reaches beyond its chosen layer)."""
        return sorted({edited for task in queue for edited in windows[task.layer]})

    def pending() -> list[GridTask]:
        return [t for t in tasks if not exists(join(directory, t.name + ".parquet"))]

    started = time.perf_counter()
    todo = pending()
    bar = Progress(len(tasks), "edit grid", "task", progress, initial=len(tasks) - len(todo))
    payload = {name: [r.to_dict() for r in reqs] for name, reqs in groups.items()}

    def finished(task: GridTask, rows: list[dict[str, Any]]) -> None:
        _write_part(join(directory, task.name + ".parquet"), rows)
        bar.update(1, f"grid task {task.name} done ({bar.done + 1}/{len(tasks)})")

    restarts = 0
    if todo and actors == 0:
        worker = GridWorker(in_actor=False)
        if worker.setup(None, spec, payload, progress=progress)["fingerprint"] != fingerprint:
            raise ConfigError(f"{spec.model} changed while the grid was starting; run it again")
        worker.prepare_statistics(statistics_layers(todo))
        for task in todo:
            finished(*worker.run(task))
    elif todo:
        import ray

        with ray_session(ray_address, actors * cpus_per_actor):
            gpus = gpus_per_actor if gpus_per_actor is not None else cluster_gpus_per_actor()
            group = GroupSpec(GridWorker, actors, ActorResources(cpus_per_actor, gpus), fingerprint, max_restarts,
                              collective=False)
            worker_spec = dataclasses.replace(spec, threads=max(1, int(cpus_per_actor)))
            _, restarts = run_on_group(group, (worker_spec, ray.put(payload)),
                                       lambda workers: _prepare_then_run(workers, statistics_layers(pending()),
                                                                         pending(), finished),
                                       f"finished grid tasks are kept in {directory}")
    bar.close()
    rows = []
    for group, group_layers in layers.items():
        for layer in group_layers:
            for task in tasks:
                if task.group == group and task.layer == runs_as[layer]:
                    rows.extend({**row, "layer": layer}
                                for row in read_parquet(join(directory, task.name + ".parquet")).to_pylist())
    return rows, {"tasks": len(tasks), "tasks_run": len(todo), "resumed_tasks": len(tasks) - len(todo),
                  "restarts": restarts, "wall_seconds": round(time.perf_counter() - started, 2)}


def _prepare_then_run(workers: ActorGroup, layers: list[int], queue: list[GridTask], finished) -> None:
    """C first, the layers dealt round-robin (one pass over the corpus per worker), then the tasks."""
    workers.call(GridWorker.prepare_statistics, [(layers[rank::workers.size],) for rank in range(workers.size)])
    _keep_busy(workers, queue, finished)


def _keep_busy(workers: ActorGroup, queue: list[GridTask], finished) -> None:
    """Every worker runs one task at a time; a finished task is written before the worker gets the next."""
    import ray

    in_flight = {}
    for actor in workers.actors:
        if queue:
            in_flight[actor.run.remote(queue.pop(0))] = actor
    while in_flight:
        done, _ = ray.wait(list(in_flight), num_returns=1)
        actor = in_flight.pop(done[0])
        finished(*get_result(done[0]))
        if queue:
            in_flight[actor.run.remote(queue.pop(0))] = actor
