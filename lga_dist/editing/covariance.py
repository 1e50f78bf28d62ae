"""C = E[k k^T]: second moment of an edit module's input keys over a text corpus, cached.

ROME, MEMIT and AlphaEdit all weigh an update by how keys are distributed in
ordinary text, so it disturbs other facts little. Accumulated in float64 over
every non-padding token; cached as safetensors under a key made of the model
fingerprint, the dtype the model runs in (a bfloat16 model's keys are not its
float32 keys), the layer, the corpus hash and the token budget, so it is computed
once and recomputed exactly when one of those changes. All the layers a job needs
are taken in one pass over the corpus, split across the ranks of a ZeRO-3 group.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors.torch import load, save

from lga_dist.console import Progress
from lga_dist.io.storage import atomic_write, cache_root, exists, is_remote, join, open_file, storage_errors
from lga_dist.models.adapters import Adapter, get_module
from lga_dist.models.loading import dtype_name
from lga_dist.models.tracing import forward_hooks

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CovarianceKey:
    fingerprint: str
    layer: int
    corpus_hash: str
    max_tokens: int
    dtype: str

    def filename(self) -> str:
        fingerprint = self.fingerprint.split(":")[-1][:16]
        return f"{fingerprint}-{self.dtype}-layer{self.layer}-{self.corpus_hash}-{self.max_tokens}.safetensors"


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


MAX_LENGTH = 256  # tokens per text: longer texts are cut, as MEMIT's statistics did
MAX_PASS_BYTES = 4 * 2**30  # float64 sums held by one pass over the corpus; more layers take more passes


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Texts run together; only the first ``keep`` of their tokens (in reading order) count towards C."""

    texts: tuple[str, ...]
    keep: int


def plan_batches(tokenizer, texts: Iterable[str], max_tokens: int, batch_size: int = 32) -> list[TokenBatch]:
    """The corpus's first ``max_tokens`` tokens as batches: the same tokens whichever rank runs which batch."""
    batches: list[TokenBatch] = []
    current: list[str] = []
    counted = total = 0
    for text in texts:
        if total >= max_tokens:
            break
        n = min(len(tokenizer(text, truncation=True, max_length=MAX_LENGTH).input_ids), max_tokens - total)
        current.append(text)
        counted, total = counted + n, total + n
        if len(current) == batch_size:
            batches.append(TokenBatch(tuple(current), counted))
            current, counted = [], 0
    if current:
        batches.append(TokenBatch(tuple(current), counted))
    return batches


