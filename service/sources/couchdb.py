"""CouchDB source: read a database's `_changes` feed and turn its rows into `Change`s.

Reads bounded pages (`feed=normal`) or follows `feed=continuous`, cutting pages itself, and
maps every row as it arrives. Never touches the store: the poller commits what this reads.
"""

import decimal
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import ijson
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service.changes import Change, Seq, Unmapped
from service.config import CouchDBFilter, CouchDBSettings, SourceSettings
from service.sources import mapping

log = logging.getLogger(__name__)

DESIGN_PREFIX = "_design/"
# How much of CouchDB's error body a message quotes, and how much of it is read at most.
_DETAIL_CHARS = 200
_ERROR_BYTES = 64 * 1024
# The longest continuous-feed line read (CouchDB's max_document_size defaults to 8 MB).
MAX_LINE_BYTES = 64 * 1024 * 1024
# The largest `feed=normal` page read: as much as one line. A page of large documents past it
# is read again in smaller pages (`poller.Poller`), down to one document.
MAX_PAGE_BYTES = MAX_LINE_BYTES
# A parser that builds values without recursion, for documents nested too deep for `json`.
_DEEP = ijson.get_backend("python")


class SourceStoppedError(Exception):
    """CouchDB refuses this source for good (credentials, no such database, an unknown
    checkpoint): stop following it. The message says what to fix; retrying cannot help."""


class FeedBrokenError(Exception):
    """The feed failed in a way that may pass (network, silence, a 5xx, a garbled line):
    reconnect from the checkpoint after a backoff."""


class UnreadableError(FeedBrokenError):
    """CouchDB sent a whole answer or line that cannot be parsed: reading the same stretch
    the same way again cannot help (read it another way, see `poller.Poller`)."""


@dataclass(frozen=True)
class Row:
    """One `_changes` row: its change (None: nothing to replicate) and its seq (None: no seq).

    `problem` is set for a document that could not become a change: why, naming the document
    (logged where it was read, kept as a dead letter by the poller).
    """

    change: Change | None
    seq: Seq | None
    problem: Unmapped | None = None

    @property
    def skipped(self) -> bool:
        """Whether the document could not become a change."""
        return self.problem is not None


@dataclass(frozen=True)
class End:
    """The last line of a feed CouchDB ended itself (CouchDB 3: `{"last_seq": ...}`)."""

    seq: Seq


@dataclass(frozen=True)
class Page:
    """Consecutive rows of one feed, as changes, and the checkpoint to save with them.

    `seq` is None when no row carried a seq (keep the checkpoint). `caught_up`: CouchDB had
    nothing more at the time (an empty page, `pending: 0`, or a feed it ended with `last_seq`).
    """

    changes: tuple[Change, ...]
    seq: Seq | None
    rows: int
    skipped: int
    caught_up: bool
    unmapped: tuple[Unmapped, ...] = ()
    pending: int | None = None


def settings_of(source: SourceSettings) -> CouchDBSettings:
    """The source's CouchDB settings; raises `ValueError` for a source without them."""
    if source.couchdb is None:
        raise ValueError(f"source {source.name} has no [sources.couchdb] settings")
    return source.couchdb


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def matches(rule: CouchDBFilter, doc: Mapping[str, object]) -> bool:
    """Whether the document holds one of the rule's values at its field (same JSON type)."""
    value = mapping.field(doc, rule.field)
    return any(_kind(value) == _kind(allowed) and value == allowed for allowed in rule.allowed())


def change_of(source: SourceSettings, row: Mapping[str, Any]) -> Change | None:
    """The change one `_changes` row (read with `include_docs=true`) makes; None for `_design/`.

    A deleted document deletes its row, and so does a document the source's filter leaves out
    (an earlier revision may have matched). `doc` is the winning revision, so a conflicted
    document needs nothing more. Raises `mapping.MappingError` when the document has no usable
    id, and `FeedBrokenError` when the row lacks its id or its document.
    """
    doc_id = row.get("id")
    if not isinstance(doc_id, str) or not doc_id:
        raise FeedBrokenError(f"source {source.name}: CouchDB sent a _changes row without an id")
    if doc_id.startswith(DESIGN_PREFIX):
        return None
    doc = row.get("doc")
    if row.get("deleted") is True or (isinstance(doc, Mapping) and doc.get("_deleted") is True):
        return _delete(source, doc_id, doc)
    if not isinstance(doc, Mapping):
        raise FeedBrokenError(
            f"source {source.name}: the _changes row of {doc_id!r} came without its document"
        )
    rule = settings_of(source).filter
    if rule is not None and not matches(rule, doc):
        return _delete(source, doc_id, doc)
    return mapping.upsert(source, doc)


