"""What a bulk edit has committed so far, so a killed job continues where it stopped.

Every --checkpoint-every batches (and after the last) the job writes, in this
order, under OUT/progress/:

  weights-NNNNN.safetensors   the edited modules' weights after batch NNNNN (exact values, model dtype),
                              and for AlphaEdit the keys' Gram matrix K_p K_p^T of batches 0..NNNNN per
                              edited layer (float64), which every later batch's solve keeps
  batch-MMMMM.json            for each batch since the last checkpoint, up to NNNNN: its edit record,
                              its requests and its tracking metrics

and then deletes the older weights files. The run has done the batches up to the
newest record that has its weights file; those weights restore the model exactly
(not by re-adding float deltas), so a resumed run ends with the same weights as
an uninterrupted one, and records written past it (a commit cut short) are redone.
``key.json`` names the run (model, ranking, requests, method, options); a
different run in the same OUT is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import torch
from safetensors.torch import load, save

from lga_dist.config import ConfigError, differing_fields
from lga_dist.io.storage import atomic_write, exists, join, list_files, open_file, remove, storage_errors
from lga_dist.models.loading import dtype_name

_BATCH = re.compile(r"batch-(\d{5})\.json")  # the whole file name: a killed write leaves .tmp-...-batch-N.json
_PRESERVED = "preserved_keys_gram.layer"  # + layer: AlphaEdit's K_p K_p^T beside the weights


@dataclasses.dataclass
class BatchRecord:
    """One finished batch: what was applied, and the tracked metrics right after it."""

    batch: int
    case_ids: list[str]
    edits_applied: int
    record: dict[str, Any]
    tracking: dict[str, float]
    seconds: float                    # the batch's wall time: targets, solve, apply and tracking
    tracking_seconds: float = 0.0     # of which the evaluation after it (tracked requests, held-out, fluency)
    peak_rss_gb: float | None = None  # this process's peak resident memory so far: with --actors 0 the whole
                                      # job's, on actors the driver's


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
                raise ConfigError(f"{self.root} holds a bulk edit of a different run (differs in: "
                                  f"{', '.join(differing_fields(previous, key))}); pass --overwrite to start over "
                                  f"or choose another --out")
        with atomic_write(path, "w") as handle:
            json.dump(key, handle, indent=1, sort_keys=True)

    def _files(self) -> list[str]:
        return list_files(self.root, (".json", ".safetensors")) if exists(self.root) else []

    def finished(self) -> list[BatchRecord]:
        """The committed batches, in order: up to the newest record whose weights were kept."""
        files = self._files()
        records = self.batch_records(files)
        kept = {self._weights(r.batch) for r in records} & set(files)
        while records and self._weights(records[-1].batch) not in kept:
            records.pop()
        return records

    def batch_records(self, files: list[str] | None = None) -> list[BatchRecord]:
        """Every batch record written, in order (a finished run's too, whose weights checkpoints are gone)."""
        files = self._files() if files is None else files
        records = []
        for path in files:
            if _BATCH.fullmatch(path.rstrip("/").rsplit("/", 1)[-1]):
                with storage_errors(path), open_file(path, "rb") as handle:
                    records.append(BatchRecord(**json.load(handle)))
        records.sort(key=lambda r: r.batch)
        if [r.batch for r in records] != list(range(len(records))):
            raise ConfigError(f"{self.root}: batch records {[r.batch for r in records]} are not consecutive; "
                              f"pass --overwrite to start over")
        return records

    def _load(self, batch: int) -> dict[str, torch.Tensor]:
        path = self._weights(batch)
        with storage_errors(path), open_file(path, "rb") as handle:
            return load(handle.read())

    def load_preserved(self, batch: int) -> dict[int, torch.Tensor]:
        """AlphaEdit's K_p K_p^T per layer as committed with the weights after ``batch`` (empty: none kept)."""
        return {int(name[len(_PRESERVED):]): tensor for name, tensor in self._load(batch).items()
                if name.startswith(_PRESERVED)}

    def load_weights(self, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The weights after ``batch``, refused unless the model resuming them runs in their dtype.

        ``--dtype auto`` resolves where the job runs (the checkpoint's dtype on an accelerator,
        float32 on CPUs), so a resume on other hardware can load the model in another dtype;
        writing the saved weights into it would round them silently.
        """
        weights = {name: w for name, w in self._load(batch).items() if not name.startswith(_PRESERVED)}
        saved = {dtype_name(w.dtype) for w in weights.values()}
        if saved != {dtype_name(dtype)}:
            raise ConfigError(f"{self.root}: the batches so far were committed in {', '.join(sorted(saved))}, and "
                              f"this run loads the model in {dtype_name(dtype)}; pass --dtype {min(saved)} to "
                              f"continue them, or --overwrite to start over")
        return weights

    def commit(self, records: list[BatchRecord], weights: dict[str, torch.Tensor],
               preserved: dict[int, torch.Tensor] | None = None) -> None:
        """The weights after the last of ``records`` (with AlphaEdit's preserved keys, in the same file) first,
        then the records that make the batches count, then drop the older weights."""

        newest = self._weights(records[-1].batch)
        tensors = {name: w.contiguous() for name, w in weights.items()}
        tensors.update({f"{_PRESERVED}{layer}": gram.contiguous() for layer, gram in (preserved or {}).items()})
        with atomic_write(newest, "wb") as handle:
            handle.write(save(tensors))
        for record in records:
            with atomic_write(join(self.root, f"batch-{record.batch:05d}.json"), "w") as handle:
                json.dump(dataclasses.asdict(record), handle, default=str)
        for path in self._files():
            if path.endswith(".safetensors") and path != newest:
                remove(path)
