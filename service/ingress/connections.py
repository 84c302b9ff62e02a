"""The HTTP server's guard against clients that open connections and hold them: a cap on
open connections, deadlines on each request's headers and body, and a bound on the size of
its headers.

uvicorn's own HTTP protocol (httptools) with these added; `pandasync serve` runs it. uvicorn
has none of them: a connection that never sends its headers, sends a byte after its answer,
or declares a body and never sends it, stays open for ever, and httptools keeps a request
line or header however long it grows (100 MB of one header took 170 MB of memory). In the
protocol rather than in the app, the deadlines cost a timer a request, not a cancel scope
around every read.
"""

import asyncio
import json
import logging
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

WARN_EVERY_S = 60.0

_BUSY_BODY = b"pandasync has too many open connections: retry later\n"
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
) % (len(_BUSY_BODY), _BUSY_BODY)


# The most a request's line and headers may take, in bytes: webhooks' own are well under
# 2 KiB, and nginx takes 4 buffers of 8 KiB at most by default.
MAX_HEAD_BYTES = 64 * 1024
_HEAD_BODY = b"the request line and headers are over %d bytes\n" % MAX_HEAD_BYTES
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain;"
    b" charset=utf-8\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
) % (len(_HEAD_BODY), _HEAD_BODY)


def _late_answer(timeout_s: float) -> bytes:
    """The 408 for a body that did not arrive within `timeout_s`, as sent on the wire."""
    body = json.dumps(
        {
            "error": f"the body did not arrive within {timeout_s:g} s: send it at once",
            "problems": [],
        }
    ).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
    ) % (len(body), body)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that answers a connection beyond `max_connections` open
    ones 503 and closes it at once, closes a connection that has not sent a request's headers
    within `header_timeout_s` (of its opening, or of the answer before), answers 431 and
    closes one whose request line and headers run past `MAX_HEAD_BYTES`, and answers 408 and
    closes one whose request's body has not arrived whole within `body_timeout_s` of its
    headers. An answer sent before its request's body was read whole (a refusal such as 401,
    413 or 415) closes the connection, so that the rest of the body is not waited for."""

    max_connections: ClassVar[int] = 1000
    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 30.0
    # When each kind of refusal was last logged (monotonic): once a minute, not once a
    # connection.
    warned_at: ClassVar[dict[str, float]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_due: asyncio.TimerHandle | None = None
        self._body_due: asyncio.TimerHandle | None = None
        self._shutting_down = False
        # Bytes of the request head being read, counted from the read after the one it began
        # in (so no body or earlier request is counted); None between headers and next request.
        self._head_bytes: int | None = None
        self._head_began = False

    def data_received(self, data: bytes) -> None:
        self._head_began = False
        counting = self._head_bytes is not None
        super().data_received(data)
        if not counting or self._head_began or self._head_bytes is None:
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._head_too_large()

    def on_message_begin(self) -> None:
        self._head_bytes, self._head_began = 0, True
        super().on_message_begin()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(transport)
            return
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        self._head_bytes = None
        existing = self.cycle
        super().on_headers_complete()
        # No new cycle: an upgrade request, which no body deadline concerns.
        if self.cycle is not None and self.cycle is not existing and self._body_due is None:
            # Until the body is read whole, an answer closes the connection (uvicorn says
            # `connection: close` and closes it once the answer is sent).
            self.cycle.keep_alive = False
            self._body_due = self.loop.call_later(self.body_timeout_s, self._body_late)

    def on_message_complete(self) -> None:
        if self._body_arrived() and self.cycle is not None and not self.cycle.response_started:
            self.cycle.keep_alive = not self._shutting_down and self._keep_alive()
        super().on_message_complete()

    def shutdown(self) -> None:
        self._shutting_down = True
        super().shutdown()

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)
        super().on_response_complete()
        if not queued and not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        self._body_arrived()
        super().connection_lost(exc)

    def _refuse(self, transport: asyncio.Transport) -> None:
        if _first_in_a_minute(self.warned_at, "busy"):
            log.warning(
                "connections refused, too many open (logged once a minute): max_connections=%d",
                self.max_connections,
            )
        transport.write(BUSY)
        transport.close()

    def _head_too_large(self) -> None:
        if _first_in_a_minute(self.warned_at, "head"):
            log.warning(
                "requests refused, their headers run past the bound (logged once a minute):"
                " max_bytes=%d",
                MAX_HEAD_BYTES,
            )
        # An answer of the request before may be under way: only a connection between two
        # answers is answered.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(HEAD_TOO_LARGE)
        self.transport.close()

    def _await_headers(self) -> None:
        self._headers_arrived()
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_arrived(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _keep_alive(self) -> bool:
        """Whether the request lets the connection be kept (as uvicorn reads it)."""
        return self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()

    def _body_arrived(self) -> bool:
        """Stop the body's timer; whether one was running."""
        if self._body_due is None:
            return False
        self._body_due.cancel()
        self._body_due = None
        return True

    def _body_late(self) -> None:
        self._body_due = None
        if self.transport.is_closing():
            return
        log.warning(
            "request refused, its body came too slowly: path=%s within_s=%g",
            self.scope.get("path", "")[:100],
            self.body_timeout_s,
        )
        if self.cycle is not None and not self.cycle.response_started:
            self.transport.write(_late_answer(self.body_timeout_s))
        # The app reading the body gets `http.disconnect`; what it answers is dropped.
        self.transport.close()

    def _headers_late(self) -> None:
        self._headers_due = None
        if not self.transport.is_closing():
            log.debug("connection closed, no request within %g s", self.header_timeout_s)
            self.transport.close()


def _first_in_a_minute(warned_at: dict[str, float], kind: str) -> bool:
    """Whether a refusal of `kind` is the first in a minute (then noted as logged now)."""
    moment = time.monotonic()
    if moment - warned_at.get(kind, -WARN_EVERY_S) < WARN_EVERY_S:
        return False
    warned_at[kind] = moment
    return True


def guarded_protocol(
    *, max_connections: int, header_timeout_s: float, body_timeout_s: float
) -> type[GuardedProtocol]:
    """`GuardedProtocol` with these limits, for `uvicorn.run(http=...)`."""
    limits = {
        "max_connections": max_connections,
        "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s,
    }
    return type("GuardedProtocol", (GuardedProtocol,), limits)
