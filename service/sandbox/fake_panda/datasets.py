"""PANDA's dataset endpoints: list, create by PUT or POST, read, update, delete (§3.1).

Each handler takes the state, the request and its route, and returns a `Response` or raises
`AbortError`; checks run in PANDA's order, so a failure after a save leaves what PANDA leaves.
"""

from service.sandbox.fake_panda.request import Request, json_object
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
from service.sandbox.fake_panda.routes import DATASET_URI, Route
from service.sandbox.fake_panda.schema import make_column_schema
from service.sandbox.fake_panda.state import State
from service.sandbox.fake_panda.store import Dataset

NAME_REQUIRED = {"dataset": {"name": ["This field is required."]}}
MULTIPLE = "More than one resource is found at this URI."
_NEEDS_COLUMNS = 'The "columns" argument must also be specified when specifying "{name}".'
_TYPED_LENGTH = (
    'The "typed_columns" argument must be a comma-separated list of True/False values with the '
    'same number of values as the "columns" argument.'
)
_TYPES_LENGTH = (
    'The "column_types" argument must be a comma-separated list of types with the same number '
    'of values as the "columns" argument.'
)


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _fields(body: dict[str, object], current: Dataset | None) -> tuple[str, str]:
    """Name and description from a body; 400 when `name` is missing or empty."""
    name = body.get("name")
    if not name:
        raise AbortError(invalid(NAME_REQUIRED))
    description = body.get("description", current.description if current else "")
    if description is None:  # a NOT NULL column in PANDA's database
        raise AbortError(canned(500))
    return _text(name), _text(description)


def _typed(query: dict[str, str], columns: list[str] | None) -> list[bool] | None:
    if "typed_columns" not in query:
        return None
    if not columns:
        raise AbortError(message(400, _NEEDS_COLUMNS.format(name="typed_columns")))
    typed = [value.lower() == "true" for value in query["typed_columns"].split(",")]
    if len(typed) != len(columns):
        raise AbortError(message(400, _TYPED_LENGTH))
    return typed


def _types(query: dict[str, str], columns: list[str] | None) -> list[str | None] | None:
    if "column_types" not in query:
        return None
    if not columns:
        raise AbortError(message(400, _NEEDS_COLUMNS.format(name="column_types")))
    types = [value.lower() or None for value in query["column_types"].split(",")]
    if len(types) != len(columns):
        raise AbortError(message(400, _TYPES_LENGTH))
    return types


def _give_columns(dataset: Dataset, query: dict[str, str]) -> None:
    """Apply `?columns=` (with `typed_columns`, `column_types`) to a dataset just created.

    Raises a 400 for inconsistent parameters, after the dataset was saved without columns.
    """
    columns = query["columns"].split(",") if "columns" in query else None
    typed = _typed(query, columns)
    types = _types(query, columns)
    if columns:
        dataset.column_schema = make_column_schema(columns, typed, types)


def _created(state: State, request: Request, slug: str, body: dict[str, object]) -> Response:
    name, description = _fields(body, None)
    dataset = state.store.create(slug, name=name, description=description)
    _give_columns(dataset, request.query)
    if DATASET_URI.match(f"/api/1.0/dataset/{slug}/") is None:
        raise AbortError(canned(500))  # PANDA cannot reverse() the Location; the dataset stays
    location = request.absolute(dataset.uri)
    return ok(201, state.dataset_json(dataset), location=location)


def _mentions(dataset: Dataset, words: list[str], email: object) -> bool:
    columns = [str(column["name"]) for column in dataset.column_schema or []]
    text = "\n".join([dataset.name, dataset.description, str(email), *columns]).lower()
    return all(word in text for word in words)


def _listed(state: State, query: dict[str, str]) -> list[Dataset]:
    """The datasets a list request selects, newest first; `q` is a plain word match here."""
    datasets = state.store.newest_first()
    creator_email = query.get("creator_email")
    if creator_email:  # PANDA's database branch: `q` and `category` are ignored
        return datasets if creator_email == state.user["email"] else []
    category = query.get("category")
    if category and category != "uncategorized":
        return []  # the fake has no categories
    words = query.get("q", "").lower().split()
    return [dataset for dataset in datasets if _mentions(dataset, words, state.user["email"])]


def list_datasets(state: State, request: Request, route: Route) -> Response:
    """GET /dataset/: a page of datasets (`limit`, `offset`, `q`, `creator_email`, `simple`)."""
    found = _listed(state, request.query)
    page = window(request.path, request.query, len(found))
    simple = request.query.get("simple", "false").lower() == "true"
    chosen = found[page.offset : page.offset + page.fetch]
    objects = [state.dataset_json(dataset, simple=simple) for dataset in chosen]
    return ok(200, {"meta": page.meta, "objects": objects})


def post_dataset(state: State, request: Request, route: Route) -> Response:
    """POST /dataset/: create; the body's slug is taken verbatim, else one is made from the name.

    A body slug that exists is not refused (PANDA has no check): the slug becomes ambiguous.
    """
    body = json_object(request)
    name, _ = _fields(body, None)
    given = body.get("slug")
    slug = _text(given) if given else state.store.unique_slug(name)
    return _created(state, request, slug, body)


def get_dataset(state: State, request: Request, route: Route) -> Response:
    """GET /dataset/<slug>/: 200, or 404 with an empty body."""
    dataset = state.store.get(route.slug)
    if dataset is None:
        return empty(404)
    if dataset.copies > 1:
        return message(300, MULTIPLE)
    return ok(200, state.dataset_json(dataset))


def _patch(state: State, request: Request, route: Route) -> Response:
    dataset = state.store.get(route.slug)
    if dataset is None:
        return empty(404)
    if dataset.copies > 1:
        return message(300, MULTIPLE)
    body = {"name": dataset.name, "description": dataset.description, **json_object(request)}
    dataset.name, dataset.description = _fields(body, dataset)
    return ok(202, state.dataset_json(dataset))


def put_dataset(state: State, request: Request, route: Route) -> Response:
    """PUT /dataset/<slug>/: create (201) or update (202); `?patch=true` updates partially.

    On update `columns`, `typed_columns` and `column_types` are ignored, as in PANDA.
    """
    if request.query.get("patch", "false").lower() == "true":
        return _patch(state, request, route)
    body = json_object(request)
    dataset = state.store.get(route.slug)
    if dataset is None or dataset.copies > 1:  # tastypie creates on MultipleObjectsReturned too
        return _created(state, request, route.slug, body)
    dataset.name, dataset.description = _fields(body, dataset)
    return ok(202, state.dataset_json(dataset))


def delete_dataset(state: State, request: Request, route: Route) -> Response:
    """DELETE /dataset/<slug>/: 204 with its rows gone at once; 404 when missing."""
    dataset = state.store.get(route.slug)
    if dataset is None:
        return empty(404)
    if dataset.copies > 1:
        return canned(500)
    state.store.delete(route.slug)
    return empty(204)


def get_schema(state: State, request: Request, route: Route) -> Response:
    """GET /dataset/schema/: a skeleton of tastypie's schema (the fake lists no fields)."""
    return ok(
        200,
        {
            "allowed_detail_http_methods": ["get", "post", "put", "delete"],
            "allowed_list_http_methods": ["get", "post", "put", "delete"],
            "default_format": "application/json",
            "default_limit": 20,
            "fields": {},
        },
    )
