"""GGUF checkpoints as ordinary safetensors folders: de-quantised once, cached by the file's sha256.

transformers reads GGUF (``from_pretrained(folder, gguf_file=name)``, which needs
the ``gguf`` package) and de-quantises every tensor to float32. It will not
``save_pretrained`` a model loaded that way, so the weights are moved into a model
built from the same config without the GGUF quantisation record and saved as
safetensors beside the tokenizer. Keying the folder by the GGUF's content hash
keeps the fingerprint, and every cache keyed on it, the same across runs and
machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from lga_dist.console import library_output_to_stderr
from lga_dist.errors import UserError
from lga_dist.io.storage import cache_root, download_file, is_remote

CONVERTED_MARKER = "lga_dist_gguf.json"  # written last: a folder without it is an interrupted conversion


class GGUFError(UserError, RuntimeError):
    """A GGUF file that cannot be read or converted; the message says what to do."""


def sha256_of(path: Path) -> str:
    """The file's sha256, remembered by (path, size, mtime) so each actor does not re-hash 250 MB."""
    stat = path.stat()
    memo = cache_root() / "gguf" / "sha256" / hashlib.sha256(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 << 20):
            digest.update(block)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(memo.name + f".{os.getpid()}")
    tmp.write_text(digest.hexdigest())
    os.replace(tmp, memo)
    return digest.hexdigest()


def local_gguf(source: str) -> Path:
    """A local copy of a GGUF file: the file itself, or its mirror in the cache for s3://."""
    if not is_remote(source):
        path = Path(source)
        if not path.is_file():
            raise GGUFError(f"{source}: no such GGUF file")
        return path

    target = cache_root() / "gguf" / "remote" / hashlib.sha256(source.encode()).hexdigest()[:16] / Path(source).name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # actors on one node share the mirror
        return download_file(source, target)


def converted_dir(gguf: Path) -> Path:
    return cache_root() / "models" / f"gguf-{sha256_of(gguf)[:16]}"


def gguf_model_dir(source: str, *, progress: bool = True) -> Path:
    """The safetensors folder of a GGUF file (local or s3://), converting it on first use."""

    gguf = local_gguf(source)
    target = converted_dir(gguf)
    if (target / CONVERTED_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # actors on one node share the conversion: one converts, the rest wait
        if not (target / CONVERTED_MARKER).exists():
            convert_gguf(gguf, target, progress=progress)
    return target


def convert_gguf(gguf: Path, target: Path, *, progress: bool = True) -> None:
    """De-quantise ``gguf`` into a safetensors + tokenizer folder at ``target`` (replaced atomically)."""

    started = time.perf_counter()
    if progress:
        print(f"converting {gguf.name} to safetensors (once; cached in {target})", flush=True)
    try:
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise GGUFError(f"{gguf}: reading GGUF needs the gguf package: pip install gguf ({err})") from err
    except Exception as err:  # noqa: BLE001 - transformers/gguf raise ValueError, KeyError, struct errors...
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GGUFError(f"{gguf}: not a GGUF checkpoint transformers can load ({type(err).__name__}: {text})") from err
    config = quantised.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    missing = [name for name, tensor in plain.state_dict().items() if tensor.is_meta]
    if missing:
        raise GGUFError(f"{gguf}: the GGUF file has no tensor for {missing[:3]}; it does not match its architecture")
    staging = target.with_name(target.name + f".staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    with library_output_to_stderr():
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    (staging / CONVERTED_MARKER).write_text(json.dumps({
        "gguf_file": gguf.name, "gguf_sha256": sha256_of(gguf), "seconds": round(time.perf_counter() - started, 1)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    if progress:
        print(f"converted {gguf.name} in {time.perf_counter() - started:.0f} s", flush=True)
