"""The webhook route: changes in over HTTP, answered 202 only once they are in the outbox.

A plain ASGI app in front of the FastAPI app, which it passes every other request
to: it reads the settings and the store, and wakes delivery when changes were committed; it never
calls PANDA. Its OpenAPI paths are `webhook_docs`'.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, Field
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from service.clock import utcnow
from service.config import Settings, SourceSettings, WebhookSettings
from service.ingress import signatures
from service.ingress.webhook_commits import Taken, Webhook, WebhookCommits
from service.metrics import UNKNOWN_SOURCE, Metrics
from service.sources import webhook
from service.store.db import Database
from service.store.group_commit import CommitError, GroupCommit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intake:
    """What the webhook routes need: the settings, the store's group commit (run it with
    `commits.run()`, stop it with `commits.close()`), a way to wake delivery, and the metrics
    they count into."""

    settings: Settings
    commits: GroupCommit[Webhook, Taken | None]
    notify: Callable[[], None]
    metrics: Metrics

    @classmethod
    def build(
        cls, settings: Settings, db: Database, notify: Callable[[], None], metrics: Metrics
    ) -> "Intake":
        """An intake committing webhooks to `db`, concurrent ones in one transaction."""
        commits = WebhookCommits(high_water=settings.ingress.outbox_high_water)
        return cls(settings, GroupCommit(db, commits), notify, metrics)


class WebhookAnswer(BaseModel):
    """What a webhook's changes came to, answered once they are durable (202)."""

    accepted: int = Field(description="Changes now in the outbox, to be delivered to PANDA.")
    duplicates: int = Field(
        description="Changes not applied again: a webhook with this id was taken in before."
    )
    stale: int = Field(
        description="Changes older than one already accepted for their id: nothing done."
    )
    ignored: int = Field(description="CouchDB design documents, which are never replicated.")


class WebhookProblem(BaseModel):
    """One bad field of a refused body."""

    field: str = Field(description="Its place in the body, e.g. `changes[2].version`.")
    message: str


class WebhookRefusal(BaseModel):
    """Why a webhook was refused; nothing of it was applied."""

    error: str
    problems: list[WebhookProblem] = []


class _RefusedError(Exception):
    """The webhook is refused with this status; nothing of it was written."""

    def __init__(
        self,
        status: int,
        error: str,
        problems: tuple[webhook.FieldProblem, ...] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.refusal = WebhookRefusal(
            error=error,
            problems=[WebhookProblem(field=p.field, message=p.message) for p in problems],
        )
        self.headers = headers

    async def send(self, send: Send) -> None:
        await _send_json(send, self.status, self.refusal.model_dump(), self.headers)


class WebhookRoute:
    """`POST /webhooks/{source}` served as plain ASGI, in front of `app` (the FastAPI app,
    which gets every other request); `state.intake` is the `Intake` it reads (the app's state,
    set once its lifespan has started).

    Take in a source's webhook: 202 once its changes are committed to the outbox. Checks, in
    order: the source (401, the answer to a bad signature), the content type (415), the size
    (413), the signature on the raw body (401), the body (400, 422), the outbox's high-water
    mark (503 with Retry-After; so does a store that fails to commit). A redelivered webhook id
    is answered 202 without applying it again. A refused webhook writes nothing. Concurrent
    webhooks are committed in one transaction (`GroupCommit`). Another method than POST is
    answered 405.

    Not a FastAPI route: FastAPI's middleware, routing, request and response objects cost as
    much again as the rest of a webhook (bench/webhook_ingest.py), and webhooks are the one
    route a busy source calls for every change. The body's deadline is the HTTP server's
    (`connections.GuardedProtocol`).
    """

    def __init__(self, app: ASGIApp, state: State) -> None:
        self._app = app
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        name = path.removeprefix(PATH_PREFIX)
        if name == path or not name or "/" in name:
            await self._app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _send_json(send, 405, {"detail": "Method Not Allowed"}, {"Allow": "POST"})
            return
        intake: Intake = self._state.intake
        known = any(s.name == name and s.kind == "webhook" for s in intake.settings.sources)
        label = name if known else UNKNOWN_SOURCE
        try:
            taken = await _take_in(intake, name, _headers(scope), receive)
        except _RefusedError as refused:
            intake.metrics.webhooks.labels(label, str(refused.status)).inc()
            await refused.send(send)
            return
        except _DisconnectedError:
            return
        intake.metrics.webhooks.labels(label, "202").inc()
        intake.metrics.received.labels(name).inc(taken.accepted)
        intake.metrics.stale.labels(name).inc(taken.stale)
        answer = {
            "accepted": taken.accepted,
            "duplicates": taken.duplicates,
            "stale": taken.stale,
            "ignored": taken.ignored,
        }
        await _send_json(send, 202, answer)


PATH_PREFIX = "/webhooks/"


class _DisconnectedError(Exception):
    """The client went away before its body was read: nothing was written, nobody to answer."""


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the first of a repeated one)."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


