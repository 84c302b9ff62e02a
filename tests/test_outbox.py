"""`service.store.outbox`: the latest change per document, leased out once, never lost."""

import subprocess
from collections.abc import Sequence
from dataclasses import asdict
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
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlmodel import Session, col, delete, select

from service.changes import Change, Op
from service.store import dead_letters, holders, leases, outbox
from service.store.db import Database
from service.store.outbox import Answer, Claim
from service.store.tables import DeadLetter, DeliveryLease, DocState, OutboxEntry
from tests import strategies
from tests.waiting import wait_until

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
    database: Database,
    *,
    source: str = "a",
    now: datetime = NOW,
    limit: int = 10,
    lease: int | None = None,
) -> list[Claim]:
    return database.run_sync(
        outbox.claim_many, source=source, now=now, lease_s=LEASE_S, limit=limit, lease=lease
    )


def _end(database: Database, held: Claim) -> None:
    database.run_sync(leases.end, held.source, held.lease)


def _changes(claims: Sequence[Claim]) -> list[Change]:
    return [held.change for held in claims]


def _entries(session: Session) -> list[OutboxEntry]:
    return list(session.exec(select(OutboxEntry).order_by(col(OutboxEntry.id))).all())


def _empty(session: Session) -> None:
    for table in (OutboxEntry, DeadLetter, DocState, DeliveryLease):
        session.exec(delete(table))


