"""The outbox: the latest undelivered change per (source, doc_id), leased out to deliveries.

Functions run inside the caller's transaction on its `Session`: they never commit and never
call PANDA. One change per document is in flight; a change that arrives meanwhile survives.
Each document's state (`DocState`) gives entries their version and keeps stale changes out.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

import orjson
import sqlalchemy
from sqlalchemy import ColumnElement, CursorResult, Table, bindparam, inspect
from sqlmodel import Session, col, delete, func, or_, select, update

from service.changes import Change, Op, SourceVersion
from service.db import dialect_insert, in_integers
from service.tables import DeadLetter, DocState, OutboxEntry, UTCDateTime

log = logging.getLogger(__name__)

# How many delivery answers an outbox entry keeps (the newest).
MAX_ANSWERS = 10
# What a newer change for the same document replaces in its entry.
_REPLACED = (
    "external_id",
    "op",
    "row",
    "version",
    "source_version",
    "attempts",
    "answers",
    "next_attempt_at",
    "updated_at",
)
Key = tuple[str, str]
_OPS = {op.value: op for op in Op}
_ENTRY_ID = attrgetter("entry_id")
_CLAIMED_UNTIL = attrgetter("claimed_until")
# One encoder for every value stored (json.dumps builds one per call when given options).
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
# How many documents a log line names at most.
_NAMED = 10


@dataclass(slots=True)
class Claim:
    """A leased outbox entry: deliver its change, then settle the claim exactly once.

    Settle with `ack_many`, `retry_later`, `dead_letter` or `release`. `claimed_until` identifies
    the lease: once it has expired and another claim has taken the entry, settling this claim
    changes nothing. Deliver well within the lease, or two deliveries of one document may race.

    Holds the change as stored, for delivery's hot path: `row_json` is the row's JSON array
    text (None for a delete), ready for a bulk PUT; `change` decodes the whole change. Read-only
    by convention (not frozen: a frozen dataclass costs a microsecond more per claim).
    """

    entry_id: int
    version: int
    source: str
    doc_id: str
    external_id: str
    op: Op
    row_json: str | None
    source_version: str | None
    attempts: int
    claimed_until: datetime

    @classmethod
    def holding(
        cls, change: Change, *, entry_id: int, version: int, attempts: int, claimed_until: datetime
    ) -> "Claim":
        """A claim of `change`, stored as `enqueue` stores it."""
        return cls(
            entry_id=entry_id,
            version=version,
            source=change.source,
            doc_id=change.doc_id,
            external_id=change.external_id,
            op=change.op,
            row_json=None if change.row is None else _json(list(change.row)),
            source_version=_text(change.source_version),
            attempts=attempts,
            claimed_until=claimed_until,
        )

    @property
    def change(self) -> Change:
        """The claimed change, decoded."""
        return _stored_change(
            self.source,
            self.doc_id,
            self.external_id,
            self.op,
            self.row_json,
            self.source_version,
        )


@dataclass(frozen=True)
class Enqueued:
    """What `enqueue` did: changes accepted, and changes skipped as stale."""

    accepted: int
    stale: int


@dataclass(frozen=True)
class Answer:
    """What one delivery attempt got back: an HTTP status (None if there was none) and detail."""

    status: int | None
    detail: str


def _json(value: object) -> str:
    # ASCII escapes, so any Python string (even a lone surrogate from a JSON `\ud800`) stores
    # as text on both databases and reads back identical.
    return _ENCODER.encode(value)


def _entry_values(change: Change, version: int, now: datetime) -> dict[str, Any]:
    return {
        "source": change.source,
        "doc_id": change.doc_id,
        "external_id": change.external_id,
        "op": change.op.value,
        "row": None if change.row is None else _json(list(change.row)),
        "version": version,
        "source_version": _text(change.source_version),
        "attempts": 0,
        "answers": "[]",
        "next_attempt_at": now,
        "claimed_until": None,
        "created_at": now,
        "updated_at": now,
    }


def enqueue(session: Session, changes: Sequence[Change], *, now: datetime) -> Enqueued:
    """Make each change the pending one for its (source, doc_id), due at `now`, unless stale.

    A change whose `source_version` is older than the newest one accepted for its document is
    stale: it is counted and changes nothing, so an out-of-order upsert never brings a deleted
    row back. A change without a source version, or with one of another kind, is never stale.
    Each accepted change raises its document's local version by one (`DocState`, never reset,
    so a later change always has a higher version than any earlier one, even after an ack) and
    becomes its entry's change with that version: inserted, or replacing the pending change
    (attempts and answers start over; a delivery in flight keeps its lease, so the new change
    goes out only after it). Within `changes`, the last accepted change per document wins.
    Safe against concurrent writers: document states are locked first, in key order.
    """
    if not changes:
        return Enqueued(accepted=0, stale=0)
    states = _locked_states(session, {(change.source, change.doc_id) for change in changes}, now)
    latest, stale = _accepted(changes, states)
    if latest:
        _write(session, latest, states, now)
    return Enqueued(accepted=len(changes) - stale, stale=stale)


@dataclass(frozen=True)
class _State:
    """A document's local version and newest accepted source version (`DocState`)."""

    version: int
    source_version: str | None


