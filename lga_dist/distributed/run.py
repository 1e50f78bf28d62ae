"""Drive a scoring run to completion: in this process, or on an actor group that may lose members.

Both paths score the same fixed batches (``BatchPlan``) and checkpoint the
finished ones every few rounds beside the output. With actors, a lost actor
tears the whole group down; a new group is started, the checkpoint is read back,
and only the batches it does not hold are scored again. A job restarted with the
same output path resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Iterator, Sequence

from lga_dist.distributed.group import ActorGroup, ActorResources, ClusterError
from lga_dist.distributed.worker import ScoringWorker, WorkerSpec
from lga_dist.errors import UserError
from lga_dist.lga.partial_scores import BatchPlan, PartialScores, score_batch

log = logging.getLogger(__name__)

FORWARDED_ENV_PREFIXES = ("AWS_", "LGA_DIST_", "HF_")
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray treats the machine as one node, on 127.0.0.1


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
    ray_address: str | None = None


class Progress:
    """Requests scored / total, per actor; a bar on a terminal, a log line per round in job logs."""

    def __init__(self, total: int, done: int, enabled: bool, actors: int):
        from tqdm.auto import tqdm

        self.total, self.per_actor = total, [0] * max(actors, 1)
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=done, desc="scoring requests", unit="req",
                        disable=not (enabled and self.tty), mininterval=1.0)
        self.enabled, self.done = enabled, done

    def update(self, counts: Sequence[int]) -> None:
        for rank, count in enumerate(counts):
            self.per_actor[rank] += count
        self.done += sum(counts)
        self.bar.update(sum(counts))
        if len(self.per_actor) > 1:
            self.bar.set_postfix_str(" ".join(f"a{r}={n}" for r, n in enumerate(self.per_actor)), refresh=False)
        if self.enabled and not self.tty:
            per_actor = ", ".join(f"actor {r}: {n}" for r, n in enumerate(self.per_actor))
            print(f"scored {self.done}/{self.total} requests ({per_actor})", flush=True)

    def close(self) -> None:
        self.bar.close()


def resume_state(path: str, key: dict, n_layers: int) -> PartialScores:
    state = PartialScores.load(path, key, n_layers)
    if state is None:
        return PartialScores(key, n_layers)
    log.info("resuming from checkpoint %s: %d batches already scored", path, len(state.finished))
    return state


def score_in_process(scorer, proxy: Sequence, plan: BatchPlan, keep_rows: bool, state: PartialScores,
                     options: RunOptions) -> PartialScores:
    """The single-process core (``--actors 0``): same batches, same checkpoints, no Ray."""
    progress = Progress(plan.n_requests, _scored(state, plan), options.progress, actors=1)
    for count, batch_id in enumerate(plan.pending(state.finished), start=1):
        state.add(score_batch(scorer, proxy, plan, batch_id, keep_rows))
        progress.update([len(plan.indices(batch_id))])
        if count % options.checkpoint_every == 0:
            state.save(options.checkpoint_path)
    progress.close()
    return state


@contextlib.contextmanager
def ray_session(address: str | None, min_cpus: float) -> Iterator[None]:
    """Join the cluster at ``address`` / $RAY_ADDRESS (as under ``ray job submit``), else a private local one.

    The private instance listens on 127.0.0.1 only and is stopped on exit.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A private single-node Ray: without this Ray binds its services to the host's
        # external address even when told 127.0.0.1 (read when ray is first imported).
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a new instance even when `ray start` left a cluster on this machine, which
        # ray.init() would otherwise join (ignoring num_cpus is not allowed there).
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True,
                 num_cpus=max(os.cpu_count() or 1, int(min_cpus + 0.999)))
    try:
        yield
    finally:
        ray.shutdown()


