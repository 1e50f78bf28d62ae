"""Editing methods, one module and one hyper-parameter dataclass each, all taking the layer(s) to edit.

``METHODS[name]`` gives the hyper-parameter class and the function
``apply(ctx, requests, layers, hparams) -> EditResult``; the result's deltas are
not applied yet (``apply_deltas`` does that), so callers decide what to keep.
``edit_each`` gives independent one-request edits (the papers' per-request
protocol), sharing the batched work where the method allows it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from lga_dist.editing.alphaedit import AlphaEditHyperParams, alphaedit_each, apply_alphaedit
from lga_dist.editing.base import EditContext
from lga_dist.editing.deltas import EditRecord, EditResult, Snapshot, apply_deltas, save_edited
from lga_dist.editing.ft import FtHyperParams, apply_ft
from lga_dist.editing.memit import MemitHyperParams, apply_memit, memit_each
from lga_dist.editing.rome import RomeHyperParams, apply_rome, rome_each
from lga_dist.requests import EditRequest


@dataclasses.dataclass(frozen=True)
class Method:
    hparams: type
    apply: Callable[..., EditResult]
    batched: bool  # edits many requests in one update (else one request per update)
    each: Callable[..., list[EditResult]] | None = None  # batched independent one-request edits, if any


METHODS: dict[str, Method] = {
    "rome": Method(RomeHyperParams, apply_rome, batched=False, each=rome_each),
    "memit": Method(MemitHyperParams, apply_memit, batched=True, each=memit_each),
    "alphaedit": Method(AlphaEditHyperParams, apply_alphaedit, batched=True, each=alphaedit_each),
    "ft": Method(FtHyperParams, apply_ft, batched=True),
}


def edit_each(method: Method, ctx: EditContext, requests: Sequence[EditRequest], layers: Sequence[int],
              hparams) -> list[EditResult]:
    """One edit per request, each computed from the model as it is now; none is applied."""
    if method.each is not None:
        return method.each(ctx, requests, layers, hparams)
    return [method.apply(ctx, [request], layers, hparams) for request in requests]

__all__ = ["METHODS", "EditContext", "EditRecord", "EditResult", "Method", "Snapshot", "apply_deltas",
           "edit_each", "save_edited"]