def test_an_enqueued_change_is_claimed_with_a_lease(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [held] = _claim(database)
    assert held == Claim.holding(
        _upsert("d", "v"),
        entry_id=held.entry_id,
        version=1,
        attempts=0,
        claimed_until=LEASED_UNTIL,
        lease=1,
        accepted_at=NOW,
    )


def test_an_acked_claim_leaves_nothing_pending(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [held] = _claim(database)
    assert database.run_sync(outbox.ack_many, [held]) == 1
    assert database.run_sync(outbox.pending) == 0


def test_the_latest_change_per_document_wins_in_the_order_changes_were_accepted(
    database: Database,
) -> None:
    _enqueue(database, _upsert("d", "1"), _upsert("e", "1"))
    _enqueue(database, _delete("d"), now=LATER)
    claims = _claim(database, now=LATER)
    assert [(held.change, held.version) for held in claims] == [
        (_upsert("e", "1"), 1),
        (_delete("d"), 2),
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
    assert [(c.change, c.version) for c in _claim(database, now=LATER, lease=held.lease)] == [
        (_upsert("d", "new"), 2)
    ]


def test_while_a_delivery_holds_the_lease_no_other_claims_the_source(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    assert len(_claim(database)) == 1
    _enqueue(database, _upsert("e", "v"))
    assert _claim(database, now=LEASED_UNTIL - timedelta(microseconds=1)) == []


def test_under_one_lease_an_entry_is_claimed_once(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"), _upsert("e", "v"))
    [first] = _claim(database, limit=1)
    [second] = _claim(database, lease=first.lease)
    assert (first.change, second.change, second.lease) == (
        _upsert("d", "v"),
        _upsert("e", "v"),
        first.lease,
    )
    assert _claim(database, lease=first.lease) == []


def test_an_ended_lease_lets_the_next_delivery_claim_at_once_and_claims_nothing_more(
    database: Database,
) -> None:
    _enqueue(database, _upsert("d", "v"))
    [first] = _claim(database)
    _end(database, first)
    assert _claim(database, lease=first.lease) == []
    [again] = _claim(database)
    assert (again.entry_id, again.lease) == (first.entry_id, first.lease + 1)


def test_an_expired_lease_is_taken_over_and_its_entries_claimed_again(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [first] = _claim(database)
    [second] = _claim(database, now=LEASED_UNTIL)
    assert (second.entry_id, second.change) == (first.entry_id, first.change)
    assert (second.lease, second.claimed_until) == (
        first.lease + 1,
        LEASED_UNTIL + timedelta(seconds=LEASE_S),
    )


def test_a_kept_lease_holds_the_source_until_it_expires(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [held] = _claim(database)
    database.run_sync(leases.end, held.source, held.lease, keep=True)
    assert _claim(database, now=LEASED_UNTIL - timedelta(microseconds=1)) == []
    assert _changes(_claim(database, now=LEASED_UNTIL)) == [_upsert("d", "v")]


def test_settling_a_claim_whose_lease_was_taken_over_changes_nothing(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [stale] = _claim(database)
    [current] = _claim(database, now=LEASED_UNTIL)
    assert database.run_sync(outbox.ack_many, [stale]) == 0
    database.run_sync(outbox.retry_later, stale, at=LATER, answer=REFUSED, now=NOW)
    assert database.run_sync(outbox.dead_letter, stale, answer=REFUSED, now=NOW) is False
    _end(database, stale)
    assert _claim(database, now=LEASED_UNTIL) == []  # the current lease still holds
    assert database.run_sync(outbox.ack_many, [current]) == 1


def test_claims_follow_the_order_changes_were_accepted_skip_entries_not_due_and_are_limited(
    database: Database,
) -> None:
    _enqueue(database, _upsert("late", "v"), now=LATER)
    _enqueue(database, _upsert("b", "v"))
    _enqueue(database, _upsert("future", "v"), now=LATER + timedelta(days=1))
    _enqueue(database, _upsert("a", "v"))
    first = _claim(database, now=LATER, limit=2)
    assert _changes(first) == [_upsert("late", "v"), _upsert("b", "v")]
    assert _changes(_claim(database, now=LATER, lease=first[0].lease)) == [_upsert("a", "v")]


def test_a_claim_takes_only_the_entries_of_its_source(database: Database) -> None:
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
    _end(database, held)
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
        _end(database, held)
    [entry] = database.run_sync(_entries)
    assert (entry.attempts, outbox.answers_of(entry)) == (
        12,
        [(NOW, Answer(500 + attempt, f"attempt {attempt}")) for attempt in range(2, 12)],
    )


def test_retry_later_after_a_newer_change_leaves_the_newer_change_due_as_it_came(
    database: Database,
) -> None:
    _enqueue(database, _upsert("d", "old"))
    [held] = _claim(database)
    _enqueue(database, _upsert("d", "new"))
    database.run_sync(outbox.retry_later, held, at=LATER, answer=REFUSED, now=NOW)
    _end(database, held)
    [again] = _claim(database)
    assert (again.change, again.version, again.attempts) == (_upsert("d", "new"), 2, 0)
    [entry] = database.run_sync(_entries)
    assert outbox.answers_of(entry) == []


def test_a_newer_change_starts_its_attempts_over(database: Database) -> None:
    _enqueue(database, _upsert("d", "old"))
    [held] = _claim(database)
    database.run_sync(outbox.retry_later, held, at=LATER, answer=REFUSED, now=NOW)
    _end(database, held)
    _enqueue(database, _upsert("d", "new"))
    [again] = _claim(database)
    assert (again.change, again.attempts) == (_upsert("d", "new"), 0)


def test_dead_letter_keeps_every_answer_and_removes_the_entry(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    answers = [Answer(status=None, detail="timeout") for _ in range(10)]
    for answer in answers:
        [held] = _claim(database)
        database.run_sync(outbox.retry_later, held, at=NOW, answer=answer, now=NOW)
        _end(database, held)
    [held] = _claim(database)
    assert database.run_sync(outbox.dead_letter, held, answer=REFUSED, now=LATER) is True
    [letter] = database.run_sync(dead_letters.stored)
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
    assert database.run_sync(dead_letters.stored) == []
    assert _changes(_claim(database, lease=held.lease)) == [_upsert("d", "new")]


def test_claims_left_unsettled_go_out_under_the_next_lease_without_an_attempt(
    database: Database,
) -> None:
    _enqueue(database, _upsert("a", "v"), _upsert("b", "v"))
    claims = _claim(database)
    _end(database, claims[0])
    again = _claim(database)
    assert [(c.change, c.attempts) for c in again] == [(c.change, 0) for c in claims]


def test_a_newer_change_goes_out_after_the_one_in_flight_under_the_same_lease(
    database: Database,
) -> None:
    _enqueue(database, _upsert("d", "old"))
    [held] = _claim(database)
    _enqueue(database, _upsert("d", "new"))
    assert _claim(database) == []
    assert _changes(_claim(database, lease=held.lease)) == [_upsert("d", "new")]


def test_pending_and_dead_letters_count_per_source(database: Database) -> None:
    _enqueue(database, _upsert("d", source="a"), _upsert("e", source="a"), _upsert("d", source="b"))
    [held] = database.run_sync(outbox.claim_many, source="b", now=NOW, lease_s=1, limit=1)
    database.run_sync(outbox.dead_letter, held, answer=REFUSED, now=NOW)
    assert (
        database.run_sync(outbox.pending),
        database.run_sync(outbox.pending, "a"),
        database.run_sync(outbox.pending, "b"),
        [letter.doc_id for letter in database.run_sync(dead_letters.stored, "b")],
        database.run_sync(dead_letters.stored, "a"),
    ) == (2, 2, 0, ["d"], [])


class _Replication(RuleBasedStateMachine):
    """Enqueues interleaved with one delivery's claims, acks, retries, ends of its lease and
    crashes (another delivery takes over once the lease has expired); then the outbox is
    drained.

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
        self.now = NOW
        self.lease: int | None = None
        database.run_sync(_empty)

    @rule(doc_id=st.sampled_from("xy"), op=st.sampled_from(Op))
    def enqueue(self, doc_id: str, op: Op) -> None:
        self.enqueued += 1
        row = ("v",) if op is Op.UPSERT else None
        change = Change("a", doc_id, f"e{self.enqueued}", op, row)
        _enqueue(self.database, change, now=self.now)
        self.latest[doc_id] = change

    @rule(target=in_flight, limit=st.integers(1, 2))
    def claim(self, limit: int) -> MultipleResults[Claim]:
        claims = _claim(self.database, now=self.now, limit=limit, lease=self.lease)
        if claims:
            self.lease = claims[0].lease
        self.unsettled += claims
        return multiple(*claims)

    @rule(held=consumes(in_flight))
    def deliver_and_ack(self, held: Claim) -> None:
        if held not in self.unsettled:
            return  # claimed before a crash: that delivery is gone
        if any(
            claim.doc_id == held.doc_id for claim in self.unsettled[: self.unsettled.index(held)]
        ):
            return  # a delivery sends what it claimed in order: an older claim of it goes first
        # Delivered to PANDA, whether or not a newer change superseded it meanwhile.
        self.unsettled.remove(held)
        self.delivered[held.change.doc_id] = held.change
        self.database.run_sync(outbox.ack_many, [held])

    @rule(held=consumes(in_flight))
    def fail_and_retry(self, held: Claim) -> None:
        if held not in self.unsettled:
            return
        self.unsettled.remove(held)
        self.database.run_sync(outbox.retry_later, held, at=self.now, answer=REFUSED, now=NOW)

    @precondition(lambda self: self.lease is not None and not self.unsettled)
    @rule()
    def end_lease(self) -> None:
        assert self.lease is not None
        self.database.run_sync(leases.end, "a", self.lease)
        self.lease = None

    @rule()
    def crash(self) -> None:
        """The delivery dies with its claims unsettled (none was sent); once its lease has
        expired, the next delivery takes the source over."""
        self.unsettled.clear()
        self.lease = None
        self.now += timedelta(seconds=LEASE_S)

    @invariant()
    def the_outbox_holds_every_latest_change_not_yet_delivered(self) -> None:
        held = {entry.doc_id: outbox.change_of(entry) for entry in self.database.run_sync(_entries)}
        owed = {
            doc: change for doc, change in self.latest.items() if self.delivered.get(doc) != change
        }
        assert {doc: held.get(doc) for doc in owed} == owed

    def teardown(self) -> None:
        """Abandon what is still in flight, drain under a new lease, and compare with the last
        change per document."""
        self.crash()
        for _ in range(10):
            claims = _claim(self.database, now=self.now, limit=100, lease=self.lease)
            for held in claims:
                self.lease = held.lease
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


def _held_by(database: Database, holder: holders.Holder) -> None:
    def write(session: Session) -> None:
        lease = session.get(DeliveryLease, "a")
        assert lease is not None
        lease.holder = holder.text()
        session.add(lease)

    database.run_sync(write)


def _ended_process() -> holders.Holder:
    """The identity a process of this machine had, once it has ended."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        wait_for_start = holders.Holder(**{**asdict(holders.me()), "pid": child.pid})
        started = holders._start_of(child.pid)
    finally:
        child.kill()
        child.wait()
    return holders.Holder(**{**asdict(wait_for_start), "start": started})


def test_a_killed_process_its_parent_has_not_reaped_yet_has_ended() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        holder = holders.Holder(
            **{**asdict(holders.me()), "pid": child.pid, "start": holders._start_of(child.pid)}
        )
        assert not holders.gone(holder)
        child.kill()  # a zombie until wait(): its /proc entry stays, with its start time
        wait_until(lambda: holders.gone(holder), what="the zombie to count as ended")
    finally:
        child.kill()
        child.wait()


def test_a_lease_whose_holder_process_has_ended_is_taken_over_at_once(database: Database) -> None:
    _enqueue(database, _upsert("d", "v"))
    [first] = _claim(database)
    dead = _ended_process()
    _held_by(database, dead)
    assert database.run_sync(leases.held_by, "a", LATER) == (
        LEASED_UNTIL,
        f"{dead.describe()} (a process that has ended: taken over at the next claim)",
    )
    [second] = _claim(database, now=LATER)
    assert (second.entry_id, second.lease) == (first.entry_id, first.lease + 1)


def test_a_lease_held_by_a_live_process_or_another_machine_is_waited_for(
    database: Database,
) -> None:
    _enqueue(database, _upsert("d", "v"))
    _claim(database)
    assert database.run_sync(leases.held_by, "a", LATER) == (
        LEASED_UNTIL,
        holders.me().describe(),
    )
    assert _claim(database, now=LATER) == []
    elsewhere = holders.Holder(**{**asdict(_ended_process()), "boot": "another-machine"})
    _held_by(database, elsewhere)
    assert _claim(database, now=LATER) == []
