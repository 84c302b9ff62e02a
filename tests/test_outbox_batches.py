"""The outbox's batch forms for delivery's hot path: `claim_many` and `ack_many`, on both stores."""

import threading
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, delete, text

from service.changes import Change, Op
from service.store import outbox
from service.store.db import Database, create_engine
from service.store.tables import DeliveryLease, DocState, OutboxEntry
from tests.fixtures.service import wait_until
from tests.strategies import changes

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def upsert(doc_id: str, headline: str = "x", source: str = "stories") -> Change:
    return Change(source, doc_id, doc_id, Op.UPSERT, (headline,))


def claim_many(
    database: Database,
    *,
    source: str = "stories",
    limit: int = 10,
    at: datetime = NOW,
    lease: int | None = None,
) -> list[outbox.Claim]:
    return database.run_sync(
        outbox.claim_many, source=source, now=at, lease_s=60, limit=limit, lease=lease
    )


def enqueue(database: Database, *changes: Change, at: datetime = NOW) -> None:
    database.run_sync(outbox.enqueue, changes, now=at)


def test_claims_are_the_due_entries_of_one_source_in_acceptance_order_up_to_the_limit(
    database: Database,
) -> None:
    enqueue(database, upsert("first"), at=NOW)
    enqueue(database, upsert("second"), upsert("other", source="other"), at=NOW - timedelta(1))
    enqueue(database, upsert("future"), at=NOW + timedelta(1))
    enqueue(database, upsert("last"), at=NOW)
    [first] = claim_many(database, limit=1)
    assert first.change.doc_id == "first"
    rest = claim_many(database, lease=first.lease)
    assert [held.change.doc_id for held in rest] == ["second", "last"]


def test_claims_hold_the_change_its_version_and_attempts(database: Database) -> None:
    enqueue(database, upsert("a"), Change("stories", "b", "b", Op.DELETE))
    claims = claim_many(database)
    assert [(held.change, held.version, held.attempts) for held in claims] == [
        (upsert("a"), 1, 0),
        (Change("stories", "b", "b", Op.DELETE), 1, 0),
    ]
    assert {held.claimed_until for held in claims} == {NOW + timedelta(seconds=60)}
    assert claim_many(database) == [], "no other delivery claims while the lease holds"
    assert len(claim_many(database, at=NOW + timedelta(seconds=61))) == 2, "until it expires"


def clear(session: Session) -> None:
    for table in (OutboxEntry, DocState, DeliveryLease):
        session.exec(delete(table))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(change=changes(sources=st.just("stories")))
def test_any_change_is_claimed_as_it_went_in(database: Database, change: Change) -> None:
    database.run_sync(clear)
    enqueue(database, change)
    assert [held.change for held in claim_many(database)] == [change]


@pytest.mark.anyio
async def test_of_concurrent_deliveries_one_takes_the_source_and_the_others_nothing(
    database: Database,
) -> None:
    enqueue(database, *(upsert(f"d{number}") for number in range(30)))
    batches: list[list[outbox.Claim]] = []

    async def claim_some() -> None:
        batches.append(
            await database.run(outbox.claim_many, source="stories", now=NOW, lease_s=60, limit=4)
        )

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(claim_some)
    taken = [[held.change.doc_id for held in batch] for batch in batches if batch]
    # One enqueue appends its changes in document order.
    assert taken == [sorted(f"d{n}" for n in range(30))[:4]]


def _waiting_on_a_lock(session: Session) -> bool:
    waiting = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    return bool(session.execute(waiting).scalar_one())


@pytest.mark.postgres
def test_postgres_a_claim_beside_another_one_waits_for_it_and_finds_the_source_taken(
    migrated_postgres_url: str,
) -> None:
    engine = create_engine(migrated_postgres_url)
    database = Database(engine)
    database.run_sync(outbox.enqueue, [upsert("a"), upsert("b"), upsert("c")], now=NOW)
    beside: list[list[outbox.Claim]] = []
    with Session(engine) as first, first.begin():
        in_flight = outbox.claim_many(first, source="stories", now=NOW, lease_s=60, limit=2)
        second = threading.Thread(
            target=lambda: beside.append(
                database.run_sync(outbox.claim_many, source="stories", now=NOW, lease_s=60, limit=9)
            )
        )
        second.start()
        # Without the lease row's lock, the second claim would not wait: it would see the
        # source free (the first claim is not committed) and take the same entries.
        wait_until(lambda: database.run_sync(_waiting_on_a_lock), what="the second claim to wait")
    second.join(timeout=30)
    engine.dispose()
    assert ([held.change for held in in_flight], beside) == ([upsert("a"), upsert("b")], [[]])


def test_an_ack_removes_the_entries_that_still_hold_their_claimed_change(
    database: Database,
) -> None:
    enqueue(database, upsert("a"), upsert("b"))
    claims = claim_many(database)
    assert database.run_sync(outbox.ack_many, claims) == 2
    assert database.run_sync(outbox.pending, None) == 0


def test_an_ack_keeps_a_newer_change_and_it_goes_out_next(database: Database) -> None:
    enqueue(database, upsert("a", "old"), upsert("b"))
    claims = claim_many(database)
    enqueue(database, upsert("a", "new"))
    assert database.run_sync(outbox.ack_many, claims) == 1
    (newer,) = claim_many(database, lease=claims[0].lease)
    assert (newer.change, newer.version) == (upsert("a", "new"), 2)


def test_an_ack_of_a_lost_lease_changes_nothing(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(database, upsert("a"))
    stale = claim_many(database)
    current = claim_many(database, at=NOW + timedelta(seconds=61))
    assert database.run_sync(outbox.ack_many, stale) == 0
    assert "delivery lease lost, another delivery took the source over: source=stories" in (
        caplog.text
    )
    assert database.run_sync(outbox.ack_many, current) == 1


def test_an_ack_of_nothing_removes_nothing(database: Database) -> None:
    assert database.run_sync(outbox.ack_many, []) == 0


def test_an_ack_of_claims_of_two_sources_removes_the_entries_of_both(database: Database) -> None:
    enqueue(database, upsert("a"), upsert("b", source="other"))
    claims = claim_many(database) + claim_many(database, source="other")
    assert database.run_sync(outbox.ack_many, claims) == 2
    assert database.run_sync(outbox.pending, None) == 0
