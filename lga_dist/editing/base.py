"""What every editing method is given: a model it can read, write and restore, and the edit statistics.

The methods (ROME, MEMIT, AlphaEdit) are written against the few operations of
``EditOps`` (targets, keys, reads at the subject, weights, applying and
restoring deltas), not against a model object, so the same method code runs on a
model in this process (``EditContext``) and on a model sharded over Ray actors
with DeepSpeed ZeRO-3 (``lga_dist.distributed.editing.ShardedEditContext``); the
methods know nothing of Ray or DeepSpeed. FT-L trains the weights themselves, so
it needs the model in this process (``EditContext``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from lga_dist.editing.context import PostNorm, edit_keys, mlp_post_norm, read_at_subject
from lga_dist.editing.deltas import Snapshot, apply_deltas, save_edited
from lga_dist.editing.targets import compute_targets
from lga_dist.evaluation import evaluate_requests
from lga_dist.fluency import entropies
from lga_dist.models.adapters import Adapter, get_module


@runtime_checkable
class EditOps(Protocol):
    """What a locate-then-edit method may do with a model, wherever the model lives."""

    adapter: Adapter
    fingerprint: str

    def targets(self, requests: Sequence, site: str, hparams): ...
    def keys(self, requests: Sequence, layer: int, fact_token: str, average: str = "flat") -> torch.Tensor: ...
    def read_output(self, requests: Sequence, site: str, fact_token: str, average: str = "flat"
                    ) -> torch.Tensor: ...
    def second_moment(self, layer: int) -> torch.Tensor: ...
    def mlp_post_norm(self, layer: int) -> PostNorm | None: ...
    def prepare_statistics(self, layers: Sequence[int]) -> None: ...
    def apply(self, deltas: dict[str, torch.Tensor]) -> None: ...
    def read_weights(self, module_names: Sequence[str]) -> dict[str, torch.Tensor]: ...
    def write_weights(self, weights: dict[str, torch.Tensor]) -> None: ...
    def snapshot(self, module_names: Sequence[str]) -> Any: ...
    def evaluate(self, requests: Sequence) -> list[dict[str, float]]: ...
    def fluency(self, prompts: Sequence[str], new_tokens: int) -> list[float]: ...
    def save(self, path: str, records: Sequence) -> str: ...


@dataclasses.dataclass
class EditContext:
    """A model in this process, ready to edit. ``second_moment(layer)`` returns E[k k^T] (float64).

    ``second_moment`` is any callable; a ``SecondMoments`` also computes several layers in one pass
    when ``prepare_statistics`` names them before the edits need them.
    """

    model: torch.nn.Module
    tokenizer: Any
    adapter: Adapter
    fingerprint: str
    prefixes: list[str]
    second_moment: Callable[[int], torch.Tensor]
    device: torch.device = torch.device("cpu")

    def targets(self, requests: Sequence, site: str, hparams):
        """One target vector per request at module ``site``'s output (see ``editing.targets``)."""

        return compute_targets(self.model, self.tokenizer, self.adapter, requests, self.prefixes, site, hparams,
                               self.device)

    def keys(self, requests: Sequence, layer: int, fact_token: str, average: str = "flat") -> torch.Tensor:
        """(n, d_in) float64: the edited projection's input at each request's subject, averaged over the
        prefixed prompts as ``average`` says (``context_weights``)."""

        return edit_keys(self.model, self.tokenizer, self.adapter, requests, self.prefixes, layer, self.device,
                         fact_token, average)

    def read_output(self, requests: Sequence, site: str, fact_token: str, average: str = "flat") -> torch.Tensor:
        """(n, d) float64: module ``site``'s output at each request's subject, averaged as ``keys``."""

        return read_at_subject(self.model, self.tokenizer, self.adapter, requests, self.prefixes, site, "output",
                               self.device, fact_token=fact_token, average=average)

    def mlp_post_norm(self, layer: int) -> PostNorm | None:
        """The norm after layer ``layer``'s MLP output projection, if the family has one."""

        return mlp_post_norm(self.model, self.adapter, layer)

    def prepare_statistics(self, layers: Sequence[int]) -> None:
        """C of these layers ready before the edits ask for them one layer at a time."""

        prepare = getattr(self.second_moment, "prepare", None)
        if prepare is not None:
            prepare(layers)

    def apply(self, deltas: dict[str, torch.Tensor]) -> None:
        apply_deltas(self.model, self.adapter, deltas)

    def read_weights(self, module_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The modules' weights exactly as stored (dtype, layout), for checkpoints."""

        return {name: get_module(self.model, name).weight.detach().to("cpu").clone() for name in module_names}

    def write_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Put back weights ``read_weights`` returned."""

        with torch.no_grad():
            for name, weight in weights.items():
                get_module(self.model, name).weight.copy_(weight)

    def evaluate(self, requests: Sequence) -> list[dict[str, float]]:
        """Per-request CounterFact/zsRE metrics of the model as it is now."""

        return evaluate_requests(self.model, self.tokenizer, requests, self.device)

    def fluency(self, prompts: Sequence[str], new_tokens: int) -> list[float]:
        """The n-gram entropy of each prompt's greedy continuation (``lga_dist.fluency``)."""

        return entropies(self.model, self.tokenizer, prompts, self.device, new_tokens)

    def save(self, path: str, records: Sequence) -> str:
        """The model as edited, with its edits.jsonl manifest; returns the saved fingerprint."""

        return save_edited(self.model, self.tokenizer, path, records)

    def snapshot(self, module_names: Sequence[str]):
        """Something whose ``restore()`` puts these modules' weights back bit-exactly."""

        return Snapshot(self.model, module_names)
