"""`service.store.seen_webhooks`: a webhook id counts once per source within its retention."""

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from sqlmodel import col, select

from service.store import seen_webhooks
from service.store.db import Database
from service.store.tables import SeenWebhook

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
DAY_S = 24 * 3600.0


def remember(database: Database, webhook_id: str, *, at: datetime, source: str = "a") -> bool:
    return database.run_sync(seen_webhooks.remember, source, webhook_id, now=at, retention_s=DAY_S)


def test_an_id_is_new_once_and_then_seen(database: Database) -> None:
    first = remember(database, "msg_1", at=NOW)
    again = remember(database, "msg_1", at=NOW + timedelta(hours=23))
    assert (first, again) == (True, False)


def test_an_id_seen_longer_ago_than_the_retention_is_new_again(database: Database) -> None:
    remember(database, "msg_1", at=NOW)
    assert remember(database, "msg_1", at=NOW + timedelta(seconds=DAY_S + 1)) is True
    assert remember(database, "msg_1", at=NOW + timedelta(seconds=DAY_S + 2)) is False


def test_sources_keep_their_ids_apart(database: Database) -> None:
    remember(database, "msg_1", at=NOW, source="a")
    assert remember(database, "msg_1", at=NOW, source="b") is True


def test_prune_forgets_only_older_ids_of_the_source(database: Database) -> None:
    remember(database, "old", at=NOW)
    remember(database, "new", at=NOW + timedelta(hours=2))
    remember(database, "other", at=NOW, source="b")
    before = NOW + timedelta(hours=1)
    forgotten = database.run_sync(seen_webhooks.prune, "a", before=before)
    kept = database.run_sync(
        lambda session: [
            (seen.source, seen.webhook_id)
            for seen in session.exec(select(SeenWebhook).order_by(col(SeenWebhook.webhook_id)))
        ]
    )
    assert (forgotten, kept) == (1, [("a", "new"), ("b", "other")])


@pytest.mark.anyio
async def test_of_concurrent_deliveries_of_one_id_exactly_one_is_new(database: Database) -> None:
    outcomes: list[bool] = []

    async def deliver() -> None:
        outcomes.append(
            await database.run(seen_webhooks.remember, "a", "msg_1", now=NOW, retention_s=DAY_S)
        )

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(deliver)
    assert sorted(outcomes) == [False] * 9 + [True]


def test_of_many_ids_remembered_at_once_each_is_new_once_and_seen_writes_nothing(
    database: Database,
) -> None:
    remember(database, "old", at=NOW)
    new = database.run_sync(
        seen_webhooks.remember_many,
        "a",
        ["old", "n1", "n2", "n1"],
        now=NOW + timedelta(hours=1),
        retention_s=DAY_S,
    )
    seen = database.run_sync(
        seen_webhooks.seen, "a", ["n1", "n3"], now=NOW + timedelta(hours=2), retention_s=DAY_S
    )
    assert (new, seen) == ({"n1", "n2"}, {"n1"})
    assert remember(database, "n3", at=NOW + timedelta(hours=3)) is True


def test_remembering_or_looking_up_no_ids_finds_none(database: Database) -> None:
    found = database.run_sync(
        lambda session: (
            seen_webhooks.remember_many(session, "a", [], now=NOW, retention_s=DAY_S),
            seen_webhooks.seen(session, "a", [], now=NOW, retention_s=DAY_S),
        )
    )
    assert found == (set(), set())