def _locked_states(session: Session, keys: set[Key], now: datetime) -> dict[Key, _State]:
    """The documents' states, created at version 0 when new, locked until the transaction ends.

    One upsert in key order does both: its no-op DO UPDATE locks an existing row on PostgreSQL,
    and a concurrent transaction creating the same document waits for this one instead of
    both starting from nothing. SQLite serialises writers anyway (BEGIN IMMEDIATE).
    """
    insert = dialect_insert(session, DocState)
    table = insert.table
    statement = insert.on_conflict_do_update(
        index_elements=["source", "doc_id"], set_={"version": table.c.version}
    ).returning(table.c.source, table.c.doc_id, table.c.version, table.c.source_version)
    rows = session.connection().execute(
        statement,
        [
            {"source": source, "doc_id": doc_id, "version": 0, "updated_at": now}
            for source, doc_id in sorted(keys)
        ],
    )
    return {(row.source, row.doc_id): _State(row.version, row.source_version) for row in rows}


def _accepted(
    changes: Sequence[Change], states: dict[Key, _State]
) -> tuple[dict[Key, Change], int]:
    """The last accepted change per document, and how many changes were stale."""
    newest = {
        key: SourceVersion(state.source_version)
        for key, state in states.items()
        if state.source_version is not None
    }
    latest: dict[Key, Change] = {}
    stale = 0
    for change in changes:
        key = (change.source, change.doc_id)
        version = change.source_version
        if version is not None and key in newest and version.older_than(newest[key]):
            log.info(
                "stale change skipped, a newer one was accepted before: source=%s doc_id=%s",
                change.source,
                change.doc_id,
            )
            stale += 1
            continue
        latest[key] = change
        if version is not None:
            newest[key] = version
    return latest, stale


def _write(
    session: Session, latest: dict[Key, Change], states: dict[Key, _State], now: datetime
) -> None:
    """Raise each document's version by one and make its latest change its entry's change."""
    ordered = sorted(latest.items())
    versions = {key: states[key].version + 1 for key, _ in ordered}
    table = inspect(DocState).local_table
    assert isinstance(table, Table)
    session.connection().execute(
        update(table)
        .where(table.c.source == bindparam("key_source"))
        .where(table.c.doc_id == bindparam("key_doc_id"))
        .values(
            version=bindparam("new_version"),
            source_version=func.coalesce(bindparam("new_source_version"), table.c.source_version),
            updated_at=bindparam("new_updated_at", type_=UTCDateTime),
        ),
        [
            {
                "key_source": source,
                "key_doc_id": doc_id,
                "new_version": versions[source, doc_id],
                "new_source_version": _text(change.source_version),
                "new_updated_at": now,
            }
            for (source, doc_id), change in ordered
        ],
    )
    insert = dialect_insert(session, OutboxEntry)
    replace: dict[str, ColumnElement[Any]] = {name: insert.excluded[name] for name in _REPLACED}
    # Rows in key order, so concurrent enqueues lock them in one order and cannot deadlock.
    session.exec(
        insert.on_conflict_do_update(index_elements=["source", "doc_id"], set_=replace),
        params=[_entry_values(change, versions[key], now) for key, change in ordered],
    )


def _text(version: SourceVersion | None) -> str | None:
    return None if version is None else version.text


def current_version(session: Session, source: str, doc_id: str) -> int | None:
    """The document's local version: that of the newest change accepted for it.

    None when no change of the document was ever accepted. A dead letter (or claim) with this
    version holds the newest change; with a lower one, a newer change was accepted since.
    """
    state = session.get(DocState, (source, doc_id))
    return None if state is None else state.version


def change_of(entry: OutboxEntry | DeadLetter) -> Change:
    """The change an outbox entry or dead letter holds."""
    return _stored_change(
        entry.source,
        entry.doc_id,
        entry.external_id,
        Op(entry.op),
        entry.row,
        entry.source_version,
    )


