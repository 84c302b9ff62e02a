"""The OpenAPI document's webhook paths: one a configured webhook source, with the body
schema of its format and the headers of its signature scheme (`/webhooks/{source}` when none
is configured).

Pure: adds to FastAPI's generated document (the webhook route is plain ASGI,
`webhooks.WebhookRoute`, which FastAPI does not see); serves nothing and checks nothing.
"""

from typing import Any

from pydantic.json_schema import models_json_schema

from service.config import Settings, SourceSettings, WebhookSettings
from service.ingress.webhooks import PATH_PREFIX, WebhookAnswer, WebhookRefusal
from service.sources import webhook, webhook_schemas

_ANSWERS = {
    "202": (WebhookAnswer, "The webhook's changes are in the outbox (or were before)."),
    "400": (WebhookRefusal, "The body is not JSON (or not UTF-8)."),
    "401": (
        WebhookRefusal,
        "Bad or missing signature, stale time, or no webhook source of this name (the same"
        " answer, so that names cannot be guessed).",
    ),
    "408": (WebhookRefusal, "The body did not arrive within server.body_timeout_s."),
    "413": (WebhookRefusal, "The body is over ingress.max_body_bytes."),
    "415": (WebhookRefusal, "The body is not declared as JSON."),
    "422": (WebhookRefusal, "JSON, but not the source's format."),
    "503": (
        WebhookRefusal,
        "The outbox is full, or the store failed: retry after Retry-After. (Beyond"
        " server.max_connections, the server answers 503 in plain text.)",
    ),
}
_DESCRIPTION = """\
Take in a source's webhook: 202 once its changes are committed to the outbox.

Checks, in order: the source (401, the answer to a bad signature), the content type (415),
the size (413), the signature on the raw body (401), the body (400, 422), the outbox's
high-water mark (503 with Retry-After; so does a store that fails to commit). A redelivered
webhook id is answered 202 without applying it again. A refused webhook writes nothing."""
_FORMATS = """\
The body format is the source's `webhook.format`: `pandasync` (this schema), `couchdb` (one
CouchDB document, a list of them, or a `_bulk_docs` body; `"_deleted": true` deletes, the
generation of `_rev` orders), or `jmespath` (any JSON, read through the source's mapping)."""


def document_sources(document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """`document` with a path `/webhooks/<name>` for each webhook source configured, or the
    generic `/webhooks/{source}` when there is none, and the schemas of their answers."""
    _, definitions = models_json_schema(
        [(WebhookAnswer, "serialization"), (WebhookRefusal, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(definitions["$defs"])
    paths = document.setdefault("paths", {})
    sources = [s for s in settings.sources if s.kind == "webhook" and s.webhook is not None]
    if not sources:
        paths[f"{PATH_PREFIX}{{source}}"] = {"post": _generic()}
    for source in sources:
        paths[f"{PATH_PREFIX}{source.name}"] = {"post": _operation(source)}
    return document


def _generic() -> dict[str, Any]:
    """The webhook route of any source, in pandasync's own format."""
    parameter = {"name": "source", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "summary": "Take in a webhook",
        "description": _DESCRIPTION,
        "operationId": "receive_webhook",
        "parameters": [parameter],
        "requestBody": {
            "required": True,
            "description": _FORMATS,
            "content": {"application/json": {"schema": webhook.body_schema()}},
        },
        "responses": _responses(),
    }


def _operation(source: SourceSettings) -> dict[str, Any]:
    assert source.webhook is not None
    settings = source.webhook
    return {
        "summary": f"Take in a webhook of source {source.name} ({settings.format} format,"
        f" signature {settings.signature}), for dataset {source.dataset.slug}",
        "description": _DESCRIPTION,
        "operationId": f"receive_webhook_{source.name.replace('-', '_')}",
        "parameters": _headers(settings),
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": webhook_schemas.body_schema(source)}},
        },
        "responses": _responses(),
    }


def _responses() -> dict[str, Any]:
    return {
        status: {
            "description": description,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
        for status, (model, description) in _ANSWERS.items()
    }


def _headers(settings: WebhookSettings) -> list[dict[str, Any]]:
    """The request headers the source's signature scheme reads (none for `none`)."""
    required = {
        "standard-webhooks": ["webhook-id", "webhook-timestamp", "webhook-signature"],
        "github": ["X-Hub-Signature-256"],
        "hmac": [settings.header or ""],
        "none": [],
    }[settings.signature]
    named = [(name, True) for name in required]
    if settings.id_header and settings.id_header.lower() not in (n.lower() for n in required):
        named.append((settings.id_header, False))
    elif settings.signature == "github":
        named.append(("X-GitHub-Delivery", False))
    return [
        {"name": name, "in": "header", "required": needed, "schema": {"type": "string"}}
        for name, needed in named
    ]