def cluster_gpus_per_actor() -> float:
    """One GPU per actor when the joined cluster has GPUs, else none (CPU actors, gloo)."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def worker_env(use_gpu: bool) -> dict[str, str]:
    """The driver's S3/cache variables; CPU-only actors also tell DeepSpeed to use the CPU accelerator
    (with a GPU, DeepSpeed detects the accelerator itself)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def score_with_actors(spec: WorkerSpec, proxy: Sequence, state: PartialScores, group: GroupOptions,
                      options: RunOptions) -> tuple[PartialScores, int]:
    """Score every pending batch on an actor group; returns the state and the number of restarts."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    restarts = 0
    progress = Progress(spec.plan.n_requests, _scored(state, spec.plan), options.progress, group.actors)
    proxy_ref = ray.put(list(proxy))
    while pending := spec.plan.pending(state.finished):
        started = time.perf_counter()
        try:
            with ActorGroup(ScoringWorker, group.actors, group.resources, worker_env(spec.use_gpu)) as actors:
                host, port = ray.get(actors.actors[0].rendezvous_address.remote())
                ranks = actors.call("setup", [(host, port, spec, proxy_ref)] * group.actors)
                log.info("actor group ready in %.1fs: %s", time.perf_counter() - started,
                         ", ".join(f"rank {r['rank']} pid {r['pid']} on {r['device']}" for r in ranks))
                _check_same_model(ranks, state)
                for round_ in BatchPlan.rounds(pending, group.actors, options.checkpoint_every):
                    per_rank = actors.call("score", [(lane,) for lane in round_])
                    for results in per_rank:
                        for result in results:
                            state.add(result)
                    state.save(options.checkpoint_path)
                    progress.update([sum(len(spec.plan.indices(r.batch_id)) for r in results)
                                     for results in per_rank])
        except (RayActorError, RayTaskError) as err:
            restarts, reason = next_restart(err, restarts, group.max_restarts,
                                            f"the checkpoint {options.checkpoint_path} keeps the finished batches")
            state = resume_state(options.checkpoint_path, state.key, state.n_layers)
            log.warning("lost an actor (%s); tore the group down, starting a new one (restart %d/%d) and resuming "
                        "from the checkpoint with %d/%d batches done", reason, restarts, group.max_restarts,
                        len(state.finished), spec.plan.n_batches)
    progress.close()
    return state, restarts


def next_restart(err: Exception, restarts: int, max_restarts: int, kept: str) -> tuple[int, str]:
    """(restarts + 1, why) when ``err`` is a lost actor and restarts are left; else raise (``kept`` says
    what survives for a rerun)."""
    reason = lost_actor(err)
    if reason is None:
        raise err
    if restarts + 1 > max_restarts:
        raise ClusterError(f"actor group failed {restarts + 1} times, giving up (last: {reason}); {kept}") from err
    return restarts + 1, reason


def lost_actor(err: Exception) -> str | None:
    """Why the group lost a member, if ``err`` says it did (else None: a real failure to re-raise).

    An actor's ``UserError`` (e.g. a model it cannot load) is raised as itself, one line.
    """
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), UserError):
        raise err.cause from None
    if isinstance(err, RayActorError) or (isinstance(err, RayTaskError) and _lost_peer(err)):
        return str(err).splitlines()[0][:200]
    return None


def _lost_peer(err: Exception) -> bool:
    """A surviving rank's collective failing because a peer vanished (gloo/NCCL connection errors)."""
    text = str(err).lower()
    return any(s in text for s in ("connection closed", "connection reset", "broken pipe", "timed out",
                                   "nccl", "gloo"))


def _check_same_model(ranks: list[dict], state: PartialScores) -> None:
    fingerprints = {r["fingerprint"] for r in ranks}
    expected = state.key.get("model_fingerprint")
    if fingerprints != {expected}:
        raise ClusterError(f"actors loaded model(s) {sorted(fingerprints)} but the driver fingerprinted {expected}; "
                           f"the model changed during the run or nodes see different files")


def _scored(state: PartialScores, plan: BatchPlan) -> int:
    return sum(len(plan.indices(b)) for b in state.finished)
