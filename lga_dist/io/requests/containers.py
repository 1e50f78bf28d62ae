"""Streaming readers for the containers edit requests come in: .json, .jsonl, .parquet.

Each reader yields ``RawRecord``s one at a time with the record's location in the
file, so a broken record is reported where it is and the rest of the file is
still read. Nothing here decides what a valid request is (see formats.py).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from lga_dist.io.requests.formats import INVALID_JSON, INVALID_UTF8, TRUNCATED_JSON, UNREADABLE_FILE, RecordError
from lga_dist.io.storage import StorageError, arrow_buffer, open_file

CONTAINERS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_CHUNK = 1 << 20
_RAW_LIMIT = 2000  # characters of an unparseable stretch kept in the quarantine file


@dataclasses.dataclass
class RawRecord:
    """One record as read, or the reason it could not be read."""

    location: str
    record: Any = None
    error: RecordError | None = None
    raw: str | None = None


def container_of(path: str) -> str:
    lowered = path.lower()
    for suffix, name in CONTAINERS.items():
        if lowered.endswith(suffix):
            return name
    raise StorageError(f"{path}: unknown file type; expected one of {', '.join(CONTAINERS)} (or pass --container)")


def read_container(path: str, container: str | None = None) -> Iterator[RawRecord]:
    """Yield every record of one file, streaming."""
    kind = container or container_of(path)
    reader = {"json": _read_json, "jsonl": _read_jsonl, "parquet": _read_parquet}[kind]
    with open_file(path, "rb") as handle:
        yield from reader(handle)


def _read_jsonl(handle: IO[bytes]) -> Iterator[RawRecord]:
    index = 0
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        index += 1
        location = f"record {index} (line {number})"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield RawRecord(location, error=RecordError(INVALID_UTF8, f"byte {err.start}: {err.reason}"),
                            raw=line.decode("utf-8", "backslashreplace")[:_RAW_LIMIT])
            continue
        try:
            yield RawRecord(location, record=json.loads(text))
        except json.JSONDecodeError as err:
            yield RawRecord(location, error=RecordError(INVALID_JSON, err.msg + f" (column {err.colno})"),
                            raw=text[:_RAW_LIMIT])


class _TextStream:
    """Incrementally decoded text with a sliding buffer; undecodable bytes become lone surrogates."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buffer = ""
        self.pos = 0
        self.eof = False
        self.line = 1  # line number at self.pos

    def more(self) -> bool:
        if self.eof:
            return False
        chunk = self.handle.read(_CHUNK)
        self.eof = not chunk
        self.buffer = self.buffer[self.pos:] + self.decoder.decode(chunk, final=self.eof)
        self.pos = 0
        return True

    def skip_space(self) -> str:
        """Advance past whitespace; return the next character ('' at end of input)."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n":
                self.line += self.buffer[self.pos] == "\n"
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self.more():
                return ""

    def advance(self, end: int) -> str:
        text = self.buffer[self.pos:end]
        self.line += text.count("\n")
        self.pos = end
        return text


def _read_json(handle: IO[bytes]) -> Iterator[RawRecord]:
    """A JSON array of records, or records concatenated one after another (JSON Lines in a .json)."""
    stream = _TextStream(handle)
    decoder = json.JSONDecoder()
    first = stream.skip_space()
    in_array = first == "["
    if in_array:
        stream.advance(stream.pos + 1)
    index = 1  # records count from 1 in every container, as lines do
    while True:
        nxt = stream.skip_space()
        if nxt == "":
            if in_array:
                yield RawRecord(f"record {index} (line {stream.line})",
                                error=RecordError(TRUNCATED_JSON, "file ends before the closing ']'"))
            return
        if in_array and nxt == "]":
            return
        location = f"record {index} (line {stream.line})"
        value, error = _decode_value(stream, decoder)
        if error is None:
            yield RawRecord(location, record=value)
        else:
            yield RawRecord(location, error=error[0], raw=error[1])
            if error[0].reason == TRUNCATED_JSON:
                return
        index += 1
        if in_array:
            sep = stream.skip_space()
            if sep == ",":
                stream.advance(stream.pos + 1)
            elif sep not in ("]", ""):
                yield from _resync_after(stream, f"record {index} (line {stream.line})",
                                         f"expected ',' or ']', found {sep!r}")
                index += 1
                if stream.skip_space() == ",":
                    stream.advance(stream.pos + 1)


def _incomplete(err: json.JSONDecodeError, buffer: str) -> bool:
    """Whether decoding failed only because the buffer ends inside the value."""
    return "Unterminated" in err.msg or err.pos >= len(buffer) - 1


def _decode_value(stream: _TextStream, decoder: json.JSONDecoder) -> tuple[Any, tuple[RecordError, str] | None]:
    """Decode the value at the stream position, reading more input until it is complete."""
    while True:
        try:
            value, end = decoder.raw_decode(stream.buffer, stream.pos)
            stream.advance(end)
            return value, None
        except json.JSONDecodeError as err:
            if _incomplete(err, stream.buffer):
                if stream.more():
                    continue
                tail = stream.advance(len(stream.buffer))
                error = RecordError(TRUNCATED_JSON, f"file ends inside this record ({err.msg})")
                return None, (error, tail[:_RAW_LIMIT])
            message = f"{err.msg} (line {stream.line + err.doc.count(chr(10), stream.pos, err.pos)})"
            bad = _skip_to_next_record(stream)
            return None, (RecordError(INVALID_JSON, message), bad[:_RAW_LIMIT])


def _skip_to_next_record(stream: _TextStream) -> str:
    """Consume the broken stretch up to the ``,`` of the next ``,{`` at which a complete object parses."""
    decoder = json.JSONDecoder()
    offset = 1  # search start relative to stream.pos; more() keeps relative offsets valid
    while True:
        buffer, pos = stream.buffer, stream.pos
        comma = buffer.find(",", pos + offset)
        if comma < 0:
            offset = len(buffer) - pos
            if stream.more():
                continue
            return stream.advance(len(stream.buffer))
        brace = comma + 1
        while brace < len(buffer) and buffer[brace] in " \t\r\n":
            brace += 1
        if brace < len(buffer) and buffer[brace] == "{":
            try:
                decoder.raw_decode(buffer, brace)
                return stream.advance(comma)  # the caller consumes the separator
            except json.JSONDecodeError as err:
                if _incomplete(err, buffer) and not stream.eof:
                    offset = comma - pos
                    stream.more()
                    continue
        elif brace >= len(buffer) and not stream.eof:
            offset = comma - pos
            stream.more()
            continue
        offset = comma + 1 - pos


def _resync_after(stream: _TextStream, location: str, message: str) -> Iterator[RawRecord]:
    bad = _skip_to_next_record(stream)
    yield RawRecord(location, error=RecordError(INVALID_JSON, message), raw=bad[:_RAW_LIMIT])


def _read_parquet(handle: IO[bytes]) -> Iterator[RawRecord]:
    try:  # Arrow-owned memory, never a Python object: see storage.read_into_arrow
        parquet = pq.ParquetFile(pa.BufferReader(arrow_buffer(handle)))
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for damaged files
        yield RawRecord("file", error=RecordError(UNREADABLE_FILE, f"not a readable Parquet file ({err})"))
        return
    row = 1
    try:
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield RawRecord(f"row {row}", record=record)
                row += 1
    except Exception as err:  # noqa: BLE001
        remaining = parquet.metadata.num_rows - row + 1
        yield RawRecord(f"rows {row}-{parquet.metadata.num_rows}",
                        error=RecordError(UNREADABLE_FILE, f"{remaining} rows could not be read ({err})"))
