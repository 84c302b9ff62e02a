"""PANDA's request dispatch for `/api/` paths, in tastypie's order (panda-api.md §1, §2).

Trailing-slash redirect, then method check (405), authentication (401), the injected 5xx, and
the handler. Exceptions a handler does not expect become tastypie's generic 500, as in PANDA.
"""

import logging
from collections.abc import Callable
from urllib.parse import quote

from service.sandbox.fake_panda import datasets, rows
from service.sandbox.fake_panda.auth import authenticated
from service.sandbox.fake_panda.request import Request
from service.sandbox.fake_panda.responses import (
    AbortError,
    Response,
    allows,
    canned,
    empty,
    redirect,
)
from service.sandbox.fake_panda.routes import Kind, Route, resolve
from service.sandbox.fake_panda.state import State

logger = logging.getLogger(__name__)

Handler = Callable[[State, Request, Route], Response]


def _not_implemented(state: State, request: Request, route: Route) -> Response:
    return empty(501)


HANDLERS: dict[tuple[Kind, str], Handler] = {
    (Kind.DATASETS, "GET"): datasets.list_datasets,
    (Kind.DATASETS, "POST"): datasets.post_dataset,
    (Kind.SCHEMA, "GET"): datasets.get_schema,
    (Kind.DATASET, "GET"): datasets.get_dataset,
    (Kind.DATASET, "PUT"): datasets.put_dataset,
    (Kind.DATASET, "DELETE"): datasets.delete_dataset,
    (Kind.DATASET, "POST"): _not_implemented,  # tastypie's post_detail
    (Kind.ROWS, "GET"): rows.get_rows,
    (Kind.ROWS, "PUT"): rows.put_rows,
    (Kind.ROWS, "POST"): rows.post_rows,
    (Kind.ROWS, "DELETE"): rows.delete_rows,
    (Kind.ROW, "GET"): rows.get_row,
    (Kind.ROW, "PUT"): rows.put_row,
    (Kind.ROW, "DELETE"): rows.delete_row,
    (Kind.ROW, "POST"): _not_implemented,  # tastypie's post_detail
}
# Not served by the fake, answered 501 after authentication: PUT and DELETE on the dataset
# list (tastypie would replace or drop every dataset), import/export/reindex, global search.

_WRITES = frozenset({"PUT", "POST", "DELETE"})


def writes_rows(route: Route | None, method: str) -> bool:
    """Whether a request is a row write (bulk, single, delete, delete all)."""
    return route is not None and route.rows and method in _WRITES


def _unrouted(request: Request) -> Response:
    """Django's `CommonMiddleware`: 301 to the slash form if that routes, else a 404 page."""
    if not request.path.endswith("/") and resolve(request.path + "/") is not None:
        location = request.absolute(quote(request.path + "/"))
        if request.raw_query:
            location = f"{location}?{request.raw_query}"
        return redirect(location)
    return empty(404)


def _dispatch(state: State, request: Request, route: Route) -> Response:
    allowed = route.allowed
    if request.method == "OPTIONS":
        return allows(allowed, status=200)
    if request.method not in allowed:
        return allows(allowed, status=405)
    if not authenticated(request, state.options):
        return empty(401)
    handler = HANDLERS.get((route.kind, request.method), _not_implemented)
    injectable = handler is not _not_implemented and writes_rows(route, request.method)
    if injectable and state.control.inject_error():
        return canned(500)
    try:
        return handler(state, request, route)
    except AbortError as abort:
        return abort.response
    except Exception:
        logger.exception("unexpected error method=%s path=%s", request.method, request.path)
        return canned(500)


def answer(state: State, request: Request) -> Response:
    """PANDA's answer to one `/api/` request, counted in the statistics."""
    route = resolve(request.path)
    response = _unrouted(request) if route is None else _dispatch(state, request, route)
    wrote = 200 <= response.status < 300 and writes_rows(route, request.method)
    state.control.answered(response.status, wrote_rows=wrote)
    return response