def _stored_change(
    source: str,
    doc_id: str,
    external_id: str,
    op: Op,
    row: str | None,
    source_version: str | None,
) -> Change:
    """A change from its stored columns (`row` as its JSON text, the source version as text)."""
    return Change(
        source=source,
        doc_id=doc_id,
        external_id=external_id,
        op=op,
        row=None if row is None else _row_of(row),
        source_version=None if source_version is None else SourceVersion(source_version),
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


def _held(session: Session, claim: Claim) -> OutboxEntry | None:
    """The claim's entry, locked, if the claim's lease is still the entry's lease."""
    entry = session.get(OutboxEntry, claim.entry_id, with_for_update=True, populate_existing=True)
    if entry is None or entry.claimed_until != claim.claimed_until:
        log.warning(
            "outbox lease lost, another delivery took over source=%s doc_id=%s",
            claim.source,
            claim.doc_id,
        )
        return None
    return entry


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
            source_version=entry.source_version,
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


def _outbox_table() -> Table:
    table = inspect(OutboxEntry).local_table
    assert isinstance(table, Table)
    return table


def _row_of(text: str) -> tuple[str, ...]:
    try:
        return tuple(orjson.loads(text))
    except orjson.JSONDecodeError:
        # orjson refuses the escaped lone surrogates `_json` may have written; json takes them.
        return tuple(json.loads(text))


def claim_many(
    session: Session, *, source: str, now: datetime, lease_s: float, limit: int
) -> list[Claim]:
    """Lease up to `limit` due entries of `source` for `lease_s` seconds, oldest due first;
    returns their claims in entry order. Delivery's hot path.

    An entry is due when `next_attempt_at <= now` and it has no lease running at `now`. On
    PostgreSQL, rows another transaction is claiming are skipped (FOR UPDATE SKIP LOCKED), so
    concurrent replicas never claim the same entry; SQLite serialises writers instead
    (BEGIN IMMEDIATE). The lease records the version it was taken for (`claimed_version`).
    """
    table = _outbox_table()
    columns = table.c
    until = now + timedelta(seconds=lease_s)
    selected = (
        sqlalchemy.select(
            columns.id,
            columns.version,
            columns.doc_id,
            columns.external_id,
            columns.op,
            columns.row,
            columns.source_version,
            columns.attempts,
        )
        # Served in order by ix_outbox_entry_source_due: no sort of the backlog per claim.
        .where(columns.source == source)
        .where(columns.next_attempt_at <= now)
        .where(or_(columns.claimed_until.is_(None), columns.claimed_until <= now))
        .order_by(columns.next_attempt_at, columns.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    due: Sequence[Sequence[Any]]
    if session.get_bind().dialect.name == "sqlite":
        # One row holding them all as JSON: Python's sqlite3 hands the GIL over at every row
        # it steps, and the event loop's thread then holds up the claim at each of them.
        picked = selected.subquery()
        packed = session.execute(
            sqlalchemy.select(func.json_group_array(func.json_array(*picked.c)))
        ).scalar_one()
        due = orjson.loads(packed)
    else:
        due = session.execute(selected).all()
    if not due:
        return []
    # The rows are locked (PostgreSQL) or the store is (SQLite) until the transaction ends.
    # Cheaper than UPDATE ... RETURNING on SQLite, which buffers every returned row.
    session.execute(
        update(table)
        .where(in_integers(session, columns.id, "ids"))
        .values(claimed_until=until, claimed_version=columns.version),
        {"ids": [entry[0] for entry in due]},
    )
    claims = [
        Claim(entry_id, version, source, doc_id, external_id, _OPS[op], row, text, tries, until)
        for entry_id, version, doc_id, external_id, op, row, text, tries in due
    ]
    return sorted(claims, key=_ENTRY_ID)


def ack_many(session: Session, claims: Sequence[Claim]) -> int:
    """Settle delivered claims; returns how many entries were removed.

    An entry still holding its claimed change is removed. One that a newer change replaced
    meanwhile keeps that change, and its lease is released so it goes out next. A claim whose
    lease was lost to another claim changes nothing.
    """
    untils = set(map(_CLAIMED_UNTIL, claims))
    if len(untils) == 1:  # a batch claimed together (delivery's hot path)
        return _ack_lease(session, untils.pop(), claims)
    leases: dict[datetime, list[Claim]] = {}
    for held in claims:
        leases.setdefault(held.claimed_until, []).append(held)
    return sum(_ack_lease(session, until, group) for until, group in leases.items())


def _ack_lease(session: Session, until: datetime, claims: Sequence[Claim]) -> int:
    """`ack_many` for claims of one lease: one DELETE when every entry is as claimed."""
    table = _outbox_table()
    columns = table.c
    ids = in_integers(session, columns.id, "ids")
    params = {"ids": list(map(_ENTRY_ID, claims))}
    ours = (columns.claimed_until == until) & ids
    deleted = session.execute(
        delete(table).where(ours).where(columns.version == columns.claimed_version), params
    )
    assert isinstance(deleted, CursorResult)
    removed: int = deleted.rowcount
    if removed == len(claims):
        return removed
    # The rest still under this lease hold a newer change: release them so it goes out next.
    released = set(
        session.execute(
            update(table).where(ours).values(claimed_until=None).returning(columns.id), params
        )
        .scalars()
        .all()
    )
    if removed + len(released) < len(claims):
        # Entries still here but not released were leased again by another delivery.
        present = set(session.execute(select(columns.id).where(ids), params).scalars().all())
        taken = [held for held in claims if held.entry_id in present - released]
        log.warning(
            "outbox lease lost, another delivery took over: source=%s entries=%d doc_ids=%s",
            claims[0].source,
            len(claims) - removed - len(released),
            [held.doc_id for held in taken[:_NAMED]],
        )
    return removed
