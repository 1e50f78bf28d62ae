"""Load a Hugging Face causal LM from a local directory or an s3:// prefix, safely.

Only safetensors checkpoints are loaded (pickle files can run code) and
``trust_remote_code`` is never set. Remote models are mirrored into the local
cache first; the fingerprint is computed from content, so it is the same for
the remote original and the local copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lga_dist.errors import UserError
from lga_dist.models.adapters import Adapter, adapter_for
from lga_dist.models.fingerprint import fingerprint
from lga_dist.storage import cache_root, download_dir, is_remote

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelError(UserError, RuntimeError):
    """A model that cannot be used; the one-line message says what to do."""


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    adapter: Adapter
    config: dict
    local_dir: Path
    source: str
    fingerprint: str

    @property
    def model_id(self) -> str:
        return model_id(self.source, self.config)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.config)


def model_id(source: str, config: dict) -> str:
    """A readable name for outputs: the directory or prefix name the model was loaded from."""
    name = str(source).rstrip("/").rsplit("/", 1)[-1]
    return name or config.get("model_type", "model")


def local_model_dir(source: str) -> Path:
    """A local directory holding the model: ``source`` itself, or its mirror in the cache."""
    if not is_remote(source):
        path = Path(source)
        if not path.is_dir():
            raise ModelError(f"{source}: no such model directory; pass --model DIR or s3://bucket/prefix")
        return path
    key = hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:16]
    return download_dir(source, cache_root() / "models" / key)


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


def load_model(source: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               init_context: contextlib.AbstractContextManager | None = None) -> LoadedModel:
    """Load model + tokenizer and the adapter for its architecture.

    ``init_context`` wraps model construction (DeepSpeed's ``zero.Init`` uses it
    to shard parameters as they are created).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(source)
    local = local_model_dir(source)
    config = read_config(local)
    adapter = adapter_for(config.get("model_type", "<missing model_type>"))
    check_checkpoint(local)
    with init_context or contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    model.eval()
    if init_context is None:
        model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelError(f"{local}: no usable tokenizer ({err}); save the tokenizer next to the weights") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, config=config, local_dir=local,
                       source=source, fingerprint=fingerprint(str(local)))
