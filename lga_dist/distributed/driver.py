"""One driver for every actor group the jobs start: placement, rendezvous, setup, the model check, restarts.

Ranking (ZeRO-3 scoring ranks), bulk edit (ZeRO-3 editing ranks) and the
validation grid (independent full-model workers) all start their actors here:
``run_on_group`` places the gang, hands rank 0's rendezvous address to every rank
of a torch.distributed group, calls the worker's ``setup``, checks that every
actor loaded the model the driver fingerprinted, runs the caller's work, and
when an actor is lost tears the whole group down and runs the work again on a
new one (the work resumes from what the caller checkpointed), up to
``max_restarts`` times. Ray itself is joined or started by ``ray_session``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Callable, Iterator, TypeVar

import torch

from lga_dist.distributed.group import ActorGroup, ActorResources, ClusterError
from lga_dist.distributed.worker import RankActor
from lga_dist.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

FORWARDED_ENV_PREFIXES = ("AWS_", "LGA_DIST_", "HF_")
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray treats the machine as one node, on 127.0.0.1
CPU_COMM_OP = "deepspeed_shm_comm"  # the op DeepSpeed builds on first use of its CPU accelerator


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """The actors to start and what they must agree on."""

    worker: type             # the actor class; its ``setup(rendezvous, *setup_args)`` loads the model
    size: int
    resources: ActorResources
    fingerprint: str         # the model the driver read; every actor must have loaded the same weights
    max_restarts: int = 3
    collective: bool = True  # one torch.distributed group (ZeRO-3 ranks): rank 0 names the rendezvous

    @property
    def use_gpu(self) -> bool:
        return self.resources.gpus > 0


def run_on_group(spec: GroupSpec, setup_args: tuple, work: Callable[[ActorGroup], T], kept: str) -> tuple[T, int]:
    """``work(group)`` on a ready group, again on a new group after a lost actor; (its result, restarts).

    ``kept`` says what survives a failure for a rerun (a checkpoint, committed batches), for the message
    given when the restarts run out."""

    restarts = 0
    if spec.collective and not spec.use_gpu and not cpu_comm_op_built():
        print("first ZeRO-3 run on CPU here: DeepSpeed JIT-builds its shared-memory communication op "
              "(deepspeed_shm_comm, about 30-45 s); it is cached and happens once", flush=True)
    while True:
        started = time.perf_counter()
        try:
            with ActorGroup(spec.worker, spec.size, spec.resources, worker_env(spec.use_gpu)) as group:
                rendezvous = group.call_one(RankActor.rendezvous_address) if spec.collective else None
                ranks = group.call(spec.worker.setup, [(rendezvous, *setup_args)] * spec.size)
                check_same_model(ranks, spec.fingerprint)
                kind = "ZeRO-3" if spec.collective else spec.worker.__name__
                print(f"{spec.size} {kind} actor(s) ready in {time.perf_counter() - started:.1f}s: " + ", ".join(
                    f"rank {r['rank']} pid {r['pid']} on {r['device']}" for r in ranks), flush=True)
                return work(group), restarts
        except Exception as err:  # noqa: BLE001 - only a lost actor is retried, the rest re-raised
            restarts, reason = next_restart(err, restarts, spec.max_restarts, kept)
            log.warning("lost an actor (%s); tore the group down and starting a new one (restart %d/%d); %s",
                        reason, restarts, spec.max_restarts, kept)


def cpu_comm_op_built() -> bool:
    """Whether DeepSpeed's CPU communication op is already in torch's extension cache (the folder torch's
    cpp_extension builds into: $TORCH_EXTENSIONS_DIR, else <cache>/torch_extensions/py<ver>_<cpu|cuXY>/)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(cache, "torch_extensions")
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    build = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{flavour}"
    return os.path.exists(os.path.join(root, build, CPU_COMM_OP, CPU_COMM_OP + ".so"))


def check_same_model(ranks: list[dict], fingerprint: str) -> None:
    """Every actor holds the weights the driver fingerprinted (not a file changed mid-run or another node's copy)."""
    found = {r["fingerprint"] for r in ranks}
    if found != {fingerprint}:
        raise ClusterError(f"actors loaded model(s) {sorted(found)} but the driver fingerprinted {fingerprint}; "
                           f"the model changed during the run or nodes see different files")


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


def next_restart(err: Exception, restarts: int, max_restarts: int, kept: str) -> tuple[int, str]:
    """(restarts + 1, why) when ``err`` is a lost actor and restarts are left; else raise (``kept`` says
    what survives for a rerun). An actor Ray's memory monitor killed is not restarted: the same work
    would need the same memory again."""
    from ray.exceptions import OutOfMemoryError

    if isinstance(err, OutOfMemoryError) or isinstance(getattr(err, "cause", None), OutOfMemoryError):
        raise ClusterError("Ray's memory monitor killed an actor: the node's memory passed Ray's threshold "
                           "(RAY_memory_usage_threshold, default 0.95). Give each actor more of the node "
                           f"(--cpus-per-actor, fewer actors per node), use smaller batches, or free memory; {kept}"
                           ) from err
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
