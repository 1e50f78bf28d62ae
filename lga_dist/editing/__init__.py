"""Editing methods, one module and one hyper-parameter dataclass each, all taking the layer(s) to edit.

``METHODS[name]`` gives the hyper-parameter class and the function
``apply(ctx, requests, layers, hparams) -> EditResult``; the result's deltas are
not applied yet (``apply_deltas`` does that), so callers decide what to keep.
``edit_each`` gives independent one-request edits (the papers' per-request
protocol), sharing the batched work where the method allows it.

One edit semantics for every job: a batch is one update computed from the
weights as they are before it (``apply_batch``); batches apply one after
another. MEMIT, AlphaEdit and FT-L solve for the batch jointly; ROME's
independent rank-one updates, each from the same weights, are summed (a batch
of one request is ROME's own sequential protocol). The validation grid edits
every request alone from the unedited model: ``apply_batch`` of one request.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from lga_dist.editing.alphaedit import AlphaEditHyperParams, PreservedKeys, alphaedit_each, apply_alphaedit
from lga_dist.editing.base import EditContext, EditOps
from lga_dist.editing.deltas import EditRecord, EditResult, Snapshot, apply_deltas, make_result, save_edited
from lga_dist.editing.ft import FtHyperParams, apply_ft
from lga_dist.editing.memit import MemitHyperParams, apply_memit, memit_each
from lga_dist.editing.rome import RomeHyperParams, apply_rome, rome_each
from lga_dist.errors import UserError
from lga_dist.io.requests import EditRequest


# Bumped whenever the edits a method computes change (the target loop, a solve): validation grids and bulk-edit
# progress record it, so a resumed run never mixes edits of two versions. 2: the target optimisation, ROME's
# update and MEMIT's keys and residuals as the authors' reference code computes them.
EDIT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Method:
    hparams: type
    apply: Callable[..., EditResult]
    batched: bool  # edits many requests in one update (else one request per update)
    each: Callable[..., list[EditResult]] | None = None  # batched independent one-request edits, if any
    uses_statistics: bool = True  # weighs its update by C = E[k k^T] of the edited layers
    sequential: bool = False  # keeps the keys of earlier batches (``preserved`` in apply_batch)


METHODS: dict[str, Method] = {
    "rome": Method(RomeHyperParams, apply_rome, batched=False, each=rome_each),
    "memit": Method(MemitHyperParams, apply_memit, batched=True, each=memit_each),
    "alphaedit": Method(AlphaEditHyperParams, apply_alphaedit, batched=True, each=alphaedit_each, sequential=True),
    "ft": Method(FtHyperParams, apply_ft, batched=True, uses_statistics=False),
}


WINDOW_ALIGNS = ("end", "center")


class LayerSpecError(UserError, ValueError):
    """A --layers value that names no layer of the model."""


def parse_layers(text: str, n_layers: int | None = None, model_id: str = "the model") -> list[int]:
    """--layers 'L', 'L1,L2' or 'A-B'; with ``n_layers``, also checked against the model."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            layers = list(range(first, last + 1))
        else:
            layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError as err:
        raise LayerSpecError(f"--layers {text!r}: use 'L', 'L1,L2' or 'A-B'") from err
    if not layers:
        raise LayerSpecError(f"--layers {text!r}: no layer given")
    if n_layers is not None and not 0 <= min(layers) <= max(layers) < n_layers:
        raise LayerSpecError(f"--layers {text}: {model_id} has layers 0-{n_layers - 1}")
    return layers


def window_size(method: str, window: int) -> int:
    """How many layers an edit with ``method`` rewrites: ROME and FT-L one, MEMIT and AlphaEdit ``window``."""
    return window if METHODS[method].batched and method != "ft" else 1


def edit_window(golden: int, method: str, window: int, n_layers: int, align: str = "end") -> list[int]:
    """The layers an edit at ``golden`` rewrites: the one rule shared by edit, bulk-edit and the validation grid.

    ROME and FT-L edit the golden layer alone. MEMIT/AlphaEdit edit ``window`` consecutive layers ending at
    it (``align='end'``, MEMIT's layout) or centred on it, shifted to fit inside the model rather than cut:
    near layer 0 a window of 3 at golden layer 1 is [0, 1, 2], never the shorter [0, 1], so every candidate
    is measured with as many edited layers as bulk-edit would apply."""
    if align not in WINDOW_ALIGNS:
        raise ValueError(f"unknown window alignment {align!r}; choose from {WINDOW_ALIGNS}")
    window = window_size(method, window)
    if window <= 1:
        return [golden]
    first = golden - window + 1 if align == "end" else golden - window // 2
    first = min(max(first, 0), max(n_layers - window, 0))
    return list(range(first, min(first + window, n_layers)))


def edit_each(method: Method, ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
              hparams) -> list[EditResult]:
    """One edit per request, each computed from the model as it is now; none is applied."""
    if method.each is not None:
        return method.each(ctx, requests, layers, hparams)
    return [method.apply(ctx, [request], layers, hparams) for request in requests]

def prepare_statistics(name: str, ctx: EditOps, layers: Sequence[int]) -> None:
    """C of every layer the method will edit, in one pass over the corpus, before the first edit asks."""
    if METHODS[name].uses_statistics:
        ctx.prepare_statistics(layers)


def apply_batch(name: str, ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int], hparams,
                number: int = 0, preserved: PreservedKeys | None = None) -> EditResult:
    """One update for ``requests`` from the current weights, applied to ``ctx``; returns it (deltas and record).

    ``preserved``: for a sequential method (AlphaEdit), the keys of the batches applied before, kept by the
    solve; the batch's own keys (read after its update) are added to it here."""
    method = METHODS[name]
    if preserved is not None and not method.sequential:
        raise ValueError(f"{name} keeps no keys of earlier batches")
    if method.batched:
        extra = {"preserved": preserved} if preserved is not None else {}
        result = method.apply(ctx, requests, layers, hparams, **extra)
    else:
        deltas: dict = {}
        for single in edit_each(method, ctx, requests, layers, hparams):
            for module, delta in single.deltas.items():
                deltas[module] = deltas[module] + delta if module in deltas else delta
        result = make_result(name, ctx.fingerprint, requests, layers, hparams, deltas)
    result.record.batch = number
    ctx.apply(result.deltas)
    if preserved is not None:
        preserved.add(ctx, requests, layers, hparams.fact_token)
    return result


__all__ = ["EDIT_VERSION", "METHODS", "WINDOW_ALIGNS", "EditContext", "EditOps", "EditRecord", "EditResult", "Method",
           "PreservedKeys", "Snapshot",
           "apply_batch", "apply_deltas", "edit_each", "edit_window", "parse_layers", "prepare_statistics",
           "save_edited"]
