"""Snapshot sources: read a whole dataset over HTTP and tell what changed since the last read.

Streams each body (ijson, the csv module), so memory does not grow with the rows; maps each
record to its row and the row's content hash; sorts a chunk of rows against the hashes seen
before and judges a finished snapshot against the delete guard. Pure but for the HTTP read:
never touches the store (`service.ingress.snapshots` commits what this decides).
"""

import csv
import hashlib
import io
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import ijson

from service.config import SnapshotSettings, SourceSettings
from service.sources import mapping

# How much of a server's error body a message quotes.
_DETAIL_CHARS = 200
# The most of an error answer's body read for its message.
_ERROR_BYTES = 64 * 1024
_READ_BYTES = 64 * 1024
# The most of a snapshot's body one record may take, in bytes (a record is built whole in
# memory before it is a row): a CouchDB document is at most 8 MB by default.
MAX_RECORD_BYTES = 64 * 1024 * 1024
# Rows may be long (a CSV field can hold a document): as long as a record may be.
csv.field_size_limit(MAX_RECORD_BYTES)


class SnapshotReadError(Exception):
    """The snapshot could not be read whole (HTTP error, truncated body, parse error, query
    error): it changes nothing. The message names the source and what went wrong."""


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    """One record of a snapshot as its PANDA row: the source id, the row as the JSON array
    text the outbox stores, and that text's content hash."""

    doc_id: str
    row_json: str
    digest: str


@dataclass(frozen=True)
class Sorted:
    """A chunk of rows sorted against what the store knows: ids seen again unchanged, rows
    to stage (new or changed), and how many ids the snapshot had already given."""

    unchanged: tuple[str, ...]
    staged: tuple[SnapshotRow, ...]
    duplicates: int


# One encoder for every row (the outbox stores rows the same way: ASCII escapes).
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def settings_of(source: SourceSettings) -> SnapshotSettings:
    """The source's snapshot settings; raises `ValueError` for a source without them."""
    if source.snapshot is None:
        raise ValueError(f"source {source.name} has no [sources.snapshot] settings")
    return source.snapshot


def row_of(source: SourceSettings, record: Mapping[str, object]) -> SnapshotRow:
    """A record as its row and hash. Raises `mapping.MappingError` for a record without a
    usable id (see `mapping.doc_id`)."""
    change = mapping.upsert(source, record)
    assert change.row is not None  # an upsert has its row
    row_json = _ENCODER.encode(list(change.row))
    digest = hashlib.blake2b(row_json.encode(), digest_size=16).hexdigest()
    return SnapshotRow(change.doc_id, row_json, digest)


# What the store knows of an id: the hash of the row last enqueued (None: never) and the
# snapshot generation the id was last seen in.
Known = tuple[str | None, int]


def sort(rows: Sequence[SnapshotRow], known: Mapping[str, Known], generation: int) -> Sorted:
    """Sort one chunk of snapshot `generation` against `known` (by id): an id whose hash is
    the one last enqueued is unchanged; any other is staged (new, changed, never sent). An id
    given twice in the snapshot (in this chunk, or seen in `generation` already) counts as a
    duplicate, and its last row wins."""
    latest: dict[str, SnapshotRow] = {}
    duplicates = 0
    for row in rows:
        earlier = known.get(row.doc_id)
        if row.doc_id in latest or (earlier is not None and earlier[1] == generation):
            duplicates += 1
        latest[row.doc_id] = row
    unchanged: list[str] = []
    staged: list[SnapshotRow] = []
    for doc_id, row in latest.items():
        earlier = known.get(doc_id)
        if earlier is not None and earlier[0] == row.digest:
            unchanged.append(doc_id)
        else:
            staged.append(row)
    return Sorted(tuple(unchanged), tuple(staged), duplicates)


@dataclass(frozen=True)
class Counts:
    """What one snapshot found: `rows_read` (duplicates included), ids `new` (never sent),
    `changed` and `unchanged`, ids `gone` (sent before, absent now) and those it `deleted`
    (all gone ones when the source sends deletes, else none), `duplicates`, records `skipped`
    (no usable id), and `known`: how many rows the dataset had before it."""

    rows_read: int
    new: int
    changed: int
    unchanged: int
    gone: int
    deleted: int
    duplicates: int
    skipped: int
    known: int


def held_reason(counts: Counts, settings: SnapshotSettings) -> str | None:
    """Why a finished snapshot must wait for an operator's confirmation, or None to apply it.

    An empty snapshot, or one whose deletes (when `deletes` is on) would remove more than
    `max_delete_fraction` of the rows known before, looks like a broken source.
    """
    if counts.rows_read == 0:
        return "the snapshot is empty: it would delete every row"
    if counts.known == 0:
        return None
    fraction = counts.deleted / counts.known
    if fraction <= settings.max_delete_fraction:
        return None
    limit = _percent(settings.max_delete_fraction)
    return (
        f"the snapshot would delete {counts.deleted} of {counts.known} rows"
        f" ({_percent(fraction)}, more than max_delete_fraction {limit})"
    )


def _percent(fraction: float) -> str:
    return f"{math.floor(fraction * 1000) / 10:g}%"


