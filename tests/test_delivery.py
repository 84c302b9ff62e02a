"""Delivery from the outbox into the PANDA-compatible server over real sockets, on both stores."""

import itertools
import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from pydantic import ValidationError
from sqlmodel import Session, col, select, update

from service.changes import Change, Op
from service.clock import Clock, utcnow
from service.config import DeliverySettings
from service.delivery import panda
from service.delivery.engine import Delivery
from service.store import dead_letters, outbox
from service.store.db import Database
from service.store.tables import DeliveryLease, OutboxEntry
from tests.fakes.clock import FakeClock
from tests.fixtures.panda import RunningPanda
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

DATASET = panda.Dataset(slug="stories", name="Stories", columns=("Headline", "Words"))
SETTINGS = DeliverySettings(batch_size=10, lease_s=120, retry_base_s=1, retry_cap_s=60)


def upsert(doc_id: str, *row: str, source: str = "stories") -> Change:
    return Change(source, doc_id, doc_id, Op.UPSERT, row)


def delete(doc_id: str, source: str = "stories") -> Change:
    return Change(source, doc_id, doc_id, Op.DELETE)


@asynccontextmanager
async def delivery_to(
    url: str,
    database: Database,
    clock: Clock,
    *,
    email: str,
    api_key: str,
    settings: DeliverySettings = SETTINGS,
    datasets: Mapping[str, panda.Dataset] | None = None,
    request_timeout_s: float = 5,
    transport: httpx.AsyncBaseTransport | None = None,
    timer: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Delivery]:
    async with panda.make_http(url=url, timeout_s=5, transport=transport) as http:
        client = panda.PandaClient(http, email=email, api_key=api_key)
        yield Delivery(
            database,
            client,
            datasets or {"stories": DATASET},
            settings,
            request_timeout_s=request_timeout_s,
            clock=clock,
            rng=random.Random(0),
            timer=timer,
        )


@asynccontextmanager
async def delivery_with(
    server: RunningPanda,
    database: Database,
    clock: Clock,
    settings: DeliverySettings = SETTINGS,
    *,
    datasets: Mapping[str, panda.Dataset] | None = None,
    request_timeout_s: float = 5,
    timer: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Delivery]:
    async with delivery_to(
        server.url,
        database,
        clock,
        email=server.email,
        api_key=server.api_key,
        settings=settings,
        datasets=datasets,
        request_timeout_s=request_timeout_s,
        timer=timer,
    ) as running:
        yield running


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
    (letter,) = await database.run(dead_letters.stored, "stories")
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
    assert (await pending(database), await database.run(dead_letters.stored, None)) == (2, [])
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


def statuses(panda: RunningPanda) -> dict[str, int]:
    by_status = panda.stats()["by_status"]
    assert isinstance(by_status, dict)
    return by_status


def requests(panda: RunningPanda) -> int:
    count = panda.stats()["requests"]
    assert isinstance(count, int)
    return count


async def until_held(panda: RunningPanda, count: int = 1) -> None:
    """Wait until PANDA holds `count` requests (under the `hang` fault)."""

    async def held() -> bool:
        return panda.stats()["held"] == count

    await eventually(held, what=f"PANDA to hold {count} requests")


async def stop_while_held(delivery: Delivery, panda: RunningPanda) -> None:
    """Run delivery until PANDA holds one of its requests, then stop it and wait for the end."""
    panda.set_faults(hang=True)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(delivery.run)
            await until_held(panda)
            delivery.stop()


async def panda_api(server: RunningPanda, method: str, path: str, **options: Any) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.auth) as http:
        (await http.request(method, f"/api/1.0{path}", **options)).raise_for_status()


def entries(session: Session) -> list[tuple[str, int, bool]]:
    """(doc_id, attempts, held) of every outbox entry, by doc_id: held when claimed under its
    source's lease, which has not ended."""
    running = {
        lease.source: lease.claimed_to
        for lease in session.exec(select(DeliveryLease))
        if lease.until is not None and lease.claimed_to is not None
    }
    query = select(OutboxEntry).order_by(col(OutboxEntry.doc_id))
    return [
        (
            entry.doc_id,
            entry.attempts,
            entry.id is not None and entry.id <= running.get(entry.source, 0),
        )
        for entry in session.exec(query).all()
    ]


