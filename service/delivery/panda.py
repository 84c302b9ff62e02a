"""The PANDA client: applies a `Change` to one row of a PANDA 1.1 dataset and classifies the answer.

The last edge of the flow (delivery → panda → PANDA HTTP API, /work/shared/panda-api.md). It never
touches the database, and never puts the API key or row values into an error, repr or log line.
"""

import email.utils
import json
import math
import re
import string
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from service.changes import Change, Op

_API = "/api/1.0"
# The official examples send 1000 rows per bulk PUT (panda-api.md §3.3.10, §5.4).
BULK_LIMIT = 1000
DETAIL_LIMIT = 2048
# The largest answer read from PANDA: its biggest, a page of rows for `rows()` or a bulk PUT's
# echo of its objects, is a few MiB; something else at panda.url could send gigabytes.
MAX_ANSWER_BYTES = 64 * 1024 * 1024

# What PANDA's URLs route as a slug or external_id: `[\w\d_-]+`, Unicode-aware (§3, §3.3.3);
# the bulk body takes ASCII ids only. `schema` is taken by /dataset/schema/ as a slug.
_ROUTABLE = re.compile(r"[\w-]+")
_BULK_ID = re.compile(r"[A-Za-z0-9_-]+")
_BULK_IDS = re.compile(r"[A-Za-z0-9_-]+(?:\n[A-Za-z0-9_-]+)*")
# One object of a bulk PUT's body, from a row's JSON text and its (checked) external_id.
_BULK_OBJECT = '{{"data":{},"external_id":"{}"}}'
# PANDA 1.1 streams its plain-text errors as this repr, not the message (§0.1).
_LAZY_REPR = re.compile(r"<django\.utils\.functional\.__proxy__ object at 0x[0-9A-Fa-f]+>")
# Header-safe email characters; PANDA URL-unquotes the email (§1), so anything else is quoted.
_EMAIL_SAFE = "".join(sorted(set(string.printable) - set(string.whitespace) - {"%"}))
_JSON = {"Content-Type": "application/json"}
_PAUSE = "delivery to this PANDA should pause until it is fixed; nothing is lost"


@dataclass(frozen=True)
class Dataset:
    """The PANDA dataset a source feeds: created with `columns` (in this order) when missing.

    Raises `ValueError` for what PANDA cannot express: a slug it cannot route, an empty
    name, no columns, or a column name with a comma (`?columns=` is split on commas, §3.1).
    """

    slug: str
    name: str
    columns: tuple[str, ...]

    def __post_init__(self) -> None:
        if not _ROUTABLE.fullmatch(self.slug) or self.slug == "schema":
            raise ValueError(
                f"PANDA cannot address dataset slug {self.slug!r}: use letters, digits, `_`"
                " and `-` (and not `schema`)"
            )
        if not self.name.strip():
            raise ValueError(f"dataset {self.slug}: PANDA needs a non-empty name")
        if not self.columns:
            raise ValueError(f"dataset {self.slug}: PANDA needs at least one column")
        with_comma = [column for column in self.columns if "," in column]
        if with_comma:
            raise ValueError(
                f"dataset {self.slug}: PANDA cannot take a comma in a column name"
                f" ({with_comma!r}): rename the column"
            )


