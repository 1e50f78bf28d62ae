"""Editing a model sharded over Ray actors with DeepSpeed ZeRO-3.

``ShardedEditContext`` offers the operations of ``lga_dist.editing.EditContext``
on the driver, so ROME, MEMIT and AlphaEdit run unchanged on top of it:

* per-request work (target optimisation, keys, reads at the subject, evaluation)
  is split across the ranks, each rank running its share as one batched
  forward/backward on its ZeRO-3 shard; shares are padded to equal length, and
  target optimisation and evaluation keep every rank stepping together, because
  each ZeRO-3 forward is a collective;
* the per-layer solve runs once, in float64, on the driver, and the resulting
  delta is sent to every rank and applied through ``GatheredParameters``, so
  every partition receives the same update;
* snapshots are taken and restored per rank on the partitions they hold.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from lga_dist.distributed.group import ActorGroup
from lga_dist.distributed.worker import RankActor
from lga_dist.distributed.zero import load_sharded_model
from lga_dist.editing.base import EditContext
from lga_dist.editing.context import PostNorm, context_prefixes, prefixes_path
from lga_dist.editing.covariance import SecondMoments
from lga_dist.editing.deltas import Snapshot, save_edited
from lga_dist.editing.targets import Targets, compute_targets
from lga_dist.evaluation import evaluate_requests, query_count
from lga_dist.fluency import entropies
from lga_dist.io.storage import exists
from lga_dist.models import DTYPES
from lga_dist.models.adapters import get_module

EVAL_BATCH = 64


@dataclasses.dataclass(frozen=True)
class EditWorkerSpec:
    """What every rank needs to load its shard and compute the statistics the edits use."""

    model: str
    dtype: str
    deepspeed_config: dict[str, Any]
    cov_tokens: int
    stats_dir: str | None
    use_gpu: bool
    threads: int = 1
    timeout_s: float = 1800.0


class EditWorker(RankActor):
    """One rank: a ZeRO-3 shard of the model and the local ``EditContext`` over it."""

    def setup(self, rendezvous: tuple[str, int], spec: EditWorkerSpec, texts: list[str]) -> dict[str, Any]:
        self.device = self.join_group(rendezvous, spec.threads, spec.timeout_s)
        self.loaded, self.engine, self._hf_deepspeed_config = load_sharded_model(
            spec.model, DTYPES[spec.dtype], spec.deepspeed_config)
        model, loaded = self.engine.module, self.loaded
        # Generation is collective too: all ranks generate, unless every one of them has the cached prefixes.
        cached = self._everywhere(exists(prefixes_path(loaded.fingerprint)))
        prefixes = context_prefixes(model, loaded.tokenizer, loaded.fingerprint, device=self.device,
                                    recompute=not cached)
        self.moments = SecondMoments(model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, texts,
                                     spec.cov_tokens, spec.stats_dir, self.device, progress=False,
                                     share=(self.rank, self.world_size), reduce=self._sum, agree=self._everywhere)
        self.ctx = EditContext(model, loaded.tokenizer, loaded.adapter, loaded.fingerprint, prefixes,
                               self.moments, self.device)
        self.snapshots: dict[int, Any] = {}
        return {"rank": self.rank, "pid": os.getpid(), "fingerprint": loaded.fingerprint,
                "n_layers": loaded.n_layers, "device": str(self.device), "model_id": loaded.model_id}

    def _reduce(self, number: int, op) -> int:
        value = torch.tensor([int(number)], device=self.device)
        dist.all_reduce(value, op=op)
        return int(value.item())

    def _most(self, number: int) -> int:
        return self._reduce(number, dist.ReduceOp.MAX)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _anywhere(self, flag: bool) -> bool:
        return bool(self._most(flag))

    def _everywhere(self, flag: bool) -> bool:
        return bool(self._reduce(flag, dist.ReduceOp.MIN))

    def targets(self, requests: Sequence, site: str, hparams) -> Targets:
        ctx = self.ctx
        return compute_targets(ctx.model, ctx.tokenizer, ctx.adapter, requests, ctx.prefixes, site, hparams,
                               ctx.device, ranks_max=self._most)

    def keys(self, requests: Sequence, layer: int, fact_token: str, average: str) -> torch.Tensor:
        return self.ctx.keys(requests, layer, fact_token, average)

    def read_output(self, requests: Sequence, site: str, fact_token: str, average: str) -> torch.Tensor:
        return self.ctx.read_output(requests, site, fact_token, average)

    def _gathered(self, module_names: Sequence[str], modifier_rank: int | None = None):
        import deepspeed


        weights = [get_module(self.ctx.model, name).weight for name in module_names]
        return deepspeed.zero.GatheredParameters(weights, modifier_rank=modifier_rank)

    def mlp_post_norm(self, layer: int) -> PostNorm | None:
        name = self.ctx.adapter.mlp_post_norm_name(layer)
        if name is None:
            return None
        with self._gathered([name]):
            norm = self.ctx.mlp_post_norm(layer)
        return norm if self.rank == 0 else None

    def apply(self, deltas: dict[str, torch.Tensor]) -> None:
        """Every rank adds the same delta to the gathered weight; rank 0's result is re-partitioned."""
        with self._gathered(list(deltas), modifier_rank=0):
            self.ctx.apply(deltas)

    def read_weights(self, module_names: Sequence[str]) -> dict[str, torch.Tensor] | None:
        with self._gathered(module_names):
            weights = self.ctx.read_weights(module_names)
        return weights if self.rank == 0 else None

    def write_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with self._gathered(list(weights), modifier_rank=0):
            self.ctx.write_weights(weights)

    def snapshot(self, token: int, module_names: Sequence[str]) -> None:
        """This rank's partitions of the modules' weights (ZeRO-3 keeps them in ``ds_tensor``), for restore."""
        self.snapshots[token] = Snapshot(self.ctx.model, module_names, held=lambda parameter: parameter.ds_tensor)

    def restore(self, token: int) -> None:
        self.snapshots.pop(token).restore()

    def prepare_statistics(self, layers: Sequence[int]) -> list[int]:
        """C of the missing layers in one pass, this rank taking every world-th batch of the corpus."""
        return self.moments.prepare(layers)

    def driver_second_moment(self, layer: int) -> torch.Tensor | None:
        mom2 = self.moments(layer)
        return mom2 if self.rank == 0 else None

    def evaluate(self, requests: Sequence, n_batches: int) -> list[dict[str, float]]:
        return evaluate_requests(self.ctx.model, self.ctx.tokenizer, requests, self.device, EVAL_BATCH,
                                 min_batches=n_batches)

    def fluency(self, prompts: Sequence[str], new_tokens: int) -> list[float]:
        """Every rank generates its share (of equal length: the same steps, each a collective)."""
        return entropies(self.ctx.model, self.ctx.tokenizer, prompts, self.device, new_tokens, synced=True)

    def save(self, path: str, records: list) -> str | None:
        """The consolidated weights (gathered module by module onto rank 0), written by rank 0."""

        state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        return save_edited(self.loaded.model, self.loaded.tokenizer, path, records, state_dict=state_dict)


