"""A gang of N scoring actors on a Ray placement group, started together and torn down together.

The actors are one torch.distributed group, so they live and die as a unit: if
one is lost, the others are stuck in a collective, and the only sound recovery is
to kill them all and start a new group (``lga_dist.distributed.run`` does that).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

from lga_dist.errors import UserError

log = logging.getLogger(__name__)


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot host the group as asked."""


@dataclasses.dataclass(frozen=True)
class ActorResources:
    cpus: float = 1.0
    gpus: float = 0.0

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


def get_result(ref: Any) -> Any:
    """``ray.get``, with an actor's ``UserError`` (a model it cannot load, a bad request file...) raised as
    itself, so it reaches the user as the job's one-line error instead of a Ray traceback."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as err:
        if isinstance(getattr(err, "cause", None), UserError):
            raise err.cause from None
        raise


class ActorGroup:
    """``with ActorGroup(Worker, ...) as group: group.call(Worker.score, per_rank_args)``.

    Methods are named by the worker class's own function (``Worker.score``), not by a string, so
    readers and tools can follow a call to the code it runs."""

    def __init__(self, worker_class: type, size: int, resources: ActorResources, env: dict[str, str],
                 placement_timeout_s: float = 300.0):
        self.worker_class, self.size, self.resources, self.env = worker_class, size, resources, env
        self.placement_timeout_s = placement_timeout_s
        self.actors: list = []
        self.placement_group = None

    def __enter__(self) -> "ActorGroup":
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.placement_group = placement_group([self.resources.bundle()] * self.size, strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=self.placement_timeout_s)
        if not ready:
            available = ray.available_resources()
            self.__exit__(None, None, None)
            raise ClusterError(
                f"the Ray cluster cannot place {self.size} actor(s) with {self.resources.bundle()} each within "
                f"{self.placement_timeout_s:.0f}s (available: CPU {available.get('CPU', 0):g}, "
                f"GPU {available.get('GPU', 0):g}); lower --actors or --cpus-per-actor/--gpus-per-actor")
        remote = ray.remote(self.worker_class)
        for rank in range(self.size):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.placement_group,
                                                        placement_group_bundle_index=rank)
            self.actors.append(remote.options(
                num_cpus=self.resources.cpus, num_gpus=self.resources.gpus, scheduling_strategy=strategy,
                runtime_env={"env_vars": self.env}, max_restarts=0, name=None,
            ).remote(rank, self.size))
        return self

    def call(self, method: Callable, per_rank_args: Sequence[tuple] | None = None, **shared: Any) -> list:
        """Call ``method`` (a function of the worker class) on every rank; the results in rank order.

        Results are collected as they arrive, so a rank that dies surfaces at once
        as ``ray.exceptions.RayActorError`` even while the others hang in a collective.
        """
        import ray

        args = per_rank_args or [()] * self.size
        refs = [getattr(actor, method.__name__).remote(*a, **shared) for actor, a in zip(self.actors, args)]
        results: dict = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[done[0]] = get_result(done[0])
        return [results[ref] for ref in refs]

    def call_one(self, method: Callable, *args: Any) -> Any:
        """Call ``method`` on rank 0 only (e.g. the rendezvous address)."""
        return get_result(getattr(self.actors[0], method.__name__).remote(*args))

    def __exit__(self, *exc) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as err:  # already dead: nothing to stop
                log.debug("could not kill actor: %s", err)
        self.actors.clear()
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
