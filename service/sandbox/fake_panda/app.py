"""The fake PANDA as a raw ASGI app: reads a request, applies the faults, sends PANDA's answer.

I/O glue only (`api` decides the answers, `cost` what they cost); `serve` runs it under uvicorn.
Raw ASGI rather than a framework because the bulk PUT path must stay cheap.
"""

import asyncio
from collections.abc import Coroutine
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from service.sandbox.fake_panda import api
from service.sandbox.fake_panda.control import answer_control
from service.sandbox.fake_panda.cost import Cost
from service.sandbox.fake_panda.options import FakePandaOptions
from service.sandbox.fake_panda.request import Request, parse_query
from service.sandbox.fake_panda.responses import Response, empty, nginx_unavailable
from service.sandbox.fake_panda.state import State, new_state


async def _read(scope: Scope, receive: Receive) -> Request:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the answer will go nowhere
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    raw_query: bytes = scope["query_string"]
    return Request(
        method=scope["method"],
        path=scope["path"],
        raw_query=raw_query.decode("latin-1"),
        query=parse_query(raw_query),
        headers=dict(scope["headers"]),
        body=b"".join(chunks),
    )


async def _send(send: Send, response: Response) -> None:
    headers = list(response.headers)
    if response.status != 204:
        headers.append((b"content-length", str(len(response.body)).encode("ascii")))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _outlasts(waiting: Coroutine[Any, Any, None], receive: Receive) -> bool:
    """Run `waiting`; False if the client disconnected first (then `waiting` is cancelled)."""
    delay = asyncio.ensure_future(waiting)
    leaving = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait((delay, leaving), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (delay, leaving):
            task.cancel()
        await asyncio.gather(delay, leaving, return_exceptions=True)
    return delay in done


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class FakePanda:
    """The ASGI app: `/api/` is PANDA, `/_fake/` the test controls, anything else 404."""

    def __init__(self, state: State) -> None:
        self._state = state
        self._serving = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = await _read(scope, receive)
        if request.path.startswith("/api/"):
            try:
                response = await self._api(request, receive)
            except asyncio.CancelledError:
                # uvicorn's graceful-shutdown timeout cancels requests still held by `hang`;
                # answer what nginx sends when the app behind it goes away (if the socket
                # still takes it), and let the cancellation end here, with the request.
                response = nginx_unavailable(None)
        elif request.path.startswith("/_fake/"):
            response = answer_control(self._state.control, request, self._state.reset)
        else:
            response = empty(404)
        if response is not None:
            await _send(send, response)

    async def _api(self, request: Request, receive: Receive) -> Response | None:
        """PANDA's answer after the faults; None when the client left while held."""
        control = self._state.control
        control.arrived()
        # A request held by `hang` (or `latency_s`) whose client gives up never reaches PANDA,
        # so a killed client leaves no write behind once the hang is lifted.
        if control.delaying and not await _outlasts(control.delay(), receive):
            return None
        outage = control.outage()
        if outage is not None:
            control.answered(outage.status, wrote_rows=False)
            return outage
        cost = self._state.options.cost
        if cost is None:
            return api.answer(self._state, request)
        return await self._costed(request, cost)

    async def _costed(self, request: Request, cost: Cost) -> Response:
        """PANDA's answer, sent once `cost` has passed; one request at a time, in arrival order.

        Real PANDA's single worker serialises requests (panda-api.md §5 item 10), so a request
        waits for those before it. Its write takes effect when its turn comes; a client that
        leaves meanwhile does not stop it, as it does not stop PANDA.
        """
        async with self._serving:
            store = self._state.store
            before = store.rows_written
            response = api.answer(self._state, request)
            seconds = cost.seconds(store.rows_written - before)
            self._state.control.charged(seconds)
            await asyncio.sleep(seconds)  # stands in for PANDA's work, waits for nothing
        return response


def create_app(options: FakePandaOptions) -> ASGIApp:
    """A fresh fake PANDA (no datasets, no faults) as an ASGI app."""
    return FakePanda(new_state(options))


def serve(options: FakePandaOptions, *, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve a fake PANDA with uvicorn until SIGTERM or SIGINT; blocks.

    Requests still held by `hang` at shutdown are cut off after 2 s.
    """
    uvicorn.run(
        create_app(options),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=2,
    )
