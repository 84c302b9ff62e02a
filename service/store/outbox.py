"""The outbox: the latest undelivered change per (source, doc_id), claimed by deliveries.

Functions run inside the caller's transaction on its `Session`: they never commit and never
call PANDA. Each accepted change is appended as an entry and replaces its document's older
entry, so a source's entries go out in acceptance order, the latest change per document only.
One delivery at a time holds a source's lease (`DeliveryLease`) and claims its entries batch
after batch; a change that arrives meanwhile is a new entry, sent after the one in flight.
Each document's state (`DocState`) gives entries their version and keeps stale changes out.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import orjson
import sqlalchemy
from sqlalchemy import CursorResult, bindparam
from sqlmodel import Session, col, delete, func, select, update

from service.changes import Change, Op, SourceVersion
from service.store import leases
from service.store.db import bind_time, execute_many, execute_values, in_integers
from service.store.tables import DeadLetter, DocState, OutboxEntry, UTCDateTime, table_of

log = logging.getLogger(__name__)

# How many delivery answers an outbox entry keeps (the newest).
MAX_ANSWERS = 10
Key = tuple[str, str]
_OPS = {op.value: op for op in Op}
_ENTRY_ID = attrgetter("entry_id")
_SOURCE_LEASE = attrgetter("source", "lease")
# One encoder for every value stored (json.dumps builds one per call when given options).
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


@dataclass(slots=True)
class Claim:
    """A claimed outbox entry: deliver its change, then settle the claim at most once.

    Settle with `ack_many`, `retry_later` or `dead_letter`, or leave it due. `lease` is the
    source's lease it was claimed under (`DeliveryLease.lease_id`), due to end at
    `claimed_until` unless renewed: once another delivery has taken the source's lease over,
    settling this claim changes nothing. Deliver well within the lease, or two deliveries of
    one document may race.

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
    lease: int
    claimed_until: datetime
    # When the change was taken in (its entry created), for freshness; None when not known.
    accepted_at: datetime | None = None
    # What PANDA acknowledged last for the document (`DocState.delivered`), when claimed.
    delivered: str | None = None

    @classmethod
    def holding(
        cls,
        change: Change,
        *,
        entry_id: int,
        version: int,
        attempts: int,
        claimed_until: datetime,
        lease: int = 1,
        accepted_at: datetime | None = None,
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
            lease=lease,
            claimed_until=claimed_until,
            accepted_at=accepted_at,
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
    """What `enqueue` did: changes accepted, and changes skipped as stale (`stale_at`: their
    places in the changes given, ascending)."""

    accepted: int
    stale: int
    stale_at: tuple[int, ...] = ()


@dataclass(frozen=True)
class Answer:
    """What one delivery attempt got back: an HTTP status (None if there was none) and detail."""

    status: int | None
    detail: str


def row_text(row: Sequence[object]) -> str:
    """A row's JSON array text, as the outbox stores it (`Claim.row_json`)."""
    return _json(list(row))


def _json(value: object) -> str:
    # ASCII escapes, so any Python string (even a lone surrogate from a JSON `\ud800`) stores
    # as text on both databases and reads back identical.
    return _ENCODER.encode(value)


def _entry_values(change: Change, version: int, at: datetime | str) -> tuple[Any, ...]:
    """An entry's columns in `_append`'s order, `at` bound as `bind_time` gives it."""
    row = None if change.row is None else _json(list(change.row))
    source_version = _text(change.source_version)
    return (
        *(change.source, change.doc_id, change.external_id, change.op.value, row, version),
        *(source_version, 0, "[]", at, at, at),
    )


def enqueue(session: Session, changes: Sequence[Change], *, now: datetime) -> Enqueued:
    """Make each change the pending one for its (source, doc_id), due at `now`, unless stale.

    A change whose `source_version` is older than the newest one accepted for its document is
    stale: it is counted and changes nothing, so an out-of-order upsert never brings a deleted
    row back. A change without a source version, or with one of another kind, is never stale.
    Each accepted change raises its document's local version by one (`DocState`, never reset,
    so a later change always has a higher version than any earlier one, even after an ack) and
    is appended as an entry with that version, due at once; the document's older entry, if
    any, is deleted (a delivery holding it sends the newer entry after it, under its lease).
    Within `changes`, the last accepted change per document wins. Safe against concurrent
    writers: document states are locked first, in key order.
    """
    if not changes:
        return Enqueued(accepted=0, stale=0)
    states = lock_states(session, {(change.source, change.doc_id) for change in changes}, now)
    latest, stale = _accepted(changes, states)
    if latest:
        _write(session, latest, states, now)
    return Enqueued(accepted=len(changes) - len(stale), stale=len(stale), stale_at=stale)


@dataclass(frozen=True)
class _State:
    """A document's local version, newest accepted source version and latest entry."""

    version: int
    source_version: str | None
    entry_id: int | None


def lock_states(session: Session, keys: set[Key], now: datetime) -> dict[Key, _State]:
    """The documents' states, created at version 0 when new, locked until the transaction ends.

    One upsert in key order does both: its no-op DO UPDATE locks an existing row on PostgreSQL,
    and a concurrent transaction creating the same document waits for this one instead of
    both starting from nothing. SQLite serialises writers anyway (BEGIN IMMEDIATE).
    """
    at = bind_time(session, now)
    rows = execute_values(
        session,
        "INSERT INTO doc_state (source, doc_id, version, updated_at)",
        [(source, doc_id, 0, at) for source, doc_id in sorted(keys)],
        tail="ON CONFLICT (source, doc_id) DO UPDATE SET version = doc_state.version"
        " RETURNING source, doc_id, version, source_version, entry_id",
    )
    return {
        (source, doc_id): _State(version, source_version, entry_id)
        for source, doc_id, version, source_version, entry_id in rows
    }


def _accepted(
    changes: Sequence[Change], states: dict[Key, _State]
) -> tuple[dict[Key, Change], tuple[int, ...]]:
    """The last accepted change per document, and the places of the stale changes."""
    newest = {
        key: SourceVersion(state.source_version)
        for key, state in states.items()
        if state.source_version is not None
    }
    latest: dict[Key, Change] = {}
    stale: list[int] = []
    for place, change in enumerate(changes):
        key = (change.source, change.doc_id)
        version = change.source_version
        if version is not None and key in newest and version.older_than(newest[key]):
            log.info(
                "stale change skipped, a newer one was accepted before: source=%s doc_id=%r",
                change.source,
                change.doc_id,
            )
            stale.append(place)
            continue
        latest[key] = change
        if version is not None:
            newest[key] = version
    return latest, tuple(stale)


def _write(
    session: Session, latest: dict[Key, Change], states: dict[Key, _State], now: datetime
) -> None:
    """Append each document's latest change as an entry with the document's version raised by
    one, delete the document's older entry, and point its state at the new one."""
    # Rows in key order, so concurrent enqueues lock them in one order and cannot deadlock.
    ordered = sorted(latest.items())
    versions = {key: states[key].version + 1 for key, _ in ordered}
    at = bind_time(session, now)
    entry_ids = _append(
        session, [_entry_values(change, versions[key], at) for key, change in ordered]
    )
    older = [states[key].entry_id for key, _ in ordered if states[key].entry_id is not None]
    if older:
        entries = table_of(OutboxEntry)
        session.execute(
            delete(entries).where(in_integers(session, entries.c.id, "ids")), {"ids": older}
        )
    execute_many(
        session,
        _UPDATE_STATE,
        [
            (versions[key], _text(change.source_version), entry_id, at, *key)
            for (key, change), entry_id in zip(ordered, entry_ids, strict=True)
        ],
    )


_UPDATE_STATE = (
    "UPDATE doc_state SET version = ?, source_version = coalesce(?, source_version),"
    " entry_id = ?, updated_at = ? WHERE source = ? AND doc_id = ?"
)


def _append(session: Session, rows: list[tuple[Any, ...]]) -> Sequence[int]:
    """Insert `rows` (one per document, as `_entry_values` gives them) as outbox entries; their
    ids, in order."""
    # Matched back by document, not by position: SQLite returns the rows of a multi-row
    # INSERT with RETURNING in no set order.
    appended = execute_values(
        session,
        'INSERT INTO outbox_entry (source, doc_id, external_id, op, "row", version,'
        " source_version, attempts, answers, next_attempt_at, created_at, updated_at)",
        rows,
        tail="RETURNING id, source, doc_id",
    )
    ids = {(source, doc_id): entry_id for entry_id, source, doc_id in appended}
    return [ids[row[0], row[1]] for row in rows]


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


def answers_text(answers: Sequence[tuple[datetime, Answer]]) -> str:
    """Answers with their times as an entry or dead letter stores them."""
    return _json(
        [
            {"at": at.isoformat(), "status": answer.status, "detail": answer.detail}
            for at, answer in answers
        ]
    )


def _with_answer(answers: str, answer: Answer, now: datetime) -> list[dict[str, Any]]:
    recorded = {"at": now.isoformat(), "status": answer.status, "detail": answer.detail}
    return [*json.loads(answers), recorded]


def retry_later(
    session: Session, claim: Claim, *, at: datetime, answer: Answer, now: datetime
) -> None:
    """Settle a failed attempt: the entry is due again `at`.

    Counts the attempt and records `answer` (time `now`; the newest `MAX_ANSWERS` are kept).
    If a newer change replaced the entry meanwhile (even one committed while this runs), there
    is nothing to retry: the newer change goes out as it came. A lost lease: no-op.
    """
    retry_many(session, [claim], at=at, answer=answer, now=now)


def retry_many(
    session: Session, claims: Sequence[Claim], *, at: datetime, answer: Answer, now: datetime
) -> None:
    """`retry_later` for claims that failed together (one request's), in a few statements."""
    table = table_of(OutboxEntry)
    for group in _held_leases(session, claims):
        answers = session.execute(
            sqlalchemy.select(table.c.id, table.c.answers).where(
                in_integers(session, table.c.id, "ids")
            ),
            {"ids": list(map(_ENTRY_ID, group))},
        ).all()
        if not answers:
            continue
        # Only the lease's holder writes an entry; an enqueue may delete it, and then this
        # updates nothing.
        session.connection().execute(
            update(table)
            .where(table.c.id == bindparam("entry_id"))
            .values(
                attempts=table.c.attempts + 1,
                answers=bindparam("new_answers"),
                next_attempt_at=bindparam("new_next_attempt_at", type_=UTCDateTime),
                updated_at=bindparam("new_updated_at", type_=UTCDateTime),
            ),
            [
                {
                    "entry_id": entry_id,
                    "new_answers": _json(_with_answer(text, answer, now)[-MAX_ANSWERS:]),
                    "new_next_attempt_at": at,
                    "new_updated_at": now,
                }
                for entry_id, text in answers
            ],
        )


def dead_letter(session: Session, claim: Claim, *, answer: Answer, now: datetime) -> bool:
    """Settle a change PANDA refused for good: move its entry to the dead letters.

    The dead letter keeps every answer the entry held plus `answer` (time `now`), and counts
    this attempt. Returns True if moved. If a newer change replaced the entry meanwhile (even
    one committed while this runs), nothing is dead-lettered (False): the newer change goes
    out as it came. A lost lease: no-op (False).
    """
    if not leases.holds(session, claim.source, claim.lease):
        return False
    table = table_of(OutboxEntry)
    # Taken out in one statement, so an enqueue deleting it at the same time cannot leave
    # a dead letter of a change it replaced.
    entry = session.execute(
        delete(table).where(table.c.id == claim.entry_id).returning(*table.c)
    ).one_or_none()
    if entry is None:
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
    session.flush()
    return True


def depth(session: Session) -> dict[str, tuple[int, datetime]]:
    """Per source with entries: how many wait for delivery, and when the oldest was taken in."""
    columns = table_of(OutboxEntry).c
    rows = session.execute(
        sqlalchemy.select(columns.source, func.count(), func.min(columns.created_at)).group_by(
            columns.source
        )
    ).all()
    return {source: (count, _aware(oldest)) for source, count, oldest in rows}


def _aware(value: datetime | str) -> datetime:
    """A UTC datetime read back through an aggregate (SQLite hands its stored text back)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def pending(session: Session, source: str | None = None) -> int:
    """How many entries wait for delivery (due, delayed or in flight), for one source or all."""
    query = select(func.count()).select_from(OutboxEntry)
    if source is not None:
        query = query.where(col(OutboxEntry.source) == source)
    return session.exec(query).one()


def _row_of(text: str) -> tuple[str, ...]:
    try:
        return tuple(orjson.loads(text))
    except orjson.JSONDecodeError:
        # orjson refuses the escaped lone surrogates `_json` may have written; json takes them.
        return tuple(json.loads(text))


def claim_many(
    session: Session,
    *,
    source: str,
    now: datetime,
    lease_s: float,
    limit: int,
    lease: int | None = None,
) -> list[Claim]:
    """Claim up to `limit` due entries of `source` in acceptance (id) order, under the
    source's lease.

    Without `lease`, takes the source's lease for `lease_s` seconds, unless another delivery
    holds it at `now` (then returns []): one delivery at a time sends a source's changes. With
    the `lease` of earlier claims, claims the next entries after them and renews the lease
    (unless it has ended or another delivery has taken it over: then nothing).
    An entry is due when `next_attempt_at <= now`. Returns [] when nothing is due (no lease
    is taken then) or when `lease` was lost. Concurrent claims on PostgreSQL wait on the
    lease's row (FOR UPDATE); SQLite serialises writers instead (BEGIN IMMEDIATE).
    """
    started = leases.start_claim(session, source, now, lease)
    if started is None:
        return []
    lease, after = started
    columns = table_of(OutboxEntry).c
    selected = _due(_claim_select(columns), columns, source, after, now, limit)
    due = session.execute(selected).all()
    if not due:
        return []
    until = leases.hold(session, source, lease, now + timedelta(seconds=lease_s), due[-1][0])
    return _claims(due, source, lease, until)


def _due(
    selected: sqlalchemy.Select[Any],
    columns: Any,
    source: str,
    after: int,
    now: datetime,
    limit: int,
) -> sqlalchemy.Select[Any]:
    """`selected` of the first `limit` entries of `source` after id `after` due at `now`, in
    id order (served in that order by ix_outbox_entry_source_id: no sort of the backlog)."""
    return (
        selected.where(columns.source == source)
        .where(columns.id > after)
        .where(columns.next_attempt_at <= now)
        .order_by(columns.id)
        .limit(limit)
    )


def _claim_select(columns: Any) -> sqlalchemy.Select[Any]:
    """What a claim reads of each entry, in the order `_claims` takes it."""
    states = table_of(DocState).c
    delivered = (
        sqlalchemy.select(states.delivered)
        .where(states.source == columns.source)
        .where(states.doc_id == columns.doc_id)
        .scalar_subquery()
    )
    return sqlalchemy.select(
        columns.id,
        columns.version,
        columns.doc_id,
        columns.external_id,
        columns.op,
        columns.row,
        columns.source_version,
        columns.attempts,
        columns.created_at,
        delivered,
    )


def _claims(due: Sequence[Sequence[Any]], source: str, lease: int, until: datetime) -> list[Claim]:
    """Claims of the entries `due` read as `_claim_select` reads them."""
    return [
        Claim(
            entry_id,
            version,
            source,
            doc_id,
            external_id,
            _OPS[op],
            row,
            text,
            tries,
            lease,
            until,
            accepted_at,
            known,
        )
        for entry_id, version, doc_id, external_id, op, row, text, tries, accepted_at, known in due
    ]


def ack_many(session: Session, claims: Sequence[Claim]) -> int:
    """Settle delivered claims: their entries are removed; returns how many were.

    An entry a newer change replaced meanwhile is gone already (the newer change goes out
    next). Claims whose lease was lost change nothing.
    """
    removed = 0
    table = table_of(OutboxEntry)
    for group in _held_leases(session, claims):
        deleted = session.execute(
            delete(table).where(in_integers(session, table.c.id, "ids")),
            {"ids": list(map(_ENTRY_ID, group))},
        )
        assert isinstance(deleted, CursorResult)
        removed += deleted.rowcount
    return removed


def _held_leases(session: Session, claims: Sequence[Claim]) -> list[list[Claim]]:
    """`claims` in groups of one lease each, less the groups whose lease is lost (`leases.holds`
    checked once a group)."""
    groups: dict[tuple[str, int], list[Claim]] = {}
    for claim in claims:
        groups.setdefault((claim.source, claim.lease), []).append(claim)
    return [
        group for (source, lease), group in groups.items() if leases.holds(session, source, lease)
    ]
