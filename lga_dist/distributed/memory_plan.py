"""Will a ranking fit? Per-actor memory of a ZeRO-3 scoring group, from config.json alone.

The model is instantiated on the meta device (shapes, no storage), so this runs
on a laptop for a 70B config. Counted per actor:

- parameters: its ZeRO-3 partition, ceil(numel/N) of every parameter larger than
  ``stage3_param_persistence_threshold`` and a full copy of the smaller ones; on
  the accelerator, or in host memory when the config offloads parameters;
- gathered parameters: the largest block (a decoder layer, the embedding or the
  LM head) fully gathered plus the prefetch bucket, capped by
  ``stage3_max_live_parameters``;
- activations of one scoring pass: 2 x batch sequences (true and new answer) of
  ``tokens`` tokens, per layer about 6h + 4i + heads*tokens values kept for the
  backward (h hidden, i MLP width), plus the LGA hooks' copies of each hooked
  module's input and output gradient;
- a fixed runtime reserve (CUDA context, communication buffers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from lga_dist.console import format_table
from lga_dist.models.adapters import adapter_for, get_module
from lga_dist.models.loading import dtype_name, model_id, read_model_config

RUNTIME_RESERVE_BYTES = 2 * 10**9
DEEPSPEED_DEFAULTS = {"stage3_param_persistence_threshold": 100_000, "stage3_prefetch_bucket_size": 50_000_000,
                      "stage3_max_live_parameters": 1_000_000_000}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    model_id: str
    model_type: str
    actors: int
    n_params: int
    dtype: str
    param_bytes_per_actor: int
    params_offloaded: bool
    gathered_bytes_per_actor: int
    activation_bytes_per_actor: int
    device_bytes: int

    @property
    def device_bytes_per_actor(self) -> int:
        resident = 0 if self.params_offloaded else self.param_bytes_per_actor
        return resident + self.gathered_bytes_per_actor + self.activation_bytes_per_actor + RUNTIME_RESERVE_BYTES

    @property
    def fits(self) -> bool:
        return self.device_bytes_per_actor <= self.device_bytes

    def summary(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_type": self.model_type, "actors": self.actors,
                "n_params": self.n_params, "dtype": self.dtype,
                "param_bytes_per_actor": self.param_bytes_per_actor, "params_offloaded": self.params_offloaded,
                "gathered_bytes_per_actor": self.gathered_bytes_per_actor,
                "activation_bytes_per_actor": self.activation_bytes_per_actor,
                "device_bytes_per_actor": self.device_bytes_per_actor, "device_bytes": self.device_bytes,
                "fits": self.fits}

    def table(self) -> str:
        gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        where = "host (offloaded)" if self.params_offloaded else "accelerator"
        rows = [("model", f"{self.model_id} ({self.model_type}), {self.n_params / 1e9:.2f}B parameters, {self.dtype}"),
                ("actors", self.actors),
                ("parameter shard per actor", f"{gb(self.param_bytes_per_actor)} on {where}"),
                ("gathered parameters (peak)", gb(self.gathered_bytes_per_actor)),
                ("activations per scoring pass", gb(self.activation_bytes_per_actor)),
                ("runtime reserve", gb(RUNTIME_RESERVE_BYTES)),
                ("accelerator memory per actor", f"{gb(self.device_bytes_per_actor)} of {gb(self.device_bytes)}"),
                ("fits", "yes" if self.fits else "NO: add actors, offload parameters or lower --batch-size")]
        return format_table([{"item": k, "value": v} for k, v in rows])


def meta_model(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The architecture with shapes only (no storage, no weights read)."""

    hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def plan_memory(source: str, *, actors: int, dtype: torch.dtype, deepspeed_config: dict[str, Any], batch_size: int,
                tokens: int, param_set: str, device_bytes: int) -> MemoryPlan:
    config = read_model_config(source)
    adapter = adapter_for(config.get("model_type", "<missing model_type>"))
    model = meta_model(config, dtype)
    zero = {**DEEPSPEED_DEFAULTS, **deepspeed_config.get("zero_optimization", {})}
    item = torch.empty((), dtype=dtype).element_size()

    params = list(model.parameters())  # shared (tied) parameters appear once
    threshold = zero["stage3_param_persistence_threshold"]
    shard = sum(p.numel() if p.numel() <= threshold else math.ceil(p.numel() / actors) for p in params)

    n_layers = adapter.n_layers(config)
    blocks = [get_module(model, adapter.layer_name(l)) for l in range(n_layers)]
    blocks += [model.get_input_embeddings(), model.get_output_embeddings()]
    largest = max(sum(p.numel() for p in block.parameters()) for block in blocks if block is not None)
    gathered = min(zero["stage3_max_live_parameters"], largest + zero["stage3_prefetch_bucket_size"])

    hidden = model.get_input_embeddings().weight.shape[1]
    out_module = get_module(model, adapter.mlp_out_name(0))
    mlp_width = adapter.oriented_weight(out_module).shape[1]
    heads = getattr(model.config, "num_attention_heads", 1)
    positions = 2 * batch_size * tokens
    per_layer = 6 * hidden + 4 * mlp_width + heads * tokens
    hooked = sum(sum(adapter.oriented_weight(get_module(model, name)).shape)
                 for name in adapter.param_set_modules(0, param_set))
    activations = positions * n_layers * (per_layer + hooked) * item

    offload = zero.get("offload_param", {}).get("device", "none") not in (None, "none")
    return MemoryPlan(model_id=model_id(source, config), model_type=config["model_type"], actors=actors,
                      n_params=sum(p.numel() for p in params), dtype=dtype_name(dtype),
                      param_bytes_per_actor=shard * item, params_offloaded=offload,
                      gathered_bytes_per_actor=gathered * item, activation_bytes_per_actor=activations,
                      device_bytes=device_bytes)
