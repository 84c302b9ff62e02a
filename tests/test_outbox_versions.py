"""`service.store.outbox` with document states: stale changes skipped, versions never go back."""

from datetime import UTC, datetime
from itertools import pairwise

import anyio
import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlmodel import Session, delete

from service.changes import Change, Op, SourceVersion
from service.store import dead_letters, leases, outbox
from service.store.db import Database, alembic_config, migrate
from service.store.outbox import Answer, Claim, Enqueued
from service.store.tables import DeadLetter, DeliveryLease, DocState, OutboxEntry

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
REFUSED = Answer(status=400, detail="Invalid row")


def upsert(doc_id: str, value: str, version: object = None) -> Change:
    stamp = None if version is None else SourceVersion.of(version)
    return Change("a", doc_id, f"x{doc_id}", Op.UPSERT, (value,), source_version=stamp)


def remove(doc_id: str, version: object = None) -> Change:
    stamp = None if version is None else SourceVersion.of(version)
    return Change("a", doc_id, f"x{doc_id}", Op.DELETE, source_version=stamp)


def enqueue(database: Database, *changes: Change) -> Enqueued:
    return database.run_sync(outbox.enqueue, changes, now=NOW)


def claim(database: Database) -> list[Claim]:
    return database.run_sync(outbox.claim_many, source="a", now=NOW, lease_s=60, limit=100)


def deliver(database: Database) -> list[tuple[Change, int]]:
    """Claim and ack everything due, then end the lease; the changes and versions that went
    out."""
    claims = claim(database)
    database.run_sync(outbox.ack_many, claims)
    if claims:
        database.run_sync(leases.end, "a", claims[0].lease)
    return [(held.change, held.version) for held in claims]


def current(database: Database, doc_id: str) -> int | None:
    return database.run_sync(outbox.current_version, "a", doc_id)


def test_a_change_older_than_the_last_accepted_one_is_stale_and_changes_nothing(
    database: Database,
) -> None:
    assert enqueue(database, upsert("d", "new", 2)) == Enqueued(accepted=1, stale=0)
    assert enqueue(database, upsert("d", "old", 1)) == Enqueued(accepted=0, stale=1, stale_at=(0,))
    assert deliver(database) == [(upsert("d", "new", 2), 1)]


def test_a_late_upsert_older_than_a_delivered_delete_never_brings_the_row_back(
    database: Database,
) -> None:
    enqueue(database, upsert("d", "first", 1))
    deliver(database)
    enqueue(database, remove("d", 3))
    assert deliver(database) == [(remove("d", 3), 2)]
    assert enqueue(database, upsert("d", "late", 2)) == Enqueued(accepted=0, stale=1, stale_at=(0,))
    assert (deliver(database), database.run_sync(outbox.pending)) == ([], 0)


def test_enqueueing_nothing_changes_nothing(database: Database) -> None:
    assert (enqueue(database), database.run_sync(outbox.pending)) == (Enqueued(0, 0), 0)


def test_an_equal_version_is_accepted(database: Database) -> None:
    enqueue(database, upsert("d", "one", 5))
    assert enqueue(database, remove("d", 5.0)) == Enqueued(accepted=1, stale=0)
    assert deliver(database) == [(remove("d", 5.0), 2)]


def test_a_change_without_a_version_is_never_stale_and_the_newest_version_is_kept(
    database: Database,
) -> None:
    enqueue(database, upsert("d", "v5", 5))
    assert enqueue(database, upsert("d", "unversioned")) == Enqueued(accepted=1, stale=0)
    assert enqueue(database, upsert("d", "v4", 4)) == Enqueued(accepted=0, stale=1, stale_at=(0,))
    assert deliver(database) == [(upsert("d", "unversioned"), 2)]


