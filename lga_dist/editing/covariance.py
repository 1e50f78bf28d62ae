"""C = E[k k^T]: second moment of an edit module's input keys over a text corpus, cached.

ROME, MEMIT and AlphaEdit all weigh an update by how keys are distributed in
ordinary text, so it disturbs other facts little. Accumulated in float64 over
every non-padding token; cached as safetensors under a key made of the model
fingerprint, the layer, the corpus hash and the token budget, so it is computed
once and recomputed exactly when one of those changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Iterable, Sequence

import torch
from safetensors.torch import load, save

from lga_dist.console import Progress
from lga_dist.io.storage import atomic_write, cache_root, exists, is_remote, join, open_file, storage_errors
from lga_dist.models.adapters import Adapter, get_module
from lga_dist.models.tracing import forward_hooks

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CovarianceKey:
    fingerprint: str
    layer: int
    corpus_hash: str
    max_tokens: int

    def filename(self) -> str:
        fingerprint = self.fingerprint.split(":")[-1][:16]
        return f"{fingerprint}-layer{self.layer}-{self.corpus_hash}-{self.max_tokens}.safetensors"


def corpus_hash(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def load_corpus(path: str, text_column: str = "text", limit: int | None = None) -> list[str]:
    """Texts from any ``datasets``-loadable file(s) (json, jsonl, parquet, csv, txt), local or s3://."""
    import datasets


    suffix = path.rsplit(".", 1)[-1].lower()
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "txt": "text"}.get(suffix)
    if builder is None:
        raise ValueError(f"{path}: cannot tell the corpus format from the extension (json, jsonl, parquet, csv, txt)")
    options = {"storage_options": {}} if is_remote(path) else {}
    with storage_errors(path):
        dataset = datasets.load_dataset(builder, data_files=path, split="train", **options)
    if text_column not in dataset.column_names:
        raise ValueError(f"{path}: no column {text_column!r} (columns: {dataset.column_names})")
    column = dataset[text_column] if limit is None else dataset.select(range(min(limit, len(dataset))))[text_column]
    return [t for t in column if isinstance(t, str) and t.strip()]


@torch.no_grad()
def compute_second_moment(model, tokenizer, adapter: Adapter, layer: int, texts: Iterable[str], max_tokens: int,
                          device="cpu", batch_size: int = 32, progress: bool = True) -> tuple[torch.Tensor, int]:
    """(E[k k^T] in float64, number of tokens it averages) for layer ``layer``'s edit-module input."""
    module = get_module(model, adapter.mlp_out_name(layer))
    state: dict = {"sum": None, "count": 0, "mask": None}

    def hook(_module, args, _output):
        keys = args[0].detach().to(torch.float64)
        keys = keys[state["mask"]]  # (tokens, d)
        state["sum"] = keys.T @ keys if state["sum"] is None else state["sum"] + keys.T @ keys
        state["count"] += keys.shape[0]

    bar = Progress(max_tokens, f"covariance layer {layer}", "tok", progress, log_every_s=30.0)
    with forward_hooks([(module, hook)]), bar:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                _run(model, tokenizer, batch, state, device, max_tokens, bar)
                batch = []
                if state["count"] >= max_tokens:
                    break
        if batch and state["count"] < max_tokens:
            _run(model, tokenizer, batch, state, device, max_tokens, bar)
    if not state["count"]:
        raise ValueError("the covariance corpus has no tokens")
    if state["count"] < max_tokens:  # the bar stopped short: say why, in job logs too
        log.warning("covariance layer %d: the corpus has %d tokens, fewer than the %d asked for (--cov-tokens); "
                    "C averages all %d", layer, state["count"], max_tokens, state["count"])
    return (state["sum"] / state["count"]).cpu(), state["count"]


def _run(model, tokenizer, texts: list[str], state: dict, device, max_tokens: int, bar) -> None:
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
    mask = encoded.attention_mask.bool()
    remaining = max_tokens - state["count"]
    if int(mask.sum()) > remaining:  # stop exactly at the budget
        flat = mask.flatten().cumsum(0) <= remaining
        mask = mask & flat.view_as(mask)
    state["mask"] = mask.to(device)
    before = state["count"]
    model.base_model(input_ids=encoded.input_ids.to(device), attention_mask=encoded.attention_mask.to(device))
    bar.update(state["count"] - before)


def cache_path(fingerprint: str, layer: int, texts: Sequence[str], max_tokens: int,
               stats_dir: str | None = None) -> str:
    """Where C of this model, layer, corpus and token budget is (or will be) cached."""
    key = CovarianceKey(fingerprint, layer, corpus_hash(texts), max_tokens)
    return join(stats_dir or str(cache_root() / "covariance"), key.filename())


def second_moment(model, tokenizer, adapter: Adapter, layer: int, fingerprint: str, texts: Sequence[str],
                  max_tokens: int, stats_dir: str | None = None, device="cpu", progress: bool = True,
                  recompute: bool = False) -> torch.Tensor:
    """E[k k^T] for the layer, from the cache when the key matches (unless ``recompute``), else computed and cached."""

    key = CovarianceKey(fingerprint, layer, corpus_hash(texts), max_tokens)
    path = cache_path(fingerprint, layer, texts, max_tokens, stats_dir)
    if exists(path) and not recompute:
        with storage_errors(path), open_file(path, "rb") as handle:
            log.info("covariance layer %d: cached %s", layer, path)
            return load(handle.read())["mom2"]
    log.info("covariance layer %d: computing over up to %d tokens -> %s", layer, max_tokens, path)
    mom2, count = compute_second_moment(model, tokenizer, adapter, layer, texts, max_tokens, device,
                                        progress=progress)
    payload = save({"mom2": mom2.contiguous(), "count": torch.tensor([count])},
                   metadata={"fingerprint": fingerprint, "layer": str(layer), "corpus_hash": key.corpus_hash,
                             "max_tokens": str(max_tokens), "tokens": str(count)})
    with atomic_write(path, "wb") as handle:
        handle.write(payload)
    return mom2

