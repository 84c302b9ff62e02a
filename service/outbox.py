"""The outbox: the latest undelivered change per (source, doc_id), leased out to deliveries.

Functions run inside the caller's transaction on its `Session`: they never commit and never
call PANDA. One change per document is in flight; a change that arrives meanwhile survives.
"""

import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement
from sqlmodel import Session, col, func, or_, select, update

from service.changes import Change, Op
from service.db import dialect_insert
from service.tables import DeadLetter, OutboxEntry

log = logging.getLogger(__name__)

# How many delivery answers an outbox entry keeps (the newest).
MAX_ANSWERS = 10
# What a newer change for the same document replaces in its entry (`version` is bumped).
_REPLACED = ("external_id", "op", "row", "attempts", "answers", "next_attempt_at", "updated_at")


@dataclass(frozen=True)
class Claim:
    """A leased outbox entry: deliver `change`, then settle the claim exactly once.

    Settle with `ack`, `retry_later`, `dead_letter` or `release`. `claimed_until` identifies
    the lease: once it has expired and another claim has taken the entry, settling this claim
    changes nothing. Deliver well within the lease, or two deliveries of one document may race.
    """

    entry_id: int
    version: int
    change: Change
    attempts: int
    claimed_until: datetime


@dataclass(frozen=True)
class Answer:
    """What one delivery attempt got back: an HTTP status (None if there was none) and detail."""

    status: int | None
    detail: str


def _json(value: object) -> str:
    # ASCII escapes, so any Python string (even a lone surrogate from a JSON `\ud800`) stores
    # as text on both databases and reads back identical.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def _entry_values(change: Change, now: datetime) -> dict[str, Any]:
    return {
        "source": change.source,
        "doc_id": change.doc_id,
        "external_id": change.external_id,
        "op": change.op.value,
        "row": None if change.row is None else _json(list(change.row)),
        "version": 1,
        "attempts": 0,
        "answers": "[]",
        "next_attempt_at": now,
        "claimed_until": None,
        "created_at": now,
        "updated_at": now,
    }


def enqueue(session: Session, changes: Sequence[Change], *, now: datetime) -> None:
    """Make each change the pending one for its (source, doc_id), due at `now`.

    Inserts an entry, or replaces the change in the existing one (INSERT ... ON CONFLICT DO
    UPDATE, safe against concurrent writers): `version` grows, attempts and answers start over,
    and a delivery in flight keeps its lease, so the new change goes out only after it.
    Within `changes`, the last change per document wins.
    """
    latest = {(change.source, change.doc_id): change for change in changes}
    if not latest:
        return
    insert = dialect_insert(session, OutboxEntry)
    replace: dict[str, ColumnElement[Any]] = {name: insert.excluded[name] for name in _REPLACED}
    replace["version"] = insert.table.c.version + 1
    # Rows in key order, so concurrent enqueues lock them in one order and cannot deadlock.
    session.exec(
        insert.on_conflict_do_update(index_elements=["source", "doc_id"], set_=replace),
        params=[_entry_values(change, now) for _, change in sorted(latest.items())],
    )


def change_of(entry: OutboxEntry | DeadLetter) -> Change:
    """The change an outbox entry or dead letter holds."""
    row = None if entry.row is None else tuple(json.loads(entry.row))
    return Change(
        source=entry.source,
        doc_id=entry.doc_id,
        external_id=entry.external_id,
        op=Op(entry.op),
        row=row,
    )


def answers_of(entry: OutboxEntry | DeadLetter) -> list[tuple[datetime, Answer]]:
    """The delivery answers an entry or dead letter holds, with their times, oldest first."""
    return [
        (datetime.fromisoformat(answer["at"]), Answer(answer["status"], answer["detail"]))
        for answer in json.loads(entry.answers)
    ]


def _with_answer(answers: str, answer: Answer, now: datetime) -> list[dict[str, Any]]:
    recorded = {"at": now.isoformat(), "status": answer.status, "detail": answer.detail}
    return [*json.loads(answers), recorded]


def _claim_of(entry: OutboxEntry) -> Claim:
    assert entry.id is not None
    assert entry.claimed_until is not None
    return Claim(
        entry_id=entry.id,
        version=entry.version,
        change=change_of(entry),
        attempts=entry.attempts,
        claimed_until=entry.claimed_until,
    )


