"""The admin API and what the admin token guards: every route refuses a missing or wrong token."""

import anyio
import httpx
import pytest
from pydantic import SecretStr

from service.config import Settings
from service.store import dead_letters, outbox
from service.store.db import Database
from tests.fixtures.panda import RunningPanda
from tests.test_webhooks import body_of, post, serving, settings_for, signed, story

pytestmark = pytest.mark.anyio

TOKEN = "admin-token-for-tests"
BEARER = {"authorization": f"Bearer {TOKEN}"}
ADMIN_ROUTES = [
    ("POST", "/admin/sources/stories/pause", None),
    ("POST", "/admin/sources/stories/resume", None),
    ("POST", "/admin/sources/feed/checkpoint", {"to": "0"}),
    ("POST", "/admin/sources/stories/resync", {"dry_run": True}),
    ("GET", "/admin/dead-letters", None),
    ("GET", "/admin/dead-letters/1", None),
    ("POST", "/admin/dead-letters/replay", {"ids": [1]}),
    ("POST", "/admin/dead-letters/discard", {"ids": [1]}),
    ("GET", "/admin/throughput", None),
]
GUARDED = [("GET", "/status"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs")]


def with_token(settings: Settings, **tokens: str) -> Settings:
    """`settings` with the admin token (and any other `server` token named) configured."""
    secrets = {name: SecretStr(value) for name, value in {"admin_token": TOKEN, **tokens}.items()}
    return settings.model_copy(update={"server": settings.server.model_copy(update=secrets)})


async def request(
    client: httpx.AsyncClient, method: str, path: str, body: object, headers: dict[str, str]
) -> httpx.Response:
    return await client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_every_admin_route_refuses_a_missing_or_wrong_token(
    database: Database, method: str, path: str, body: object
) -> None:
    async with serving(with_token(settings_for(database))) as (client, _):
        missing = await request(client, method, path, body, {})
        wrong = await request(client, method, path, body, {"authorization": "Bearer nope"})
        basic = await request(client, method, path, body, {"authorization": f"Basic {TOKEN}"})
    assert [answer.status_code for answer in (missing, wrong, basic)] == [401, 401, 401]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in missing.text


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_without_a_token_configured_the_admin_api_is_off(
    database: Database, method: str, path: str, body: object
) -> None:
    async with serving(settings_for(database)) as (client, _):
        answer = await request(client, method, path, body, BEARER)
    assert answer.status_code == 404
    assert "server.admin_token" in answer.json()["detail"]


@pytest.mark.parametrize(("method", "path"), GUARDED)
async def test_status_metrics_and_docs_want_the_token_once_one_is_configured(
    database: Database, method: str, path: str
) -> None:
    async with serving(with_token(settings_for(database))) as (client, _):
        anonymous = await client.request(method, path)
        admin = await client.request(method, path, headers=BEARER)
    assert (anonymous.status_code, admin.status_code) == (401, 200)


async def test_metrics_take_their_own_scrape_token(database: Database) -> None:
    settings = with_token(settings_for(database), metrics_token="scrape")
    async with serving(settings) as (client, _):
        scrape = await client.get("/metrics", headers={"authorization": "Bearer scrape"})
        status = await client.get("/status", headers={"authorization": "Bearer scrape"})
    assert (scrape.status_code, status.status_code) == (200, 401)


async def test_readyz_tells_an_anonymous_caller_only_whether_it_is_ready(
    database: Database,
) -> None:
    async with serving(with_token(settings_for(database))) as (client, _):
        anonymous = (await client.get("/readyz")).json()
        admin = (await client.get("/readyz", headers=BEARER)).json()
    assert sorted(anonymous) == ["ready"]
    assert sorted(admin) == ["problems", "ready"]


async def test_a_paused_webhook_source_queues_and_delivers_once_resumed(
    panda: RunningPanda, database: Database
) -> None:
    body = body_of(story("s1", "Flood"))
    async with serving(with_token(settings_for(database, panda.url))) as (client, service):
        paused = await client.post("/admin/sources/stories/pause", headers=BEARER)
        taken = await post(client, "stories", body, signed(body))
        assert await service.delivery.run_once() == 0
        queued = await database.run(outbox.pending, "stories")
        resumed = await client.post("/admin/sources/stories/resume", headers=BEARER)
        delivered = await service.delivery.run_once()
    assert (paused.json(), taken.status_code, queued) == (
        {"source": "stories", "paused": True},
        202,
        1,
    )
    assert (resumed.json()["paused"], delivered) == (False, 1)
    assert await anyio.to_thread.run_sync(panda.rows, "stories") == {"s1": ["Flood", ""]}


async def test_dead_letters_are_listed_shown_replayed_and_discarded(
    panda: RunningPanda, database: Database
) -> None:
    body = body_of(story("s1", "Flood"), story("s2", "Fire"))
    panda.set_faults(refuse_ids=["s1", "s2"])
    async with serving(with_token(settings_for(database, panda.url))) as (client, service):
        await post(client, "stories", body, signed(body))
        await service.delivery.run_once()
        listed = (await client.get("/admin/dead-letters", headers=BEARER)).json()
        first, second = (letter["id"] for letter in listed)
        shown = (await client.get(f"/admin/dead-letters/{first}", headers=BEARER)).json()
        panda.clear_faults()
        replay = {"ids": [first, 999]}
        replayed = await client.post("/admin/dead-letters/replay", json=replay, headers=BEARER)
        await service.delivery.run_once()
        discard = {"ids": [second]}
        discarded = await client.post("/admin/dead-letters/discard", json=discard, headers=BEARER)
        missing = await client.get(f"/admin/dead-letters/{second}", headers=BEARER)
    assert [letter["doc_id"] for letter in listed] == ["s1", "s2"]
    assert (shown["row"], shown["answers"][-1]["status"]) == (["Flood", ""], 400)
    assert (replayed.json()["replayed"], replayed.json()["missing"]) == ([first], [999])
    assert discarded.json() == {"discarded": [second], "missing": []}
    assert missing.status_code == 404
    assert await anyio.to_thread.run_sync(panda.rows, "stories") == {"s1": ["Flood", ""]}
    assert await database.run(dead_letters.stored, None) == []


async def test_dead_letters_are_listed_a_page_at_a_time(
    panda: RunningPanda, database: Database
) -> None:
    body = body_of(story("s1", "Flood"), story("s2", "Fire"), story("s3", "Storm"))
    panda.set_faults(refuse_ids=["s1", "s2", "s3"])
    async with serving(with_token(settings_for(database, panda.url))) as (client, service):
        await post(client, "stories", body, signed(body))
        await service.delivery.run_once()

        async def page(query: str) -> list[str]:
            answer = await client.get(f"/admin/dead-letters?{query}", headers=BEARER)
            assert answer.status_code == 200, answer.text
            return [letter["doc_id"] for letter in answer.json()]

        ids = [
            letter["id"]
            for letter in (await client.get("/admin/dead-letters", headers=BEARER)).json()
        ]
        pages = [
            await page("limit=2"),
            await page(f"limit=2&after={ids[1]}"),
            await page(f"after={ids[2]}"),
        ]
        too_many = await client.get("/admin/dead-letters?limit=10001", headers=BEARER)
    assert pages == [["s1", "s2"], ["s3"], []]
    assert too_many.status_code == 422


async def test_a_dead_letter_id_or_limit_past_what_the_database_holds_is_a_422_not_a_500(
    database: Database,
) -> None:
    huge = 2**70
    async with serving(with_token(settings_for(database))) as (client, _):
        answers = [
            await client.get(f"/admin/dead-letters/{huge}", headers=BEARER),
            await client.get(f"/admin/dead-letters?limit={huge}", headers=BEARER),
            await client.post("/admin/dead-letters/replay", json={"ids": [huge]}, headers=BEARER),
            await client.post("/admin/dead-letters/discard", json={"ids": [huge]}, headers=BEARER),
        ]
    assert [answer.status_code for answer in answers] == [422] * 4
    assert all("less than or equal to" in answer.text for answer in answers)


async def test_a_webhook_source_has_no_checkpoint_to_set(database: Database) -> None:
    async with serving(with_token(settings_for(database))) as (client, _):
        url = "/admin/sources/stories/checkpoint"
        answer = await client.post(url, json={"to": "0"}, headers=BEARER)
    assert answer.status_code == 409
    assert "not a CouchDB source" in answer.json()["detail"]


async def test_a_resync_deletes_rows_added_by_hand_and_forgets_rows_changed_by_hand(
    panda: RunningPanda, database: Database
) -> None:
    stories = {"s1": "Flood", "s2": "Fire", "s3": "Storm", "s4": "Snow", "s5": "Drought"}
    body = body_of(*(story(doc_id, title) for doc_id, title in stories.items()))
    async with serving(with_token(settings_for(database, panda.url))) as (client, service):
        await post(client, "stories", body, signed(body))
        await service.delivery.run_once()
        await anyio.to_thread.run_sync(
            panda.by_hand, "PUT", "stories/data/hand-1/", {"data": ["By hand", ""]}
        )
        await anyio.to_thread.run_sync(
            panda.by_hand, "PUT", "stories/data/s2/", {"data": ["Edited", ""]}
        )
        url = "/admin/sources/stories/resync"
        dry = await client.post(url, json={"dry_run": True, "delete_orphans": True}, headers=BEARER)
        done = await client.post(url, json={"delete_orphans": True}, headers=BEARER)
        await service.delivery.run_once()
        # The source sends s2 again: no longer skipped as what PANDA holds.
        again = body_of(story("s2", "Fire"))
        await post(client, "stories", again, signed(again))
        await service.delivery.run_once()
    assert dry.status_code == 200, dry.text
    assert (dry.json()["written"], dry.json()["deletes_queued"]) == (False, 0)
    assert done.status_code == 200, done.text
    assert {key: done.json()[key] for key in ("in_step", "changed", "unknown", "to_send")} == {
        "in_step": 4,
        "changed": 1,
        "unknown": 1,
        "to_send": 1,
    }
    assert (done.json()["deletes_queued"], done.json()["read_again"]) == (1, False)
    assert done.json()["examples"]["unknown to the source"] == ["hand-1"]
    rows = await anyio.to_thread.run_sync(panda.rows, "stories")
    assert rows == {doc_id: [title, ""] for doc_id, title in stories.items()}


async def test_a_resync_that_would_delete_most_rows_wants_confirm(
    panda: RunningPanda, database: Database
) -> None:
    await anyio.to_thread.run_sync(panda.by_hand, "PUT", "stories/?columns=A,B", {"name": "S"})
    for index in range(3):
        await anyio.to_thread.run_sync(
            panda.by_hand, "PUT", f"stories/data/hand{index}/", {"data": ["By hand", ""]}
        )
    async with serving(with_token(settings_for(database, panda.url))) as (client, _):
        url = "/admin/sources/stories/resync"
        refused = await client.post(url, json={"delete_orphans": True}, headers=BEARER)
        pending = await database.run(outbox.pending, "stories")
    assert refused.status_code == 409
    assert "this would delete 3 of 3 rows of stories" in refused.json()["detail"]
    assert "confirm=true" in refused.json()["detail"]
    assert pending == 0
