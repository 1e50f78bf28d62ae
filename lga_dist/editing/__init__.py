"""Editing methods, one module and one hyper-parameter dataclass each, all taking the layer(s) to edit.

``METHODS[name]`` gives the hyper-parameter class and the function
``apply(ctx, requests, layers, hparams) -> EditResult``; the result's deltas are
not applied yet (``apply_deltas`` does that), so callers decide what to keep.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from lga_dist.editing.alphaedit import AlphaEditHyperParams, apply_alphaedit
from lga_dist.editing.base import EditContext
from lga_dist.editing.deltas import EditRecord, EditResult, Snapshot, apply_deltas, save_edited
from lga_dist.editing.ft import FtHyperParams, apply_ft
from lga_dist.editing.memit import MemitHyperParams, apply_memit
from lga_dist.editing.rome import RomeHyperParams, apply_rome


@dataclasses.dataclass(frozen=True)
class Method:
    hparams: type
    apply: Callable[..., EditResult]
    batched: bool  # edits many requests in one update (else one request per update)


METHODS: dict[str, Method] = {
    "rome": Method(RomeHyperParams, apply_rome, batched=False),
    "memit": Method(MemitHyperParams, apply_memit, batched=True),
    "alphaedit": Method(AlphaEditHyperParams, apply_alphaedit, batched=True),
    "ft": Method(FtHyperParams, apply_ft, batched=True),
}

__all__ = ["METHODS", "EditContext", "EditRecord", "EditResult", "Method", "Snapshot", "apply_deltas",
           "save_edited"]