def _delete(source: SourceSettings, doc_id: str, doc: object) -> Change:
    # The id goes through the same checks as an upsert's. A deleted document's stub holds only
    # _id and _rev: an id field other than `_id` is usually gone (MappingError).
    record = {**(doc if isinstance(doc, Mapping) else {}), "_id": doc_id}
    return mapping.delete(source, mapping.doc_id(source, record))


def read_row(source: SourceSettings, row: object) -> Row:
    """A `_changes` row as a `Row`; a document that cannot become a change, whatever the
    mapping raised (no usable id, a value nested too deep to write...), is logged and comes
    back with its `problem`, so the feed goes on past it.

    Raises `FeedBrokenError` when `row` is not a `_changes` row with its document.
    """
    if not isinstance(row, Mapping):
        raise FeedBrokenError(
            f"source {source.name}: CouchDB sent a _changes row that is no object"
        )
    seq = row.get("seq")
    at = None if seq is None else Seq.of(seq)
    try:
        return Row(change_of(source, row), at)
    except FeedBrokenError:
        raise
    except Exception as error:  # a document's content may make the mapping raise anything
        doc_id = _printable(row.get("id"))
        reason = str(error) if isinstance(error, mapping.MappingError) else _failure(error)
        log.warning(
            "document kept as a dead letter, it cannot become a row: source=%s dataset=%s"
            " doc_id=%r seq=%s reason=%s",
            source.name,
            source.dataset.slug,
            doc_id,
            None if at is None else at.json_text,
            reason,
        )
        return Row(None, at, problem=Unmapped(doc_id, at, reason))


def _printable(doc_id: object) -> str:
    """The document id as storable text: as it is, or JSON-escaped when it holds a NUL or a
    lone surrogate (which no database column takes)."""
    text = doc_id if isinstance(doc_id, str) else json.dumps(doc_id)
    if "\x00" in text or not mapping.is_unicode(text):
        return json.dumps(text)[1:-1]
    return text


