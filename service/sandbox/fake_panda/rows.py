"""PANDA's data (row) endpoints: list, bulk PUT, POST, row GET/PUT/DELETE, delete all (§3.2).

Checks run in PANDA's order (`api/data.py`): body, dataset, per-object validation, the lock,
then the write. The `refuse_ids` fault enters with validation and `locked` with the lock.
"""

import re
from collections.abc import Collection
from itertools import islice

from service.sandbox.fake_panda.request import Request, json_body, json_object
from service.sandbox.fake_panda.resources import window
from service.sandbox.fake_panda.responses import (
    AbortError,
    Response,
    canned,
    empty,
    invalid,
    message,
    ok,
)
from service.sandbox.fake_panda.routes import Kind, Route, resolve
from service.sandbox.fake_panda.schema import accepts_upserts
from service.sandbox.fake_panda.state import State
from service.sandbox.fake_panda.store import Dataset, JsonRow, StoredRow

DATA_REQUIRED = "The data field is required."
MUST_BE_STRING = "external_id must be a string."
ID_CHARACTERS = "external_id can only contain letters, numbers, underscores and dashes."
NO_COLUMNS = "Can not create or modify data for a dataset without columns."
LOCKED = "Dataset is currently locked by another process."
INVALID_DATA = "Invalid data sent."
# The `refuse_ids` fault answers as PANDA answers an external_id it rejects.
REFUSED = {"data": {"external_id": [ID_CHARACTERS]}}
MULTIPLE = "More than one resource is found at this URI."
DATASET_MISMATCH = (
    "Dataset specified in request body does not agree with dataset API endpoint used."
)

# PANDA's `re.match('^[\w\d_-]+$', ...)` without the Unicode flag: ASCII only, and `$` also
# matches before a final newline, which is let through as PANDA lets it through.
_BULK_ID = re.compile(r"^[\w\d_-]+$", re.ASCII)
_SINCE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?")

Entry = tuple[object, str | None]


def _dataset(state: State, slug: str) -> Dataset:
    """The dataset a data endpoint names: 404 (JSON) when missing, 500 when ambiguous."""
    dataset = state.store.get(slug)
    if dataset is None:
        raise AbortError(canned(404))
    if dataset.copies > 1:
        raise AbortError(canned(500))
    return dataset


def _fit(dataset: Dataset, data: object) -> None:
    """PANDA's `validate_bundle_data`: the dataset has columns and `data` one value per column."""
    if not isinstance(data, list | str | dict):
        raise AbortError(canned(500))  # `len()` of a number or null
    if dataset.column_schema is None:
        raise AbortError(invalid({"dataset": [NO_COLUMNS]}))
    expected = len(dataset.column_schema)
    if len(data) != expected:
        raise AbortError(invalid({"data": [f"Got {len(data)} data fields. Expected {expected}."]}))


def _refuse(state: State, external_id: str | None) -> None:
    if state.control.is_refused(external_id):
        raise AbortError(invalid(REFUSED))


def _take_lock(state: State, dataset: Dataset) -> None:
    if state.control.is_locked(dataset.slug):
        raise AbortError(message(403, LOCKED))
    state.store.lock(dataset)


def _check_upsertable(dataset: Dataset) -> None:
    if not accepts_upserts(dataset.column_schema):
        raise AbortError(canned(500))  # PANDA's DataTyper fails inside the lock


def _bulk_objects(body: object) -> object:
    """The `objects` value of a bulk body: 400 when absent, 500 where tastypie crashes."""
    if not isinstance(body, dict | list | str):
        raise AbortError(canned(500))
    if "objects" not in body:
        raise AbortError(message(400, INVALID_DATA))
    if not isinstance(body, dict):
        raise AbortError(canned(500))
    return body["objects"]


def _object_errors(item: dict[str, object]) -> dict[str, list[str]]:
    """PANDA's `DataValidation` for one bulk object."""
    errors: dict[str, list[str]] = {}
    if not item.get("data"):
        errors["data"] = [DATA_REQUIRED]
    if "external_id" in item:
        external_id = item["external_id"]
        if not isinstance(external_id, str):
            errors["external_id"] = [MUST_BE_STRING]
        elif _BULK_ID.match(external_id) is None:
            errors["external_id"] = [ID_CHARACTERS]
    return errors


def _entries(state: State, dataset: Dataset, objects: object) -> list[Entry]:
    """Validate every bulk object in order; the first failure aborts the whole request."""
    if not isinstance(objects, list):
        if objects == {} or objects == "":
            return []  # iterating an empty object or string: nothing to write
        raise AbortError(canned(500))
    refused = state.control.faults.refuse_ids
    entries: list[Entry] = []
    for item in objects:
        if not isinstance(item, dict):
            raise AbortError(canned(500))
        errors = _object_errors(item)
        if errors:
            raise AbortError(invalid({"data": errors}))
        external_id = item.get("external_id")
        if refused and external_id in refused:
            raise AbortError(invalid(REFUSED))
        _fit(dataset, item["data"])
        entries.append((item["data"], external_id if isinstance(external_id, str) else None))
    return entries


def put_rows(state: State, request: Request, route: Route) -> Response:
    """Bulk PUT /data/: all objects validated, then one write; 202 echoing each, in order."""
    objects = _bulk_objects(json_body(request))
    dataset = _dataset(state, route.slug)
    entries = _entries(state, dataset, objects)
    _take_lock(state, dataset)
    _check_upsertable(dataset)
    return ok(202, {"objects": state.store.upsert_many(dataset, entries)})


