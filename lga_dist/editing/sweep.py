"""One update of the same requests under several hyper-parameter settings, each from the same weights.

Choosing a hyper-parameter for a model (MEMIT's mom2_update_weight, say) means
editing a sample of requests once per candidate value and comparing the results.
Target optimisation is most of an edit's cost and, when only the solve-stage
hyper-parameters differ, gives the same targets for every setting: the weights
it starts from are the same (each setting's update is undone before the next),
so the targets are computed once (``SharedTargets``) and the sweep costs about
one edit plus one solve and evaluation per value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

from lga_dist.config import ConfigError, coerce
from lga_dist.editing import METHODS, EditOps, EditResult, apply_batch
from lga_dist.editing.targets import TargetHyperParams
from lga_dist.io.requests import EditRequest

TARGET_FIELDS = tuple(field.name for field in dataclasses.fields(TargetHyperParams))


class SharedTargets:
    """``ctx`` whose ``targets`` are computed once per (site, requests, target hyper-parameters).

    Only valid while every call starts from the same weights: ``settings_in_turn``
    undoes each setting's update before the next one asks.
    """

    def __init__(self, ctx: EditOps):
        self._ctx = ctx
        self._known: dict[tuple, Any] = {}

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)

    def targets(self, requests: Sequence[EditRequest], site: str, hparams):
        key = (site, tuple(requests), tuple(getattr(hparams, name) for name in TARGET_FIELDS))
        if key not in self._known:
            self._known[key] = self._ctx.targets(requests, site, hparams)
        return self._known[key]


def parse_sweep(text: str, method: str) -> tuple[str, list]:
    """--sweep 'NAME=V1,V2,...' -> (NAME, [values coerced to the method's hyper-parameter type])."""
    cls = METHODS[method].hparams
    name, _, values = text.partition("=")
    fields = [field.name for field in dataclasses.fields(cls)]
    if name not in fields:
        raise ConfigError(f"--sweep {name}: {cls.__name__} has {', '.join(fields)}")
    items = [value for value in values.split(",") if value.strip()]
    if not items:
        raise ConfigError(f"--sweep {text!r}: give values, NAME=V1,V2,...")
    values = [coerce(cls, name, value.strip()) for value in items]
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    if repeated:
        raise ConfigError(f"--sweep {text!r}: {', '.join(repeated)} given more than once; each value is one "
                          f"update, measured once")
    return name, values


def settings_in_turn(method: str, ctx: EditOps, requests: Sequence[EditRequest], layers: Sequence[int],
                     settings: Sequence) -> Iterator[EditResult]:
    """Apply one update of ``requests`` per hyper-parameter setting; each is in place while the caller
    looks at it (evaluates) and is undone bit-exactly before the next setting's update is computed."""
    shared = SharedTargets(ctx)
    modules = [ctx.adapter.mlp_out_name(layer) for layer in layers]
    for hparams in settings:
        snapshot = ctx.snapshot(modules)
        try:
            yield apply_batch(method, shared, requests, layers, hparams)
        finally:
            snapshot.restore()
