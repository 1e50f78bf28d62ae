"""One rank of the scoring group: a Ray actor holding a ZeRO-3 shard of the model.

Shaped like the Ray launchers Ray + DeepSpeed users know (OpenRLHF's
``DistributedTorchRayActor``): rank 0 names the rendezvous address, every actor
sets MASTER_ADDR/PORT, RANK and WORLD_SIZE, joins one torch.distributed group
and then loads its shard. The LGA scorer from ``lga_dist.lga.scoring`` runs inside,
unchanged, on the engine's module.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import sys
import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist

from lga_dist.devices import peak_rss_gb
from lga_dist.distributed.zero import load_sharded_model, partition_sizes
from lga_dist.lga.causal_tracing import TraceOptions
from lga_dist.lga.partial_scores import BatchPlan, BatchResult, open_scorer, score_batch
from lga_dist.models import DTYPES


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to load its shard and score; the same for every rank."""

    model: str
    dtype: str
    param_set: str
    deepspeed_config: dict[str, Any]
    plan: BatchPlan
    use_gpu: bool
    threads: int = 1
    timeout_s: float = 1800.0
    selector: str = "lga"
    trace: TraceOptions = TraceOptions()


def stdout_to_stderr() -> None:
    """In an actor: everything it prints (DeepSpeed's accelerator and op-build lines, compiler output) goes
    to stderr, which Ray forwards to the job's stderr, so the job's stdout stays tables and the summary."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RankActor:
    """One rank of a torch.distributed group of Ray actors (``ActorGroup`` calls every rank in step)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        stdout_to_stderr()

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_gb(self) -> float:
        """This rank's peak resident memory so far: what ``--plan`` predicts per actor."""
        return peak_rss_gb()

    def rendezvous_address(self) -> tuple[str, int]:
        """Called on rank 0 only: the address Ray knows this node by, and a free port for the group's store."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        host = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
        return host, free_port(host)

    def join_group(self, rendezvous: tuple[str, int], threads: int, timeout_s: float):
        """Join the process group on the node's accelerator: CPU (DS_ACCELERATOR=cpu: gloo) or GPUs (NCCL)."""


        master_addr, master_port = rendezvous
        # DeepSpeed still calls the deprecated spelling of all-gather; the warning says nothing actionable.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        torch.set_num_threads(threads)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False,
                                   init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                   world_size=self.world_size, timeout=dt.timedelta(seconds=timeout_s))
        return torch.device(accelerator.current_device_name())

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class ScoringWorker(RankActor):
    """Methods are called by ``ActorGroup`` on every rank in step; see ``lga_dist.distributed.group``."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.scorer = None

    def setup(self, rendezvous: tuple[str, int], spec: WorkerSpec, proxy: Sequence) -> dict[str, Any]:
        """Join the process group, load this rank's shard, open the selector's scorer (LGA hooks or tracing)."""

        device = self.join_group(rendezvous, spec.threads, spec.timeout_s)
        self.spec, self.proxy = spec, proxy
        self.loaded, self.engine, self._hf_deepspeed_config = load_sharded_model(
            spec.model, DTYPES[spec.dtype], spec.deepspeed_config)
        self.scorer = open_scorer(self.engine.module, self.loaded.tokenizer, self.loaded.adapter,
                                  self.loaded.n_layers, spec.selector, spec.param_set, spec.trace, proxy,
                                  device).__enter__()  # left in shutdown()
        return {"rank": self.rank, "pid": os.getpid(), "fingerprint": self.loaded.fingerprint,
                "n_layers": self.loaded.n_layers, "device": str(device)}

    def score(self, batch_ids: Sequence[int | None]) -> list[BatchResult]:
        """Score this rank's batches of one round (``None``: a padding pass)."""
        results = [score_batch(self.scorer, self.proxy, self.spec.plan, b) for b in batch_ids]
        return [r for r in results if r is not None]

    def partition_sizes(self) -> dict[str, tuple[int, int]]:
        return partition_sizes(self.engine.module)

    def shutdown(self) -> None:
        if self.scorer is not None:
            self.scorer.__exit__(None, None, None)
        super().shutdown()
