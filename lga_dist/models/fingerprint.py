"""Model fingerprints: which exact weights an output was computed from.

sha256 over the canonical config.json, the tokenizer files, every safetensors
header (tensor names, shapes, dtypes, offsets) and a content sample of every
tensor (evenly spaced blocks, first and last included). Any update that touches
a tensor broadly (fine-tuning, a rank-one edit) changes the sample; ``full=True``
hashes every byte instead, for when a single changed element must be caught.
The fingerprint depends only on content, so a local copy and its s3:// original agree.
"""

from __future__ import annotations

import hashlib
import json
import struct

from lga_dist.io.storage import filesystem, join, storage_errors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "vocab.txt")
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")
SAMPLE_BLOCKS = 4
SAMPLE_BYTES = 512


def _canonical_config(raw: bytes) -> bytes:
    config = json.loads(raw)
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def _sample_ranges(begin: int, end: int) -> list[tuple[int, int]]:
    size = end - begin
    if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        return [(begin, end)] if size else []
    step = (size - SAMPLE_BYTES) / (SAMPLE_BLOCKS - 1)
    return [(begin + int(i * step), begin + int(i * step) + SAMPLE_BYTES) for i in range(SAMPLE_BLOCKS)]


def safetensors_header(fs, path: str) -> tuple[dict, int]:
    """The parsed header of a safetensors file and the byte offset where tensor data starts."""
    with fs.open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header, 8 + length


def fingerprint(model_dir: str, *, full: bool = False) -> str:
    """The model's fingerprint, e.g. ``sha256:3f2a...`` (64 hex digits)."""
    fs, root = filesystem(model_dir)
    digest = hashlib.sha256()
    with storage_errors(model_dir):
        names = {p.rsplit("/", 1)[-1]: p for p in fs.ls(root, detail=False)}
        if "config.json" not in names:
            raise FileNotFoundError(f"{join(model_dir, 'config.json')} does not exist")
        digest.update(b"config\0" + _canonical_config(fs.cat_file(names["config.json"])))
        for name in TOKENIZER_FILES:
            if name in names:
                digest.update(f"file\0{name}\0".encode() + fs.cat_file(names[name]))
        for name in sorted(n for n in names if n.endswith(".safetensors")):
            path = names[name]
            header, data_start = safetensors_header(fs, path)
            header.pop("__metadata__", None)
            digest.update(f"safetensors\0{name}\0".encode() + json.dumps(header, sort_keys=True).encode())
            if full:
                with fs.open(path, "rb") as handle:
                    handle.seek(data_start)
                    while block := handle.read(16 << 20):
                        digest.update(block)
                continue
            ranges = [r for key in sorted(header)
                      for r in _sample_ranges(data_start + header[key]["data_offsets"][0],
                                              data_start + header[key]["data_offsets"][1])]
            if ranges:
                blocks = fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])
                for block in blocks:
                    digest.update(block)
    return "sha256:" + digest.hexdigest()