def _slug_named(uri: object) -> str:
    """The dataset slug in a body's `dataset` URI, resolved as Django's `resolve()` would."""
    if not isinstance(uri, str):
        raise AbortError(canned(500))
    found = resolve(uri)
    if found is None:
        raise AbortError(canned(404))
    if found.kind not in (Kind.DATASET, Kind.TASK):
        raise AbortError(canned(500))  # the view has no `slug` argument
    return found.slug


def _single_id(body: dict[str, object], fallback: str | None) -> str | None:
    """The id a single-row write uses: the body's (unvalidated) over the URL's.

    A falsy body id makes the row anonymous; numbers are stored as their text.
    """
    if "external_id" not in body:
        return fallback
    value = body["external_id"]
    if not value:
        return None
    if isinstance(value, str | int | float):
        return str(value)
    raise AbortError(canned(500))  # Solr refuses a list or an object as the id


def _write_one(state: State, request: Request, route: Route, fallback: str | None) -> JsonRow:
    body = json_object(request)
    uri = body.pop("dataset", None)
    if uri and _slug_named(uri) != route.slug:
        raise AbortError(message(400, DATASET_MISMATCH))
    dataset = _dataset(state, route.slug)
    if "data" not in body:
        raise AbortError(canned(500))  # no DataValidation on this path (§3.2)
    _fit(dataset, body["data"])
    external_id = _single_id(body, fallback)
    _refuse(state, external_id)
    _take_lock(state, dataset)
    _check_upsertable(dataset)
    return state.store.upsert_one(dataset, body["data"], external_id)


def put_row(state: State, request: Request, route: Route) -> Response:
    """PUT /data/<id>/: 202 whether the row is new or not; a body external_id wins."""
    return ok(202, _write_one(state, request, route, route.external_id))


def post_rows(state: State, request: Request, route: Route) -> Response:
    """POST /data/: 201 with an absolute Location (`.../data/None` for an anonymous row)."""
    row = _write_one(state, request, route, None)
    resource_uri = row["resource_uri"]
    if resource_uri == "":
        raise AbortError(canned(500))  # PANDA cannot reverse() the Location; the row stays
    location = request.absolute("None" if resource_uri is None else str(resource_uri))
    return ok(201, row, location=location)


def get_row(state: State, request: Request, route: Route) -> Response:
    """GET /data/<id>/: 200; a missing row is a JSON 404, a missing dataset an empty one."""
    dataset = state.store.get(route.slug)
    if dataset is None:
        return empty(404)
    if dataset.copies > 1:
        return message(300, MULTIPLE)
    stored = dataset.rows.get(route.external_id)
    if stored is None:
        return canned(404)
    return ok(200, stored.row)


def delete_row(state: State, request: Request, route: Route) -> Response:
    """DELETE /data/<id>/: 204 whether or not the row existed."""
    dataset = _dataset(state, route.slug)
    _refuse(state, route.external_id)
    _take_lock(state, dataset)
    state.store.delete_row(dataset, route.external_id)
    return empty(204)


def delete_rows(state: State, request: Request, route: Route) -> Response:
    """DELETE /data/: 204; 500 on a dataset never written, which still ends with row_count 0."""
    dataset = _dataset(state, route.slug)
    _take_lock(state, dataset)
    if not state.store.delete_all(dataset):
        return canned(500)
    return empty(204)


def _mentions(data: object, words: list[str]) -> bool:
    values = data if isinstance(data, list | str | dict) else [data]
    text = "\n".join(str(value) for value in values).lower()
    return all(word in text for word in words)


def _matching(dataset: Dataset, query: dict[str, str]) -> Collection[StoredRow]:
    """The rows a list request selects, in `_docid_` order.

    `since` keeps rows written at or after it; `q` is approximated by a plain word match
    over the row's values (PANDA hands it to Solr). `sort` is not supported.
    """
    rows: Collection[StoredRow] = dataset.rows.values()
    since = query.get("since")
    if since:
        if _SINCE.fullmatch(since) is None:
            raise AbortError(canned(500))  # Solr cannot parse the date
        rows = [stored for stored in rows if stored.written_at >= since]
    words = query.get("q", "").lower().split()
    if words:
        rows = [stored for stored in rows if _mentions(stored.row["data"], words)]
    return rows


def _and_elsewhere(state: State, dataset: Dataset) -> list[StoredRow]:
    """The rows of other datasets holding the word "and": without `q`, PANDA's Solr query
    `" AND dataset_slug:<slug>"` reads as "and OR this dataset" (panda-api.md §3.2)."""
    return [
        stored
        for other in state.store.newest_first()
        if other is not dataset
        for stored in other.rows.values()
        if _has_word(stored.row["data"], "and")
    ]


def _has_word(data: object, word: str) -> bool:
    values = data if isinstance(data, list) else [data]
    return any(word in str(value).lower().split() for value in values)


def get_rows(state: State, request: Request, route: Route) -> Response:
    """GET /data/: the simple dataset plus `meta` and a page of `objects` (without `q`, with
    other datasets' rows that hold the word "and", as PANDA's own listing has them)."""
    dataset = _dataset(state, route.slug)
    rows = _matching(dataset, request.query)
    if not request.query.get("q"):
        rows = [*rows, *_and_elsewhere(state, dataset)]
    page = window(request.path, request.query, len(rows))
    objects = [stored.row for stored in islice(rows, page.offset, page.offset + page.fetch)]
    body = state.dataset_json(dataset, simple=True)
    body.update(meta=page.meta, objects=objects)
    return ok(200, body)