async def test_upserts_go_in_one_bulk_put_and_deletes_one_by_one(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"), upsert("s2", "b", "2"))
    await delivery.run_once()
    before = statuses(panda)
    await enqueue(
        database,
        clock,
        *[upsert(f"n{index}", "new", str(index)) for index in range(5)],
        delete("s1"),
        delete("s2"),
    )
    assert await delivery.run_once() == 7
    after = statuses(panda)
    added = {status: after[status] - before.get(status, 0) for status in after}
    assert {status: count for status, count in added.items() if count} == {"202": 1, "204": 2}
    assert panda.rows("stories") == {f"n{index}": ["new", str(index)] for index in range(5)}


async def test_an_upsert_then_a_delete_queued_during_a_failure_ends_deleted(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"))
    await delivery.run_once()
    await enqueue(database, clock, upsert("s1", "b", "2"))
    panda.set_faults(error_rate=1.0)
    await delivery.run_once()
    await enqueue(database, clock, delete("s1"))
    panda.clear_faults()
    clock.advance(SETTINGS.retry_cap_s)
    await delivery.run_once()
    assert (panda.rows("stories"), await pending(database)) == ({}, 0)


async def test_a_delete_then_an_upsert_queued_during_a_failure_ends_present(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"))
    await delivery.run_once()
    await enqueue(database, clock, delete("s1"))
    panda.set_faults(locked=["stories"])
    await delivery.run_once()
    await enqueue(database, clock, upsert("s1", "back", "3"))
    panda.clear_faults()
    clock.advance(SETTINGS.retry_cap_s)
    await delivery.run_once()
    assert panda.rows("stories") == {"s1": ["back", "3"]}


async def test_bisection_dead_letters_exactly_the_refused_rows_in_about_log2_n_puts(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    size = 64
    bad = {"r7", "r40"}
    settings = SETTINGS.model_copy(update={"batch_size": size, "max_batch_size": size})
    await enqueue(database, clock, *[upsert(f"r{index}", "x", str(index)) for index in range(size)])
    panda.set_faults(refuse_ids=sorted(bad))
    async with delivery_with(panda, database, clock, settings) as delivery:
        assert await delivery.run_once() == size
        assert delivery.status().dead_lettered == len(bad)
    letters = await database.run(dead_letters.stored, "stories")
    assert {letter.doc_id for letter in letters} == bad
    assert {answer.status for letter in letters for _, answer in outbox.answers_of(letter)} == {400}
    good = {f"r{index}": ["x", str(index)] for index in range(size) if f"r{index}" not in bad}
    assert (panda.rows("stories"), await pending(database)) == (good, 0)
    counts = statuses(panda)
    bulk_puts = counts["202"] + counts["400"]
    assert bulk_puts - 1 <= len(bad) * (math.ceil(math.log2(size)) + 1)


async def test_one_refused_row_among_a_thousand_costs_eleven_extra_puts_at_most(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    size = 1000
    settings = SETTINGS.model_copy(update={"batch_size": size, "max_batch_size": size})
    await enqueue(database, clock, *[upsert(f"r{index}", "x", "1") for index in range(size)])
    panda.set_faults(refuse_ids=["r613"])
    async with delivery_with(panda, database, clock, settings) as delivery:
        await delivery.run_once()
    counts = statuses(panda)
    assert counts["202"] + counts["400"] - 1 <= math.ceil(math.log2(size)) + 1
    assert len(panda.rows("stories")) == size - 1


async def test_rows_pandasync_cannot_send_in_bulk_are_dead_lettered_without_bisecting(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    unsendable = Change("stories", "odd id", "odd id", Op.UPSERT, ("x", "1"))
    await enqueue(database, clock, upsert("a", "x", "1"), unsendable, upsert("b", "y", "2"))
    await delivery.run_once()
    (letter,) = await database.run(dead_letters.stored, "stories")
    (answer,) = [answer for _, answer in outbox.answers_of(letter)]
    assert (letter.doc_id, answer.status) == ("odd id", None)
    assert panda.rows("stories") == {"a": ["x", "1"], "b": ["y", "2"]}
    assert "400" not in statuses(panda)


async def test_row_by_row_mode_sends_each_change_on_its_own(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    settings = SETTINGS.model_copy(update={"row_by_row": True})
    await enqueue(database, clock, *[upsert(f"r{index}", "x", "1") for index in range(4)])
    async with delivery_with(panda, database, clock, settings) as delivery:
        assert await delivery.run_once() == 4
    assert (statuses(panda)["202"], len(panda.rows("stories"))) == (4, 4)


def test_a_starting_batch_size_outside_its_bounds_is_refused_with_its_fix() -> None:
    with pytest.raises(ValidationError, match="make min_batch_size <= batch_size"):
        DeliverySettings(batch_size=100, max_batch_size=50)


async def test_the_batch_grows_while_panda_answers_fast(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    settings = SETTINGS.model_copy(update={"batch_size": 10, "max_batch_size": 100})
    await enqueue(database, clock, *[upsert(f"r{index:03}", "x", "1") for index in range(300)])
    # Every PUT takes no time by this timer: PANDA answers fast, however loaded the machine.
    async with delivery_with(panda, database, clock, settings, timer=lambda: 0.0) as delivery:
        await delivery.run_once()
        size = delivery.status().datasets["stories"].batch_size
    assert (size, len(panda.rows("stories"))) == (100, 300)
    # The batch doubled from 10 to 100: 10 + 20 + 40 + 80 + 100 + 50 rows.
    assert statuses(panda)["202"] == 6


async def test_a_failed_put_counts_an_attempt_only_against_its_rows_and_releases_the_rest(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    changes = [upsert("r0", "x", "1"), upsert("r1", "x", "1"), delete("r2"), delete("r3")]
    await enqueue(database, clock, *changes)
    panda.set_faults(error_rate=1.0)
    async with delivery_with(panda, database, clock) as delivery:
        await delivery.run_once()
    assert statuses(panda)["500"] == 1, "only the bulk PUT went out; the deletes wait"
    assert await database.run(entries) == [
        ("r0", 1, False),
        ("r1", 1, False),
        ("r2", 0, False),
        ("r3", 0, False),
    ]


async def test_the_batch_shrinks_when_panda_answers_slowly(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    settings = SETTINGS.model_copy(
        update={"batch_size": 8, "min_batch_size": 2, "slow_batch_s": 0.05}
    )
    await enqueue(database, clock, *[upsert(f"r{index:02}", "x", "1") for index in range(8)])
    await enqueue(database, clock, *[upsert(f"s{index:02}", "x", "1") for index in range(8)])
    panda.set_faults(latency_s=0.1)
    async with delivery_with(panda, database, clock, settings) as delivery:
        assert await delivery.step() == 8
        sizes = [delivery.status().datasets["stories"].batch_size]
        for _ in range(3):
            await delivery.step()
            sizes.append(delivery.status().datasets["stories"].batch_size)
    assert sizes == [4, 2, 2, 2], "each slow answer halves the batch, down to the minimum"


async def test_a_server_error_shrinks_the_batch_and_a_lock_does_not(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"))
    panda.set_faults(locked=["stories"])
    await delivery.run_once()
    locked = delivery.status().datasets["stories"].batch_size
    panda.set_faults(locked=[], error_rate=1.0)
    clock.advance(SETTINGS.retry_cap_s)
    await delivery.run_once()
    assert (locked, delivery.status().datasets["stories"].batch_size) == (10, 5)


async def test_retry_after_sets_when_the_dataset_is_tried_again(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"))
    panda.set_faults(down=True, retry_after_s=30)
    await delivery.run_once()
    assert delivery.status().retrying_until == clock() + timedelta(seconds=30)
    clock.advance(29)
    assert await delivery.run_once() == 0, "not before PANDA said"


async def test_while_panda_is_down_one_row_probes_per_wait_and_all_arrive_after(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, *[upsert(f"r{index}", "x", "1") for index in range(5)])
    panda.set_faults(down=True)
    handled = []
    for _ in range(6):
        handled.append(await delivery.run_once())
        for _ in range(3):
            assert await delivery.run_once() == 0, "no hot loop while backing off"
        clock.advance(SETTINGS.retry_cap_s)
    # Each failure halves the batch (10, 5, 2 entries; 5 are queued); after three
    # (breaker_failures) the breaker opens and one row probes at a time.
    assert handled == [5, 5, 2, 1, 1, 1]
    assert requests(panda) == 6, "one request per attempt"
    assert delivery.status().datasets["stories"].breaker_open
    panda.clear_faults()
    await delivery.run_once()
    assert (len(panda.rows("stories")), await pending(database)) == (5, 0)
    assert not delivery.status().datasets["stories"].breaker_open


async def test_a_probe_counts_one_attempt_against_one_entry(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("a", "x", "1"), upsert("b", "y", "2"))
    panda.set_faults(error_rate=1.0)
    for _ in range(4):
        await delivery.run_once()
        clock.advance(SETTINGS.retry_cap_s)
    assert await database.run(entries) == [("a", 4, False), ("b", 3, False)]


async def test_a_dataset_with_other_columns_stops_only_its_source(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    other = panda_dataset("other", ("Headline", "Words"))
    await panda_api(
        panda, "PUT", "/dataset/stories/", params={"columns": "Title"}, json={"name": "Stories"}
    )
    await enqueue(database, clock, upsert("s1", "a", "1"), upsert("o1", "b", "2", source="other"))
    async with delivery_with(
        panda, database, clock, datasets={"stories": DATASET, "other": other}
    ) as delivery:
        await delivery.run_once()
        stopped = delivery.status().stopped_sources
    assert list(stopped) == ["stories"]
    assert "Title" in stopped["stories"]
    assert (panda.rows("other"), await database.run(outbox.pending, "stories")) == (
        {"o1": ["b", "2"]},
        1,
    )


def panda_dataset(slug: str, columns: tuple[str, ...]) -> panda.Dataset:
    return panda.Dataset(slug=slug, name=slug.title(), columns=columns)


async def test_a_dataset_deleted_in_panda_is_created_again(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"))
    await delivery.run_once()
    await panda_api(panda, "DELETE", "/dataset/stories/")
    await enqueue(database, clock, upsert("s2", "b", "2"))
    await delivery.run_once()
    clock.advance(SETTINGS.retry_cap_s)
    await delivery.run_once()
    assert panda.rows("stories") == {"s2": ["b", "2"]}


async def test_a_refused_dataset_creation_stops_the_source(
    database: Database, clock: FakeClock
) -> None:
    def refuse_creation(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404)
        return httpx.Response(400, json={"dataset": {"name": ["This field is required."]}})

    await enqueue(database, clock, upsert("s1", "a", "1"))
    async with delivery_to(
        "http://panda.test",
        database,
        clock,
        email="e@x",
        api_key="k",
        transport=httpx.MockTransport(refuse_creation),
    ) as refused:
        await refused.run_once()
        reason = refused.status().stopped_sources["stories"]
    assert "PANDA refused to create dataset stories" in reason
    assert await pending(database) == 1


# Two documents that map to one external_id (a source misconfiguration).
TWO_CHANGES_TO_ONE_ROW = (
    Change("stories", "first", "same", Op.UPSERT, ("first", "1")),
    Change("stories", "second", "same", Op.UPSERT, ("second", "2")),
)


async def test_two_changes_to_one_row_never_share_a_batch(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    # The second waits for the next batch, so the two writes to the row never race.
    await enqueue(database, clock, *TWO_CHANGES_TO_ONE_ROW)
    assert await delivery.step() == 2
    assert (panda.rows("stories"), await pending(database)) == ({"same": ["first", "1"]}, 1)
    await delivery.run_once()
    assert panda.rows("stories") == {"same": ["second", "2"]}


async def test_a_change_put_off_behind_another_to_its_row_goes_out_in_the_same_run(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, *TWO_CHANGES_TO_ONE_ROW)
    await delivery.run_once()
    assert (panda.rows("stories"), await pending(database)) == ({"same": ["second", "2"]}, 0)


async def test_each_batch_goes_out_under_a_lease_of_its_own_ended_after_it(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    settings = SETTINGS.model_copy(update={"batch_size": 10, "max_batch_size": 10})
    await enqueue(database, clock, *[upsert(f"r{index:02}", "x", "1") for index in range(25)])
    async with delivery_with(panda, database, clock, settings) as delivery:
        assert await delivery.run_once() == 25
    lease = await database.run(lambda session: session.get(DeliveryLease, "stories"))
    assert lease is not None
    assert (len(panda.rows("stories")), lease.lease_id, lease.until) == (25, 3, None)


SHORT_LEASE = SETTINGS.model_copy(update={"lease_s": 1.0})


def lease_until(session: Session) -> datetime | None:
    lease = session.get(DeliveryLease, "stories")
    return None if lease is None else lease.until


def take_the_lease_over(session: Session) -> None:
    """What another replica's claim does to the lease: the next lease id, held on."""
    session.execute(
        update(DeliveryLease)
        .where(col(DeliveryLease.source) == "stories")
        .values(lease_id=col(DeliveryLease.lease_id) + 1)
    )


async def test_a_request_that_outlasts_the_lease_goes_on_while_the_lease_is_renewed(
    panda: RunningPanda, database: Database
) -> None:
    await database.run(outbox.enqueue, [upsert("s1", "a", "1")], now=utcnow())
    async with delivery_with(
        panda, database, utcnow, SHORT_LEASE, request_timeout_s=30
    ) as delivery:
        panda.set_faults(hang=True)
        async with anyio.create_task_group() as group:
            group.start_soon(delivery.run_once)
            await until_held(panda)
            first = await database.run(lease_until)
            assert first is not None

            async def renewed_for_three_leases() -> bool:
                until = await database.run(lease_until)
                held = panda.stats()["held"] == 1
                return held and until is not None and until > first + timedelta(seconds=3)

            await eventually(renewed_for_three_leases, what="three leases' worth of renewals")
            panda.clear_faults()
    assert (panda.rows("stories"), await pending(database)) == ({"s1": ["a", "1"]}, 0)


async def test_a_delivery_whose_lease_is_taken_over_cuts_its_request_off(
    panda: RunningPanda, database: Database
) -> None:
    await database.run(outbox.enqueue, [upsert("s1", "a", "1")], now=utcnow())
    async with delivery_with(
        panda, database, utcnow, SHORT_LEASE, request_timeout_s=60
    ) as delivery:
        panda.set_faults(hang=True)
        with anyio.fail_after(5):  # far under the request's own 60 s timeout
            async with anyio.create_task_group() as group:
                group.start_soon(delivery.run_once)
                await until_held(panda)
                await database.run(take_the_lease_over)
        assert "taken over" in (delivery.status().last_error or "")
    await until_held(panda, 0)  # the client hung up: PANDA drops the request unapplied
    panda.clear_faults()
    assert panda.stats()["writes"] == 0
    # Untouched, for the replica that holds the lease now.
    assert await database.run(entries) == [("s1", 0, True)]


def let_the_lease_run_out(session: Session) -> None:
    """What a renewal that came late finds: the lease ran out, and no one took it over."""
    session.execute(
        update(DeliveryLease)
        .where(col(DeliveryLease.source) == "stories")
        .values(until=utcnow() - timedelta(seconds=30))
    )


async def test_a_delivery_whose_lease_ran_out_unrenewed_says_so_not_taken_over(
    panda: RunningPanda, database: Database
) -> None:
    await database.run(outbox.enqueue, [upsert("s1", "a", "1")], now=utcnow())
    async with delivery_with(
        panda, database, utcnow, SHORT_LEASE, request_timeout_s=60
    ) as delivery:
        panda.set_faults(hang=True)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(delivery.run_once)
                await until_held(panda)
                await database.run(let_the_lease_run_out)
        last_error = delivery.status().last_error or ""
    assert "before it was renewed, and no one took it over" in last_error
    assert "taken over by" not in last_error
    await until_held(panda, 0)
    panda.clear_faults()
    assert panda.stats()["writes"] == 0


async def test_datasets_are_written_in_parallel_up_to_the_bound(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    datasets = {name: panda_dataset(name, ("Headline", "Words")) for name in ("a", "b", "c")}
    settings = SETTINGS.model_copy(update={"parallel_datasets": 2})
    for name in datasets:
        await enqueue(database, clock, upsert("r1", "x", "1", source=name))
    async with delivery_with(panda, database, clock, settings, datasets=datasets) as delivery:
        panda.set_faults(hang=True)
        async with anyio.create_task_group() as group:
            group.start_soon(delivery.run_once)
            await until_held(panda, 2)
            assert requests(panda) == 2, "the third dataset waits for a free slot"
            panda.clear_faults()
    assert [panda.rows(name) for name in datasets] == [{"r1": ["x", "1"]}] * 3


async def test_run_delivers_what_is_notified_until_stopped(
    panda: RunningPanda, database: Database
) -> None:
    settings = SETTINGS.model_copy(update={"idle_poll_s": 60})
    async with (
        delivery_with(panda, database, utcnow, settings) as delivery,
        anyio.create_task_group() as group,
    ):
        group.start_soon(delivery.run)
        await database.run(outbox.enqueue, [upsert("s1", "a", "1")], now=utcnow())
        delivery.notify()

        async def arrived() -> bool:
            return panda.rows("stories") == {"s1": ["a", "1"]}

        await eventually(arrived, what="the row in PANDA")
        delivery.stop()
    assert await pending(database) == 0


async def test_stopping_lets_the_request_in_flight_finish_within_the_grace_period(
    panda: RunningPanda, database: Database
) -> None:
    settings = SETTINGS.model_copy(update={"shutdown_grace_s": 10})
    await database.run(outbox.enqueue, [upsert("s1", "a", "1")], now=utcnow())
    async with delivery_with(panda, database, utcnow, settings) as delivery:
        panda.set_faults(hang=True)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(delivery.run)
                await until_held(panda)
                delivery.stop()
                await database.run(outbox.enqueue, [upsert("s2", "b", "2")], now=utcnow())
                panda.clear_faults()
    assert panda.rows("stories") == {"s1": ["a", "1"]}
    assert await database.run(entries) == [("s2", 0, False)], "nothing claimed after stop"


async def test_after_stop_the_rest_of_a_batch_is_released_not_sent(
    panda: RunningPanda, database: Database
) -> None:
    settings = SETTINGS.model_copy(update={"shutdown_grace_s": 10})
    changes = [upsert("s0", "a", "0"), delete("s1"), delete("s2")]
    await database.run(outbox.enqueue, changes, now=utcnow())
    async with delivery_with(panda, database, utcnow, settings) as delivery:
        panda.set_faults(hang=True)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(delivery.run)
                await until_held(panda)
                delivery.stop()
                panda.clear_faults()
    # The write in flight (creating the dataset, then s0's PUT) finished; no later one went.
    assert panda.rows("stories") == {"s0": ["a", "0"]}
    assert await database.run(entries) == [("s1", 0, False), ("s2", 0, False)]


async def claimed_after_the_lease(database: Database) -> list[tuple[str, int]]:
    """(doc_id, attempts) of what a delivery claims once the source's lease has expired."""
    later = utcnow() + timedelta(seconds=SETTINGS.lease_s)
    claims = await database.run(
        outbox.claim_many, source="stories", now=later, lease_s=SETTINGS.lease_s, limit=10
    )
    return sorted((held.doc_id, held.attempts) for held in claims)


async def test_a_request_cut_off_at_shutdown_holds_its_source_until_the_lease_expires(
    panda: RunningPanda, database: Database
) -> None:
    settings = SETTINGS.model_copy(update={"shutdown_grace_s": 0.2, "batch_size": 10})
    async with delivery_with(panda, database, utcnow, settings) as delivery:
        await database.run(outbox.enqueue, [upsert("s0", "a", "0")], now=utcnow())
        await delivery.run_once()
        changes = [upsert("s1", "a", "1"), delete("gone"), delete("gone2")]
        await database.run(outbox.enqueue, changes, now=utcnow())
        await stop_while_held(delivery, panda)
    panda.clear_faults()
    # PANDA may still apply the PUT cut off: nothing of the source goes out until the lease
    # has expired, so no newer change of s1 can overtake it; then all of it goes again.
    assert await database.run(entries) == [("gone", 0, True), ("gone2", 0, True), ("s1", 0, True)]
    claimed_now = await database.run(
        outbox.claim_many, source="stories", now=utcnow(), lease_s=SETTINGS.lease_s, limit=10
    )
    assert claimed_now == []
    assert await claimed_after_the_lease(database) == [("gone", 0), ("gone2", 0), ("s1", 0)]


async def test_panda_down_for_a_while_then_up_gets_everything_with_no_hot_loop(
    panda: RunningPanda, database: Database
) -> None:
    settings = SETTINGS.model_copy(
        update={"retry_base_s": 0.05, "retry_cap_s": 0.2, "idle_poll_s": 60}
    )
    await database.run(
        outbox.enqueue, [upsert(f"r{index}", "x", "1") for index in range(30)], now=utcnow()
    )
    panda.set_faults(down=True)
    async with (
        delivery_with(panda, database, utcnow, settings) as delivery,
        anyio.create_task_group() as group,
    ):
        group.start_soon(delivery.run)

        async def probing() -> bool:
            return delivery.status().datasets["stories"].breaker_open

        await eventually(probing, what="a probe")
        down_for = anyio.current_time()
        while_down = requests(panda)
        panda.clear_faults()

        async def arrived() -> bool:
            return len(panda.rows("stories")) == 30

        await eventually(arrived, what="the row in PANDA")
        delivery.stop()
    # A hot loop would make hundreds; each attempt is one request after a backoff.
    assert settings.breaker_failures <= while_down <= settings.breaker_failures + 2
    assert anyio.current_time() - down_for < 5
    assert await pending(database) == 0


async def test_a_request_without_an_answer_in_time_is_retried_later(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"))
    async with delivery_with(panda, database, clock, request_timeout_s=0.2) as delivery:
        await delivery.run_once()
        panda.set_faults(hang=True)
        await enqueue(database, clock, upsert("s2", "b", "2"))
        assert await delivery.run_once() == 1
        panda.clear_faults()
        assert "within 0.2 s" in (delivery.status().last_error or "")
        clock.advance(SETTINGS.retry_cap_s)
        await delivery.run_once()
    assert panda.rows("stories") == {"s1": ["a", "1"], "s2": ["b", "2"]}


async def test_a_refused_delete_becomes_a_dead_letter(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "a", "1"), upsert("s2", "b", "2"))
    await delivery.run_once()
    panda.set_faults(refuse_ids=["s1"])
    await enqueue(database, clock, delete("s1"), delete("s2"))
    await delivery.run_once()
    (letter,) = await database.run(dead_letters.stored, "stories")
    assert (letter.doc_id, letter.op, panda.rows("stories")) == ("s1", "delete", {"s1": ["a", "1"]})


async def test_a_row_that_is_not_valid_text_is_dead_lettered_and_the_rest_delivered(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    # A lone surrogate (as a JSON `\ud800` decodes) cannot be sent as UTF-8.
    await enqueue(
        database, clock, upsert("a", "x", "1"), upsert("odd", "\ud800", "2"), upsert("b", "y", "3")
    )
    await delivery.run_once()
    (letter,) = await database.run(dead_letters.stored, "stories")
    (answer,) = [answer for _, answer in outbox.answers_of(letter)]
    assert (letter.doc_id, answer.status) == ("odd", None)
    assert panda.rows("stories") == {"a": ["x", "1"], "b": ["y", "3"]}


async def test_after_a_cut_off_the_next_batch_too_waits_for_the_lease(
    panda: RunningPanda, database: Database
) -> None:
    settings = SETTINGS.model_copy(
        update={"shutdown_grace_s": 0.2, "batch_size": 1, "max_batch_size": 1}
    )
    async with delivery_with(panda, database, utcnow, settings) as delivery:
        await database.run(outbox.enqueue, [upsert("s0", "a", "0")], now=utcnow())
        await delivery.run_once()
        changes = [upsert("s1", "a", "1"), upsert("s2", "b", "2")]
        await database.run(outbox.enqueue, changes, now=utcnow())
        await stop_while_held(delivery, panda)
    panda.clear_faults()
    assert panda.rows("stories") == {"s0": ["a", "0"]}, "s2 was not sent"
    claimed_now = await database.run(
        outbox.claim_many, source="stories", now=utcnow(), lease_s=SETTINGS.lease_s, limit=10
    )
    assert claimed_now == [], "the cut-off batch's lease holds the source"
    assert await claimed_after_the_lease(database) == [("s1", 0), ("s2", 0)]


async def test_a_busy_delivery_says_how_it_goes_in_a_line_every_ten_seconds(
    panda: RunningPanda, database: Database, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ticks = itertools.count(0.0, 1.0)  # every look at the timer is a second later
    await enqueue(database, clock, *[upsert(f"r{index:02}", "x", "1") for index in range(30)])
    settings = SETTINGS.model_copy(update={"batch_size": 2, "max_batch_size": 2})
    with caplog.at_level(logging.INFO, logger="service.delivery.engine"):
        async with delivery_with(
            panda, database, clock, settings, timer=lambda: next(ticks)
        ) as delivery:
            assert await delivery.run_once() == 30
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("delivering:")]
    assert all(
        line.startswith("delivering: source=stories dataset=stories delivered=") for line in lines
    )
    assert 1 <= len(lines) < statuses(panda)["202"], "a line a period, not one a batch"
    periods = [float(line.split(" in ")[1].split(" s ")[0]) for line in lines]
    assert min(periods) >= 10, periods