def _failure(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "a mapped field holds a value nested too deeply to write as column text"
    return f"{type(error).__name__}: {error}"[:_DETAIL_CHARS]


def parse_line(source: SourceSettings, line: str | bytes) -> Row | End:
    """One non-blank line of a continuous feed: a row, or the feed's end.

    Raises `FeedBrokenError` for anything else (garbled JSON, an error CouchDB reports).
    """
    value = _loads(source, line)
    if isinstance(value, dict) and "id" in value:
        return read_row(source, value)
    if isinstance(value, dict) and "last_seq" in value:
        return End(Seq.of(value["last_seq"]))
    raise FeedBrokenError(f"source {source.name}: CouchDB sent {_detail(value)} in the feed")


def page_of(source: SourceSettings, body: object) -> Page:
    """A `feed=normal` answer as a page whose checkpoint is its `last_seq`.

    Raises `FeedBrokenError` when the answer is not a `_changes` result.
    """
    if not (isinstance(body, dict) and isinstance(body.get("results"), list)):
        raise FeedBrokenError(f"source {source.name}: CouchDB answered {_detail(body)}")
    if body.get("last_seq") is None:
        raise FeedBrokenError(f"source {source.name}: CouchDB's answer has no last_seq")
    rows = [read_row(source, row) for row in body["results"]]
    pending = body.get("pending")
    caught_up = not rows or pending == 0
    page = _page(rows, Seq.of(body["last_seq"]), caught_up=caught_up)
    return replace(page, pending=pending if type(pending) is int else None)


def _page(rows: Sequence[Row], seq: Seq | None, *, caught_up: bool) -> Page:
    if seq is None:
        seq = next((row.seq for row in reversed(rows) if row.seq is not None), None)
    unmapped = tuple(row.problem for row in rows if row.problem is not None)
    return Page(
        changes=tuple(row.change for row in rows if row.change is not None),
        seq=seq,
        rows=len(rows),
        skipped=len(unmapped),
        caught_up=caught_up,
        unmapped=unmapped,
    )


def _loads(source: SourceSettings, text: str | bytes) -> object:
    # The standard parser, not orjson: orjson turns integers beyond 64 bits into floats
    # (a document's 123456789012345678901234567890 would reach PANDA as 1.2345678901234568e+29)
    # and refuses lone surrogate escapes, which JSON allows.
    try:
        return json.loads(text)
    except RecursionError:
        return _deep_loads(source, text)
    except ValueError as error:
        raise UnreadableError(
            f"source {source.name}: CouchDB sent text that is not JSON ({error})"
        ) from error


def _deep_loads(source: SourceSettings, text: str | bytes) -> object:
    """`json.loads` for a value nested deeper than Python's recursion limit (CouchDB stores
    such documents): parsed and rebuilt without recursion, numbers as `json` reads them."""
    data = text.encode() if isinstance(text, str) else text
    try:
        (value,) = _DEEP.items(data, "", multiple_values=False)
    except (ValueError, ijson.JSONError) as error:
        raise UnreadableError(
            f"source {source.name}: CouchDB sent text that is not JSON ({error})"
        ) from error
    return _floats(value)


def _floats(value: object) -> object:
    """`value` with ijson's `Decimal`s turned into the floats `json.loads` gives, in place and
    without recursion."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    stack = [value]
    while stack:
        container = stack.pop()
        keys = container.keys() if isinstance(container, dict) else range(len(container))  # type: ignore[arg-type]
        for key in keys:
            item = container[key]  # type: ignore[index]
            if isinstance(item, decimal.Decimal):
                container[key] = float(item)  # type: ignore[index]
            elif isinstance(item, dict | list):
                stack.append(item)
    return value


def _detail(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "…"


def base_url(settings: CouchDBSettings) -> str:
    """The server's address without a trailing slash (the config refuses credentials in it)."""
    return str(settings.url).rstrip("/")


def changes_url(settings: CouchDBSettings) -> str:
    """`<server>/<database>/_changes`, the database name escaped (it may hold `/`)."""
    return f"{base_url(settings)}/{quote(settings.database, safe='')}/_changes"


def _where(settings: CouchDBSettings) -> str:
    return f"database {settings.database!r} at {base_url(settings)}"


def _auth(settings: CouchDBSettings) -> httpx.BasicAuth | None:
    if settings.username is None or settings.password is None:
        return None
    return httpx.BasicAuth(settings.username, settings.password.get_secret_value())


def _broken(source: SourceSettings, error: httpx.TransportError) -> FeedBrokenError:
    settings = settings_of(source)
    if isinstance(error, httpx.ReadTimeout):
        what = f"no byte for {settings.timeout_s:g} s, not even a heartbeat"
    else:
        what = f"{type(error).__name__} {error}".strip()
    return FeedBrokenError(f"source {source.name}: lost CouchDB ({_where(settings)}): {what}")


async def _open(
    http: httpx.AsyncClient, source: SourceSettings, since: Seq, **params: str
) -> httpx.Response:
    """GET `_changes` after `since` with the documents; the streaming 200 response.

    Raises `SourceStoppedError` or `FeedBrokenError` for any other outcome (see `refusal`).
    """
    settings = settings_of(source)
    request = http.build_request(
        "GET",
        changes_url(settings),
        params={"since": since.param(), "include_docs": "true", **params},
        headers={
            # pouchdb-server answers `text/plain` unless JSON is asked for.
            "Accept": "application/json",
            # A compressed feed is held back in the compressor's buffer: rows and heartbeats
            # would arrive late, and a quiet feed would look silent.
            "Accept-Encoding": "identity",
        },
        timeout=httpx.Timeout(settings.timeout_s),
    )
    try:
        response = await http.send(request, stream=True, auth=_auth(settings))
    except httpx.TransportError as error:
        raise _broken(source, error) from error
    if response.status_code == httpx.codes.OK:
        return response
    try:
        body, _ = await _read_bounded(response, _ERROR_BYTES)
    except httpx.TransportError:
        body = b""
    finally:
        await response.aclose()
    raise refusal(source, since, response.status_code, body)


def _reason(body: bytes) -> str:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:_DETAIL_CHARS].decode(errors="replace")
    if isinstance(answer, dict):
        return ", ".join(str(answer[key]) for key in ("error", "reason") if key in answer)
    return _detail(answer)


