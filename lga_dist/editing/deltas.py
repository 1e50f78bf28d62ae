"""Edits as explicit weight deltas: apply them, undo them exactly, record them, save the edited model.

Every method returns ``{module name: delta}`` in the (out_features, in_features)
orientation of the adapter, whatever the storage layout (GPT-2's Conv1D is
transposed). A ``Snapshot`` of the touched weights taken before applying makes
restoring bit-exact (subtracting a float delta would not be).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lga_dist.errors import UserError
from lga_dist.io.storage import cache_root, is_remote, upload_dir
from lga_dist.models.adapters import Adapter, get_module
from lga_dist.models.fingerprint import fingerprint


@dataclasses.dataclass
class EditRecord:
    """What was applied: one line of ``edits.jsonl``."""

    method: str
    layers: list[int]
    case_ids: list[str]
    hparams: dict[str, Any]
    fingerprint_before: str
    batch: int = 0
    modules: list[str] = dataclasses.field(default_factory=list)
    delta_norms: dict[str, float] = dataclasses.field(default_factory=dict)
    created_at: str = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())


@dataclasses.dataclass
class EditResult:
    deltas: dict[str, torch.Tensor]
    record: EditRecord


class Snapshot:
    """Copies of the weights an edit will touch, for an exact restore.

    ``held`` maps a parameter to the tensor this process holds of it: the parameter itself, or (a sharded
    model's edit context passes its own) this rank's partition of it."""

    def __init__(self, model: torch.nn.Module, module_names: Sequence[str],
                 held: Callable[[torch.nn.Parameter], torch.Tensor] = lambda parameter: parameter):
        self.model, self.held = model, held
        self.weights = {name: held(get_module(model, name).weight).detach().clone() for name in module_names}

    def restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.weights.items():
                self.held(get_module(self.model, name).weight).copy_(weight)


def apply_deltas(model: torch.nn.Module, adapter: Adapter, deltas: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = adapter.oriented_weight(get_module(model, name))
            if weight.shape != delta.shape:
                raise ValueError(f"{name}: delta {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
            weight.add_(delta.to(weight.device, weight.dtype))


class NonFiniteEdit(UserError, ArithmeticError):
    """An edit whose weight changes hold inf or NaN: refused before anything is applied."""


def finish_record(record: EditRecord, deltas: dict[str, torch.Tensor]) -> EditRecord:
    """Fills in what the deltas are; refuses non-finite ones, which would silently turn every metric to 0."""
    record.modules = sorted(deltas)
    record.delta_norms = {name: float(delta.norm()) for name, delta in deltas.items()}
    broken = [name for name, norm in record.delta_norms.items() if not math.isfinite(norm)]
    if broken:
        raise NonFiniteEdit(f"{record.method} at layer(s) {record.layers} gave non-finite weight changes at "
                            f"{', '.join(broken)} (requests {', '.join(map(str, record.case_ids[:5]))}"
                            f"{', ...' if len(record.case_ids) > 5 else ''}); nothing was applied: check --hparam "
                            f"values and the model's weights")
    return record


def make_result(method: str, fingerprint: str, requests: Sequence, layers: Sequence[int], hparams,
                deltas: dict[str, torch.Tensor]) -> EditResult:
    """The deltas with the record of what produced them."""
    record = EditRecord(method=method, layers=sorted(layers), case_ids=[r.case_id for r in requests],
                        hparams=dataclasses.asdict(hparams), fingerprint_before=fingerprint)
    return EditResult(deltas, finish_record(record, deltas))


def save_edited(model, tokenizer, path: str | Path, records: Sequence[EditRecord], *,
                max_shard_size: str = "2GB", state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """safetensors (sharded when large) + tokenizer + edits.jsonl; returns the saved model's fingerprint.

    Written into a local directory (a remote target is written locally first and
    then uploaded file by file). ``state_dict``: the weights to write instead of
    ``model``'s own (a ZeRO-3 model's consolidated weights).
    """

    local = Path(path) if not is_remote(str(path)) else cache_root() / "staging" / str(abs(hash(str(path))))
    local.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(local, safe_serialization=True, max_shard_size=max_shard_size, state_dict=state_dict)
    tokenizer.save_pretrained(local)
    after = fingerprint(str(local))
    with open(local / "edits.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps({**dataclasses.asdict(record), "fingerprint_after": after}) + "\n")
    if is_remote(str(path)):
        upload_dir(local, str(path))
    return after
