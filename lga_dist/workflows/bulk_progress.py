"""What a bulk edit has committed so far, so a killed job continues where it stopped.

After each batch the job writes, in this order, under OUT/progress/:

  weights-NNNNN.safetensors   the edited modules' weights after batch NNNNN (exact values, model dtype)
  batch-NNNNN.json            the batch's edit record, its requests and its tracking metrics

and then deletes the previous weights file. A batch counts as done once its
record exists; the weights file of the last record restores the model exactly
(not by re-adding float deltas), so a resumed run ends with the same weights as
an uninterrupted one. ``key.json`` names the run (model, ranking, requests,
method, options); a different run in the same OUT is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import torch
from safetensors.torch import load, save

from lga_dist.config import ConfigError
from lga_dist.io.storage import atomic_write, exists, join, list_files, open_file, remove, storage_errors

_BATCH = re.compile(r"batch-(\d{5})\.json$")


@dataclasses.dataclass
class BatchRecord:
    """One finished batch: what was applied, and the tracked metrics right after it."""

    batch: int
    case_ids: list[str]
    edits_applied: int
    record: dict[str, Any]
    tracking: dict[str, float]
    seconds: float


class BulkProgress:
    """The OUT/progress/ directory of one bulk-edit run."""

    def __init__(self, out: str):
        self.root = join(out, "progress")

    def _weights(self, batch: int) -> str:
        return join(self.root, f"weights-{batch:05d}.safetensors")

    def check_key(self, key: dict[str, Any], overwrite: bool) -> None:
        """Start (or start over); refuse to mix a different run's batches into this one."""
        path = join(self.root, "key.json")
        if overwrite:
            for leftover in self._files():
                remove(leftover)
        elif exists(path):
            with storage_errors(path), open_file(path, "rb") as handle:
                previous = json.load(handle)
            if previous != key:
                changed = sorted(k for k in set(key) | set(previous) if key.get(k) != previous.get(k))
                raise ConfigError(f"{self.root} holds a bulk edit of a different run (differs in: "
                                  f"{', '.join(changed)}); pass --overwrite to start over or choose another --out")
        with atomic_write(path, "w") as handle:
            json.dump(key, handle, indent=1, sort_keys=True)

    def _files(self) -> list[str]:
        return list_files(self.root, (".json", ".safetensors")) if exists(self.root) else []

    def finished(self) -> list[BatchRecord]:
        """The committed batches, in order (a weights file without its record is ignored)."""
        records = []
        for path in self._files():
            if _BATCH.search(path):
                with storage_errors(path), open_file(path, "rb") as handle:
                    records.append(BatchRecord(**json.load(handle)))
        records.sort(key=lambda r: r.batch)
        if [r.batch for r in records] != list(range(len(records))):
            raise ConfigError(f"{self.root}: batch records {[r.batch for r in records]} are not consecutive; "
                              f"pass --overwrite to start over")
        return records

    def load_weights(self, batch: int) -> dict[str, torch.Tensor]:
        path = self._weights(batch)
        with storage_errors(path), open_file(path, "rb") as handle:
            return load(handle.read())

    def commit(self, record: BatchRecord, weights: dict[str, torch.Tensor]) -> None:
        """Weights first, then the record that makes the batch count, then drop the previous weights."""

        with atomic_write(self._weights(record.batch), "wb") as handle:
            handle.write(save({name: w.contiguous() for name, w in weights.items()}))
        with atomic_write(join(self.root, f"batch-{record.batch:05d}.json"), "w") as handle:
            json.dump(dataclasses.asdict(record), handle, default=str)
        if record.batch > 0:
            remove(self._weights(record.batch - 1))
