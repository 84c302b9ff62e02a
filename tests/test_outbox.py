"""`service.outbox`: the latest change per document, leased out once, never lost to a stale ack."""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlmodel import Session, col, delete, select

from service import outbox
from service.changes import Change, Op
from service.db import Database
from service.outbox import Answer, Claim
from service.tables import DeadLetter, OutboxEntry
from tests import strategies

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
LEASE_S = 60.0
LEASED_UNTIL = NOW + timedelta(seconds=LEASE_S)
LATER = NOW + timedelta(seconds=1)
REFUSED = Answer(status=400, detail="Invalid row")


def _upsert(doc_id: str, *values: str, source: str = "a") -> Change:
    return Change(source, doc_id, f"x{doc_id}", Op.UPSERT, values)


def _delete(doc_id: str, source: str = "a") -> Change:
    return Change(source, doc_id, f"x{doc_id}", Op.DELETE)


def _enqueue(database: Database, *changes: Change, now: datetime = NOW) -> None:
    database.run_sync(outbox.enqueue, changes, now=now)


def _claim(
    database: Database, *, source: str = "a", now: datetime = NOW, limit: int = 10
) -> list[Claim]:
    return database.run_sync(
        outbox.claim_many, source=source, now=now, lease_s=LEASE_S, limit=limit
    )


def _changes(claims: Sequence[Claim]) -> list[Change]:
    return [held.change for held in claims]


def _entries(session: Session) -> list[OutboxEntry]:
    return list(session.exec(select(OutboxEntry).order_by(col(OutboxEntry.id))).all())


def _empty(session: Session) -> None:
    session.exec(delete(OutboxEntry))
    session.exec(delete(DeadLetter))


