"""Adapters, safe loading and fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import FAMILIES, save_tiny_model, tiny_config
from safetensors.torch import load_file, save_file

from lga_dist.io.storage import filesystem, upload_dir
from lga_dist.models import ModelError, UnknownArchitecture, adapter_for, fingerprint, get_module, load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_resolve_on_every_family(family):
    import transformers

    config = tiny_config(family)
    model = transformers.AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(config.model_type)
    assert adapter.n_layers(config) == 3 == adapter.n_layers(config.to_dict())
    for layer in range(3):
        out = get_module(model, adapter.mlp_out_name(layer))
        weight = adapter.oriented_weight(out)
        for name in adapter.mlp_in_names(layer):
            inp = adapter.oriented_weight(get_module(model, name))
            assert inp.shape[0] == weight.shape[1]  # MLP input projections feed the output projection
        assert weight.shape[0] == model.get_input_embeddings().weight.shape[1]  # back to the residual stream
        assert adapter.param_set_modules(layer, "mlp")[-1] == adapter.mlp_out_name(layer)
    assert isinstance(get_module(model, adapter.final_norm), torch.nn.Module)


def test_unknown_architecture_message():
    with pytest.raises(UnknownArchitecture, match=r"unknown architecture 'bert'.*adapters.py"):
        adapter_for("bert")


def test_load_model_and_errors(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m")
    loaded = load_model(str(model_dir))
    assert loaded.n_layers == 3 and loaded.adapter.family == "llama" and loaded.model_id == "m"
    assert loaded.fingerprint == fingerprint(str(model_dir))
    assert not loaded.model.training

    with pytest.raises(ModelError, match="no such model; --model takes a folder"):
        load_model(str(tmp_path / "missing"))
    no_config = tmp_path / "no_config"
    shutil.copytree(model_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(no_config))
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="safetensors only"):
        load_model(str(pickled))
    unknown = tmp_path / "unknown"
    shutil.copytree(model_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(UnknownArchitecture, match="unknown architecture 'bert'"):
        load_model(str(unknown))


def perturbed_copy(source, target, tensor_name=None, element=None):
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    name = tensor_name or sorted(tensors)[len(tensors) // 2]
    if element is None:
        tensors[name] = tensors[name] + 1e-3 * torch.randn_like(tensors[name])
    else:
        tensors[name].view(-1)[element] += 1.0
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return name


def test_fingerprint_changes_with_any_tensor_and_only_then(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    reference = fingerprint(str(base))
    assert reference.startswith("sha256:") and len(reference) == 71
    assert fingerprint(str(base)) == reference
    # Same content saved again: same fingerprint (content, not timestamps or paths).
    again = save_tiny_model(tmp_path / "again")
    assert fingerprint(str(again)) == reference
    names = sorted(load_file(base / "model.safetensors"))
    for i, name in enumerate(names):  # every tensor, perturbed on its own, changes the fingerprint
        perturbed_copy(base, tmp_path / f"p{i}", name)
        assert fingerprint(str(tmp_path / f"p{i}")) != reference, name
    other_seed = save_tiny_model(tmp_path / "seed1", seed=1)
    assert fingerprint(str(other_seed)) != reference
    config_changed = tmp_path / "cfg"
    shutil.copytree(base, config_changed)
    config = json.loads((config_changed / "config.json").read_text())
    (config_changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert fingerprint(str(config_changed)) != reference
    tokenizer_changed = tmp_path / "tok"
    shutil.copytree(base, tokenizer_changed)
    with open(tokenizer_changed / "tokenizer.json", "a") as handle:
        handle.write(" ")
    assert fingerprint(str(tokenizer_changed)) != reference


def test_full_fingerprint_catches_a_single_element(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    name = "model.layers.1.mlp.down_proj.weight"
    perturbed_copy(base, tmp_path / "one", name, element=777)
    assert fingerprint(str(tmp_path / "one"), full=True) != fingerprint(str(base), full=True)


@pytest.mark.s3
@pytest.mark.slow
def test_model_from_s3_has_the_local_fingerprint(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("LGA_DIST_CACHE", str(tmp_path / "cache"))
    base = save_tiny_model(tmp_path / "base")
    upload_dir(base, f"{s3}/models/tiny")
    assert fingerprint(f"{s3}/models/tiny") == fingerprint(str(base))
    loaded = load_model(f"{s3}/models/tiny")
    assert loaded.fingerprint == fingerprint(str(base)) and loaded.model_id == "tiny"
    assert str(loaded.local_dir).startswith(str(tmp_path / "cache"))
    reference = load_model(str(base)).model
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    fs, path = filesystem(f"{s3}/models/tiny")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path)) == sorted(p.name for p in base.iterdir())


def test_tracing_helpers_put_hooks_and_flags_back_even_on_error():
    import torch

    from lga_dist.models.tracing import forward_hooks, hidden_of, trainable_only, with_hidden

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    x = torch.ones(1, 3)
    clean = model(x)
    seen = []
    with forward_hooks([(model[0], lambda m, args, out: seen.append(out.shape)),
                        (model[1], lambda m, args, out: out * 0)]):
        assert torch.equal(model(x), torch.zeros(1, 2))  # a hook that returns replaces the output
    assert seen == [torch.Size([1, 3])] and torch.equal(model(x), clean)
    try:
        with forward_hooks([(model[1], lambda m, args, out: out * 0)]), trainable_only(model, [model[0].weight]):
            assert [p.requires_grad for p in model.parameters()] == [True, False, False, False]
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.equal(model(x), clean)
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    hidden = torch.zeros(2)
    assert hidden_of((hidden, "cache")) is hidden and with_hidden((hidden, "cache"), hidden + 1)[1] == "cache"
    assert torch.equal(with_hidden(hidden, hidden + 1), hidden + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_running_from_a_block_on_its_cached_input_gives_the_full_forward_bit_for_bit(family):
    """Gemma 3 alternates sliding and full attention per block: the skipped blocks stay in place, so
    every block keeps its own attention type; a hook at the start block sees the same states too."""
    import transformers

    from lga_dist.models.tracing import block_input, forward_hooks, run_from_block

    torch.manual_seed(0)
    config = tiny_config(family, n_layers=4)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    adapter = adapter_for(config.model_type)
    blocks = get_module(model, adapter.layers)
    ids = torch.randint(3, config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        for start in range(4):
            below = block_input(model, blocks, start, input_ids=ids, attention_mask=mask)
            outputs = []
            mlp_out = get_module(model, adapter.mlp_out_name(start))
            with forward_hooks([(mlp_out, lambda m, a, out: outputs.append(out))]):
                with run_from_block(blocks, start, below):
                    resumed = model(input_ids=ids, attention_mask=mask).logits
                model(input_ids=ids, attention_mask=mask)
            assert torch.equal(resumed, full), (family, start)
            assert torch.equal(outputs[0], outputs[1])
    assert all("forward" not in vars(block) for block in blocks)  # every block runs again afterwards
    assert not any(block._forward_pre_hooks for block in blocks)
