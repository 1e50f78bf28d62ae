"""Every ``--model`` the jobs accept, turned into a Hugging Face folder (local, or an s3:// prefix).

Accepted: a packaged model name (``lga-dist models``); a ``.gguf`` file, local or
s3://, de-quantised once into the cache; a local Hugging Face folder; an s3://
prefix holding one; a hub id (``org/name``) already in the standard Hugging Face
cache. Nothing is downloaded from a hub at run time. Drivers and actors both
resolve the same string, so on a cluster each node converts or mirrors for itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.constants import HF_HUB_CACHE

from lga_dist.errors import UserError
from lga_dist.io.storage import is_remote
from lga_dist.models.demo import build_demo_model
from lga_dist.models.gguf import gguf_model_dir
from lga_dist.models.packaged import packaged_model, packaged_names

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(UserError, RuntimeError):
    """A model that cannot be used; the one-line message says what to do."""


def resolve_model(source: str, *, progress: bool = True) -> str:
    """A Hugging Face model folder (local path or s3:// prefix) for ``source``."""
    source = str(source)
    packaged = packaged_model(source)
    if packaged is not None:
        if packaged.locate is None:

            return build_demo_model(show_progress=progress).path
        return str(gguf_model_dir(str(packaged.gguf_path()), progress=progress))
    if source.lower().endswith(".gguf"):
        return str(gguf_model_dir(source, progress=progress))
    if is_remote(source) or Path(source).is_dir():
        return source
    if HUB_ID.match(source) and not Path(source).exists():
        return hub_snapshot(source)
    raise ModelError(f"{source}: no such model; --model takes a folder, an s3:// prefix, a .gguf file, a hub id "
                     f"already in the Hugging Face cache, or a packaged model ({', '.join(packaged_names())})")


def hub_snapshot(repo_id: str) -> str:
    """The cached snapshot of a hub model; never a download (jobs run where the hub may be unreachable)."""

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - LocalEntryNotFoundError, HFValidationError, OfflineModeIsEnabled
        raise ModelError(
            f"{repo_id}: not a local folder, and the Hugging Face cache ({HF_HUB_CACHE}) has no copy of this hub "
            f"model ({type(err).__name__}); lga_dist never downloads at run time: fetch it where the hub is "
            f"reachable (hf download {repo_id}) or pass a folder, s3:// prefix or .gguf file as --model") from err
