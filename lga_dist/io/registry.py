"""The ranking registry that scheduled re-ranking keeps: rankings by key, a history, and a lock.

Layout under REGISTRY (a directory or s3:// prefix):

    rankings/<name>/<fingerprint[:16]>-<proxy hash>-<options hash>/ranking.parquet
    history.parquet            one row per ranking computed (append-only, rewritten atomically)
    reports/<name>-<time>.md   (+ .png) comparison written when the golden layer drifts
    lock.json                  held by the one run allowed to write; expires if its owner dies

A run writes a ranking first and the history row second, each atomically, so a
crash leaves the registry readable: at worst a ranking without its history row,
which the next run finds and records instead of recomputing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

import pyarrow as pa

from lga_dist.errors import UserError
from lga_dist.io.storage import (
    atomic_write,
    exists,
    filesystem,
    is_remote,
    join,
    makedirs,
    open_file,
    read_parquet,
    storage_errors,
    write_parquet,
)

log = logging.getLogger(__name__)

HISTORY_SCHEMA = pa.schema([
    ("name", pa.string()), ("model", pa.string()), ("model_fingerprint", pa.string()), ("proxy_hash", pa.string()),
    ("options", pa.string()), ("options_hash", pa.string()), ("ranking", pa.string()), ("golden_layer", pa.int32()),
    ("previous_golden_layer", pa.int32()), ("rank_correlation", pa.float64()), ("drift", pa.bool_()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("seconds", pa.float64()),
])


class RegistryLocked(UserError, RuntimeError):
    """Another run holds the registry."""


def options_hash(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class RankingKey:
    name: str
    fingerprint: str
    proxy_hash: str
    options_hash: str

    def directory(self, registry: str) -> str:
        fingerprint = self.fingerprint.split(":")[-1][:16]
        return join(registry, "rankings", self.name, f"{fingerprint}-{self.proxy_hash}-{self.options_hash}")


class Registry:
    def __init__(self, root: str):
        self.root = root.rstrip("/")

    @property
    def history_path(self) -> str:
        return join(self.root, "history.parquet")

    def history(self) -> list[dict[str, Any]]:
        if not exists(self.history_path):
            return []
        return read_parquet(self.history_path).to_pylist()

    def last_entry(self, name: str) -> dict[str, Any] | None:
        rows = [r for r in self.history() if r["name"] == name]
        return rows[-1] if rows else None

    def entry_for(self, key: RankingKey) -> dict[str, Any] | None:
        for row in reversed(self.history()):
            if (row["name"], row["model_fingerprint"], row["proxy_hash"], row["options_hash"]) == (
                    key.name, key.fingerprint, key.proxy_hash, key.options_hash):
                return row
        return None

    def append(self, row: dict[str, Any]) -> None:
        rows = self.history() + [row]
        write_parquet(pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA), self.history_path)


class RegistryLock:
    """An exclusive lock object with an expiry, on local disk or S3 (conditional create).

    ``with RegistryLock(root, ttl_s, wait_s):`` waits up to ``wait_s`` for a held
    lock, breaks one whose owner let it expire, and raises ``RegistryLocked`` with
    the holder's identity otherwise.
    """

    def __init__(self, root: str, ttl_s: float = 6 * 3600, wait_s: float = 0.0, poll_s: float = 2.0):
        self.path = join(root, "lock.json")
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "acquired_at": now, "expires_at": now + self.ttl_s}).encode()

    def _try_create(self) -> bool:
        """Exclusive create whose content is complete the moment the lock exists.

        On S3 a conditional put (If-None-Match: *) is atomic. Locally the payload is
        written to a private file first and hard-linked into place (link fails if
        the name exists), so a run killed mid-acquire never leaves an empty lock
        that nobody could read, expire or break.
        """
        makedirs(self.path.rsplit("/", 1)[0])
        fs, path = filesystem(self.path)
        if is_remote(self.path):
            try:
                with storage_errors(self.path), fs.open(path, "xb") as handle:
                    handle.write(self._payload())
                return True
            except FileExistsError:
                return False
        staging = f"{path}.{self.owner.replace(':', '-')}"
        with storage_errors(self.path):
            try:
                with open(staging, "wb") as handle:
                    handle.write(self._payload())
                os.link(staging, path)
                return True
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)

    def holder(self) -> dict[str, Any] | None:
        try:
            with open_file(self.path, "rb") as handle:
                return json.loads(handle.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def acquire(self) -> None:
        deadline = time.time() + self.wait_s
        while True:
            if self._try_create():
                return
            holder = self.holder()
            if holder is not None and holder.get("expires_at", 0) < time.time():
                log.warning("breaking the expired registry lock of %s", holder.get("owner"))
                self._remove()
                continue
            if time.time() >= deadline:
                who = holder.get("owner", "?") if holder else "?"
                until = dt.datetime.fromtimestamp(holder["expires_at"], dt.timezone.utc).isoformat() if holder \
                    else "?"
                raise RegistryLocked(f"{self.path} is held by {who} (expires {until}); another re-rank is running "
                                     f"on this registry: wait for it or pass a longer --lock-wait")
            time.sleep(self.poll_s)

    def renew(self) -> None:
        with atomic_write(self.path, "wb") as handle:
            handle.write(self._payload())

    def _remove(self) -> None:
        fs, path = filesystem(self.path)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        holder = self.holder()
        if holder is not None and holder.get("owner") == self.owner:
            self._remove()

    def __enter__(self) -> "RegistryLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