@torch.no_grad()
def compute_second_moments(model, tokenizer, adapter: Adapter, layers: Sequence[int], texts: Iterable[str],
                           max_tokens: int, device="cpu", batch_size: int = 32, progress: bool = True,
                           share: tuple[int, int] = (0, 1),
                           reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           ) -> tuple[dict[int, torch.Tensor], int]:
    """({layer: E[k k^T] in float64}, tokens averaged) for every layer in one pass over the corpus.

    ``share=(rank, world)`` runs this rank's batches only (every world-th, so the shares stay even);
    ``reduce`` sums a tensor over the ranks. Every rank runs the same number of forward passes (a
    ZeRO-3 forward is a collective): a rank short of batches runs one whose tokens all don't count.
    """
    rank, world = share
    batches = plan_batches(tokenizer, texts, max_tokens, batch_size)
    if not batches:
        raise ValueError("the covariance corpus has no tokens")
    mine = batches[rank::world]
    mine += [TokenBatch(batches[0].texts, 0)] * (-(-len(batches) // world) - len(mine))
    modules = {layer: get_module(model, adapter.mlp_out_name(layer)) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    state: dict = {"mask": None}

    def hook_for(layer: int):
        def hook(_module, args, _output):
            keys = args[0].detach()[state["mask"]].to(torch.float64)  # (counted tokens, d)
            sums[layer] = keys.T @ keys if layer not in sums else sums[layer].addmm_(keys.T, keys)
        return hook

    count = 0
    described = f"covariance layer{'s' if len(layers) > 1 else ''} {_spans(layers)}"
    bar = Progress(sum(b.keep for b in mine), described, "tok", progress, log_every_s=30.0)
    with forward_hooks([(modules[layer], hook_for(layer)) for layer in layers]), bar:
        for batch in mine:
            encoded = tokenizer(list(batch.texts), return_tensors="pt", padding=True, truncation=True,
                                max_length=MAX_LENGTH)
            mask = encoded.attention_mask.bool()
            mask &= (mask.flatten().cumsum(0) <= batch.keep).view_as(mask)  # the first ``keep`` real tokens
            state["mask"] = mask.to(device)
            model.base_model(input_ids=encoded.input_ids.to(device),
                             attention_mask=encoded.attention_mask.to(device))
            count += batch.keep
            bar.update(batch.keep)
    if reduce is not None:
        sums = {layer: reduce(sums[layer]) for layer in layers}
        count = int(reduce(torch.tensor([count], dtype=torch.float64, device=device)).item())
    if count < max_tokens:  # the corpus ran out: say so, in job logs too
        log.warning("covariance: the corpus has %d tokens, fewer than the %d asked for (--cov-tokens); "
                    "C averages all %d", count, max_tokens, count)
    return {layer: sums[layer].div_(count).cpu() for layer in layers}, count  # in place: no second copy held


def passes_within(widths: dict[int, int], max_bytes: int) -> list[list[int]]:
    """The layers cut, in order, into passes whose float64 sums (width^2 * 8 bytes a layer) fit ``max_bytes``.

    One pass per group costs one forward over the corpus; all in one pass would hold every layer's d x d
    sum at once (a 1.5B model's 28 MLP keys of width 8,960: 18 GB). A layer larger than the budget alone
    gets its own pass."""
    passes: list[list[int]] = []
    held = 0
    for layer, width in widths.items():
        size = width * width * 8
        if not passes or held + size > max_bytes:
            passes.append([])
            held = 0
        passes[-1].append(layer)
        held += size
    return passes


def _spans(layers: Sequence[int]) -> str:
    ordered = sorted(layers)
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, ordered))


def cache_path(fingerprint: str, dtype: torch.dtype, layer: int, corpus: str, max_tokens: int,
               stats_dir: str | None = None) -> str:
    """Where C of this model (in this dtype), layer, corpus (its ``corpus_hash``) and token budget is cached."""
    key = CovarianceKey(fingerprint, layer, corpus, max_tokens, dtype_name(dtype))
    return join(stats_dir or str(cache_root() / "covariance"), key.filename())


@dataclasses.dataclass
class SecondMoments:
    """C per layer of one model over one corpus: read from the cache, else computed and cached.

    ``prepare(layers)`` computes every missing layer in one pass over the corpus (one forward
    for all of them instead of one per layer). Calling it with a layer returns that layer's C,
    preparing it first if needed. On a ZeRO-3 group each rank holds one of these with its
    ``share`` and collectives: ``reduce`` sums over ranks, ``agree`` is true when true on every
    rank (so all ranks decide alike whether to compute).
    """

    model: Any
    tokenizer: Any
    adapter: Adapter
    fingerprint: str
    texts: Sequence[str]
    max_tokens: int
    stats_dir: str | None = None
    device: Any = "cpu"
    progress: bool = True
    share: tuple[int, int] = (0, 1)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    agree: Callable[[bool], bool] = bool
    max_bytes: int = MAX_PASS_BYTES   # the float64 sums one pass over the corpus may hold (passes_within)

    def path(self, layer: int) -> str:
        return cache_path(self.fingerprint, self.dtype, layer, self.corpus, self.max_tokens, self.stats_dir)

    @functools.cached_property
    def corpus(self) -> str:
        """The corpus's hash, part of every cache key: hashed once, not per layer and call."""
        return corpus_hash(self.texts)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes its keys in (a ZeRO-3 partition keeps its parameters' dtype)."""
        return next(self.model.parameters()).dtype

    def prepare(self, layers: Sequence[int], recompute: bool = False) -> list[int]:
        """Compute and cache C for the layers not cached yet (all of them if ``recompute``); returns those."""
        wanted = list(dict.fromkeys(int(layer) for layer in layers))
        missing = [layer for layer in wanted if recompute or not self.agree(exists(self.path(layer)))]
        if not missing:
            return []
        widths = {layer: self.adapter.key_width(get_module(self.model, self.adapter.mlp_out_name(layer)))
                  for layer in missing}
        for layers_now in passes_within(widths, self.max_bytes):
            log.info("covariance layers %s: computing over up to %d tokens -> %s", _spans(layers_now),
                     self.max_tokens, self.path(layers_now[0]).rsplit("/", 1)[0])
            moments, count = compute_second_moments(self.model, self.tokenizer, self.adapter, layers_now, self.texts,
                                                    self.max_tokens, self.device, progress=self.progress,
                                                    share=self.share, reduce=self.reduce)
            self._save(moments, count)
        return missing

    def _save(self, moments: dict[int, torch.Tensor], count: int) -> None:
        for layer, mom2 in moments.items():
            payload = save({"mom2": mom2.contiguous(), "count": torch.tensor([count])},
                           metadata={"fingerprint": self.fingerprint, "dtype": dtype_name(self.dtype),
                                     "layer": str(layer), "corpus_hash": self.corpus,
                                     "max_tokens": str(self.max_tokens),
                                     "tokens": str(count)})
            with atomic_write(self.path(layer), "wb") as handle:
                handle.write(payload)

    def __call__(self, layer: int) -> torch.Tensor:
        self.prepare([layer])
        path = self.path(layer)
        with storage_errors(path), open_file(path, "rb") as handle:
            return load(handle.read())["mom2"]
