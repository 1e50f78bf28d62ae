"""lga-dist models: the packaged models, whether they are installed, and where their converted copy is."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys

from lga_dist.config import option
from lga_dist.console import format_table
from lga_dist.io.storage import cache_root
from lga_dist.models.demo import demo_model_dir
from lga_dist.models.gguf import CONVERTED_MARKER, converted_dir
from lga_dist.models.packaged import DEFAULT_MODEL, PACKAGED_MODELS, PackagedModel
from lga_dist.models.sources import ModelError, resolve_model

_REAL = ", ".join(m.name for m in PACKAGED_MODELS if m.locate is not None)
_INSTALLABLE = tuple(m.name for m in PACKAGED_MODELS if m.locate is not None)
DESCRIPTION = f"""List the models lga_dist can run with no hub access: pass a name as --model to any job.

{_REAL} are real pretrained models that install from PyPI as GGUF files;
the first use de-quantises them to float32 safetensors in the cache ($LGA_DIST_CACHE, default
~/.cache/lga_dist), keyed by the GGUF's sha256. demo is the small fact model lga_dist trains
itself for fast tests (figures measured on it say nothing about real models). The default of
every job is {DEFAULT_MODEL}. --install NAME runs the pip command a model needs (qwen2.5-coder-1.5b is never
installed with lga_dist: 22 packages, 1.1 GB, 7 GB once de-quantised); --prepare NAME converts (or builds)
one now."""


@dataclasses.dataclass
class Config:
    install: str | None = option(None, "run the exact pip command that installs this packaged model, then list",
                                 choices=_INSTALLABLE)
    prepare: str | None = option(None, "convert this packaged model into the cache now (first use does it too)",
                                 choices=tuple(m.name for m in PACKAGED_MODELS))


def cached_folder(model: PackagedModel) -> str | None:
    """The converted (or built) folder, if it exists already."""
    if model.locate is None:

        folder = demo_model_dir()
        return str(folder) if (folder / "demo_report.json").exists() else None
    gguf = model.existing_gguf()
    if gguf is None:
        return None
    folder = converted_dir(gguf)
    return str(folder) if (folder / CONVERTED_MARKER).exists() else None


def install(model: PackagedModel) -> None:
    """The model's pip command, with this interpreter's pip, output passed through; a failure is a one-line error."""
    command = shlex.split(model.install)
    assert command[:2] == ["pip", "install"], model.install
    print(f"installing {model.name}: {model.install}", flush=True)
    if subprocess.run([sys.executable, "-m", *command], check=False).returncode != 0:
        raise ModelError(f"installing {model.name} failed (see pip's output above); the command: {model.install}")


def run(config: Config) -> tuple[dict, int]:
    if config.install:
        install(next(m for m in PACKAGED_MODELS if m.name == config.install))
    if config.prepare:

        resolve_model(config.prepare)
    listed = [{"name": m.name, "package": m.package, "installed": m.installed(), "family": m.family,
               "layers": m.layers, "parameters": m.parameters, "cached": cached_folder(m)} for m in PACKAGED_MODELS]
    print(format_table([{**row, "name": row["name"] + (" (default)" if row["name"] == DEFAULT_MODEL else ""),
                         "cached": row["cached"] or "-"} for row in listed]))
    for model in PACKAGED_MODELS:
        if not model.installed():
            print(f"{model.name}: not installed; {model.install}")
    print(f"cache: {cache_root()}")
    return {"models": [{k: v for k, v in row.items() if k != "family"} for row in listed], "default": DEFAULT_MODEL}, 0
