"""The outbox's batch forms for delivery's hot path: `claim_many` and `ack_many`, on both stores."""

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, delete

from service import outbox
from service.changes import Change, Op
from service.db import Database, create_engine
from service.tables import OutboxEntry
from tests.strategies import changes

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def upsert(doc_id: str, headline: str = "x", source: str = "stories") -> Change:
    return Change(source, doc_id, doc_id, Op.UPSERT, (headline,))


def claim_many(
    database: Database, *, source: str = "stories", limit: int = 10, at: datetime = NOW
) -> list[outbox.Claim]:
    return database.run_sync(outbox.claim_many, source=source, now=at, lease_s=60, limit=limit)


def enqueue(database: Database, *changes: Change, at: datetime = NOW) -> None:
    database.run_sync(outbox.enqueue, changes, now=at)


def test_claims_are_the_oldest_due_entries_of_one_source_up_to_the_limit(
    database: Database,
) -> None:
    enqueue(database, upsert("late"), at=NOW)
    enqueue(database, upsert("early"), upsert("other", source="other"), at=NOW - timedelta(1))
    enqueue(database, upsert("future"), at=NOW + timedelta(1))
    assert [held.change.doc_id for held in claim_many(database, limit=1)] == ["early"]
    assert [held.change.doc_id for held in claim_many(database)] == ["late"]


def test_claims_hold_the_change_its_version_and_attempts(database: Database) -> None:
    enqueue(database, upsert("a"), Change("stories", "b", "b", Op.DELETE))
    claims = claim_many(database)
    assert [(held.change, held.version, held.attempts) for held in claims] == [
        (upsert("a"), 1, 0),
        (Change("stories", "b", "b", Op.DELETE), 1, 0),
    ]
    assert {held.claimed_until for held in claims} == {NOW + timedelta(seconds=60)}
    assert claim_many(database) == [], "leased entries are not claimed again"
    assert len(claim_many(database, at=NOW + timedelta(seconds=61))) == 2, "until it expires"


def clear(session: Session) -> None:
    session.exec(delete(OutboxEntry))


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=changes(sources=st.just("stories")))
def test_any_change_is_claimed_as_it_went_in(database: Database, change: Change) -> None:
    database.run_sync(clear)
    enqueue(database, change)
    assert [held.change for held in claim_many(database)] == [change]


@pytest.mark.anyio
async def test_concurrent_claims_never_share_an_entry(database: Database) -> None:
    enqueue(database, *(upsert(f"d{number}") for number in range(30)))
    claims: list[outbox.Claim] = []

    async def claim_some() -> None:
        claims.extend(
            await database.run(outbox.claim_many, source="stories", now=NOW, lease_s=60, limit=4)
        )

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(claim_some)
    assert sorted(held.change.doc_id for held in claims) == sorted(f"d{n}" for n in range(30))


@pytest.mark.postgres
def test_postgres_claims_skip_entries_another_transaction_is_claiming(
    migrated_postgres_url: str,
) -> None:
    engine = create_engine(migrated_postgres_url)
    Database(engine).run_sync(outbox.enqueue, [upsert("a"), upsert("b"), upsert("c")], now=NOW)
    with Session(engine) as first, first.begin():
        in_flight = outbox.claim_many(first, source="stories", now=NOW, lease_s=60, limit=2)
        with Session(engine) as second, second.begin():
            # Without SKIP LOCKED this would wait for `first` to commit: a deadlock here.
            beside = outbox.claim_many(second, source="stories", now=NOW, lease_s=60, limit=10)
    engine.dispose()
    assert ([held.change for held in in_flight], [held.change for held in beside]) == (
        [upsert("a"), upsert("b")],
        [upsert("c")],
    )


def test_an_ack_removes_the_entries_that_still_hold_their_claimed_change(
    database: Database,
) -> None:
    enqueue(database, upsert("a"), upsert("b"))
    claims = claim_many(database)
    assert database.run_sync(outbox.ack_many, claims) == 2
    assert database.run_sync(outbox.pending, None) == 0


def test_an_ack_keeps_a_newer_change_and_frees_it_to_go_out_next(database: Database) -> None:
    enqueue(database, upsert("a", "old"), upsert("b"))
    claims = claim_many(database)
    enqueue(database, upsert("a", "new"))
    assert database.run_sync(outbox.ack_many, claims) == 1
    (newer,) = claim_many(database)
    assert (newer.change, newer.version) == (upsert("a", "new"), 2)


def test_an_ack_of_a_lost_lease_changes_nothing(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(database, upsert("a"))
    stale = claim_many(database)
    current = claim_many(database, at=NOW + timedelta(seconds=61))
    assert database.run_sync(outbox.ack_many, stale) == 0
    assert "outbox lease lost" in caplog.text
    assert "entries=1 doc_ids=['a']" in caplog.text, "names the document taken over"
    assert database.run_sync(outbox.ack_many, current) == 1


def test_an_ack_of_nothing_removes_nothing(database: Database) -> None:
    assert database.run_sync(outbox.ack_many, []) == 0
