"""How PANDA renders its objects: the user, a dataset (full or simple), a page's `meta`.

Pure functions from store values to JSON-ready dicts (panda-api.md §3.1, §3.2).
"""

from dataclasses import dataclass
from urllib.parse import urlencode

from service.sandbox.fake_panda.responses import AbortError, canned
from service.sandbox.fake_panda.store import Dataset

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


def user_json(*, email: str, joined: str) -> dict[str, object]:
    """The one user, as PANDA embeds it in `creator` and `last_modified_by`."""
    return {
        "date_joined": joined,
        "email": email.lower(),
        "first_name": "",
        "id": "1",
        "is_active": True,
        "last_login": joined,
        "last_name": "",
        "resource_uri": "/api/1.0/user/1/",
    }


def dataset_json(
    dataset: Dataset, *, user: dict[str, object], locked: bool, simple: bool = False
) -> dict[str, object]:
    """A dataset as PANDA's `DatasetResource` dehydrates it.

    `simple` drops `data_uploads`, `related_uploads`, `sample_data` and `current_task`, as in
    the row list and `?simple=true`. Categories, uploads and tasks are always empty here.
    """
    body: dict[str, object] = {
        "categories": [],
        "column_schema": dataset.column_schema,
        "creation_date": dataset.creation_date,
        "creator": user,
        "description": dataset.description,
        "id": str(dataset.id),
        "initial_upload": None,
        "last_modification": dataset.last_modification,
        "last_modified": dataset.last_modified,
        "last_modified_by": user if dataset.modified_by_user else None,
        "locked": locked,
        "locked_at": dataset.locked_at,
        "name": dataset.name,
        "related_links": [],
        "resource_uri": dataset.uri,
        "row_count": dataset.row_count,
        "slug": dataset.slug,
    }
    if not simple:
        body.update(current_task=None, data_uploads=[], related_uploads=[])
        body["sample_data"] = dataset.sample_data
    return body


@dataclass(frozen=True)
class Window:
    """Which objects a list page holds (`offset`, `fetch`) and the `meta` PANDA reports."""

    offset: int
    fetch: int
    meta: dict[str, object]


def _whole(raw: str | None, default: int) -> int:
    # A non-integer is a ValueError and a negative one a Solr error in PANDA: both 500s.
    if raw is None:
        return default
    try:
        number = int(raw)
    except ValueError:
        raise AbortError(canned(500)) from None
    if number < 0:
        raise AbortError(canned(500))
    return number


def _link(path: str, query: dict[str, str], *, limit: int, offset: int) -> str:
    # Tastypie repeats every query parameter, email and api_key included.
    return f"{path}?{urlencode({**query, 'limit': limit, 'offset': offset})}"


def window(path: str, query: dict[str, str], count: int) -> Window:
    """The page asked for by `limit`/`offset` over `count` objects, with tastypie's `meta`.

    As in PANDA, `limit` is capped at 1000 in `meta` only, and `limit=0` leaves `next` and
    `previous` out. Without `limit` the fake returns 20 and says 20 (PANDA returns 50).
    Raises `AbortError` (500) for a non-integer or negative `limit` or `offset`.
    """
    fetch = _whole(query.get("limit"), DEFAULT_LIMIT)
    offset = _whole(query.get("offset"), 0)
    limit = min(fetch, MAX_LIMIT)
    meta: dict[str, object] = {"limit": limit, "offset": offset, "total_count": count}
    if limit:
        previous = offset - limit
        meta["previous"] = (
            None if previous < 0 else _link(path, query, limit=limit, offset=previous)
        )
        following = offset + limit
        meta["next"] = (
            None if following >= count else _link(path, query, limit=limit, offset=following)
        )
    return Window(offset, fetch, meta)
