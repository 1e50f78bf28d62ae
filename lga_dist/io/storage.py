"""Paths that may be local or remote (s3://), and writes that never leave half a file.

fsspec/s3fs do the I/O. The S3 endpoint and credentials come from the standard
AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ...), which botocore reads itself; nothing here needs to know them.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from lga_dist.errors import UserError


class StorageError(UserError, RuntimeError):
    """An input or output location that cannot be used; the message says what to do."""


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``path`` and the path as that filesystem spells it."""
    try:
        return url_to_fs(str(path))
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {path}: {err}") from err


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def cache_root() -> Path:
    """Where downloaded models, demo models and statistics are cached (LGA_DIST_CACHE overrides)."""
    return Path(os.environ.get("LGA_DIST_CACHE") or Path.home() / ".cache" / "lga_dist")


def explain(err: BaseException, path: str) -> StorageError:
    """Turn a low-level storage exception into one line that says what to check."""
    name = type(err).__name__
    text = str(err) or name
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(f"{path}: no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            f"or AWS_PROFILE (and AWS_ENDPOINT_URL for a non-AWS endpoint)")
    if isinstance(err, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        return StorageError(f"{path}: not found ({text.splitlines()[0]})")
    if isinstance(err, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return StorageError(f"{path}: access denied; check the S3 credentials and bucket policy ({name})")
    if "EndpointConnectionError" in name or "ConnectionError" in name or "Could not connect" in text:
        return StorageError(f"{path}: cannot reach the storage endpoint; check AWS_ENDPOINT_URL "
                            f"({text.splitlines()[0]})")
    return StorageError(f"{path}: {name}: {text.splitlines()[0] if text else ''}")


@contextlib.contextmanager
def storage_errors(path: str) -> Iterator[None]:
    """Re-raise storage failures while working on ``path`` as one-line StorageErrors."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - every backend raises its own types
        if type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp") \
                or isinstance(err, (FileNotFoundError, PermissionError, ConnectionError)):
            raise explain(err, path) from err
        raise


def open_file(path: str | os.PathLike, mode: str = "rb") -> IO:
    """Open a local or remote file for reading."""
    fs, fs_path = filesystem(path)
    with storage_errors(str(path)):
        return fs.open(fs_path, mode)


def exists(path: str | os.PathLike) -> bool:
    fs, fs_path = filesystem(path)
    with storage_errors(str(path)):
        return fs.exists(fs_path)


def remove(path: str | os.PathLike) -> None:
    """Delete a file if it is there."""
    fs, fs_path = filesystem(path)
    with storage_errors(str(path)):
        if fs.exists(fs_path):
            fs.rm_file(fs_path)


def makedirs(path: str | os.PathLike) -> None:
    fs, fs_path = filesystem(path)
    if not is_remote(path):  # object stores have no directories to create
        with storage_errors(str(path)):
            fs.makedirs(fs_path, exist_ok=True)


def list_files(path: str | os.PathLike, suffixes: tuple[str, ...]) -> list[str]:
    """Files under a directory/prefix (or the file itself) whose names end in one of ``suffixes``, sorted."""
    fs, fs_path = filesystem(path)
    with storage_errors(str(path)):
        if fs.isdir(fs_path):
            found = [p for p in fs.find(fs_path) if p.lower().endswith(suffixes)]
        elif fs.exists(fs_path):
            found = [fs_path]
        else:
            raise StorageError(f"{path}: not found")
    protocol = str(path).split("://", 1)[0] + "://" if is_remote(path) else ""
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in sorted(found)]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file and move it into place only when the block succeeds.

    Local files are renamed within their directory (atomic on POSIX); remote files
    are uploaded in one put, which S3 makes visible only once complete.
    """
    path = str(path)
    remote = is_remote(path)
    directory = tempfile.gettempdir() if remote else (os.path.dirname(os.path.abspath(path)) or ".")
    if not remote:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        if remote:
            fs, fs_path = filesystem(path)
            with storage_errors(path):
                fs.put_file(tmp, fs_path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def upload_dir(local_dir: str | os.PathLike, target: str) -> None:
    """Copy a finished local directory to ``target`` (local or remote), file by file, each atomically."""
    for source in sorted(Path(local_dir).rglob("*")):
        if source.is_file():
            with open(source, "rb") as src, atomic_write(join(target, *source.relative_to(local_dir).parts)) as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)


def download_dir(remote: str, local_dir: str | os.PathLike) -> Path:
    """Mirror a remote prefix into ``local_dir`` (skipping files already there with the same size)."""
    fs, fs_path = filesystem(remote)
    local_dir = Path(local_dir)
    with storage_errors(remote):
        if not fs.isdir(fs_path):
            raise StorageError(f"{remote}: no such directory/prefix")
        for source in fs.find(fs_path, detail=True).values():
            _fetch(fs, source["name"], source["size"], local_dir / posixpath.relpath(source["name"], fs_path))
    return local_dir


def download_file(remote: str, destination: str | os.PathLike) -> Path:
    """Mirror one remote file to ``destination`` (skipped when a file of the same size is there)."""
    fs, fs_path = filesystem(remote)
    with storage_errors(remote):
        _fetch(fs, fs_path, fs.size(fs_path), Path(destination))
    return Path(destination)


def _fetch(fs: fsspec.AbstractFileSystem, fs_path: str, size: int, destination: Path) -> None:
    """Download under a temporary name and rename, so a reader never sees half a file."""
    if destination.exists() and destination.stat().st_size == size:
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    fs.get_file(fs_path, str(partial))
    os.replace(partial, destination)


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Parquet, written atomically to a local path or s3://."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue().to_pybytes())


def read_parquet(path: str | os.PathLike) -> pa.Table:
    """A whole Parquet file (local or s3://), parsed from memory that Arrow owns."""
    return pq.read_table(pa.BufferReader(read_into_arrow(path)))


def read_into_arrow(path: str | os.PathLike) -> pa.Buffer:
    """The bytes of a file, copied into an Arrow-allocated buffer.

    Arrow's readers finish on their own I/O threads; if what they read is a Python
    object (a file handle, or bytes wrapped by pa.py_buffer) and the last reference
    drops on such a thread while the interpreter shuts down, its destructor asks
    for the GIL, the thread is cancelled inside a noexcept destructor and the
    process aborts ("terminate called without an active exception", exit 134)
    after a run that had succeeded. Memory Arrow allocated itself needs no GIL.
    """
    with storage_errors(str(path)), open_file(path, "rb") as handle:
        return arrow_buffer(handle)


def arrow_buffer(handle: IO[bytes]) -> pa.Buffer:
    """The rest of an open file, copied into an Arrow-allocated buffer (see read_into_arrow)."""
    sink = pa.BufferOutputStream()
    while block := handle.read(16 << 20):
        sink.write(block)
    return sink.getvalue()