async def _send_json(
    send: Send, status: int, value: object, headers: dict[str, str] | None = None
) -> None:
    """Answer with `value` as JSON (as Starlette's JSONResponse renders it)."""
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    fields = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), text.encode()) for name, text in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


def unsigned_sources(settings: Settings) -> list[str]:
    """The webhook sources that take unsigned webhooks (`signature = "none"`)."""
    return [
        source.name
        for source in settings.sources
        if source.webhook is not None and source.webhook.signature == "none"
    ]


def warn_about_unsigned_sources(settings: Settings) -> None:
    """Log a warning for each webhook source anyone may post changes to (at startup)."""
    for name in unsigned_sources(settings):
        log.warning(
            "webhooks are not authenticated, anyone who can reach pandasync can change the"
            " dataset: source=%s (set a signature and secrets in its webhook settings)",
            name,
        )


async def _take_in(intake: Intake, name: str, headers: dict[str, str], receive: Receive) -> Taken:
    source, settings = _webhook_source(intake.settings, name)
    if not _is_json(headers.get("content-type")):
        raise _RefusedError(415, "the body must be JSON: send Content-Type: application/json")
    ingress = intake.settings.ingress
    body = await _read(headers, receive, ingress.max_body_bytes)
    now = utcnow()
    try:
        signatures.verify(settings, headers, body, now=now)
    except signatures.SignatureError as error:
        log.warning("webhook refused, not authentic: source=%s reason=%s", name, error)
        raise _RefusedError(401, "unauthorized") from None
    except signatures.NotTextError as error:
        raise _RefusedError(400, str(error)) from None
    parsed = _parse(source, settings, body)
    webhook_id = signatures.webhook_id(settings, headers)
    retry = {"Retry-After": str(ingress.retry_after_s)}
    try:
        taken = await intake.commits.submit(
            Webhook(name, parsed, webhook_id, settings.dedup_retention_s)
        )
    except CommitError:
        # The group commit logged why; the sender keeps the webhook and sends it again.
        raise _RefusedError(503, "the store failed: retry later", headers=retry) from None
    if taken is None:
        log.warning("webhook refused, the outbox is full: source=%s", name)
        raise _RefusedError(503, "the outbox is full: retry later", headers=retry)
    if taken.accepted:
        intake.notify()
    return taken


def _webhook_source(settings: Settings, name: str) -> tuple[SourceSettings, WebhookSettings]:
    for source in settings.sources:
        if source.name == name and source.kind == "webhook" and source.webhook is not None:
            return source, source.webhook
    log.warning("webhook refused, no webhook source of this name: source=%r", name[:100])
    raise _RefusedError(401, "unauthorized")


def _is_json(content_type: str | None) -> bool:
    """`application/json` or `application/<something>+json`, in UTF-8 if a charset is given."""
    media, *parameters = (content_type or "").lower().split(";")
    media = media.strip()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        return False
    for parameter in parameters:
        key, _, value = parameter.strip().partition("=")
        if key == "charset" and value.strip('"') not in ("utf-8", "utf8"):
            return False
    return True


async def _read(headers: dict[str, str], receive: Receive, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it is known to exceed `limit` bytes; raises
    `_DisconnectedError` when the client goes away first."""
    declared = headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _RefusedError(413, f"the body is over {limit} bytes")
    body = bytearray()
    # Counted while reading too: a chunked body declares no length.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _DisconnectedError
        body += message.get("body", b"")
        if len(body) > limit:
            raise _RefusedError(413, f"the body is over {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def _parse(source: SourceSettings, settings: WebhookSettings, body: bytes) -> webhook.Parsed:
    try:
        return webhook.parse(source, body)
    except webhook.MalformedBodyError as error:
        log.info("webhook refused, not JSON: source=%s", source.name)
        raise _RefusedError(400, str(error)) from None
    except webhook.BodyError as error:
        log.info(
            "webhook refused, bad fields: source=%s fields=%d", source.name, len(error.problems)
        )
        message = f"the body does not hold changes in the {settings.format} format"
        raise _RefusedError(422, message, error.problems) from None
