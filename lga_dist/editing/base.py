"""What every editing method is given: the model, where its statistics come from, and the requests."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from lga_dist.models.adapters import Adapter


@dataclasses.dataclass
class EditContext:
    """A model ready to edit. ``second_moment(layer)`` returns E[k k^T] of that layer's edit keys (float64)."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: Adapter
    fingerprint: str
    prefixes: list[str]
    second_moment: Callable[[int], torch.Tensor]
    device: torch.device = torch.device("cpu")

    def weight(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s edited weight, (out, in) orientation (a view: writing to it edits the model)."""
        from lga_dist.models.adapters import get_module

        return self.adapter.oriented_weight(get_module(self.model, self.adapter.mlp_out_name(layer)))
