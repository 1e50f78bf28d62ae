"""Model sources: GGUF files (round trip, cache, fingerprint), packaged names, hub ids, and their errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import run_cli, write_tiny_gguf

from lga_dist.models import ModelError, describe_model, load_model, resolve_model
from lga_dist.models.gguf import CONVERTED_MARKER, GGUFError
from lga_dist.models.packaged import PACKAGED_MODELS, PackagedModel, PackageMissing


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LGA_DIST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_round_trip_cache_and_fingerprint(tmp_path, cache):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    ids = torch.tensor([[1, 5, 9, 33, 40, 7, 31]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    assert loaded.tokenizer("ab cd").input_ids == [1, 30, 5, 32, 7]  # BOS, "\u2581a" b, "\u2581c" d: the file's vocab
    folder = loaded.local_dir
    assert folder.parent == cache / "models" and (folder / CONVERTED_MARKER).exists()
    marker_time = (folder / CONVERTED_MARKER).stat().st_mtime_ns
    # Second use: the same folder, not converted again, the same fingerprint (also for a copy elsewhere).
    again = describe_model(str(tmp_path / "tiny.gguf"))
    assert (folder / CONVERTED_MARKER).stat().st_mtime_ns == marker_time
    assert again.fingerprint == loaded.fingerprint and again.model_id == "tiny.gguf"
    shutil.copy(tmp_path / "tiny.gguf", tmp_path / "copy.gguf")
    assert resolve_model(str(tmp_path / "copy.gguf")) == str(folder)
    # A changed file is a new entry with a new fingerprint.
    write_tiny_gguf(tmp_path / "tiny.gguf", seed=1)
    changed = describe_model(str(tmp_path / "tiny.gguf"))
    assert resolve_model(str(tmp_path / "tiny.gguf")) != str(folder)
    assert changed.fingerprint != loaded.fingerprint


@pytest.mark.s3
@pytest.mark.slow
def test_gguf_from_s3_is_the_same_model(tmp_path, cache, s3):
    import s3fs

    write_tiny_gguf(tmp_path / "tiny.gguf", seed=2)
    s3fs.S3FileSystem().put_file(str(tmp_path / "tiny.gguf"), f"{s3}/models/tiny.gguf")
    local = describe_model(str(tmp_path / "tiny.gguf"))
    remote = describe_model(f"{s3}/models/tiny.gguf")
    assert remote.fingerprint == local.fingerprint and remote.n_layers == 2


def test_corrupt_gguf_is_a_one_line_error(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(2000))
    with pytest.raises(GGUFError, match="not a GGUF checkpoint transformers can load"):
        resolve_model(str(bad))
    code, _, stderr, summary = run_cli("rank-layers", "--model", str(bad), "--out", str(tmp_path / "out"),
                                       "--actors", "0", "--no-progress", env={"LGA_DIST_CACHE": str(cache)})
    assert code == 2 and summary["status"] == "error" and "broken.gguf" in summary["error"]
    assert "Traceback" not in stderr and not list(cache.glob("models/*staging*"))


def test_hub_id_without_a_cached_copy_is_a_one_line_error(tmp_path, cache):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "LGA_DIST_CACHE": str(cache)}
    code, _, stderr, summary = run_cli("rank-layers", "--model", "someorg/some-model", "--out", str(tmp_path / "o"),
                                       "--actors", "0", "--no-progress", env=env)
    assert code == 2 and "Traceback" not in stderr
    assert "Hugging Face cache" in summary["error"] and str(tmp_path / "hf") in summary["error"]


def test_hub_id_in_the_cache_resolves_to_its_snapshot(tmp_path):
    import subprocess
    import sys

    from helpers import save_tiny_model

    repo = tmp_path / "hub" / "models--someorg--tiny"
    snapshot = save_tiny_model(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    found = subprocess.run([sys.executable, "-c", "from lga_dist.models import resolve_model; "
                            "print(resolve_model('someorg/tiny'))"], env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert os.path.realpath(found.stdout.strip().splitlines()[-1]) == os.path.realpath(snapshot)


def test_unknown_source_and_missing_package_say_what_to_do(tmp_path, cache):
    with pytest.raises(ModelError, match="packaged model"):
        resolve_model(str(tmp_path / "nothing-here"))
    absent = PackagedModel("absent-1m", "absent-pkg", "absent_pkg_module", "pip install absent-pkg", "llama", 2,
                           "1M", "test", locate=lambda model, assemble: None)
    assert not absent.installed()
    with pytest.raises(PackageMissing, match="pip install absent-pkg"):
        absent.gguf_path()


def test_unknown_architecture_is_a_one_line_error(tmp_path, cache):
    from helpers import save_tiny_model

    folder = save_tiny_model(tmp_path / "m")
    config = (folder / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "mamba"')
    (folder / "config.json").write_text(config)
    code, _, stderr, summary = run_cli("rank-layers", "--model", str(folder), "--out", str(tmp_path / "o"),
                                       "--actors", "0", "--no-progress", env={"LGA_DIST_CACHE": str(cache)})
    assert code == 2 and "unknown architecture 'mamba'" in summary["error"] and "Traceback" not in stderr


def test_models_command_lists_every_packaged_model(cache):
    code, stdout, _, summary = run_cli("models", env={"LGA_DIST_CACHE": str(cache)})
    assert code == 0 and [m["name"] for m in summary["models"]] == [m.name for m in PACKAGED_MODELS]
    assert summary["default"] == "gemma3-270m" and "(default)" in stdout
    installed = {m["name"]: m["installed"] for m in summary["models"]}
    assert installed["demo"] is True


def test_converting_a_gguf_keeps_stdout_for_the_table(tmp_path, cache):
    """A first run de-quantises the GGUF; the DeepSpeed import that transformers' save_pretrained triggers
    announces its accelerator, and that line must not land between the job's output and its table."""
    write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    code, stdout, stderr, summary = run_cli("rank-layers", "--model", str(tmp_path / "tiny.gguf"), "--proxy-size", "2",
                                            "--actors", "0", "--out", str(tmp_path / "out"), "--no-progress",
                                            env={"LGA_DIST_CACHE": str(cache)})
    assert code == 0, stderr[-2000:]
    assert "accelerator" not in stdout.lower() and summary["golden_layer"] is not None
