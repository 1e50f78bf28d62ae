"""Read edit requests from any number of files, validate them, and quarantine every reject.

Per-record rules live in formats.py; this module adds the rules that need more
than one record (duplicate case ids, contradicting targets) and the accounting:
every record read ends up either in ``RequestSet.requests`` or, with its reason
and location, in the quarantine file. ``read == valid + rejected`` always holds.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Iterable, Sequence

from lga_dist.errors import UserError
from lga_dist.io.requests.containers import read_container
from lga_dist.io.requests.formats import CONFLICTING_TARGET, DUPLICATE_CASE_ID, FORMATS, RecordError, convert
from lga_dist.io.requests.schema import EditRequest
from lga_dist.io.storage import atomic_write, list_files

ON_CONFLICT = ("reject", "last")
REQUEST_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet")


@dataclasses.dataclass
class Rejection:
    source: str
    location: str
    reason: str
    detail: str
    record: Any = None
    raw: str | None = None

    def to_json(self) -> str:
        # ensure_ascii keeps undecodable input (lone surrogates) representable as JSON escapes
        return json.dumps(dataclasses.asdict(self), ensure_ascii=True, default=str)


@dataclasses.dataclass
class RequestSet:
    """The valid requests of one read, with what was rejected and why."""

    requests: list[EditRequest]
    rejections: list[Rejection]
    files: list[str]
    quarantine: str | None = None

    @property
    def read(self) -> int:
        return len(self.requests) + len(self.rejections)

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(r.reason for r in self.rejections).items()))

    def summary(self) -> dict[str, Any]:
        return {"read": self.read, "valid": len(self.requests), "rejected": len(self.rejections),
                "by_reason": self.by_reason, "quarantine": self.quarantine}


class RequestError(UserError, ValueError):
    """Requests that cannot be used at all (no files, --strict with rejections)."""


def resolve_paths(paths: Iterable[str]) -> list[str]:
    """Expand directories/prefixes into the request files under them."""
    files: list[str] = []
    for path in paths:
        files.extend(list_files(path, REQUEST_SUFFIXES))
    if not files:
        raise RequestError(f"no request files ({', '.join(REQUEST_SUFFIXES)}) found under {', '.join(paths)}")
    return files


def read_requests(paths: str | Sequence[str], *, format_name: str | None = None, container: str | None = None,
                  on_conflict: str = "reject", quarantine: str | None = None) -> RequestSet:
    """Read, convert and validate every record under ``paths``; write rejects to ``quarantine``.

    ``on_conflict`` says what happens to requests that give the same subject and
    prompt different new targets: ``reject`` quarantines all of them, ``last``
    keeps the last one read and quarantines the earlier ones.
    """
    if format_name is not None and format_name not in FORMATS:
        raise RequestError(f"unknown format {format_name!r}; choose from {', '.join(FORMATS)}")
    if on_conflict not in ON_CONFLICT:
        raise RequestError(f"unknown conflict policy {on_conflict!r}; choose from {', '.join(ON_CONFLICT)}")
    files = resolve_paths([paths] if isinstance(paths, str) else paths)
    accepted: list[tuple[EditRequest, str, str]] = []  # (request, file, location)
    rejections: list[Rejection] = []
    first_seen: dict[str, str] = {}
    for path in files:
        for raw in read_container(path, container):
            where = f"{path}:{raw.location}"
            if raw.error is not None:
                rejections.append(Rejection(path, raw.location, raw.error.reason, raw.error.detail, raw=raw.raw))
                continue
            try:
                request = convert(raw.record, where, format_name)
            except RecordError as err:
                rejections.append(Rejection(path, raw.location, err.reason, err.detail, record=raw.record))
                continue
            if request.case_id in first_seen:
                rejections.append(Rejection(path, raw.location, DUPLICATE_CASE_ID,
                                            f"case_id {request.case_id} already read at {first_seen[request.case_id]}",
                                            record=raw.record))
                continue
            first_seen[request.case_id] = where
            accepted.append((request, path, raw.location))
    requests, conflicts = _resolve_conflicts(accepted, on_conflict)
    records = _records_at({(path, location) for path, location, _ in conflicts}, container)
    rejections.extend(Rejection(path, location, CONFLICTING_TARGET, detail, record=records.get((path, location)))
                      for path, location, detail in conflicts)
    result = RequestSet(requests=requests, rejections=rejections, files=files, quarantine=quarantine)
    if quarantine:
        write_quarantine(quarantine, rejections)
    return result


def _resolve_conflicts(accepted: list[tuple[EditRequest, str, str]],
                       policy: str) -> tuple[list[EditRequest], list[tuple[str, str, str]]]:
    """The requests kept, and (file, location, why) of those whose subject and prompt other requests
    give another target."""
    targets: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    last: dict[tuple[str, str], str] = {}
    for request, _, _ in accepted:
        targets[request.conflict_key].add(request.target_new)
        last[request.conflict_key] = request.case_id
    kept, rejected = [], []
    for request, path, location in accepted:
        key = request.conflict_key
        if len(targets[key]) == 1 or (policy == "last" and last[key] == request.case_id):
            kept.append(request)
            continue
        choices = ", ".join(sorted(targets[key]))
        detail = (f"superseded by case {last[key]} (--on-conflict last)" if policy == "last"
                  else f"other requests give this subject and prompt different targets: {choices}")
        rejected.append((path, location, detail))
    return kept, rejected


def _records_at(wanted: set[tuple[str, str]], container: str | None) -> dict[tuple[str, str], Any]:
    """The records as read at these (file, location)s, so a conflict is quarantined in its own format and a
    fixed copy can be fed back. A second pass over just the files holding conflicts (rare) costs less than
    keeping every accepted record in memory through the first."""
    found: dict[tuple[str, str], Any] = {}
    for path in sorted({path for path, _ in wanted}):
        for raw in read_container(path, container):
            if (path, raw.location) in wanted and raw.error is None:
                found[(path, raw.location)] = raw.record
    return found


def write_quarantine(path: str, rejections: Sequence[Rejection]) -> None:
    """One JSON line per rejected record (source file, location, reason, detail, the record)."""
    with atomic_write(path, "w") as handle:
        for rejection in rejections:
            handle.write(rejection.to_json() + "\n")