def refusal(
    source: SourceSettings, since: Seq, status: int, body: bytes
) -> SourceStoppedError | FeedBrokenError:
    """What CouchDB's non-200 answer to `_changes` means for the source.

    401, 403 and 404 (no such database) and 400 stop the source: they need a person. A 400
    about `since` means the checkpoint does not belong to this database (recreated or
    restored); the message says how to reset it rather than silently starting over. Anything
    else (5xx, 429...) may pass: reconnect later.
    """
    name, settings = source.name, settings_of(source)
    answer, place = f"{status} {_reason(body)}".strip(), _where(settings)
    fixes = {
        401: "CouchDB refused the credentials: set this source's couchdb username and password"
        " to a user who may read the database, then restart",
        403: "the user may not read the database: give it the reader role in the database's"
        " _security, then restart",
        404: "the database does not exist: create it or correct couchdb.database, then restart",
    }
    if status in fixes:
        return SourceStoppedError(f"source {name}: {place} answered {answer}: {fixes[status]}")
    if status == httpx.codes.BAD_REQUEST and "since" in answer:
        return SourceStoppedError(
            f"source {name}: {place} refused the checkpoint {since.json_text} ({answer}); the"
            " database was probably recreated or restored. To read it again from"
            f" couchdb.since, run `pandasync reset-checkpoint {name}`, then restart"
        )
    if status == httpx.codes.BAD_REQUEST:
        return SourceStoppedError(f"source {name}: {place} refused the request ({answer})")
    return FeedBrokenError(f"source {name}: {place} answered {answer}")


async def read_page(
    http: httpx.AsyncClient, source: SourceSettings, since: Seq, *, limit: int | None = None
) -> Page:
    """The changes after `since`, at most `limit` (default `batch_size`) of them
    (`feed=normal&limit=`).

    The page is read whole, bounded by the limit and by `MAX_PAGE_BYTES`. Raises
    `SourceStoppedError` or `FeedBrokenError` (see `refusal`); `UnreadableError` when the page
    is not JSON or runs past `MAX_PAGE_BYTES` (no more than that is read).
    """
    settings = settings_of(source)
    rows = settings.batch_size if limit is None else limit
    response = await _open(http, source, since, feed="normal", limit=str(rows))
    try:
        body, whole = await _read_bounded(response, MAX_PAGE_BYTES)
    except httpx.TransportError as error:
        raise _broken(source, error) from error
    finally:
        await response.aclose()
    if not whole:
        raise UnreadableError(
            f"source {source.name}: CouchDB's page of up to {rows} changes runs past"
            f" {MAX_PAGE_BYTES} bytes"
        )
    return page_of(source, _loads(source, body))


