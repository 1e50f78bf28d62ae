"""Architecture adapters: the only place that knows how each model family names its modules.

Everything else asks an adapter for "layer l's MLP output projection" and never
spells a module name itself. Adding a family means adding one record here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lga_dist.errors import UserError


class UnknownArchitecture(UserError, ValueError):
    """A model family without an adapter record, or a checkpoint that does not match its adapter."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Where a transformer family keeps the pieces knowledge editing touches.

    ``mlp_in``/``mlp_out`` are relative to the layer module. ``conv1d`` marks
    GPT-2's Conv1D, whose weight is stored (in, out) instead of nn.Linear's (out, in).
    ``mlp_post_norm`` names the norm some families (Gemma 2/3) put between the MLP's
    output projection and the residual stream; None where the MLP writes straight into it.
    Embeddings and the LM head come from transformers' own
    ``get_input_embeddings()``/``get_output_embeddings()``, which track renames.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str  # dotted path of the ModuleList holding the blocks
    mlp_in: tuple[str, ...]
    mlp_out: str
    final_norm: str
    n_layers_keys: tuple[str, ...] = ("num_hidden_layers", "n_layer")
    conv1d: bool = False
    mlp_post_norm: str | None = None

    def n_layers(self, config: Any) -> int:
        for key in self.n_layers_keys:
            value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
            if value is not None:
                return int(value)
        raise UnknownArchitecture(f"{self.family}: config has none of {self.n_layers_keys}")

    def layer_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def block_of(self, name: str) -> int:
        """Which block a module lies in: ``model.layers.5.mlp.down_proj`` -> 5."""
        prefix = self.layers + "."
        if not name.startswith(prefix):
            raise ValueError(f"{name!r} is not inside a block of {self.layers!r}")
        return int(name[len(prefix):].split(".")[0])

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.layer_name(layer)}.{self.mlp_out}"

    def mlp_post_norm_name(self, layer: int) -> str | None:
        return f"{self.layer_name(layer)}.{self.mlp_post_norm}" if self.mlp_post_norm else None

    def mlp_in_names(self, layer: int) -> list[str]:
        return [f"{self.layer_name(layer)}.{name}" for name in self.mlp_in]

    def param_set_modules(self, layer: int, param_set: str) -> list[str]:
        """Module names whose weights make up ``param_set`` ('out': the edited projection; 'mlp': all MLP linears)."""
        if param_set == "out":
            return [self.mlp_out_name(layer)]
        if param_set == "mlp":
            return self.mlp_in_names(layer) + [self.mlp_out_name(layer)]
        raise ValueError(f"unknown parameter set {param_set!r}; choose 'out' or 'mlp'")

    def oriented_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The weight as (out_features, in_features), whatever the storage layout."""
        return self.orient(module.weight)

    def key_width(self, module: torch.nn.Module) -> int:
        """The edited projection's input width (the key's), read from the module's own record of it: a ZeRO-3
        partition's weight has no shape to read."""
        return int(module.nx if self.conv1d else module.in_features)

    def orient(self, stored: torch.Tensor) -> torch.Tensor:
        """A tensor stored like this family's weights, viewed as (out_features, in_features)."""
        return stored.T if self.conv1d else stored


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("gpt2", ("gpt2",), "transformer.h", ("mlp.c_fc",), "mlp.c_proj", "transformer.ln_f", conv1d=True),
    Adapter("gptj", ("gptj",), "transformer.h", ("mlp.fc_in",), "mlp.fc_out", "transformer.ln_f"),
    Adapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h",
            "gpt_neox.final_layer_norm"),
    # LLaMA-style blocks; the embedded demo fact model is a LLaMA.
    Adapter("llama", ("llama", "mistral", "qwen2"), "model.layers", ("mlp.gate_proj", "mlp.up_proj"),
            "mlp.down_proj", "model.norm"),
    # Gemma 3 text models (the 270M-27B text stacks). The block norms the MLP output before it joins the
    # residual (post_feedforward_layernorm); down_proj is still the linear map ROME/MEMIT edit and LGA
    # differentiates: its input is the key, its output the value, the norm is part of what follows it.
    # Embeddings are scaled by sqrt(hidden) inside the embedding module and the LM head is tied to them;
    # both are reached through get_input_embeddings()/get_output_embeddings() like any other family.
    Adapter("gemma3", ("gemma3_text",), "model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
            "model.norm", mlp_post_norm="post_feedforward_layernorm"),
)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a Hugging Face ``config.model_type``."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnknownArchitecture(
        f"unknown architecture {model_type!r}: lga_dist supports {', '.join(supported_model_types())}; "
        f"add an Adapter record in lga_dist/models/adapters.py for a new family")


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise UnknownArchitecture(f"model has no module {name!r}; the adapter does not match this checkpoint") from err