def test_times_compare_as_instants_and_a_number_does_not_compare_with_a_time(
    database: Database,
) -> None:
    enqueue(database, upsert("d", "noon", "2026-01-02T12:00:00+00:00"))
    assert enqueue(database, upsert("d", "earlier", "2026-01-02T13:00:00+02:00")).stale == 1
    assert enqueue(database, upsert("d", "a number", 1)) == Enqueued(accepted=1, stale=0)
    assert deliver(database) == [(upsert("d", "a number", 1), 2)]


def test_within_one_call_a_stale_change_is_skipped_too(database: Database) -> None:
    result = enqueue(database, upsert("d", "v2", 2), upsert("d", "v1", 1), upsert("e", "x", 1))
    assert result == Enqueued(accepted=2, stale=1, stale_at=(1,))
    assert deliver(database) == [(upsert("d", "v2", 2), 1), (upsert("e", "x", 1), 1)]


def test_an_entry_made_again_after_an_ack_has_a_higher_version_than_before(
    database: Database,
) -> None:
    enqueue(database, upsert("d", "1"))
    enqueue(database, upsert("d", "2"))
    assert deliver(database) == [(upsert("d", "2"), 2)]
    enqueue(database, upsert("d", "3"))
    assert deliver(database) == [(upsert("d", "3"), 3)]


def test_current_version_follows_accepted_changes_only(database: Database) -> None:
    before = current(database, "d")
    enqueue(database, upsert("d", "1", 1), upsert("d", "2", 2))
    after_one_call = current(database, "d")
    enqueue(database, upsert("d", "0", 0))
    assert (before, after_one_call, current(database, "d")) == (None, 1, 1)


def test_a_dead_letter_holds_the_current_version_until_a_newer_change_is_accepted(
    database: Database,
) -> None:
    enqueue(database, upsert("d", "refused", "2026-01-02T03:04:05Z"))
    [held] = claim(database)
    database.run_sync(outbox.dead_letter, held, answer=REFUSED, now=NOW)
    [letter] = database.run_sync(dead_letters.stored)
    replayable = letter.version == current(database, "d")
    enqueue(database, upsert("d", "newer", "2026-01-02T03:04:06Z"))
    assert (replayable, letter.version == current(database, "d")) == (True, False)
    assert outbox.change_of(letter) == upsert("d", "refused", "2026-01-02T03:04:05Z")


@pytest.mark.anyio
async def test_concurrent_enqueues_of_one_new_document_get_distinct_versions(
    database: Database,
) -> None:
    async def enqueue_one(number: int) -> None:
        await database.run(outbox.enqueue, [upsert("d", str(number))], now=NOW)

    async with anyio.create_task_group() as group:
        for number in range(12):
            group.start_soon(enqueue_one, number)
    versions = [version for _, version in deliver(database)]
    assert (versions, current(database, "d")) == ([12], 12)


def _forget_everything(session: Session) -> None:
    session.exec(delete(OutboxEntry))
    session.exec(delete(DeadLetter))
    session.exec(delete(DocState))
    session.exec(delete(DeliveryLease))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(Op), st.integers(0, 5), st.booleans()), min_size=1, max_size=12
    )
)
def test_what_gets_delivered_last_is_the_last_change_with_the_highest_version(
    database: Database, steps: list[tuple[Op, int, bool]]
) -> None:
    """Changes arrive out of order, with deliveries in between; PANDA ends up with the last
    change among those with the highest version, and no stale one is ever delivered."""
    database.run_sync(_forget_everything)
    delivered: list[Change] = []
    newest: int | None = None
    expected: Change | None = None
    for number, (op, version, deliver_now) in enumerate(steps):
        change = upsert("d", str(number), version) if op is Op.UPSERT else remove("d", version)
        accepted = newest is None or version >= newest
        assert enqueue(database, change) == Enqueued(
            accepted=int(accepted), stale=int(not accepted), stale_at=() if accepted else (0,)
        )
        if accepted:
            newest, expected = version, change
        if deliver_now:
            delivered += [sent for sent, _ in deliver(database)]
    delivered += [sent for sent, _ in deliver(database)]
    assert delivered[-1] == expected
    assert all(
        later.source_version is not None
        and earlier.source_version is not None
        and not later.source_version.older_than(earlier.source_version)
        for earlier, later in pairwise(delivered)
    )


