"""A deadline on every request's body, so that a client sending it slowly cannot hold a
connection (and a file) open for ever.

Pure ASGI middleware around the whole app; it reads nothing itself and never answers a
request that keeps to the deadline. The headers' own deadline and the cap on connections
are the HTTP server's (`service.ingress.connections`).
"""

import json
import logging

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class _LateBodyError(Exception):
    """The request's body did not arrive within the deadline."""


class BodyDeadline:
    """Answer 408 (and close the connection) when a request's body has not arrived within
    `timeout_s` of its headers.

    A response sent before its request's body was read whole (a refusal such as 401, 413
    or 415) closes the connection too, so that the rest of the body is not waited for.
    """

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self._app = app
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request = _Request(scope, receive, send, deadline=anyio.current_time() + self._timeout_s)
        try:
            await self._app(scope, request.receive, request.send)
        except _LateBodyError:
            log.warning(
                "request refused, its body came too slowly: path=%s within_s=%g",
                scope["path"][:100],
                self._timeout_s,
            )
            if not request.started:
                await _late(send, self._timeout_s)


class _Request:
    """One request's `receive` under the deadline, and its `send`, which asks the server to
    close the connection while the body is not read whole."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, *, deadline: float) -> None:
        self._receive = receive
        self._send = send
        self._deadline = deadline
        self.body_read = not _has_body(scope)
        self.started = False

    async def receive(self) -> Message:
        if self.body_read:
            return await self._receive()
        with anyio.move_on_after(self._deadline - anyio.current_time()) as late:
            message = await self._receive()
        if late.cancelled_caught:
            raise _LateBodyError
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_read = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if not self.body_read:
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
        await self._send(message)


def _has_body(scope: Scope) -> bool:
    """Whether the request declares a body (a length above 0, or chunks)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False


async def _late(send: Send, timeout_s: float) -> None:
    body = json.dumps(
        {
            "error": f"the body did not arrive within {timeout_s:g} s: send it at once",
            "problems": [],
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 408, "headers": headers})
    await send({"type": "http.response.body", "body": body})
