"""Load a Hugging Face causal LM from a local directory or an s3:// prefix, safely.

Only safetensors checkpoints are loaded (pickle files can run code) and
``trust_remote_code`` is never set. Remote models are mirrored into the local
cache first; the fingerprint is computed from content, so it is the same for
the remote original and the local copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from lga_dist.io.storage import cache_root, download_dir, exists, is_remote, join, open_file, storage_errors
from lga_dist.models.adapters import Adapter, adapter_for
from lga_dist.models.fingerprint import fingerprint
from lga_dist.models.sources import ModelError, resolve_model

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype by the name ``DTYPES`` and ``--dtype`` use ("bfloat16", not "torch.bfloat16")."""
    return str(dtype).removeprefix("torch.")


def checkpoint_dtype(config: dict) -> str | None:
    """The dtype a checkpoint's config.json says its weights are in (``torch_dtype``, or ``dtype`` in newer files)."""
    name = str(config.get("torch_dtype") or config.get("dtype") or "").replace("torch.", "")
    return name if name in DTYPES else None


def model_id(source: str, config: dict) -> str:
    """A readable name for outputs: the directory or prefix name the model was loaded from."""
    name = str(source).rstrip("/").rsplit("/", 1)[-1]
    return name or config.get("model_type", "model")


@dataclasses.dataclass
class ModelInfo:
    """What a driver needs to know about a model without loading its weights."""

    source: str
    config: dict
    adapter: Adapter
    fingerprint: str

    @property
    def model_id(self) -> str:
        return model_id(self.source, self.config)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.config)


@dataclasses.dataclass
class LoadedModel(ModelInfo):
    """The model itself, its tokenizer, and the local directory it was read from."""

    model: torch.nn.Module
    tokenizer: Any
    local_dir: Path


def read_model_config(source: str | Path) -> dict:
    """config.json of a model directory or s3:// prefix, read in place."""
    source = str(source)
    if not is_remote(source) and not Path(source).is_dir():
        raise ModelError(f"{source}: no such model directory; pass --model DIR or s3://bucket/prefix")
    config_path = join(source, "config.json")
    if not exists(config_path):
        raise ModelError(f"{source}: no config.json; --model must point at a Hugging Face model directory")
    with storage_errors(config_path), open_file(config_path, "rb") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ModelError(f"{config_path}: not valid JSON ({err})") from err


def describe_model(source: str | Path, *, progress: bool = True) -> ModelInfo:
    """Config, adapter and fingerprint; an s3:// folder is read in place (no weights, no download).

    A packaged name or GGUF file is converted into the cache first (once)."""
    folder = resolve_model(str(source), progress=progress)
    config = read_model_config(folder)
    adapter = adapter_for(config.get("model_type", "<missing model_type>"))
    return ModelInfo(source=str(source), config=config, adapter=adapter, fingerprint=fingerprint(folder))


def local_model_dir(source: str) -> Path:
    """A local directory holding the model: ``source`` itself, or its mirror in the cache."""
    if not is_remote(source):
        path = Path(source)
        if not path.is_dir():
            raise ModelError(f"{source}: no such model directory; pass --model DIR or s3://bucket/prefix")
        return path

    key = hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:16]
    target = cache_root() / "models" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # actors on one node share the mirror: one downloads, the rest wait
        return download_dir(source, target)


def read_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise ModelError(f"{model_dir}: no config.json; --model must point at a Hugging Face model directory")
    return json.loads(config_path.read_text())


def check_checkpoint(model_dir: Path) -> None:
    """Refuse directories without safetensors weights, with the fix in the message."""
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{model_dir}: only pickle weights ({', '.join(pickles[:3])}); lga_dist loads safetensors only. "
            f"Convert once on a trusted machine: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
            f"safe_serialization=True)")
    raise ModelError(f"{model_dir}: no *.safetensors weights found")


def load_model(source: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = "cpu") -> LoadedModel:
    """Load model + tokenizer and the adapter for its architecture.

    ``device=None`` leaves placement to whoever built the parameters (under
    ZeRO-3, DeepSpeed's ``zero.Init`` has already put each shard where it belongs).
    """

    source = str(source)
    local = local_model_dir(resolve_model(source, progress=False))
    config = read_config(local)
    adapter = adapter_for(config.get("model_type", "<missing model_type>"))
    check_checkpoint(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    model.eval()
    if device is not None:
        model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelError(f"{local}: no usable tokenizer ({err}); save the tokenizer next to the weights") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, config=config, local_dir=local,
                       source=source, fingerprint=fingerprint(str(local)))
