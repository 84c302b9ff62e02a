"""`POST /webhooks/{source}`: verified, durable, idempotent, on both stores.

The app runs in-process with its lifespan (`asgi_lifespan`); PANDA is the PANDA-compatible
server as a real process, reached over sockets.
"""

import base64
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from math import floor
from typing import Any
from uuid import uuid4

import anyio
import anyio.to_thread
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, col, select
from standardwebhooks import Webhook

from service.app import create_app
from service.changes import Change, Op, SourceVersion
from service.config import Settings
from service.container import Service
from service.store import dead_letters, outbox
from service.store.db import Database
from service.store.tables import DocState, OutboxEntry
from tests import documented
from tests.fixtures.panda import RunningPanda
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_" + base64.b64encode(b"the secret before the rotation").decode()
RETIRED_SECRET = "whsec_" + base64.b64encode(b"a secret retired long ago").decode()
GITHUB_SECRET = "It's a Secret to Everybody"
FORM_SECRET = "form-tool-secret"
COLUMNS = [{"name": "Headline", "field": "title"}, {"name": "Words", "field": "words"}]
JSON = {"content-type": "application/json"}
DEADLINE_S = 15.0


def source(name: str, **webhook: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "webhook",
        "dataset": {"slug": name, "name": name.title()},
        "columns": COLUMNS,
        "webhook": webhook,
    }


SOURCES = [
    source("stories", signature="standard-webhooks", secrets=[SECRET, OLD_SECRET]),
    source("pushes", signature="github", secrets=[GITHUB_SECRET], format="couchdb"),
    source(
        "forms",
        signature="hmac",
        header="X-Form-Signature",
        secrets=[FORM_SECRET],
        format="jmespath",
        mapping={
            "items": "submission",
            "id": "uuid",
            "columns": {"Headline": "answers[?q=='headline'].a | [0]"},
        },
    ),
    source("open", signature="none"),
    {
        "name": "feed",
        "kind": "couchdb",
        "dataset": {"slug": "feed", "name": "Feed"},
        "columns": COLUMNS,
        "couchdb": {"url": "http://127.0.0.1:9", "database": "feed"},
    },
]


def settings_for(
    database: Database,
    panda_url: str = "http://127.0.0.1:9",
    *,
    sources: Sequence[dict[str, Any]] = SOURCES,
    **ingress: int,
) -> Settings:
    return Settings.model_validate(
        {
            "database_url": database.engine.url.render_as_string(hide_password=False),
            "panda": {
                "url": panda_url,
                "email": "panda@example.com",
                "api_key": "pandasync-demo-key",
                "timeout_s": 1,
            },
            "delivery": {
                "lease_s": 2.5,
                "idle_poll_s": 0.05,
                "retry_base_s": 0.05,
                "retry_cap_s": 0.2,
            },
            "ingress": ingress,
            "sources": sources,
        }
    )


@asynccontextmanager
async def serving(
    settings: Settings, *, start_runner: bool = False
) -> AsyncIterator[tuple[httpx.AsyncClient, Service]]:
    """The app with its lifespan, and a client to it; an answer with a status the OpenAPI
    document does not list for its route fails the test."""
    app = create_app(settings, start_runner=start_runner)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        hooks = {"response": [documented.hook(app.openapi())]}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://pandasync", event_hooks=hooks
        ) as client:
            yield client, app.state.service


def body_of(*changes: dict[str, Any]) -> bytes:
    return json.dumps({"changes": list(changes)}).encode()


def story(doc_id: str, title: str, version: object = None) -> dict[str, Any]:
    change = {"op": "upsert", "id": doc_id, "row": {"title": title}}
    return change if version is None else {**change, "version": version}


