"""The OpenAPI document's webhook paths: one a configured webhook source, with the body
schema of its format and the headers of its signature scheme.

Pure: rewrites FastAPI's generated document (`/webhooks/{source}`, one route for every
source) from the settings; serves nothing and checks nothing.
"""

from copy import deepcopy
from typing import Any

from service.config import Settings, SourceSettings, WebhookSettings
from service.sources import webhook_schemas

_ROUTE = "/webhooks/{source}"


def document_sources(document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """`document` with `/webhooks/{source}` replaced by `/webhooks/<name>` for each webhook
    source configured (kept as it is when there is none)."""
    sources = [s for s in settings.sources if s.kind == "webhook" and s.webhook is not None]
    paths = document.get("paths", {})
    if not sources or _ROUTE not in paths:
        return document
    generic = paths.pop(_ROUTE)["post"]
    for source in sources:
        paths[f"/webhooks/{source.name}"] = {"post": _operation(generic, source)}
    return document


def _operation(generic: dict[str, Any], source: SourceSettings) -> dict[str, Any]:
    assert source.webhook is not None
    settings = source.webhook
    operation = deepcopy(generic)
    operation["operationId"] = f"receive_webhook_{source.name.replace('-', '_')}"
    operation["summary"] = (
        f"Take in a webhook of source {source.name} ({settings.format} format, signature"
        f" {settings.signature}), for dataset {source.dataset.slug}"
    )
    operation["parameters"] = _headers(settings)
    operation["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": webhook_schemas.body_schema(source)}},
    }
    return operation


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