def test_an_upgrade_starts_document_versions_above_every_version_in_the_store(
    database_url: str,
) -> None:
    command.upgrade(alembic_config(database_url), "0001")
    database = Database.open(database_url)
    database.run_sync(_rows_of_revision_0001)
    migrate(database_url)
    enqueue(database, upsert("d", "after the upgrade"))
    versions = (current(database, "d"), current(database, "e"), current(database, "f"))
    database.close()
    assert versions == (8, 2, None)


def _rows_of_revision_0001(session: Session) -> None:
    """Outbox entries for d (version 3) and e (2), and a dead letter of d (7)."""
    at = "2026-01-02 03:04:05"
    connection = session.connection()
    for values in ("'a', 'd', 'xd', 'delete', NULL, 3", "'a', 'e', 'xe', 'delete', NULL, 2"):
        connection.execute(
            text(
                "INSERT INTO outbox_entry (source, doc_id, external_id, op, row, version,"
                " attempts, answers, next_attempt_at, created_at, updated_at) VALUES"
                f" ({values}, 0, '[]', '{at}', '{at}', '{at}')"
            )
        )
    connection.execute(
        text(
            "INSERT INTO dead_letter (source, doc_id, external_id, op, row, version, attempts,"
            f" answers, created_at) VALUES ('a', 'd', 'xd', 'delete', NULL, 7, 1, '[]', '{at}')"
        )
    )


def test_an_upgrade_to_one_lease_per_source_keeps_every_queued_change_replaceable(
    database_url: str,
) -> None:
    database = _store_at_revision_0004(database_url)
    migrate(database_url)
    enqueue(database, upsert("d", "after the upgrade"))
    delivered = deliver(database)
    database.close()
    # e's lease from before the upgrade is gone: it goes out again (the same row, harmless).
    assert delivered == [(remove("e"), 2), (upsert("d", "after the upgrade"), 4)]


def _store_at_revision_0004(database_url: str) -> Database:
    command.upgrade(alembic_config(database_url), "0004")
    database = Database.open(database_url)
    database.run_sync(_rows_of_revision_0004)
    return database


def _rows_of_revision_0004(session: Session) -> None:
    """Outbox entries for d (version 3) and e (2, leased), with their document states."""
    at = "2026-01-02 03:04:05"
    connection = session.connection()
    for doc_id, version, until in (("d", 3, "NULL"), ("e", 2, f"'{at}'")):
        connection.execute(
            text(
                "INSERT INTO outbox_entry (source, doc_id, external_id, op, row, version,"
                " attempts, answers, next_attempt_at, claimed_until, claimed_version,"
                " created_at, updated_at) VALUES"
                f" ('a', '{doc_id}', 'x{doc_id}', 'delete', NULL, {version}, 0, '[]', '{at}',"
                f" {until}, {version}, '{at}', '{at}')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO doc_state (source, doc_id, version, updated_at) VALUES"
                f" ('a', '{doc_id}', {version}, '{at}')"
            )
        )


def test_after_an_upgrade_to_one_lease_per_source_no_entry_id_is_issued_twice(
    database_url: str,
) -> None:
    database = _store_at_revision_0004(database_url)
    database.run_sync(_forget_the_newest_entry)
    issued = database.run_sync(_highest_entry_id_issued)
    migrate(database_url)
    enqueue(database, upsert("new", "after the upgrade"))
    [new] = [held for held in claim(database) if held.doc_id == "new"]
    database.close()
    assert new.entry_id > issued


def _forget_the_newest_entry(session: Session) -> None:
    session.connection().execute(text("DELETE FROM outbox_entry WHERE doc_id = 'e'"))


def _highest_entry_id_issued(session: Session) -> int:
    # e was the last entry inserted, and is gone.
    return (
        int(session.connection().execute(text("SELECT max(id) FROM outbox_entry")).scalar_one()) + 1
    )
