"""Delivery from the outbox into the PANDA-compatible server over real sockets, on both stores."""

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from service import outbox, panda
from service.changes import Change, Op
from service.config import DeliverySettings
from service.db import Database
from service.delivery import Delivery
from tests.fakes.clock import FakeClock
from tests.fixtures.panda import RunningPanda

pytestmark = pytest.mark.anyio

DATASET = panda.Dataset(slug="stories", name="Stories", columns=("Headline", "Words"))
SETTINGS = DeliverySettings(batch_size=10, lease_s=120, retry_base_s=1, retry_cap_s=60)


def upsert(doc_id: str, *row: str) -> Change:
    return Change("stories", doc_id, doc_id, Op.UPSERT, row)


def delete(doc_id: str) -> Change:
    return Change("stories", doc_id, doc_id, Op.DELETE)


@asynccontextmanager
async def delivery_to(
    url: str, database: Database, clock: FakeClock, *, email: str, api_key: str
) -> AsyncIterator[Delivery]:
    async with panda.make_http(url=url, timeout_s=5) as http:
        client = panda.PandaClient(http, email=email, api_key=api_key)
        yield Delivery(
            database, client, {"stories": DATASET}, SETTINGS, request_timeout_s=5, clock=clock
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def delivery(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> AsyncIterator[Delivery]:
    async with delivery_to(
        panda.url, database, clock, email=panda.email, api_key=panda.api_key
    ) as running:
        yield running


async def enqueue(database: Database, clock: FakeClock, *changes: Change) -> None:
    await database.run(outbox.enqueue, changes, now=clock())


async def pending(database: Database) -> int:
    return await database.run(outbox.pending, None)


async def test_a_queued_upsert_arrives_in_a_dataset_created_with_its_columns(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "Flood", "12"))
    assert await delivery.run_once() == 1
    dataset = panda.dataset("stories")
    assert dataset is not None
    schema = dataset["column_schema"]
    assert isinstance(schema, list)
    assert [column["name"] for column in schema] == ["Headline", "Words"]
    assert panda.rows("stories") == {"s1": ["Flood", "12"]}
    assert await pending(database) == 0


async def test_a_queued_delete_removes_the_row(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "Flood", "12"), upsert("s2", "Fire", "3"))
    await delivery.run_once()
    await enqueue(database, clock, delete("s1"))
    await delivery.run_once()
    assert panda.rows("stories") == {"s2": ["Fire", "3"]}


async def test_a_5xx_is_retried_until_it_succeeds(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await delivery.run_once()  # nothing queued yet; the dataset does not exist either
    await enqueue(database, clock, upsert("s1", "Flood", "12"))
    panda.set_faults(error_rate=1.0)
    assert await delivery.run_once() == 1
    assert (panda.rows("stories"), await pending(database)) == ({}, 1)
    panda.clear_faults()
    assert await delivery.run_once() == 0, "the retry waits for its backoff"
    clock.advance(SETTINGS.retry_cap_s)
    assert await delivery.run_once() == 1
    assert (panda.rows("stories"), await pending(database)) == ({"s1": ["Flood", "12"]}, 0)


async def test_a_locked_dataset_is_retried(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "Flood", "12"))
    panda.set_faults(locked=["stories"])
    await delivery.run_once()
    assert (panda.rows("stories"), await pending(database)) == ({}, 1)
    panda.clear_faults()
    clock.advance(SETTINGS.retry_cap_s)
    await delivery.run_once()
    assert panda.rows("stories") == {"s1": ["Flood", "12"]}


async def test_a_400_becomes_a_dead_letter_with_pandas_message(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("bad", "x", "1"), upsert("good", "y", "2"))
    panda.set_faults(refuse_ids=["bad"])
    assert await delivery.run_once() == 2
    assert panda.rows("stories") == {"good": ["y", "2"]}
    (letter,) = await database.run(outbox.dead_letters, "stories")
    assert (letter.doc_id, letter.op, await pending(database)) == ("bad", "upsert", 0)
    (answer,) = [answer for _, answer in outbox.answers_of(letter)]
    assert answer.status == 400
    assert "external_id" in answer.detail, "PANDA's own message is kept"


async def test_a_wrong_api_key_pauses_delivery_with_one_clear_error_and_loses_nothing(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"), upsert("s2", "b", "2"))
    async with delivery_to(
        panda.url, database, clock, email=panda.email, api_key="wrong-key-123"
    ) as wrong:
        assert await wrong.run_once() == 2
        assert await wrong.run_once() == 0, "a paused target claims nothing more"
        reason = wrong.status().paused
    assert reason is not None
    assert "401" in reason
    assert "api_key" in reason
    assert "wrong-key-123" not in reason
    assert panda.stats()["requests"] == 1, "one refused request, not one per row"
    assert (await pending(database), await database.run(outbox.dead_letters, None)) == (2, [])
    async with delivery_to(
        panda.url, database, clock, email=panda.email, api_key=panda.api_key
    ) as fixed:
        await fixed.run_once()
    assert panda.rows("stories") == {"s1": ["a", "1"], "s2": ["b", "2"]}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_an_unreachable_panda_keeps_the_change_for_later(
    database: Database, clock: FakeClock
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"))
    async with delivery_to(
        f"http://127.0.0.1:{closed_port()}", database, clock, email="e@x", api_key="k"
    ) as unreachable:
        assert await unreachable.run_once() == 1
        assert unreachable.status().retrying_until is not None
    assert await pending(database) == 1


async def test_a_change_that_arrives_during_delivery_is_delivered_after_it(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "old", "1"))
    await delivery.run_once()
    await enqueue(database, clock, upsert("s1", "middle", "2"))
    panda.set_faults(hang=True)
    async with anyio.create_task_group() as group:
        group.start_soon(delivery.step)
        with anyio.fail_after(10):
            for _ in iter(lambda: panda.stats()["held"], 1):
                await anyio.sleep(0.01)
        await enqueue(database, clock, upsert("s1", "new", "3"))
        panda.clear_faults()
    assert await pending(database) == 1, "the ack of 'middle' kept 'new'"
    await delivery.run_once()
    assert panda.rows("stories") == {"s1": ["new", "3"]}
