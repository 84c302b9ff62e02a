"""The bound on the body of every request but a webhook's (the admin API's; a webhook's is
`ingress.max_body_bytes`, read by `webhooks`): FastAPI reads a body whole before it checks
anything, a token included, so a body must declare its length, and that length must be within
`MAX_API_BODY_BYTES`; otherwise it is refused (411, 413) before a byte of it is read.
"""

import json

from starlette.types import ASGIApp, Receive, Scope, Send

# The largest body the admin API takes: its biggest, 10,000 dead-letter ids, is about 210 KB.
MAX_API_BODY_BYTES = 1024 * 1024


class BoundedBodies:
    """`app` for requests whose body is declared within the bound; 411 for a body of no
    declared length (chunked), 413 for one declared over it, as FastAPI's refusals
    (`{"detail": ...}`)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _refusal(scope["headers"]) if scope["type"] == "http" else None
        if refusal is None:
            await self._app(scope, receive, send)
            return
        status, detail = refusal
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _refusal(headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding":
            return 411, "send the body with a Content-Length"
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_API_BODY_BYTES):
            return 413, f"the body is over {MAX_API_BODY_BYTES} bytes"
    return None