def test_an_enqueued_change_is_claimed_with_a_lease(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [held] = _claim(database)
    assert held == Claim.holding(
        _upsert("d", "v"), entry_id=held.entry_id, version=1, attempts=0, claimed_until=LEASED_UNTIL
    )


def test_an_acked_claim_leaves_nothing_pending(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [held] = _claim(database)
    assert database.run_sync(outbox.ack_many, [held]) == 1
    assert database.run_sync(outbox.pending) == 0


def test_the_latest_change_per_document_wins(database: Database) -> None:
    _enqueue(database, _upsert("d", "1"), _upsert("e", "1"))
    _enqueue(database, _delete("d"), now=LATER)
    claims = _claim(database, now=LATER)
    assert [(held.change, held.version) for held in claims] == [
        (_delete("d"), 2),
        (_upsert("e", "1"), 1),
    ]


def test_within_one_call_the_last_change_per_document_wins(database: Database) -> None:
    _enqueue(database, _upsert("d", "1"), _delete("d"), _upsert("d", "3"))
    assert [(held.change, held.version) for held in _claim(database)] == [(_upsert("d", "3"), 1)]


def test_documents_are_told_apart_by_source(database: Database) -> None:
    _enqueue(database, _upsert("d", "1", source="a"), _upsert("d", "2", source="b"))
    assert [_changes(_claim(database, source=source)) for source in "ab"] == [
        [_upsert("d", "1", source="a")],
        [_upsert("d", "2", source="b")],
    ]


def test_rows_round_trip_exactly(database: Database) -> None:
    row = ("", "é", "\x00", "\ud800", '"quoted", [json]', "x" * 10_000)
    _enqueue(database, _upsert("d", *row))
    assert _changes(_claim(database)) == [_upsert("d", *row)]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(change=strategies.changes())
def test_any_change_comes_back_as_it_went_in(database: Database, change: Change) -> None:
    database.run_sync(_empty)
    _enqueue(database, change)
    assert _changes(_claim(database, source=change.source)) == [change]


def test_an_ack_after_a_newer_change_keeps_it_and_it_goes_out_next(database: Database) -> None:
    _enqueue(database, _upsert("d", "old"))
    [held] = _claim(database)
    _enqueue(database, _upsert("d", "new"), now=LATER)
    assert _claim(database, now=LATER) == []
    assert database.run_sync(outbox.ack_many, [held]) == 0
    assert [(c.change, c.version) for c in _claim(database, now=LATER)] == [
        (_upsert("d", "new"), 2)
    ]


def test_a_claimed_entry_is_not_claimed_again(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    assert len(_claim(database)) == 1
    assert _claim(database, now=LEASED_UNTIL - timedelta(microseconds=1)) == []


def test_an_expired_lease_makes_the_entry_claimable_again(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [first] = _claim(database)
    [second] = _claim(database, now=LEASED_UNTIL)
    assert (second.entry_id, second.change) == (first.entry_id, first.change)
    assert second.claimed_until == LEASED_UNTIL + timedelta(seconds=LEASE_S)


def test_settling_a_claim_whose_lease_was_taken_over_changes_nothing(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [stale] = _claim(database)
    [current] = _claim(database, now=LEASED_UNTIL)
    assert database.run_sync(outbox.ack_many, [stale]) == 0
    database.run_sync(outbox.release, [stale])
    database.run_sync(outbox.retry_later, stale, at=LATER, answer=REFUSED, now=NOW)
    assert database.run_sync(outbox.dead_letter, stale, answer=REFUSED, now=NOW) is False
    assert database.run_sync(outbox.ack_many, [current]) == 1


def test_claims_are_oldest_due_first_and_limited(database: Database) -> None:
    _enqueue(database, _upsert("late", "v"), now=LATER)
    _enqueue(database, _upsert("b", "v"))
    _enqueue(database, _upsert("a", "v"))
    _enqueue(database, _upsert("future", "v"), now=LATER + timedelta(days=1))
    assert _changes(_claim(database, now=LATER, limit=2)) == [_upsert("b", "v"), _upsert("a", "v")]
    assert _changes(_claim(database, now=LATER)) == [_upsert("late", "v")]


def test_a_claim_leases_only_the_entries_of_its_source(database: Database) -> None:
    _enqueue(database, _upsert("d", source="a"), _upsert("d", source="b"))
    _enqueue(database, _upsert("d", source="c"))
    assert _changes(_claim(database, source="b")) == [_upsert("d", source="b")]
    assert [_changes(_claim(database, source=source)) for source in "abc"] == [
        [_upsert("d", source="a")],
        [],
        [_upsert("d", source="c")],
    ]


def test_retry_later_counts_the_attempt_and_delays_the_entry(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [held] = _claim(database)
    timeout = Answer(status=None, detail="timeout")
    database.run_sync(outbox.retry_later, held, at=LATER, answer=timeout, now=NOW)
    assert _claim(database, now=LATER - timedelta(microseconds=1)) == []
    [again] = _claim(database, now=LATER)
    assert (again.version, again.attempts) == (1, 1)
    [entry] = database.run_sync(_entries)
    assert outbox.answers_of(entry) == [(NOW, timeout)]


def test_retry_later_keeps_the_last_ten_answers(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    for attempt in range(12):
        [held] = _claim(database)
        answer = Answer(status=500 + attempt, detail=f"attempt {attempt}")
        database.run_sync(outbox.retry_later, held, at=NOW, answer=answer, now=NOW)
    [entry] = database.run_sync(_entries)
    assert (entry.attempts, outbox.answers_of(entry)) == (
        12,
        [(NOW, Answer(500 + attempt, f"attempt {attempt}")) for attempt in range(2, 12)],
    )


def test_retry_later_after_a_newer_change_delays_it_without_counting(database: Database) -> None:
    _enqueue(database, _upsert("d", "old"))
    [held] = _claim(database)
    _enqueue(database, _upsert("d", "new"))
    database.run_sync(outbox.retry_later, held, at=LATER, answer=REFUSED, now=NOW)
    assert _claim(database) == []
    [again] = _claim(database, now=LATER)
    assert (again.change, again.version, again.attempts) == (_upsert("d", "new"), 2, 0)
    [entry] = database.run_sync(_entries)
    assert outbox.answers_of(entry) == []


def test_a_newer_change_starts_its_attempts_over(database: Database) -> None:
    _enqueue(database, _upsert("d", "old"))
    [held] = _claim(database)
    database.run_sync(outbox.retry_later, held, at=LATER, answer=REFUSED, now=NOW)
    _enqueue(database, _upsert("d", "new"))
    [again] = _claim(database)
    assert (again.change, again.attempts) == (_upsert("d", "new"), 0)


def test_dead_letter_keeps_every_answer_and_removes_the_entry(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    answers = [Answer(status=None, detail="timeout") for _ in range(10)]
    for answer in answers:
        [held] = _claim(database)
        database.run_sync(outbox.retry_later, held, at=NOW, answer=answer, now=NOW)
    [held] = _claim(database)
    assert database.run_sync(outbox.dead_letter, held, answer=REFUSED, now=LATER) is True
    [letter] = database.run_sync(outbox.dead_letters)
    assert (
        outbox.change_of(letter),
        letter.version,
        letter.attempts,
        outbox.answers_of(letter),
        letter.created_at,
    ) == (
        _upsert("d", "v"),
        1,
        11,
        [(NOW, answer) for answer in answers] + [(LATER, REFUSED)],
        LATER,
    )
    assert database.run_sync(outbox.pending) == 0


def test_dead_letter_after_a_newer_change_keeps_it_instead(database: Database) -> None:
    _enqueue(database, _upsert("d", "old"))
    [held] = _claim(database)
    _enqueue(database, _upsert("d", "new"))
    assert database.run_sync(outbox.dead_letter, held, answer=REFUSED, now=NOW) is False
    assert database.run_sync(outbox.dead_letters) == []
    assert _changes(_claim(database)) == [_upsert("d", "new")]


def test_release_gives_leases_back_without_counting_an_attempt(database: Database) -> None:
    _enqueue(database, _upsert("a", "v"), _upsert("b", "v"))
    claims = _claim(database)
    database.run_sync(outbox.release, claims)
    again = _claim(database)
    assert [(c.change, c.attempts) for c in again] == [(c.change, 0) for c in claims]


def test_a_newer_change_does_not_end_a_lease_in_flight(database: Database) -> None:
    _enqueue(database, _upsert("d", "old"))
    _claim(database)
    _enqueue(database, _upsert("d", "new"))
    assert _claim(database) == []


def test_pending_and_dead_letters_count_per_source(database: Database) -> None:
    _enqueue(database, _upsert("d", source="a"), _upsert("e", source="a"), _upsert("d", source="b"))
    [held] = database.run_sync(outbox.claim_many, source="b", now=NOW, lease_s=1, limit=1)
    database.run_sync(outbox.dead_letter, held, answer=REFUSED, now=NOW)
    assert (
        database.run_sync(outbox.pending),
        database.run_sync(outbox.pending, "a"),
        database.run_sync(outbox.pending, "b"),
        [letter.doc_id for letter in database.run_sync(outbox.dead_letters, "b")],
        database.run_sync(outbox.dead_letters, "a"),
    ) == (2, 2, 0, ["d"], [])


class _Replication(RuleBasedStateMachine):
    """Enqueues interleaved with claims, acks and retries; then the outbox is drained.

    Two documents, so newer changes often arrive while an older one is in flight; every
    change has its own external_id, so any two can be told apart.
    """

    in_flight = Bundle("in_flight")

    def __init__(self, database: Database) -> None:
        super().__init__()
        self.database = database
        self.latest: dict[str, Change] = {}
        self.delivered: dict[str, Change] = {}
        self.unsettled: list[Claim] = []
        self.enqueued = 0
        database.run_sync(_empty)

    @rule(doc_id=st.sampled_from("xy"), op=st.sampled_from(Op))
    def enqueue(self, doc_id: str, op: Op) -> None:
        self.enqueued += 1
        row = ("v",) if op is Op.UPSERT else None
        change = Change("a", doc_id, f"e{self.enqueued}", op, row)
        _enqueue(self.database, change)
        self.latest[doc_id] = change

    @rule(target=in_flight, limit=st.integers(1, 2))
    def claim(self, limit: int) -> MultipleResults[Claim]:
        claims = _claim(self.database, limit=limit)
        self.unsettled += claims
        return multiple(*claims)

    @rule(held=consumes(in_flight))
    def deliver_and_ack(self, held: Claim) -> None:
        # Delivered to PANDA, whether or not a newer change superseded it meanwhile.
        self.unsettled.remove(held)
        self.delivered[held.change.doc_id] = held.change
        self.database.run_sync(outbox.ack_many, [held])

    @rule(held=consumes(in_flight))
    def fail_and_retry(self, held: Claim) -> None:
        self.unsettled.remove(held)
        self.database.run_sync(outbox.retry_later, held, at=NOW, answer=REFUSED, now=NOW)

    @invariant()
    def the_outbox_holds_every_latest_change_not_yet_delivered(self) -> None:
        held = {entry.doc_id: outbox.change_of(entry) for entry in self.database.run_sync(_entries)}
        owed = {
            doc: change for doc, change in self.latest.items() if self.delivered.get(doc) != change
        }
        assert {doc: held.get(doc) for doc in owed} == owed

    def teardown(self) -> None:
        """Release what is still in flight, drain, and compare with the last change per doc."""
        self.database.run_sync(outbox.release, self.unsettled)
        for _ in range(10):
            claims = _claim(self.database, limit=100)
            for held in claims:
                self.delivered[held.change.doc_id] = held.change
            self.database.run_sync(outbox.ack_many, claims)
        assert (self.delivered, self.database.run_sync(outbox.pending)) == (self.latest, 0)


def test_draining_delivers_exactly_the_last_change_per_document(database: Database) -> None:
    class Replication(_Replication):
        def __init__(self) -> None:
            super().__init__(database)

    run_state_machine_as_test(
        Replication,
        settings=settings(max_examples=40, stateful_step_count=20, deadline=None),
    )
