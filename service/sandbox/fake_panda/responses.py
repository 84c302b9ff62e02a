"""The answers a PANDA gives, as plain values: JSON successes, its four error shapes, redirects.

Building a `Response` does no I/O; `app` sends it. Shapes follow panda-api.md §2.
"""

import json
import math
from dataclasses import dataclass

import orjson

JSON_TYPE = b"application/json; charset=utf-8"
HTML_TYPE = b"text/html; charset=utf-8"
NO_CACHE = b"max-age=0,no-cache,no-store"
CANNED_ERROR = "Sorry, this request could not be processed. Please try again later."

Headers = tuple[tuple[bytes, bytes], ...]

_HTML: Headers = ((b"content-type", HTML_TYPE),)
_JSON: Headers = ((b"content-type", JSON_TYPE),)
_JSON_NO_CACHE: Headers = ((b"content-type", JSON_TYPE), (b"cache-control", NO_CACHE))


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP answer: status, body and headers (without Content-Length, added on sending)."""

    status: int
    body: bytes = b""
    headers: Headers = _HTML


class AbortError(Exception):
    """Stop handling the request and answer `response` (tastypie's `ImmediateHttpResponse`)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def dump(value: object) -> bytes:
    """Serialize like PANDA: sorted keys, raw UTF-8 (whitespace aside)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits, which PANDA's simplejson round-trips
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode()


def ok(status: int, value: object, *, location: str | None = None) -> Response:
    """A JSON success, with PANDA's `Cache-Control` (and an absolute `Location` on a create)."""
    headers = _JSON_NO_CACHE
    if location is not None:
        headers = (*headers, (b"location", location.encode("utf-8")))
    return Response(status, dump(value), headers)


def invalid(errors: object) -> Response:
    """A 400 validation error with a JSON body, e.g. `{"data": {"external_id": [...]}}`."""
    return Response(400, dump(errors), _JSON)


def message(status: int, text: str) -> Response:
    """A plain-text error (400 `Invalid data sent.`, 403 locked, 300 ambiguous slug).

    Real PANDA's bodies here reach HTTP clients as the repr of a lazy translation object
    (panda-api.md §0.1); the fake sends the readable text, under the same content type.
    """
    return Response(status, text.encode("utf-8"), _HTML)


def empty(status: int) -> Response:
    """An answer without a body: 401, some 404s, 501, 204."""
    return Response(status)


def canned(status: int = 500) -> Response:
    """Tastypie's generic handler: 404 for "does not exist" errors, 500 for anything else."""
    return Response(status, dump({"error_message": CANNED_ERROR}), _JSON)


def allows(methods: tuple[str, ...], *, status: int) -> Response:
    """Tastypie's method check: 405 (or 200 for OPTIONS) naming the allowed methods."""
    text = ",".join(methods).encode("ascii")
    return Response(status, text, (*_HTML, (b"allow", text)))


def redirect(location: str) -> Response:
    """Django's `CommonMiddleware` adding the trailing slash: 301 to an absolute URL."""
    return Response(301, b"", (*_HTML, (b"location", location.encode("utf-8"))))


_NGINX_PAGE = (
    '<html>\r\n<head><title>{status}</title></head>\r\n<body bgcolor="white">\r\n'
    "<center><h1>{status}</h1></center>\r\n<hr><center>nginx/1.1.19</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def nginx_unavailable(retry_after_s: float | None) -> Response:
    """What PANDA's nginx answers while the app behind it is gone: 502, or 503 + Retry-After."""
    if retry_after_s is None:
        page = _NGINX_PAGE.format(status="502 Bad Gateway").encode("ascii")
        return Response(502, page, ((b"content-type", b"text/html"),))
    page = _NGINX_PAGE.format(status="503 Service Temporarily Unavailable").encode("ascii")
    seconds = str(math.ceil(max(0.0, retry_after_s))).encode("ascii")
    return Response(503, page, ((b"content-type", b"text/html"), (b"retry-after", seconds)))


def control(status: int, value: object) -> Response:
    """An answer of the fake's own `/_fake/` endpoints."""
    return Response(status, dump(value), _JSON)
