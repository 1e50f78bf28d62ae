"""DeepSpeed ZeRO-3 for scoring: a sharded, frozen model with no optimizer.

Every rank holds 1/N of every parameter; DeepSpeed gathers a module's weights
just before its forward (and again for the backward) and frees them after, so
the hook-based LGA scorer runs on the engine's module unchanged. Precision comes
from the job's ``--dtype`` and overrides whatever the config file says, so one
flag decides it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from transformers.integrations import HfDeepSpeedConfig

from lga_dist.config import ConfigError
from lga_dist.io.storage import open_file, storage_errors
from lga_dist.models.loading import load_model

# Plain ZeRO-3 for frozen-weight scoring. Persistence threshold 0: every weight is
# partitioned, even the small ones (norms), so 1/N per rank holds exactly.
# cluster/deepspeed/zero3.json is this dict (a test keeps them equal).
DEFAULT_ZERO3: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
    },
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


def load_deepspeed_config(path: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """The config file (local or s3://) or the built-in default, with precision set from ``dtype``."""
    if path is None:
        config = copy.deepcopy(DEFAULT_ZERO3)
    else:
        with storage_errors(path), open_file(path, "rb") as handle:
            try:
                config = json.load(handle)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: not a JSON DeepSpeed config ({err})") from err
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"{path or 'DeepSpeed config'}: zero_optimization.stage must be 3 (sharded weights), "
                          f"got {stage}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"ZeRO-3 holds float32, float16 or bfloat16 weights, not {dtype}; "
                          f"use --actors 0 for other dtypes")
    config["fp16"] = {"enabled": dtype == torch.float16}
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    return config


def default_config_path() -> Path:
    """Where the repository keeps the default as a file for users to copy (not needed at run time)."""
    return Path(__file__).resolve().parents[2] / "cluster" / "deepspeed" / "zero3.json"


def load_sharded_model(source: str, dtype: torch.dtype, deepspeed_config: dict[str, Any]):
    """Load the model straight into ZeRO-3 partitions and wrap it in a no-optimizer engine.

    transformers builds the model inside ``deepspeed.zero.Init`` and scatters the
    checkpoint into the partitions when a ``HfDeepSpeedConfig`` is alive, so no
    rank ever holds the full model. Returns (LoadedModel, engine, hf_config); keep
    ``hf_config`` referenced while the model is used.
    """
    import deepspeed


    hf_config = HfDeepSpeedConfig(deepspeed_config)
    loaded = load_model(source, dtype=dtype, device=None)
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=loaded.model, config=deepspeed_config)
    return loaded, engine, hf_config


def partition_sizes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (elements held by this rank, elements of the full parameter)."""
    return {name: (int(p.ds_tensor.numel()), int(p.ds_numel)) for name, p in model.named_parameters()}
