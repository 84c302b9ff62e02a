"""Webhook routes: changes in over HTTP, answered 202 only once they are in the outbox.

They read the settings and the store, and wake delivery when changes were committed; they
never call PANDA.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

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


def _intake(request: Request) -> Intake:
    # Read by the route itself, not as a FastAPI dependency: resolving one costs more CPU than
    # checking the signature and parsing the body together (bench/webhook_ingest.py).
    intake: Intake = request.app.state.intake
    return intake


router = APIRouter()


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

    def response(self) -> JSONResponse:
        return JSONResponse(self.refusal.model_dump(), self.status, headers=self.headers)


_REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": WebhookRefusal, "description": "The body is not JSON (or not UTF-8)."},
    401: {
        "model": WebhookRefusal,
        "description": "Bad or missing signature, stale time, or no webhook source of this name"
        " (the same answer, so that names cannot be guessed).",
    },
    408: {
        "model": WebhookRefusal,
        "description": "The body did not arrive within server.body_timeout_s.",
    },
    413: {"model": WebhookRefusal, "description": "The body is over ingress.max_body_bytes."},
    415: {"model": WebhookRefusal, "description": "The body is not declared as JSON."},
    422: {"model": WebhookRefusal, "description": "JSON, but not the source's format."},
    503: {
        "model": WebhookRefusal,
        "description": "The outbox is full, or the store failed: retry after Retry-After."
        " (Beyond server.max_connections, the server answers 503 in plain text.)",
    },
}
_FORMATS = """\
The body format is the source's `webhook.format`: `pandasync` (this schema), `couchdb` (one
CouchDB document, a list of them, or a `_bulk_docs` body; `"_deleted": true` deletes, the
generation of `_rev` orders), or `jmespath` (any JSON, read through the source's mapping)."""


@router.post(
    "/webhooks/{source}",
    status_code=202,
    response_model=WebhookAnswer,
    responses=_REFUSALS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": _FORMATS,
            "content": {"application/json": {"schema": webhook.body_schema()}},
        }
    },
)
async def receive_webhook(source: str, request: Request) -> Response:
    """Take in a source's webhook: 202 once its changes are committed to the outbox.

    Checks, in order: the source (401, the answer to a bad signature), the content type
    (415), the size (413), the signature on the raw body (401), the body (400, 422), the
    outbox's high-water mark (503 with Retry-After; so does a store that fails to commit).
    A redelivered webhook id is answered 202 without applying it again. A refused webhook
    writes nothing. Concurrent webhooks are committed in one transaction (`GroupCommit`).
    """
    intake = _intake(request)
    known = any(s.name == source and s.kind == "webhook" for s in intake.settings.sources)
    label = source if known else UNKNOWN_SOURCE
    try:
        answer = await _take_in(intake, source, request)
    except _RefusedError as refused:
        intake.metrics.webhooks.labels(label, str(refused.status)).inc()
        return refused.response()
    intake.metrics.webhooks.labels(label, "202").inc()
    intake.metrics.received.labels(source).inc(answer.accepted)
    intake.metrics.stale.labels(source).inc(answer.stale)
    return JSONResponse(answer.model_dump(), status_code=202)


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


async def _take_in(intake: Intake, name: str, request: Request) -> WebhookAnswer:
    source, settings = _webhook_source(intake.settings, name)
    if not _is_json(request.headers.get("content-type")):
        raise _RefusedError(415, "the body must be JSON: send Content-Type: application/json")
    ingress = intake.settings.ingress
    body = await _read(request, ingress.max_body_bytes)
    now = utcnow()
    try:
        signatures.verify(settings, request.headers, body, now=now)
    except signatures.SignatureError as error:
        log.warning("webhook refused, not authentic: source=%s reason=%s", name, error)
        raise _RefusedError(401, "unauthorized") from None
    except signatures.NotTextError as error:
        raise _RefusedError(400, str(error)) from None
    parsed = _parse(source, settings, body)
    webhook_id = signatures.webhook_id(settings, request.headers)
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
    return WebhookAnswer(
        accepted=taken.accepted,
        duplicates=taken.duplicates,
        stale=taken.stale,
        ignored=taken.ignored,
    )


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


async def _read(request: Request, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it is known to exceed `limit` bytes."""
    too_large = _RefusedError(413, f"the body is over {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    # Counted while reading too: a chunked body declares no length.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
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