def chunks(records: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """`records` in lists of `size` (the last may be shorter)."""
    iterator = iter(records)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@contextmanager
def read_http(http: httpx.Client, source: SourceSettings) -> Iterator[Iterator[Mapping[str, Any]]]:
    """The records of the source's HTTP snapshot, streamed from one GET as they arrive.

    Raises `SnapshotReadError` for a refused request, a lost connection, a body cut short
    (one Content-Length or chunking shows) or one that does not parse in the source's format;
    from the iterator too, at the record where it breaks.
    """
    settings = settings_of(source)
    headers = {name: value.get_secret_value() for name, value in settings.headers.items()}
    where = f"source {source.name}: {shown(str(settings.url))}"
    try:
        with http.stream(
            "GET", str(settings.url), headers=headers, timeout=settings.timeout_s
        ) as response:
            if response.status_code != 200:
                raise SnapshotReadError(
                    f"{where} answered HTTP {response.status_code}: {_error_page(response)}"
                )
            raw = _Body(response.iter_bytes())
            records = _records(settings, io.BufferedReader(raw, _READ_BYTES))
            yield _guarded(where, records, raw)
    except httpx.HTTPError as error:
        raise SnapshotReadError(
            f"{where} could not be read: {type(error).__name__} {error}"
        ) from None


def _records(settings: SnapshotSettings, body: io.BufferedReader) -> Iterator[Mapping[str, Any]]:
    if settings.format == "json":
        return _json_list(body)
    if settings.format == "keys-data":
        return _keys_data(body)
    if settings.format == "jsonl":
        return _json_lines(body)
    return _csv(body)


def _guarded(
    where: str, records: Iterator[Mapping[str, Any]], body: "_Body"
) -> Iterator[Mapping[str, Any]]:
    """`records`, with any error parsing them raised as `SnapshotReadError`; `body` counts
    what each of them reads from the start of the one before."""
    try:
        for record in records:
            yield record
            body.mark()
    except (ijson.JSONError, ValueError, csv.Error) as error:
        raise SnapshotReadError(f"{where} sent a snapshot that does not parse: {error}") from None
    except httpx.HTTPError as error:
        raise SnapshotReadError(
            f"{where} broke off while sending the snapshot: {type(error).__name__} {error}"
        ) from None


class _Body(io.RawIOBase):
    """A response's bytes as a binary file, for ijson and `io`'s text reader; raises
    `ValueError` once more than `MAX_RECORD_BYTES` are read without a `mark` (a record)."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        super().__init__()
        self._parts = parts
        self._left = b""
        self._since_mark = 0

    def mark(self) -> None:
        """A record was read whole: count afresh."""
        self._since_mark = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._left:
            self._left = next(self._parts, b"")
        taken = min(len(buffer), len(self._left))
        buffer[:taken] = self._left[:taken]
        self._left = self._left[taken:]
        self._since_mark += taken
        if self._since_mark > MAX_RECORD_BYTES:
            raise ValueError(
                f"a record runs past {MAX_RECORD_BYTES} bytes, more than a row should hold"
            )
        return taken


def _lines(body: io.BufferedReader) -> Iterator[str]:
    """The body as UTF-8 text lines with their ends kept (as `csv` wants them)."""
    # utf-8-sig: a spreadsheet's CSV export often starts with a byte order mark.
    return iter(io.TextIOWrapper(body, "utf-8-sig", newline=""))


def _records_of(value: object, index: int) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"item {index} of the list is {type(value).__name__}, not an object")
    return value


def _json_list(body: io.BufferedReader) -> Iterator[Mapping[str, Any]]:
    events = ijson.parse(body, use_float=True)
    first = next(events, None)
    if first is None or first[1] != "start_array":
        shape = "nothing" if first is None else first[1].removeprefix("start_")
        raise ValueError(
            f"the body is not a JSON list of objects (it starts with {shape}); a body of"
            ' `{"keys": [...], "data": [...]}` is format = "keys-data"'
        )
    for index, item in enumerate(ijson.items(itertools.chain([first], events), "item")):
        yield _records_of(item, index)


def _keys_data(body: io.BufferedReader) -> Iterator[Mapping[str, Any]]:
    """PANDA's tutorial shape: `keys` names the fields of each array in `data`."""
    keys: list[str] = []
    builder: ijson.ObjectBuilder | None = None
    index = 0
    for prefix, event, value in ijson.parse(body, use_float=True):
        if prefix == "keys.item":
            keys.append(str(value))
        elif prefix == "data.item" and event == "start_array" and builder is None:
            if not keys:
                raise ValueError('"keys" must come before "data", and name the fields')
            builder = ijson.ObjectBuilder()
            builder.event(event, value)
        elif builder is not None and prefix == "data.item" and event == "end_array":
            yield _keyed(keys, builder.value, index)
            builder, index = None, index + 1
        elif builder is not None:
            builder.event(event, value)
        elif prefix == "data.item":
            raise ValueError(f"data item {index} is not an array of values")


def _keyed(keys: list[str], values: list[Any], index: int) -> Mapping[str, Any]:
    if len(values) != len(keys):
        raise ValueError(f"data item {index} has {len(values)} values for {len(keys)} keys")
    return dict(zip(keys, values, strict=True))


def _json_lines(body: io.BufferedReader) -> Iterator[Mapping[str, Any]]:
    for number, line in enumerate(_lines(body), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            raise ValueError(f"line {number} is not JSON ({error})") from None
        yield _records_of(value, number - 1)


def _csv(body: io.BufferedReader) -> Iterator[Mapping[str, Any]]:
    reader = csv.reader(_lines(body), strict=True)
    header = next(reader, None)
    if header is None:
        return
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(
                f"line {reader.line_num} has {len(row)} fields, the header {len(header)}"
            )
        yield dict(zip(header, row, strict=True))


def shown(url: str) -> str:
    """A snapshot URL for messages: without its query, which may hold a token."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) + (
        "?…" if parts.query else ""
    )


def _error_page(response: httpx.Response) -> str:
    """The start of an error answer's body, for the message: no more than `_ERROR_BYTES` of
    it is read, however long it runs."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= _ERROR_BYTES:
            break
    start = bytes(body[:_ERROR_BYTES])
    try:
        text = start.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = start.decode("utf-8", errors="replace")
    return _detail(text)


def _detail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "…"
