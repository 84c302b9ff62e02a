"""One incoming HTTP request as the fake reads it, and PANDA's way of decoding its JSON body.

Pure: built by `app` from the ASGI scope and body; never reaches the store.
"""

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urljoin

import orjson

from service.sandbox.fake_panda.responses import AbortError, canned

# orjson turns integers beyond 64 bits into floats; PANDA's simplejson keeps them exact, so a
# body with a long run of digits (maybe only inside a string) goes to the stdlib parser.
_LONG_DIGITS = re.compile(rb"\d{19}")


@dataclass(frozen=True, slots=True)
class Request:
    """Method, decoded path, query (last value per name, like Django's `request.GET`), body."""

    method: str
    path: str
    raw_query: str
    query: dict[str, str]
    headers: dict[bytes, bytes]
    body: bytes

    def header(self, name: bytes) -> str | None:
        """A header's value (names are lower case), or None when absent."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    def absolute(self, location: str) -> str:
        """`location` resolved against this request's URL, as Django fixes `Location` headers."""
        host = self.header(b"host") or "localhost"
        return urljoin(f"http://{host}{quote(self.path)}", location)


def parse_query(raw: bytes) -> dict[str, str]:
    """Query parameters, blank values kept, the last of repeated names winning."""
    if not raw:
        return {}
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def json_body(request: Request) -> object:
    """The body decoded as tastypie does.

    Raises `AbortError` with PANDA's 500 when the content type is not exactly
    `application/json` (a `;` suffix aside; a missing one included) or the JSON is invalid:
    tastypie's `UnsupportedFormat` and decode errors are not turned into 400s (§2).
    """
    content_type = request.header(b"content-type") or ""
    if content_type.split(";")[0] != "application/json":
        raise AbortError(canned(500))
    if _LONG_DIGITS.search(request.body) is None:
        try:
            return orjson.loads(request.body)
        except orjson.JSONDecodeError:
            pass  # maybe NaN or Infinity, which PANDA's simplejson accepts
    try:
        return json.loads(request.body)
    except ValueError:
        raise AbortError(canned(500)) from None


def json_object(request: Request) -> dict[str, object]:
    """The body as a JSON object; anything else is PANDA's 500 (`dict_strip_unicode_keys`)."""
    body = json_body(request)
    if not isinstance(body, dict):
        raise AbortError(canned(500))
    return body