async def _read_bounded(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The streamed `response`'s body up to `limit` bytes, and whether that is all of it:
    nothing past the limit is read."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), False
    return bytes(body), True


async def read_doc(http: httpx.AsyncClient, source: SourceSettings, doc_id: str) -> dict[str, Any]:
    """The document as CouchDB holds it now, as a `_changes` row for `read_row` (a deleted or
    missing document as a deleted row), for replaying a dead letter.

    Raises `SourceStoppedError` or `FeedBrokenError` when CouchDB cannot be read;
    `UnreadableError` when the document is not JSON or runs past `MAX_PAGE_BYTES` (no more
    than that is read).
    """
    settings = settings_of(source)
    url = f"{base_url(settings)}/{quote(settings.database, safe='')}/{quote(doc_id, safe='')}"
    request = http.build_request(
        "GET", url, headers={"Accept": "application/json"}, timeout=settings.timeout_s
    )
    try:
        response = await http.send(
            request, stream=True, auth=_auth(settings) or httpx.USE_CLIENT_DEFAULT
        )
        found = response.status_code == httpx.codes.OK
        try:
            body, whole = await _read_bounded(response, MAX_PAGE_BYTES if found else _ERROR_BYTES)
        finally:
            await response.aclose()
    except httpx.TransportError as error:
        raise _broken(source, error) from error
    if response.status_code == httpx.codes.NOT_FOUND and _reason(body) in _GONE:
        return {"id": doc_id, "deleted": True, "doc": {"_id": doc_id, "_deleted": True}}
    if not found:
        raise refusal(source, Seq.of("now"), response.status_code, body)
    if not whole:
        raise UnreadableError(
            f"source {source.name}: CouchDB's document runs past {MAX_PAGE_BYTES} bytes"
        )
    return {"id": doc_id, "doc": _loads(source, body)}


# CouchDB's 404 answers for a document that is not there (a missing database says otherwise).
_GONE = {"not_found, missing", "not_found, deleted"}

Item = Row | End | FeedBrokenError


class Feed:
    """An open continuous `_changes` feed, read in pages; made by `follow`."""

    def __init__(self, source: SourceSettings, receive: MemoryObjectReceiveStream[Item]) -> None:
        self._source = source
        self._settings = settings_of(source)
        self._receive = receive
        self._failure: FeedBrokenError | None = None
        self._rows = 0

    async def next_page(self) -> Page:
        """Wait for the next row, then take what arrives within `batch_wait_s`, at most
        `batch_size` rows.

        `caught_up` means CouchDB ended the feed: open a new one. Raises `FeedBrokenError` when
        the feed failed, or ended without a single row; a failure after some rows ends the
        page early and the next call raises it.
        """
        first = await self._next()
        rows = [] if isinstance(first, End) else [first]
        end = first if isinstance(first, End) else await self._gather(rows)
        self._rows += len(rows)
        if end is not None and self._rows == 0:
            raise FeedBrokenError(
                f"source {self._source.name}: CouchDB ended the feed without a change"
            )
        return _page(rows, None if end is None else end.seq, caught_up=end is not None)

    async def _gather(self, rows: list[Row]) -> End | None:
        with anyio.move_on_after(self._settings.batch_wait_s):
            while len(rows) < self._settings.batch_size:
                try:
                    item = await self._next()
                except FeedBrokenError:
                    return None  # kept: the next page raises it
                if isinstance(item, End):
                    return item
                rows.append(item)
        return None

    async def _next(self) -> Row | End:
        if self._failure is not None:
            raise self._failure
        # The reader's last item is an `End` or an error, so the stream never runs dry here.
        item = await self._receive.receive()
        if isinstance(item, FeedBrokenError):
            self._failure = item
            raise item
        return item


async def _pump(
    source: SourceSettings, response: httpx.Response, send: MemoryObjectSendStream[Item]
) -> None:
    """Parse the feed's lines into rows for `Feed`; last, its `End` or what broke it.

    Blank lines are heartbeats: they only keep the read timeout from firing.
    """
    async with send:
        try:
            async for line in _lines(source, response):
                if not line.strip():
                    continue
                item = parse_line(source, line)
                await send.send(item)
                if isinstance(item, End):
                    return
            raise FeedBrokenError(f"source {source.name}: CouchDB closed the feed")
        except FeedBrokenError as error:
            await send.send(error)
        except httpx.TransportError as error:
            await send.send(_broken(source, error))


async def _lines(source: SourceSettings, response: httpx.Response) -> AsyncIterator[bytes]:
    """The feed's lines, each ended by `\\n` and nowhere else (couchdb.md rule 9: CouchDB 3
    writes U+2028, U+2029 and U+0085 raw inside strings, where `str.splitlines` and httpx's
    line reader would break too), without the `\\n`. A last line without its `\\n` is a
    cut-off feed, not a line. Raises `FeedBrokenError` for a line over `MAX_LINE_BYTES`.
    """
    pending = bytearray()
    async for chunk in response.aiter_bytes():
        if b"\n" not in chunk:
            pending += chunk
            _bound_line(source, pending)
            continue
        *complete, rest = chunk.split(b"\n")
        complete[0] = bytes(pending + complete[0])
        for line in complete:
            _bound_line(source, line)
            yield line
        pending = bytearray(rest)
        _bound_line(source, pending)


def _bound_line(source: SourceSettings, line: bytes | bytearray) -> None:
    if len(line) > MAX_LINE_BYTES:
        raise UnreadableError(
            f"source {source.name}: CouchDB sent a feed line over {MAX_LINE_BYTES} bytes"
        )


@asynccontextmanager
async def follow(
    http: httpx.AsyncClient, source: SourceSettings, since: Seq
) -> AsyncIterator[Feed]:
    """Follow the continuous feed after `since` (with heartbeats) until the block ends.

    Rows are read and mapped in the background as they come, at most `batch_size` ahead of
    `Feed.page()`, so memory stays bounded however long the backlog. Closes the connection on
    exit. Raises `SourceStoppedError` or `FeedBrokenError` when the feed cannot be opened.
    """
    settings = settings_of(source)
    heartbeat_ms = str(max(1, round(settings.heartbeat_s * 1000)))
    response = await _open(http, source, since, feed="continuous", heartbeat=heartbeat_ms)
    send, receive = anyio.create_memory_object_stream[Item](settings.batch_size)
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_pump, source, response, send)
            try:
                yield Feed(source, receive)
            except Exception as error:
                # Raised again below: from inside the task group it would come out wrapped in
                # an ExceptionGroup.
                failure = error
            group.cancel_scope.cancel()
    finally:
        receive.close()
        with anyio.CancelScope(shield=True):
            await response.aclose()
    if failure is not None:
        raise failure