def claim(
    session: Session,
    *,
    now: datetime,
    lease_s: float,
    limit: int,
    sources: Collection[str] | None = None,
) -> list[Claim]:
    """Lease up to `limit` due entries for `lease_s` seconds, oldest due first.

    An entry is due when `next_attempt_at <= now` and it has no lease running at `now`.
    `sources=None` means any source. On PostgreSQL, rows another transaction is claiming are
    skipped (FOR UPDATE SKIP LOCKED), so concurrent replicas never claim the same entry;
    SQLite serialises writers instead (BEGIN IMMEDIATE).
    """
    until = now + timedelta(seconds=lease_s)
    claimed_until = col(OutboxEntry.claimed_until)
    query = (
        select(OutboxEntry)
        .where(col(OutboxEntry.next_attempt_at) <= now)
        .where(or_(claimed_until.is_(None), claimed_until <= now))
        .order_by(col(OutboxEntry.next_attempt_at), col(OutboxEntry.id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if sources is not None:
        query = query.where(col(OutboxEntry.source).in_(sources))
    entries = session.exec(query).all()
    for entry in entries:
        entry.claimed_until = until
    session.flush()
    return [_claim_of(entry) for entry in entries]


def _held(session: Session, claim: Claim) -> OutboxEntry | None:
    """The claim's entry, locked, if the claim's lease is still the entry's lease."""
    entry = session.get(OutboxEntry, claim.entry_id, with_for_update=True, populate_existing=True)
    if entry is None or entry.claimed_until != claim.claimed_until:
        log.warning(
            "outbox lease lost, another delivery took over source=%s doc_id=%s",
            claim.change.source,
            claim.change.doc_id,
        )
        return None
    return entry


def ack(session: Session, claim: Claim) -> bool:
    """Settle a delivered claim: remove its entry if it still holds the claimed change.

    Returns True if the entry was removed. If a newer change replaced it meanwhile, that
    change is kept and its lease released, so it goes out next (False). If the lease was
    lost to another claim, nothing changes (False).
    """
    entry = _held(session, claim)
    if entry is None:
        return False
    if entry.version != claim.version:
        entry.claimed_until = None
        session.flush()
        return False
    session.delete(entry)
    session.flush()
    return True


def retry_later(
    session: Session, claim: Claim, *, at: datetime, answer: Answer, now: datetime
) -> None:
    """Settle a failed attempt: release the lease and make the entry due again `at`.

    Counts the attempt and records `answer` (time `now`; the newest `MAX_ANSWERS` are kept).
    If a newer change replaced the entry meanwhile, the newer change is kept and only delayed
    until `at`: neither the attempt nor the answer is held against it. A lost lease: no-op.
    """
    entry = _held(session, claim)
    if entry is None:
        return
    if entry.version == claim.version:
        entry.attempts += 1
        entry.answers = _json(_with_answer(entry.answers, answer, now)[-MAX_ANSWERS:])
    entry.next_attempt_at = at
    entry.claimed_until = None
    entry.updated_at = now
    session.flush()


def dead_letter(session: Session, claim: Claim, *, answer: Answer, now: datetime) -> bool:
    """Settle a change PANDA refused for good: move its entry to the dead letters.

    The dead letter keeps every answer the entry held plus `answer` (time `now`), and counts
    this attempt. Returns True if moved. If a newer change replaced the entry meanwhile, that
    change is kept and its lease released, and nothing is dead-lettered (False). A lost lease:
    no-op (False).
    """
    entry = _held(session, claim)
    if entry is None:
        return False
    if entry.version != claim.version:
        entry.claimed_until = None
        session.flush()
        return False
    session.add(
        DeadLetter(
            source=entry.source,
            doc_id=entry.doc_id,
            external_id=entry.external_id,
            op=entry.op,
            row=entry.row,
            version=entry.version,
            attempts=entry.attempts + 1,
            answers=_json(_with_answer(entry.answers, answer, now)),
            created_at=now,
        )
    )
    session.delete(entry)
    session.flush()
    return True


def release(session: Session, claims: Sequence[Claim]) -> None:
    """Give the claims' leases back without counting an attempt; their entries are due as before.

    For shutdown and a paused PANDA target. Claims whose lease was lost are left alone.
    """
    for held in claims:
        session.exec(
            update(OutboxEntry)
            .where(col(OutboxEntry.id) == held.entry_id)
            .where(col(OutboxEntry.claimed_until) == held.claimed_until)
            .values(claimed_until=None)
        )


def pending(session: Session, source: str | None = None) -> int:
    """How many entries wait for delivery (due, delayed or in flight), for one source or all."""
    query = select(func.count()).select_from(OutboxEntry)
    if source is not None:
        query = query.where(col(OutboxEntry.source) == source)
    return session.exec(query).one()


def dead_letters(session: Session, source: str | None = None) -> list[DeadLetter]:
    """The dead letters, oldest first, for one source or all."""
    query = select(DeadLetter).order_by(col(DeadLetter.id))
    if source is not None:
        query = query.where(col(DeadLetter.source) == source)
    return list(session.exec(query).all())