class RetryableError(Exception):
    """Try the same call again later; PANDA may or may not have applied it (every call is
    idempotent, so repeating it is safe). `retry_after_s` is PANDA's (or a proxy's) own
    `Retry-After` in seconds when it sent one; `status` is None when no answer arrived.
    """

    def __init__(
        self, detail: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.retry_after_s = retry_after_s


class DatasetMissingError(RetryableError):
    """PANDA has no such dataset (404 on a row call): run `ensure_dataset`, then retry."""


class PermanentError(Exception):
    """This change can never succeed as it is: keep it as a dead letter, deliver the others.

    `detail` holds PANDA's readable message (at most `DETAIL_LIMIT` characters). `status` is
    400, or None when the client refused to send it (an id PANDA cannot address, a row that
    is not valid UTF-8). `external_ids` names the rows it is known to be about; empty for a
    bulk request PANDA refused as a whole. From `ensure_dataset` it is about the dataset.
    """

    def __init__(
        self, detail: str, *, status: int | None = 400, external_ids: Sequence[str] = ()
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.external_ids = tuple(external_ids)


class TargetError(Exception):
    """PANDA cannot be used as configured (wrong `panda.url`, an answer PANDA never gives):
    pause delivery to it until an operator fixes the setting; retrying unchanged will not help.
    """

    def __init__(self, detail: str, *, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class UnauthorizedError(TargetError):
    """PANDA refused the credentials (401): pause delivery until `panda.email` or
    `panda.api_key` is fixed. The message names the settings, never the key.
    """


class DatasetMismatchError(Exception):
    """The dataset exists in PANDA but cannot take this source's rows (other columns, or a
    state PANDA refuses writes in): stop delivering this source until it is fixed.
    """

    def __init__(self, detail: str, *, slug: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.slug = slug


def make_http(
    *,
    url: str,
    timeout_s: float = 30.0,
    max_connections: int = 10,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An HTTP client for the PANDA at `url` (its site root, e.g. `http://panda.example.org/`).

    Keep-alive pool of `max_connections`; `timeout_s` bounds connect, each read and write,
    and the wait for a pooled connection. Redirects are never followed: PANDA's 301s drop PUT
    bodies (§2). Carries no credentials; `PandaClient` adds them. `transport` replaces the
    network (tests). Close it with `aclose()` or `async with`. Raises `ValueError` for a URL
    that is not absolute http(s).
    """
    base = httpx.URL(url)
    if base.scheme not in ("http", "https") or not base.host:
        raise ValueError(
            "panda.url must be PANDA's absolute http(s) site root, e.g. http://panda.example.org/"
        )
    return httpx.AsyncClient(
        base_url=base,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        follow_redirects=False,
        headers={"Accept": "application/json", "User-Agent": "pandasync"},
        transport=transport,
    )


@dataclass(frozen=True)
class PandaRow:
    """A row as PANDA lists it: its external_id and its data, as stored."""

    external_id: str
    data: list[Any]


class PandaClient:
    """Writes rows of PANDA datasets by external_id over an `httpx.AsyncClient` from `make_http`.

    Every call is idempotent and either returns (PANDA confirmed it) or raises one of
    `RetryableError` (incl. `DatasetMissingError`), `PermanentError`, `TargetError` (incl.
    `UnauthorizedError`) or `DatasetMismatchError`. Cancellation propagates untouched.
    `clock` (epoch seconds) dates a `Retry-After` when the answer carries no `Date`.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        email: str,
        api_key: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not email:
            raise ValueError("panda.email is empty: set it to your PANDA user's email")
        if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise ValueError(
                "panda.api_key is not an API key (empty, or not printable ASCII):"
                " copy it from your PANDA user page"
            )
        self._http = http
        self._email = email
        self._clock = clock
        # Dash form: nginx drops header names with underscores (§1); query parameters would
        # put the key into URLs, and from there into logs.
        self._auth = {"PANDA-EMAIL": quote(email, safe=_EMAIL_SAFE), "PANDA-API-KEY": api_key}

    def __repr__(self) -> str:
        return f"PandaClient(url={str(self._http.base_url)!r}, email={self._email!r})"

    async def ensure_dataset(self, dataset: Dataset) -> bool:
        """Make sure `dataset` exists in PANDA with exactly its columns, in order; True when
        it was created.

        Idempotent: GET it; when missing, PUT it with `?columns=` and its name (§5.3). Raises
        `DatasetMismatchError` when it exists with other columns (PANDA cannot change them),
        `PermanentError` when PANDA refuses to create it, and the others as `PandaClient` says.
        """
        path = _dataset_path(dataset.slug)
        response = await self._send("GET", path)
        created = response.status_code == 404
        if created:
            response = await self._send(
                "PUT",
                path,
                params={"columns": ",".join(dataset.columns)},
                content=orjson.dumps({"name": dataset.name}),
            )
        self._check(response, slug=dataset.slug, rows=False)
        existing = _column_names(response)
        if existing != dataset.columns:
            raise DatasetMismatchError(_mismatch(dataset, existing), slug=dataset.slug)
        return created

    async def put_row(self, slug: str, external_id: str, row: Sequence[str]) -> None:
        """Create or replace row `external_id` of dataset `slug` with `row` (column order).

        Idempotent; PANDA answers 202 whether the row is new or not (§3.2). Raises
        `PermanentError` without sending for an id PANDA cannot route or a row that is not
        valid UTF-8; `DatasetMissingError` when the dataset is gone.
        """
        path = _row_path(slug, external_id)
        content = _encode({"data": list(row)}, (external_id,))
        self._check(await self._send("PUT", path, content=content), slug=slug, rows=True)

    async def delete_row(self, slug: str, external_id: str) -> None:
        """Delete row `external_id` of dataset `slug`; done also when the row did not exist.

        Idempotent (PANDA answers 204 for a missing row, §3.2). A 404 means the dataset is
        gone: `DatasetMissingError`, so the caller re-creates it rather than trust a URL
        that may be wrong.
        """
        path = _row_path(slug, external_id)
        self._check(await self._send("DELETE", path), slug=slug, rows=True)

    async def put_rows(self, slug: str, rows: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Create or replace several rows of dataset `slug` in one bulk PUT: (external_id, row).

        All or nothing: PANDA validates every object before writing any (§3.3.9), so a
        `PermanentError` means none was written; its `external_ids` names the culprits when
        they are known, else re-send the rows one by one with `put_row` to find them. At most
        `BULK_LIMIT` rows (`ValueError` beyond); an empty list sends nothing.
        """
        external_ids: list[str] = []
        encoded: list[str] = []
        for external_id, row in rows:
            try:
                text = orjson.dumps(list(row)).decode()
            except orjson.JSONEncodeError:
                text = _json_with_escapes(row)  # refused as not UTF-8 by `put_rows_json`
            external_ids.append(external_id)
            encoded.append(text)
        await self.put_rows_json(slug, external_ids, encoded)

    async def put_rows_json(
        self, slug: str, external_ids: Sequence[str], rows: Sequence[str]
    ) -> None:
        """`put_rows` for rows already encoded: `rows[i]` is the JSON array text of the row
        `external_ids[i]`.

        The text goes into the body as it is (delivery sends rows as the outbox stores them).
        Rows whose text holds a lone surrogate (`\\ud800`), which is not UTF-8 text, are named
        in the `PermanentError` and nothing is sent.
        """
        if len(external_ids) != len(rows):
            raise ValueError(f"{len(external_ids)} external_ids for {len(rows)} rows")
        if len(rows) > BULK_LIMIT:
            raise ValueError(f"{len(rows)} rows in one bulk PUT; send at most {BULK_LIMIT}")
        if not rows:
            return
        # One match over all the ids (no id may hold the separator), and a row-by-row look
        # only when something is off.
        joined = "\n".join(external_ids)
        fit = (
            joined.count("\n") == len(rows) - 1
            and _BULK_IDS.fullmatch(joined) is not None
            and "[]" not in rows
        )
        pairs = zip(external_ids, rows, strict=True)
        unfit = [] if fit else [eid for eid, row in pairs if not _fits_bulk(eid, row)]
        if unfit:
            raise PermanentError(
                "PANDA's bulk PUT needs an external_id of ASCII letters, digits, `_` or `-`"
                f" and a non-empty row; not sent, because of {unfit!r}",
                status=None,
                external_ids=unfit,
            )
        # The ids are checked ASCII letters, digits, `_` and `-`: nothing to escape.
        objects = ",".join(map(_BULK_OBJECT.format, rows, external_ids))
        body = f'{{"objects":[{objects}]}}'
        try:
            content = body.encode()
        except UnicodeEncodeError:  # a lone surrogate, unescaped
            content = b""
        # Escaped (`\\ud800`), a lone surrogate is valid JSON but not text PANDA can store.
        if not content or "\\ud" in body or "\\uD" in body:
            unfit = [
                eid for eid, row in zip(external_ids, rows, strict=True) if not _utf8_json(row)
            ]
            if unfit:
                raise PermanentError(
                    f"a row for {unfit!r} is not valid UTF-8 text (it holds a lone surrogate);"
                    " not sent",
                    status=None,
                    external_ids=unfit,
                )
        response = await self._send("PUT", _rows_path(slug), content=content)
        self._check(response, slug=slug, rows=True)

    async def apply(self, slug: str, change: Change) -> None:
        """Make PANDA's row `change.external_id` of dataset `slug` match `change`.

        An upsert puts the row, a delete deletes it; raises as `put_row` and `delete_row`.
        """
        if change.op is Op.DELETE:
            await self.delete_row(slug, change.external_id)
        elif change.row is not None:
            await self.put_row(slug, change.external_id, change.row)
        else:  # pragma: no cover - `Change` itself refuses an upsert without a row
            raise ValueError("an upsert change without a row")

    async def row_count(self, slug: str) -> int | None:
        """The dataset's `row_count` (§3.1: trust it, not a listing's `total_count`); None
        when the dataset does not exist or was never written."""
        response = await self._send("GET", _dataset_path(slug))
        if response.status_code == 404:
            return None
        self._check(response, slug=slug, rows=False)
        count = response.json().get("row_count")
        return count if isinstance(count, int) else None

    async def rows(self, slug: str, *, page_size: int = 1000) -> AsyncIterator[PandaRow]:
        """Every row of dataset `slug` with an external_id, page by page (§3.2).

        Always an explicit `limit`; rows of other datasets a listing may hold are left out
        (each row's `dataset` is checked). Pages are unstable while the dataset is written:
        read it when nothing else writes it, or expect a row missed or seen twice.
        Raises `DatasetMissingError` when the dataset does not exist.
        """
        path, mine = _rows_path(slug), _dataset_path(slug)
        offset = 0
        while True:
            params = {"limit": str(page_size), "offset": str(offset)}
            response = await self._send("GET", path, params=params)
            self._check(response, slug=slug, rows=True)
            page = response.json()
            objects = page.get("objects") or []
            for row in objects:
                external_id, data = row.get("external_id"), row.get("data")
                if row.get("dataset") == mine and isinstance(external_id, str):
                    yield PandaRow(external_id, list(data) if isinstance(data, list) else [])
            if len(objects) < page_size:
                return
            offset += page_size

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        headers = self._auth if content is None else {**self._auth, **_JSON}
        try:
            request = self._http.build_request(
                method, path, params=params, content=content, headers=headers
            )
            response = await self._http.send(request, stream=True)
            try:
                return await _read_bounded(response, f"{method} {path}")
            finally:
                await response.aclose()
        except httpx.UnsupportedProtocol as error:
            raise TargetError(f"{method} {path}: {error}; fix panda.url ({_PAUSE})") from error
        except httpx.TimeoutException as error:
            raise RetryableError(
                f"{method} {path}: no answer from PANDA in time ({type(error).__name__})"
            ) from error
        except httpx.RequestError as error:
            raise RetryableError(
                f"{method} {path}: PANDA unreachable or the answer was cut off"
                f" ({type(error).__name__}: {error})"
            ) from error

    def _check(self, response: httpx.Response, *, slug: str, rows: bool) -> None:
        """Return on 2xx; otherwise raise the error the answer stands for (see `_error`)."""
        if not response.is_success:
            raise self._error(response, slug=slug, rows=rows)

    def _error(self, response: httpx.Response, *, slug: str, rows: bool) -> Exception:
        """The error for a non-2xx answer to a call on dataset `slug` or its rows (`rows`).

        Only 400 is permanent: PANDA itself refused this request. Anything PANDA never sends
        (3xx, 405, 501, other 4xx) pauses the target rather than dead-letter every row.
        """
        status = response.status_code
        call = f"{response.request.method} {response.request.url.path}"
        if status == 400:
            return _refusal(response, call, slug=slug, rows=rows)
        if status == 401:
            return UnauthorizedError(
                f"PANDA refused the credentials (401) for {call}: check panda.email"
                f" ({self._email}; an active PANDA user allowed to create datasets) and"
                f" panda.api_key ({_PAUSE})",
                status=401,
            )
        if status == 403:
            # The only 403 PANDA sends: a write while another process holds the lock (§3.3.7).
            return RetryableError(
                f"{call}: the dataset is locked by another process (403)", status=403
            )
        if status == 404 and rows:
            return DatasetMissingError(f"{call}: PANDA has no such dataset (404)", status=404)
        if status == 300:
            return DatasetMismatchError(
                f"{call}: PANDA holds two datasets with slug {slug} (300; made by POST with a"
                " slug in the body, §3.1): delete one of them in PANDA",
                slug=slug,
            )
        if _is_transient(status):
            return RetryableError(
                f"{call}: PANDA answered {status} {_excerpt(response)}".rstrip(),
                status=status,
                retry_after_s=_retry_after_s(response, self._clock),
            )
        return TargetError(_unexpected(response, call), status=status)


def _is_transient(status: int) -> bool:
    """Statuses that say "later": timeouts, throttling and server errors, except 501 and 505,
    which say "never" (PANDA's 501 is a method its route lacks, §3.2)."""
    return status in (408, 429) or (status >= 500 and status not in (501, 505))


def _dataset_path(slug: str) -> str:
    # Every PANDA route ends in `/`; without it Django redirects and the body is lost (§2).
    return f"{_API}/dataset/{quote(slug, safe='')}/"


def _rows_path(slug: str) -> str:
    return f"{_dataset_path(slug)}data/"


def _row_path(slug: str, external_id: str) -> str:
    """The row URL; raises `PermanentError` for an id PANDA's URL pattern cannot route."""
    if not _ROUTABLE.fullmatch(external_id):
        # Unroutable ids get Django's 404, which would read as "dataset missing" forever.
        raise PermanentError(
            f"PANDA cannot address external_id {external_id!r} in a URL (only letters,"
            " digits, `_` and `-`); not sent",
            status=None,
            external_ids=(external_id,),
        )
    return f"{_rows_path(slug)}{quote(external_id, safe='')}/"


def _encode(body: dict[str, Any], external_ids: Sequence[str]) -> bytes:
    """The JSON body; `PermanentError` (naming the rows, not their values) if it is not UTF-8."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as error:
        raise PermanentError(
            f"a row for {list(external_ids)!r} is not valid UTF-8 text ({type(error).__name__});"
            " not sent",
            status=None,
            external_ids=external_ids,
        ) from None


def _json_with_escapes(row: Sequence[str]) -> str:
    """A row's JSON text with every non-ASCII character escaped, lone surrogates too."""
    return json.dumps(list(row), ensure_ascii=True, separators=(",", ":"))


def _fits_bulk(external_id: str, row: str) -> bool:
    return _BULK_ID.fullmatch(external_id) is not None and row != "[]"


def _utf8_json(text: str) -> bool:
    """Whether JSON `text` encodes as UTF-8 and holds no lone surrogate (orjson refuses both)."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _refusal(response: httpx.Response, call: str, *, slug: str, rows: bool) -> Exception:
    """A 400: PANDA refused this request (the dataset itself, when the body says so)."""
    message = _excerpt(response) or (
        "(no readable reason: PANDA 1.1 sends its plain-text errors as an object repr, §0.1)"
    )
    if rows and _is_about_dataset(response):
        # `{"dataset": [...]}`: no columns, or an upload still importing (§3.3.6, §3.3.7);
        # every row would be refused the same way, so stop the source, not the row.
        return DatasetMismatchError(
            f"{call}: PANDA refuses rows for dataset {slug}: {message}; delete the dataset in"
            " PANDA so pandasync re-creates it with its columns, or configure another slug",
            slug=slug,
        )
    return PermanentError(f"PANDA refused {call} (400): {message}", status=400)


async def _read_bounded(response: httpx.Response, call: str) -> httpx.Response:
    """`response` read whole, unless it runs past `MAX_ANSWER_BYTES`: then `TargetError` (no
    PANDA answers that much), after reading no more than that."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise TargetError(
                f"{call}: the answer runs past {MAX_ANSWER_BYTES} bytes, which PANDA never"
                f" sends: is panda.url PANDA's site root? ({_PAUSE})",
                status=response.status_code,
            )
    # Read decoded: the answer's own content-encoding and length no longer apply.
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=bytes(body), request=response.request
    )


def _is_about_dataset(response: httpx.Response) -> bool:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and "dataset" in body


def _excerpt(response: httpx.Response) -> str:
    """The readable part of an answer's body, whitespace collapsed, at most `DETAIL_LIMIT`."""
    text = " ".join(_LAZY_REPR.sub(" ", response.text).split())
    return text if len(text) <= DETAIL_LIMIT else f"{text[: DETAIL_LIMIT - 1]}…"


def _retry_after_s(response: httpx.Response, clock: Callable[[], float]) -> float | None:
    """`Retry-After` in seconds: delay-seconds or an HTTP date (RFC 9110 §10.2.3), else None.

    A date counts from the answer's own `Date` when it has one (no clock skew), else `clock`.
    """
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        at = _http_date(value)
        if at is None:
            return None
        seconds = at - (_http_date(response.headers.get("Date", "")) or clock())
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _http_date(value: str) -> float | None:
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    # A `-0000` zone parses as naive; HTTP dates are always UTC (RFC 9110 §5.6.7).
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _unexpected(response: httpx.Response, call: str) -> str:
    status = response.status_code
    if response.is_redirect:
        where = response.headers.get("Location", "nowhere")
        return (
            f"{call}: PANDA answered {status} (to {where}), which pandasync never follows:"
            f" set panda.url to PANDA's site root exactly as it serves it (scheme, host,"
            f" path) ({_PAUSE})"
        )
    return (
        f"{call}: PANDA answered {status}, which PANDA 1.1 never sends for this call: check"
        f" that panda.url is PANDA's site root, not a page or /api/1.0/ ({_PAUSE})"
    )


def _column_names(response: httpx.Response) -> tuple[str, ...]:
    """`column_schema[*].name` of a dataset answer (empty when it has no columns).

    Raises `TargetError` when the answer is not a PANDA dataset.
    """
    try:
        body = orjson.loads(response.content)
        names = tuple(column["name"] for column in body["column_schema"] or [])
        if not all(isinstance(name, str) for name in names):
            raise TypeError("a column name is not a string")
    except (orjson.JSONDecodeError, TypeError, KeyError) as error:
        call = f"{response.request.method} {response.request.url.path}"
        raise TargetError(
            f"{call}: the answer is not a PANDA dataset ({type(error).__name__}): check that"
            f" panda.url is PANDA's site root ({_PAUSE})",
            status=response.status_code,
        ) from None
    return names


def _mismatch(dataset: Dataset, existing: tuple[str, ...]) -> str:
    has = f"columns {list(existing)!r}" if existing else "no columns"
    return (
        f"PANDA dataset {dataset.slug} has {has}, but pandasync is configured with"
        f" {list(dataset.columns)!r}; PANDA cannot change a dataset's columns through its API:"
        " configure the columns PANDA has, or delete the dataset in PANDA so pandasync"
        " re-creates it, or configure another slug"
    )