def split_evenly(items: Sequence, parts: int) -> list[tuple[list, int]]:
    """``parts`` contiguous shares of equal length: (share padded with repeats, how many are real)."""
    size = max(1, math.ceil(len(items) / parts))
    shares = []
    for rank in range(parts):
        real = list(items[rank * size:(rank + 1) * size])
        filler = real[-1:] or list(items[:1])
        shares.append((real + filler * (size - len(real)), len(real)))
    return shares


class ShardedEditContext:
    """``EditContext``'s operations on a model sharded over ``group`` (see the module docstring)."""

    model = None  # no full model in this process: methods that need one (FT-L) run with --actors 0

    def __init__(self, group: ActorGroup, adapter, fingerprint: str):
        self.group, self.adapter, self.fingerprint = group, adapter, fingerprint
        self._mom2: dict[int, torch.Tensor] = {}
        self._post_norms: dict[int, PostNorm] = {}  # the norms are never edited: one gather per layer
        self._tokens = itertools.count()

    def _per_request(self, method: Callable, requests: Sequence, *args) -> list:
        shares = split_evenly(requests, self.group.size)
        results = self.group.call(method, [(share, *args) for share, _ in shares])
        return [(result, real) for result, (_, real) in zip(results, shares)]

    def targets(self, requests: Sequence, site: str, hparams) -> Targets:
        parts = self._per_request(EditWorker.targets, requests, site, hparams)
        return Targets.concatenate([t.rows(range(n)) for t, n in parts])

    def keys(self, requests: Sequence, layer: int, fact_token: str, average: str = "flat") -> torch.Tensor:
        return torch.cat([k[:n] for k, n in self._per_request(EditWorker.keys, requests, layer, fact_token,
                                                              average)])

    def read_output(self, requests: Sequence, site: str, fact_token: str, average: str = "flat") -> torch.Tensor:
        return torch.cat([v[:n] for v, n in self._per_request(EditWorker.read_output, requests, site, fact_token,
                                                              average)])

    def mlp_post_norm(self, layer: int) -> PostNorm | None:
        if self.adapter.mlp_post_norm_name(layer) is None:
            return None
        if layer not in self._post_norms:
            self._post_norms[layer] = self.group.call(EditWorker.mlp_post_norm, [(layer,)] * self.group.size)[0]
        return self._post_norms[layer]

    def apply(self, deltas: dict[str, torch.Tensor]) -> None:
        self.group.call(EditWorker.apply, [(deltas,)] * self.group.size)

    def read_weights(self, module_names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.group.call(EditWorker.read_weights, [(list(module_names),)] * self.group.size)[0]

    def write_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.group.call(EditWorker.write_weights, [(weights,)] * self.group.size)

    def snapshot(self, module_names: Sequence[str]) -> "_ShardedSnapshot":
        token = next(self._tokens)
        self.group.call(EditWorker.snapshot, [(token, list(module_names))] * self.group.size)
        return _ShardedSnapshot(self.group, token)

    def prepare_statistics(self, layers: Sequence[int]) -> None:
        self.group.call(EditWorker.prepare_statistics, [(list(layers),)] * self.group.size)

    def second_moment(self, layer: int) -> torch.Tensor:
        if layer not in self._mom2:
            self._mom2[layer] = self.group.call(EditWorker.driver_second_moment, [(layer,)] * self.group.size)[0]
        return self._mom2[layer]

    def evaluate(self, requests: Sequence) -> list[dict[str, float]]:
        shares = split_evenly(requests, self.group.size)
        n_batches = max(math.ceil(query_count(share) / EVAL_BATCH) for share, _ in shares)
        results = self.group.call(EditWorker.evaluate, [(share, n_batches) for share, _ in shares])
        return [row for rows, (_, real) in zip(results, shares) for row in rows[:real]]

    def fluency(self, prompts: Sequence[str], new_tokens: int) -> list[float]:
        return [value for values, real in self._per_request(EditWorker.fluency, prompts, new_tokens)
                for value in values[:real]]

    def save(self, path: str, records: list) -> str:
        return self.group.call(EditWorker.save, [(path, records)] * self.group.size)[0]


@dataclasses.dataclass
class _ShardedSnapshot:
    group: ActorGroup
    token: int

    def restore(self) -> None:
        self.group.call(EditWorker.restore, [(self.token,)] * self.group.size)