def signed(
    body: bytes, *, secret: str = SECRET, msg_id: str | None = None, at: datetime | None = None
) -> dict[str, str]:
    """Standard Webhooks headers, signed with the `standardwebhooks` package's own signer."""
    msg_id = msg_id or f"msg_{uuid4().hex}"
    at = at or datetime.now(UTC)
    return {
        **JSON,
        "webhook-id": msg_id,
        "webhook-timestamp": str(floor(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }


def github_signed(body: bytes, delivery: str) -> dict[str, str]:
    """Exactly as GitHub documents it: `sha256=` + hex HMAC-SHA256 of the raw body."""
    digest = hmac.new(GITHUB_SECRET.encode("utf-8"), msg=body, digestmod=hashlib.sha256)
    return {
        **JSON,
        "X-Hub-Signature-256": "sha256=" + digest.hexdigest(),
        "X-GitHub-Delivery": delivery,
    }


async def post(
    client: httpx.AsyncClient, name: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    return await client.post(f"/webhooks/{name}", content=body, headers=headers)


def _entries(session: Session) -> dict[str, Change]:
    query = select(OutboxEntry).order_by(col(OutboxEntry.id))
    return {entry.doc_id: outbox.change_of(entry) for entry in session.exec(query)}


async def entries(database: Database) -> dict[str, Change]:
    return await database.run(_entries)


def upsert(source: str, doc_id: str, *row: str, version: object = None) -> Change:
    stamp = None if version is None else SourceVersion.of(version)
    return Change(source, doc_id, doc_id, Op.UPSERT, row, source_version=stamp)


ANSWER_ZERO = {"accepted": 0, "duplicates": 0, "stale": 0, "ignored": 0}


async def test_a_signed_webhook_is_answered_202_once_its_changes_are_in_the_outbox(
    database: Database,
) -> None:
    body = body_of(story("s1", "Flood", 1), {"op": "delete", "id": "s2"})
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", body, signed(body))
    assert (answer.status_code, answer.json()) == (202, {**ANSWER_ZERO, "accepted": 2})
    assert await entries(database) == {
        "s1": upsert("stories", "s1", "Flood", "", version=1),
        "s2": Change("stories", "s2", "s2", Op.DELETE),
    }


async def test_a_wrong_secret_is_refused_401_without_detail_and_writes_nothing(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    body = body_of(story("s1", "Flood"))
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", body, signed(body, secret=RETIRED_SECRET))
    assert (answer.status_code, answer.json()) == (401, {"error": "unauthorized", "problems": []})
    assert await entries(database) == {}
    assert all(secret.removeprefix("whsec_") not in caplog.text for secret in (SECRET, OLD_SECRET))


async def test_a_tampered_body_is_refused_401(database: Database) -> None:
    body = body_of(story("s1", "Flood"))
    headers = signed(body)
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", body.replace(b"Flood", b"Fraud"), headers)
    assert (answer.status_code, await entries(database)) == (401, {})


async def test_an_old_timestamp_is_refused_401(database: Database) -> None:
    body = body_of(story("s1", "Flood"))
    headers = signed(body, at=datetime.now(UTC) - timedelta(minutes=6))
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", body, headers)
    assert (answer.status_code, await entries(database)) == (401, {})


async def test_an_unsigned_body_is_refused_401_before_it_is_even_parsed(
    database: Database,
) -> None:
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", b"{not json", JSON)
    assert answer.status_code == 401


async def test_a_redelivered_webhook_is_acknowledged_without_being_applied_again(
    database: Database,
) -> None:
    first = body_of(story("s1", "first"))
    first_headers = signed(first, msg_id="msg_first")
    second = body_of(story("s1", "second"))
    async with serving(settings_for(database)) as (client, _):
        await post(client, "stories", first, first_headers)
        await post(client, "stories", second, signed(second))
        again = await post(client, "stories", first, first_headers)
    assert (again.status_code, again.json()) == (202, {**ANSWER_ZERO, "duplicates": 1})
    assert await entries(database) == {"s1": upsert("stories", "s1", "second", "")}


async def test_during_a_secret_rotation_both_secrets_are_accepted(database: Database) -> None:
    new, old = body_of(story("s1", "new")), body_of(story("s2", "old"))
    retired = body_of(story("s3", "retired"))
    async with serving(settings_for(database)) as (client, _):
        answers = [
            await post(client, "stories", new, signed(new, secret=SECRET)),
            await post(client, "stories", old, signed(old, secret=OLD_SECRET)),
            await post(client, "stories", retired, signed(retired, secret=RETIRED_SECRET)),
        ]
    assert [answer.status_code for answer in answers] == [202, 202, 401]
    assert sorted(await entries(database)) == ["s1", "s2"]


async def test_a_github_signed_couchdb_push_is_taken_in_once_per_delivery(
    database: Database,
) -> None:
    docs = [
        {"_id": "p1", "_rev": "2-a", "title": "Pushed", "words": 12},
        {"_id": "p2", "_rev": "5-b", "_deleted": True},
        {"_id": "_design/app", "views": {}},
    ]
    body = json.dumps({"docs": docs, "new_edits": False}).encode()
    async with serving(settings_for(database)) as (client, _):
        first = await post(client, "pushes", body, github_signed(body, "delivery-1"))
        again = await post(client, "pushes", body, github_signed(body, "delivery-1"))
        forged = await post(client, "pushes", body, {**JSON, "X-Hub-Signature-256": "sha256=00"})
    assert [first.json(), again.json(), forged.status_code] == [
        {**ANSWER_ZERO, "accepted": 2, "ignored": 1},
        {**ANSWER_ZERO, "duplicates": 2, "ignored": 1},
        401,
    ]
    assert await entries(database) == {
        "p1": upsert("pushes", "p1", "Pushed", "12", version=2),
        "p2": Change("pushes", "p2", "p2", Op.DELETE, source_version=SourceVersion.of(5)),
    }


async def test_a_form_tools_json_is_read_through_the_jmespath_mapping(database: Database) -> None:
    payload = {
        "form": "tips",
        "submission": {"uuid": "f1", "answers": [{"q": "headline", "a": "A tip"}]},
    }
    body = json.dumps(payload).encode()
    digest = hmac.new(FORM_SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "forms", body, {**JSON, "X-Form-Signature": digest})
    assert answer.json() == {**ANSWER_ZERO, "accepted": 1}
    assert await entries(database) == {"f1": upsert("forms", "f1", "A tip", "")}


async def test_an_unsigned_source_takes_webhooks_and_is_named_in_a_warning_at_start(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    body = body_of(story("o1", "Open"))
    with caplog.at_level(logging.WARNING, logger="service.ingress.webhooks"):
        async with serving(settings_for(database)) as (client, _):
            answer = await post(client, "open", body, JSON)
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "service.ingress.webhooks"
    ]
    assert answer.status_code == 202
    assert [("not authenticated" in line, "source=open" in line) for line in warnings] == [
        (True, True)
    ]


async def test_a_body_declared_over_the_limit_is_refused_413(database: Database) -> None:
    body = body_of(story("s1", "x" * 200))
    async with serving(settings_for(database, max_body_bytes=100)) as (client, _):
        answer = await post(client, "stories", body, signed(body))
    assert (answer.status_code, answer.json()["error"]) == (413, "the body is over 100 bytes")
    assert await entries(database) == {}


async def test_a_chunked_body_over_the_limit_is_refused_413_while_reading(
    database: Database,
) -> None:
    body = body_of(story("s1", "x" * 200))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 50):
            yield body[start : start + 50]

    async with serving(settings_for(database, max_body_bytes=100)) as (client, _):
        answer = await client.post("/webhooks/open", content=chunks(), headers=JSON)
    assert (answer.status_code, "content-length" in answer.request.headers) == (413, False)
    assert await entries(database) == {}


async def test_malformed_json_is_refused_400_saying_where(database: Database) -> None:
    body = b'{"changes": [}'
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", body, signed(body))
    assert (answer.status_code, answer.json()) == (
        400,
        {"error": "the body is not JSON: Expecting value at line 1 column 14", "problems": []},
    )


async def test_a_body_that_is_not_utf8_is_refused_400_not_401_on_a_standard_webhooks_source(
    database: Database,
) -> None:
    body = b'{"changes": []}\xff'
    headers = {**signed(b"{}"), "webhook-signature": "v1,c2lnbmF0dXJl"}
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", body, headers)
    assert (answer.status_code, answer.json()) == (
        400,
        {"error": "the body is not UTF-8 (byte 15)", "problems": []},
    )


async def test_a_key_given_twice_is_refused_422_and_nothing_is_written(
    database: Database,
) -> None:
    body = b'{"changes": [{"op": "delete", "id": "s1", "op": "upsert", "row": {"title": "x"}}]}'
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", body, signed(body))
    assert (answer.status_code, answer.json()["problems"]) == (
        422,
        [
            {
                "field": "(body)",
                "message": 'an object holds the key "op" more than once, so which value is'
                " meant is unknown: send each key once",
            }
        ],
    )
    assert await entries(database) == {}


async def test_wrong_types_are_refused_422_pointing_at_the_field_and_nothing_is_written(
    database: Database,
) -> None:
    body = body_of(story("s1", "fine"), {"op": "upsert", "id": "s2", "row": {}, "version": "2"})
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "stories", body, signed(body))
    assert (answer.status_code, answer.json()) == (
        422,
        {
            "error": "the body does not hold changes in the pandasync format",
            "problems": [
                {
                    "field": "changes[1].version",
                    "message": "a version is a number or an RFC 3339 time such as"
                    " 2026-01-02T03:04:05Z",
                }
            ],
        },
    )
    assert await entries(database) == {}


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", ""],
)
async def test_a_body_not_declared_as_json_is_refused_415(
    database: Database, content_type: str
) -> None:
    body = body_of(story("s1", "Flood"))
    async with serving(settings_for(database)) as (client, _):
        answer = await post(client, "open", body, {"content-type": content_type})
    assert (answer.status_code, await entries(database)) == (415, {})


async def test_json_media_types_with_a_suffix_or_utf8_charset_are_taken(
    database: Database,
) -> None:
    body = body_of(story("s1", "Flood"))
    async with serving(settings_for(database)) as (client, _):
        answers = [
            await post(client, "open", body, {"content-type": content_type})
            for content_type in ("application/cloudevents+json", "Application/JSON; charset=UTF-8")
        ]
    assert [answer.status_code for answer in answers] == [202, 202]


@pytest.mark.parametrize("name", ["nope", "feed"])
async def test_a_name_that_is_no_webhook_source_gets_the_answer_of_a_bad_signature(
    database: Database, name: str
) -> None:
    async with serving(settings_for(database)) as (client, _):
        unknown = await post(client, name, body_of(), JSON)
        unsigned = await post(client, "stories", body_of(), JSON)
    assert (unknown.status_code, unknown.json()) == (401, {"error": "unauthorized", "problems": []})
    assert (unknown.status_code, unknown.content) == (unsigned.status_code, unsigned.content)


async def test_above_the_high_water_mark_webhooks_get_503_and_nothing_is_written(
    database: Database,
) -> None:
    first, second = body_of(story("s1", "1")), body_of(story("s2", "2"))
    late = body_of(story("s3", "3"))
    late_headers = signed(late, msg_id="msg_late")
    async with serving(settings_for(database, outbox_high_water=2, retry_after_s=7)) as (client, _):
        await post(client, "stories", first, signed(first))
        await post(client, "stories", second, signed(second, msg_id="msg_second"))
        full = await post(client, "stories", late, late_headers)
        redelivered = await post(client, "stories", second, signed(second, msg_id="msg_second"))
        pending = sorted(await entries(database))
        claims = await database.run(
            outbox.claim_many, source="stories", now=datetime.now(UTC), lease_s=5, limit=9
        )
        await database.run(outbox.ack_many, claims)
        retried = await post(client, "stories", late, signed(late, msg_id="msg_late"))
    assert (full.status_code, full.headers["retry-after"], full.json()["error"]) == (
        503,
        "7",
        "the outbox is full: retry later",
    )
    assert (pending, redelivered.json()["duplicates"], retried.json()["accepted"]) == (
        ["s1", "s2"],
        1,
        1,
    )


async def test_a_stale_version_after_a_newer_one_changes_nothing(database: Database) -> None:
    newer, older = body_of(story("s1", "newer", 5)), body_of(story("s1", "older", 4))
    async with serving(settings_for(database)) as (client, _):
        await post(client, "stories", newer, signed(newer))
        answer = await post(client, "stories", older, signed(older))
    assert answer.json() == {**ANSWER_ZERO, "stale": 1}
    assert await entries(database) == {"s1": upsert("stories", "s1", "newer", "", version=5)}


async def test_a_delete_then_a_late_upsert_with_an_older_version_leaves_the_row_deleted(
    panda: RunningPanda, database: Database
) -> None:
    created = body_of(story("s1", "created", "2026-01-02T10:00:00Z"))
    deleted = body_of({"op": "delete", "id": "s1", "version": "2026-01-02T12:00:00Z"})
    late = body_of(story("s1", "edited before the delete", "2026-01-02T11:00:00Z"))
    async with serving(settings_for(database, panda.url)) as (client, service):
        await post(client, "stories", created, signed(created))
        await service.delivery.run_once()
        before = await anyio.to_thread.run_sync(panda.rows, "stories")
        await post(client, "stories", deleted, signed(deleted))
        await service.delivery.run_once()
        answer = await post(client, "stories", late, signed(late))
        await service.delivery.run_once()
    assert before == {"s1": ["created", ""]}
    assert answer.json() == {**ANSWER_ZERO, "stale": 1}
    assert (panda.rows("stories"), await entries(database)) == ({}, {})


async def test_the_openapi_spec_documents_each_webhook_source_in_its_format_and_scheme(
    database: Database,
) -> None:
    async with serving(settings_for(database)) as (client, _):
        spec = (await client.get("/openapi.json")).json()
    webhooks = {path: item["post"] for path, item in spec["paths"].items() if "webhooks" in path}
    bodies = {
        path: operation["requestBody"]["content"]["application/json"]["schema"]
        for path, operation in webhooks.items()
    }
    headers = {
        path: [(header["name"], header["required"]) for header in operation["parameters"]]
        for path, operation in webhooks.items()
    }
    assert headers == {
        "/webhooks/stories": [
            ("webhook-id", True),
            ("webhook-timestamp", True),
            ("webhook-signature", True),
        ],
        "/webhooks/pushes": [("X-Hub-Signature-256", True), ("X-GitHub-Delivery", False)],
        "/webhooks/forms": [("X-Form-Signature", True)],
        "/webhooks/open": [],
    }
    assert {sorted(operation["responses"]) == RESPONSES for operation in webhooks.values()} == {
        True
    }
    upsert, delete = bodies["/webhooks/stories"]["properties"]["changes"]["items"]["oneOf"]
    assert (upsert["required"], upsert["properties"]["op"], delete["properties"]["op"]) == (
        ["op", "id", "row"],
        {"const": "upsert"},
        {"const": "delete"},
    )
    assert upsert["properties"]["row"]["anyOf"] == [
        {
            "type": "object",
            "anyOf": [
                {"type": "object", "properties": {"title": {}}, "required": ["title"]},
                {"type": "object", "properties": {"words": {}}, "required": ["words"]},
            ],
        },
        {"type": "array", "minItems": 2, "maxItems": 2},
    ]
    document, documents, bulk = bodies["/webhooks/pushes"]["anyOf"]
    assert (document["required"], documents["items"], bulk["required"]) == (
        ["_id"],
        document,
        ["docs"],
    )
    assert document["properties"]["_rev"]["pattern"] == "^[0-9]{1,15}-[0-9A-Za-z]+$"
    # Its mapping filters (`answers[?q=='headline']`): any JSON, its rules in words.
    assert list(bodies["/webhooks/forms"]) == ["description"]


RESPONSES = ["202", "400", "401", "408", "413", "415", "422", "503"]


async def test_the_openapi_spec_documents_the_status_and_each_sources_states(
    database: Database,
) -> None:
    async with serving(settings_for(database)) as (client, _):
        spec = (await client.get("/openapi.json")).json()
        status = (await client.get("/status")).json()
    answer = spec["paths"]["/status"]["get"]["responses"]["200"]["content"]["application/json"]
    schemas = spec["components"]["schemas"]
    feed = schemas["PollerStatus"]
    assert answer["schema"] == {"$ref": "#/components/schemas/StatusAnswer"}
    assert feed["properties"]["state"]["enum"] == [
        "starting",
        "standby",
        "catching_up",
        "live",
        "retrying",
        "paused",
        "stopped",
    ]
    assert "`retrying` since `retrying_since`" in feed["description"]
    assert sorted(status) == sorted(schemas["StatusAnswer"]["properties"])
    assert sorted(status["sources"]["stories"]) == sorted(schemas["SourceStatus"]["properties"])


DOCS = 100
VERSIONS = 10


def planned_change(doc: int, version: int) -> dict[str, Any]:
    """Every fifth document ends deleted; the others end at their last title."""
    if doc % 5 == 0 and version == VERSIONS - 1:
        return {"op": "delete", "id": f"d{doc}", "version": version}
    row = {"title": f"d{doc} v{version}", "words": version}
    return {"op": "upsert", "id": f"d{doc}", "row": row, "version": version}


async def send_all(
    client: httpx.AsyncClient, webhooks: Sequence[tuple[bytes, dict[str, str]]]
) -> list[httpx.Response]:
    answers: list[httpx.Response] = []
    limit = anyio.Semaphore(16)

    async def send(body: bytes, headers: dict[str, str]) -> None:
        async with limit:
            answers.append(await post(client, "stories", body, headers))

    async with anyio.create_task_group() as group:
        for body, headers in webhooks:
            group.start_soon(send, body, headers)
    return answers


async def test_a_thousand_webhooks_taken_in_while_panda_is_down_arrive_once_it_is_up(
    panda: RunningPanda, database: Database
) -> None:
    plan = [(doc, version) for doc in range(DOCS) for version in range(VERSIONS)]
    random.Random(4).shuffle(plan)  # out of order: many changes arrive after newer ones
    webhooks = []
    for doc, version in plan:
        body = body_of(planned_change(doc, version))
        webhooks.append((body, signed(body)))
    panda.set_faults(down=True)
    settings = settings_for(database, panda.url, sources=SOURCES[:1])
    async with serving(settings, start_runner=True) as (client, _):
        started = time.perf_counter()
        answers = await send_all(client, webhooks)
        elapsed_s = time.perf_counter() - started
        redelivered = await send_all(client, random.Random(5).sample(webhooks, 50))

        async def refused_by_panda() -> bool:
            stats = await anyio.to_thread.run_sync(panda.stats)
            return stats["requests"] != 0

        await eventually(refused_by_panda, what="delivery to meet PANDA down")
        stats_while_down = await anyio.to_thread.run_sync(panda.stats)
        panda.clear_faults()

        async def drained() -> bool:
            return await database.run(outbox.pending) == 0

        await eventually(drained, what="every change delivered")
    logging.getLogger(__name__).warning(
        "accepted 1000 webhooks while PANDA was down in %.2f s: %.0f webhooks/s",
        elapsed_s,
        len(answers) / elapsed_s,
    )
    totals = {key: sum(answer.json()[key] for answer in answers) for key in ANSWER_ZERO}
    assert {answer.status_code for answer in answers + redelivered} == {202}
    assert (totals["accepted"] + totals["stale"], totals["duplicates"]) == (1000, 0)
    assert sum(answer.json()["duplicates"] for answer in redelivered) == 50
    assert stats_while_down["writes"] == 0
    expected = {
        f"d{doc}": [f"d{doc} v{VERSIONS - 1}", str(VERSIONS - 1)] for doc in range(DOCS) if doc % 5
    }
    assert panda.rows("stories") == expected
    # Exactly once in effect: no superseded change was written after the latest one, and
    # no row was written twice (a write may carry many rows, so at most one per row).
    writes = panda.stats()["writes"]
    assert isinstance(writes, int)
    assert writes <= len(expected)
    assert await database.run(dead_letters.stored) == []


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics answer by (name, sorted labels)."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_metrics_count_changes_in_and_out_webhook_answers_and_panda_requests(
    panda: RunningPanda, database: Database
) -> None:
    body = body_of(story("s1", "Flood"), story("s2", "Fire"))
    async with serving(settings_for(database, panda.url)) as (client, service):
        await post(client, "stories", body, signed(body))
        await post(client, "stories", body, {**JSON})  # unsigned: 401
        await post(client, "no-such-source", body, signed(body))  # 401, as unsigned
        waiting = samples((await client.get("/metrics")).text)
        await service.delivery.run_once()
        answer = await client.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain")
    after = samples(answer.text)
    stories = (("source", "stories"),)
    assert waiting["pandasync_outbox_entries", stories] == 2
    assert waiting["pandasync_outbox_oldest_entry_age_seconds", stories] >= 0
    assert after["pandasync_changes_received_total", stories] == 2
    assert after["pandasync_outbox_entries", stories] == 0
    assert after["pandasync_changes_delivered_total", (("dataset", "stories"), *stories)] == 2
    assert after["pandasync_freshness_seconds_count", stories] == 2
    answers = {
        labels: value
        for (name, labels), value in after.items()
        if name == "pandasync_webhook_answers_total"
    }
    assert answers == {
        (("source", "stories"), ("status", "202")): 1,
        (("source", "stories"), ("status", "401")): 1,
        (("source", "(unknown)"), ("status", "401")): 1,
    }
    bulk = (("dataset", "stories"), ("kind", "bulk"), ("outcome", "ok"))
    assert after["pandasync_panda_request_seconds_count", bulk] == 1
    assert "s1" not in answer.text, "no document id in a label"
    assert "no-such-source" not in answer.text, "no name from outside in a label"


async def test_concurrent_redeliveries_of_one_webhook_are_applied_once(
    database: Database,
) -> None:
    body = body_of(story("s1", "Flood"))
    headers = signed(body, msg_id="msg_again")
    async with serving(settings_for(database)) as (client, _):
        answers = await send_all(client, [(body, headers)] * 8)
    assert sorted(answer.json()["accepted"] for answer in answers) == [0] * 7 + [1]
    assert {answer.status_code for answer in answers} == {202}
    assert await entries(database) == {"s1": upsert("stories", "s1", "Flood", "")}


def _drop_documents(session: Session) -> None:
    DocState.__table__.drop(session.connection())  # type: ignore[attr-defined]


def _create_documents(session: Session) -> None:
    DocState.__table__.create(session.connection())  # type: ignore[attr-defined]


async def test_when_the_store_fails_every_webhook_of_the_group_gets_503_and_none_is_kept(
    database: Database,
) -> None:
    webhooks = []
    for number in range(8):
        body = body_of(story(f"s{number}", "Flood"))
        webhooks.append((body, signed(body)))
    async with serving(settings_for(database, retry_after_s=5)) as (client, _):
        await database.run(_drop_documents)
        refused = await send_all(client, webhooks)
        await database.run(_create_documents)
        again = await send_all(client, webhooks)
    assert [(answer.status_code, answer.headers["retry-after"]) for answer in refused] == [
        (503, "5")
    ] * 8
    assert {answer.json()["error"] for answer in refused} == {"the store failed: retry later"}
    # Their ids were not kept either: sent again, each is taken in, not a duplicate.
    assert [answer.json()["accepted"] for answer in again] == [1] * 8
    assert sorted(await entries(database)) == [f"s{number}" for number in range(8)]


async def test_the_webhook_route_takes_only_post_and_one_path_segment(database: Database) -> None:
    async with serving(settings_for(database)) as (client, _):
        read = await client.get("/webhooks/stories")
        nested = await client.post("/webhooks/stories/x", content=b"{}", headers=JSON)
        bare = await client.post("/webhooks/", content=b"{}", headers=JSON)
    assert (read.status_code, read.headers["allow"]) == (405, "POST")
    assert (nested.status_code, bare.status_code) == (404, 404)
    assert await entries(database) == {}
