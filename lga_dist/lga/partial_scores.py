"""Per-batch partial sums of a ranking run: what ranks send back, what checkpoints hold.

The proxy set is cut into fixed batches (``BatchPlan``) that do not depend on how
many ranks score them. Each finished batch contributes its float64 sums over its
requests; the layer scores are the sum of the batch sums in batch order. So the
ranking is the same for any number of actors, and for a run resumed from a
checkpoint, down to float64 rounding of identical numbers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any, Sequence

import numpy as np

from lga_dist.io.storage import atomic_write, exists, open_file, storage_errors
from lga_dist.lga.causal_tracing import CausalTracer, TraceOptions, TraceResult
from lga_dist.lga.scoring import LayerGradientScorer, RequestScores

# Per-request scores whose layer sums a run keeps: the signed gradient inner product, its cosine, and
# the new target's gradient norm. Which one ranks layers, and in which order, is the ranking's rule.
SCORES = ("dot", "cosine", "norm_new")
TRACE_SCORE = "aie"  # causal tracing's layer sum: indirect effects summed over requests (mean = AIE)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Batch b holds proxy requests [b*batch_size, (b+1)*batch_size)."""

    n_requests: int
    batch_size: int

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_requests / self.batch_size)

    def indices(self, batch_id: int) -> range:
        return range(batch_id * self.batch_size, min(self.n_requests, (batch_id + 1) * self.batch_size))

    def pending(self, finished: set[int]) -> list[int]:
        return [b for b in range(self.n_batches) if b not in finished]

    @staticmethod
    def rounds(pending: Sequence[int], world_size: int, steps_per_round: int) -> list[list[list[int | None]]]:
        """Deal pending batches round-robin to ranks, cut into rounds of ``steps_per_round`` passes.

        Every rank gets the same number of entries per round; ``None`` is a padding
        pass (a masked request), because ZeRO-3's parameter gathers are collectives
        that every rank must join.
        """
        steps = math.ceil(len(pending) / world_size)
        per_rank = [list(pending[rank::world_size]) + [None] * (steps - len(pending[rank::world_size]))
                    for rank in range(world_size)]
        return [[lane[start:start + steps_per_round] for lane in per_rank]
                for start in range(0, steps, steps_per_round)]


@dataclasses.dataclass
class BatchResult:
    """One finished batch: float64 sums over its requests, and its per-request rows (a few floats per request
    and layer, kept so a ranking can say how firm its pick is: ``lga_dist.lga.ranking.pick_shares``)."""

    batch_id: int
    sums: dict[str, np.ndarray]  # one (layers,) float64 sum per name in SCORES (LGA) or TRACE_SCORE
    rows: RequestScores | None = None  # LGA's per-request scores
    effects: np.ndarray | None = None  # causal tracing's per-request indirect effects (requests, layers)

    @staticmethod
    def from_scores(batch_id: int, scores: RequestScores) -> "BatchResult":
        return BatchResult(batch_id, {score: scores.per_request(score).sum(axis=0) for score in SCORES}, scores)

    @staticmethod
    def from_trace(batch_id: int, trace: TraceResult) -> "BatchResult":
        return BatchResult(batch_id, {TRACE_SCORE: trace.effects.sum(axis=0)}, effects=trace.effects)


