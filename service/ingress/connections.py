"""The HTTP server's guard against clients that open connections and hold them: a cap on
open connections, and a deadline on each request's headers.

uvicorn's own HTTP protocol (httptools) with both added; `pandasync serve` runs it. uvicorn
has neither: a connection that never sends its headers, or sends a byte after its answer,
stays open for ever. The body's deadline is the app's (`service.ingress.deadlines`).
"""

import asyncio
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


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that answers a connection beyond `max_connections` open
    ones 503 and closes it at once, and closes a connection that has not sent a request's
    headers within `header_timeout_s` (of its opening, or of the answer before)."""

    max_connections: ClassVar[int] = 1000
    header_timeout_s: ClassVar[float] = 10.0
    # When a refusal was last logged (monotonic): once a minute, not once a connection.
    warned_at: ClassVar[float] = -WARN_EVERY_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(transport)
            return
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)
        super().on_response_complete()
        if not queued and not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        super().connection_lost(exc)

    def _refuse(self, transport: asyncio.Transport) -> None:
        moment = time.monotonic()
        if moment - self.warned_at >= WARN_EVERY_S:
            type(self).warned_at = moment
            log.warning(
                "connections refused, too many open (logged once a minute): max_connections=%d",
                self.max_connections,
            )
        transport.write(BUSY)
        transport.close()

    def _await_headers(self) -> None:
        self._headers_arrived()
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_arrived(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_late(self) -> None:
        self._headers_due = None
        if not self.transport.is_closing():
            log.debug("connection closed, no request within %g s", self.header_timeout_s)
            self.transport.close()


def guarded_protocol(*, max_connections: int, header_timeout_s: float) -> type[GuardedProtocol]:
    """`GuardedProtocol` with these limits, for `uvicorn.run(http=...)`."""
    limits = {"max_connections": max_connections, "header_timeout_s": header_timeout_s}
    return type("GuardedProtocol", (GuardedProtocol,), limits)
