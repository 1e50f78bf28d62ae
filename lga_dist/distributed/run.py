"""Drive a scoring run to completion: in this process, or on an actor group that may lose members.

Both paths score the same fixed batches (``BatchPlan``) and checkpoint the
finished ones every few rounds beside the output. With actors, a lost actor
tears the whole group down; a new group is started, the checkpoint is read back,
and only the batches it does not hold are scored again. A job restarted with the
same output path resumes from the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from lga_dist.console import Progress
from lga_dist.distributed.driver import GroupSpec, run_on_group
from lga_dist.distributed.group import ActorGroup, ActorResources
from lga_dist.distributed.worker import ScoringWorker, WorkerSpec
from lga_dist.lga.partial_scores import BatchPlan, PartialScores, score_batch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    checkpoint_path: str
    checkpoint_every: int = 8
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class GroupOptions:
    actors: int
    resources: ActorResources
    max_restarts: int = 3


def _progress(total: int, done: int, enabled: bool) -> Progress:
    return Progress(total, "scoring requests", "req", enabled, initial=done)


def resume_state(path: str, key: dict, n_layers: int) -> PartialScores:
    state = PartialScores.load(path, key, n_layers)
    if state is None:
        return PartialScores(key, n_layers)
    log.info("resuming from checkpoint %s: %d batches already scored", path, len(state.finished))
    return state


def score_in_process(scorer, proxy: Sequence, plan: BatchPlan, state: PartialScores,
                     options: RunOptions) -> PartialScores:
    """The single-process core (``--actors 0``): same batches, same checkpoints, no Ray."""
    progress = _progress(plan.n_requests, _scored(state, plan), options.progress)
    for count, batch_id in enumerate(plan.pending(state.finished), start=1):
        state.add(score_batch(scorer, proxy, plan, batch_id))
        progress.update(len(plan.indices(batch_id)), f"scored {progress.done + len(plan.indices(batch_id))}/"
                                                     f"{plan.n_requests} requests")
        if count % options.checkpoint_every == 0:
            state.save(options.checkpoint_path)
    progress.close()
    return state


def score_with_actors(spec: WorkerSpec, proxy: Sequence, state: PartialScores, group: GroupOptions,
                      options: RunOptions, fingerprint: str) -> tuple[PartialScores, int, list[float]]:
    """Score every pending batch on a ZeRO-3 actor group; returns the state, the number of restarts and each
    actor's peak resident memory (GB, of the group that finished).

    After a lost actor the new group starts from the checkpoint, so only unfinished batches are scored again."""
    import ray

    progress = _progress(spec.plan.n_requests, _scored(state, spec.plan), options.progress)
    per_actor = [0] * group.actors
    proxy_ref = ray.put(list(proxy))
    attempts = 0
    peaks: list[float] = []

    def score_pending(actors: ActorGroup) -> PartialScores:
        nonlocal state, attempts
        if attempts:  # a new group after a lost actor: the checkpoint holds what the old one finished
            state = resume_state(options.checkpoint_path, state.key, state.n_layers)
            log.warning("resuming from the checkpoint with %d/%d batches done", len(state.finished),
                        spec.plan.n_batches)
        attempts += 1
        pending = spec.plan.pending(state.finished)
        for round_ in BatchPlan.rounds(pending, group.actors, options.checkpoint_every):
            per_rank = actors.call(ScoringWorker.score, [(lane,) for lane in round_])
            for results in per_rank:
                for result in results:
                    state.add(result)
            state.save(options.checkpoint_path)
            counts = [sum(len(spec.plan.indices(r.batch_id)) for r in results) for results in per_rank]
            per_actor[:] = [a + c for a, c in zip(per_actor, counts)]
            shares = ", ".join(f"actor {r}: {n}" for r, n in enumerate(per_actor))
            progress.update(sum(counts), f"scored {progress.done + sum(counts)}/{spec.plan.n_requests} requests "
                                         f"({shares})", {"per actor": "/".join(map(str, per_actor))})
        peaks[:] = actors.call(ScoringWorker.peak_rss_gb)
        return state

    group_spec = GroupSpec(ScoringWorker, group.actors, group.resources, fingerprint, group.max_restarts)
    state, restarts = run_on_group(group_spec, (spec, proxy_ref), score_pending,
                                   f"the checkpoint {options.checkpoint_path} keeps the finished batches")
    progress.close()
    return state, restarts, peaks


def _scored(state: PartialScores, plan: BatchPlan) -> int:
    return sum(len(plan.indices(b)) for b in state.finished)