class PartialScores:
    """The finished batches of one run, keyed by what the run computes (model, proxy, options)."""

    def __init__(self, key: dict[str, Any], n_layers: int):
        self.key = key
        self.n_layers = n_layers
        self.results: dict[int, BatchResult] = {}

    @property
    def finished(self) -> set[int]:
        return set(self.results)

    def add(self, result: BatchResult) -> None:
        for name, sums in result.sums.items():
            if sums.shape != (self.n_layers,):
                raise ValueError(f"batch {result.batch_id}: {name} has {sums.shape[0]} layers, "
                                 f"expected {self.n_layers}")
        self.results[result.batch_id] = result

    def layer_scores(self, score: str) -> np.ndarray:
        """S_l: batch sums added in batch order (float64)."""
        if score not in SCORES + (TRACE_SCORE,):
            raise ValueError(f"unknown score {score!r}; choose from {SCORES + (TRACE_SCORE,)}")
        total = np.zeros(self.n_layers, dtype=np.float64)
        for batch_id in sorted(self.results):
            total += self.results[batch_id].sums[score]
        return total

    def request_scores(self) -> RequestScores:
        """LGA's per-request rows in proxy order."""
        missing = [b for b, r in self.results.items() if r.rows is None]
        if missing:
            raise ValueError(f"batches {missing[:5]} hold no LGA per-request rows")
        return RequestScores.concat([self.results[b].rows for b in sorted(self.results)])

    def per_request(self, score: str) -> np.ndarray:
        """(requests, layers) values of one score in proxy order: an LGA score of SCORES, or TRACE_SCORE."""
        if score != TRACE_SCORE:
            return self.request_scores().per_request(score)
        missing = [b for b, r in self.results.items() if r.effects is None]
        if missing:
            raise ValueError(f"batches {missing[:5]} hold no causal-tracing effects")
        return np.concatenate([self.results[b].effects for b in sorted(self.results)])

    # --- checkpoint file -------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write the whole state atomically (local or s3://): a crash leaves the previous checkpoint."""
        ids = sorted(self.results)
        arrays: dict[str, np.ndarray] = {
            "key": np.array(json.dumps(self.key, sort_keys=True)),
            "batch_ids": np.array(ids, dtype=np.int64),
            **{f"sum_{name}": np.array([self.results[b].sums[name] for b in ids]).reshape(len(ids), self.n_layers)
               for name in (sorted(self.results[ids[0]].sums) if ids else [])},
        }
        if ids and all(self.results[b].rows is not None for b in ids):
            arrays["row_batch"] = np.concatenate([np.full(len(self.results[b].rows.dot), b) for b in ids])
            for field in dataclasses.fields(RequestScores):
                arrays["row_" + field.name] = np.concatenate([getattr(self.results[b].rows, field.name) for b in ids])
        if ids and all(self.results[b].effects is not None for b in ids):
            arrays["effect_batch"] = np.concatenate([np.full(len(self.results[b].effects), b) for b in ids])
            arrays["effects"] = np.concatenate([self.results[b].effects for b in ids])
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_write(path, "wb") as handle:
            handle.write(buffer.getvalue())

    @staticmethod
    def load(path: str, key: dict[str, Any], n_layers: int) -> "PartialScores | None":
        """The checkpoint at ``path`` if it belongs to a run with this key, else None."""
        if not exists(path):
            return None
        with storage_errors(path), open_file(path, "rb") as handle:
            data = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        if json.loads(str(data["key"])) != json.loads(json.dumps(key, sort_keys=True)):
            return None
        names = [name[len("sum_"):] for name in data.files if name.startswith("sum_")]
        if len(data["batch_ids"]) and not names:
            return None  # written by an older version that kept its sums differently: start over
        state = PartialScores(key, n_layers)
        for index, batch_id in enumerate(data["batch_ids"].tolist()):
            rows = effects = None
            if "row_batch" in data.files:
                take = data["row_batch"] == batch_id
                rows = RequestScores(*(data["row_" + f.name][take] for f in dataclasses.fields(RequestScores)))
            if "effect_batch" in data.files:
                effects = data["effects"][data["effect_batch"] == batch_id]
            state.add(BatchResult(batch_id, {name: data[f"sum_{name}"][index] for name in names}, rows, effects))
        return state


SELECTORS = ("lga", "cma")


def open_scorer(model, tokenizer, adapter, n_layers: int, selector: str, param_set: str, trace: TraceOptions,
                proxy: Sequence, device):
    """The scorer a selector scores batches with, to be entered once (``with``): LGA's gradient hooks, or
    causal tracing with the noise scale measured once on the whole proxy (the same for every batch and rank)."""
    if selector == "lga":
        return LayerGradientScorer(model, tokenizer, adapter, n_layers, param_set, device)
    if selector == "cma":
        tracer = CausalTracer(model, tokenizer, adapter, n_layers, device)
        return tracer.scorer(trace, tracer.noise_std(proxy))
    raise ValueError(f"unknown selector {selector!r}; choose from {SELECTORS}")


def score_batch(scorer, proxy: Sequence, plan: BatchPlan, batch_id: int | None) -> BatchResult | None:
    """Score one planned batch with an LGA or tracing scorer (``open_scorer``); ``None`` runs a padding pass
    (the same passes on one masked request, for ZeRO-3's lock-step collectives) and returns None."""
    if batch_id is None:
        scorer.score([proxy[0]], valid=[False])
        return None
    requests = [proxy[i] for i in plan.indices(batch_id)]
    scores = scorer.score(requests)
    if isinstance(scores, TraceResult):
        return BatchResult.from_trace(batch_id, scores)
    return BatchResult.from_scores(batch_id, scores)
