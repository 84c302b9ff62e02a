"""Snapshot bookkeeping: a content hash per id each snapshot source gave, and its last snapshot.

Reads and writes inside the caller's transaction (never commits, never reads a source). A
snapshot is a generation: it stamps the ids it gives, stages new and changed rows, and is
applied in chunks; every write checks that its generation is still the source's latest, so a
newer snapshot (or a restart) supersedes an older one cleanly.
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy
from sqlalchemy import func
from sqlmodel import Session

from service.store.db import dialect_insert, in_texts
from service.store.tables import SnapshotSeen, SnapshotState, table_of

_SEEN = table_of(SnapshotSeen)
_STATE = table_of(SnapshotState)


class StagedRow(Protocol):
    """A row to stage: its id, hash and JSON array text."""

    @property
    def doc_id(self) -> str: ...

    @property
    def digest(self) -> str: ...

    @property
    def row_json(self) -> str: ...


@dataclass(frozen=True)
class Staged:
    """A row a snapshot staged: its id, hash and JSON array text."""

    doc_id: str
    digest: str
    row_json: str


@dataclass(frozen=True)
class Found:
    """What the store can count of snapshot `generation` once it is read whole: ids `new`
    (never enqueued), `changed`, `seen` (all ids it gave), `gone` (enqueued before, not in
    it) and `known` (enqueued before it)."""

    new: int
    changed: int
    seen: int
    gone: int
    known: int


@dataclass(frozen=True)
class Snapshot:
    """A source's latest snapshot as the store holds it."""

    generation: int
    phase: str
    reason: str | None
    counts: dict[str, int] | None
    started_at: datetime
    finished_at: datetime | None


def begin(session: Session, source: str, *, now: datetime) -> int:
    """Start `source`'s next snapshot, `reading`; returns its generation (1 for the first).

    Supersedes any snapshot under way or held: its writes change nothing from now on. The
    counts and end of the last snapshot read whole stay until this one replaces them.
    """
    insert = dialect_insert(session, SnapshotState).values(
        source=source, generation=1, phase="reading", started_at=now
    )
    statement = insert.on_conflict_do_update(
        index_elements=["source"],
        set_={
            "generation": _STATE.c.generation + 1,
            "phase": "reading",
            "reason": None,
            "started_at": now,
        },
    ).returning(_STATE.c.generation)
    generation: int = session.execute(statement).scalar_one()
    return generation


def latest(session: Session, source: str) -> Snapshot | None:
    """`source`'s latest snapshot, or None before its first."""
    row = session.execute(sqlalchemy.select(_STATE).where(_STATE.c.source == source)).first()
    if row is None:
        return None
    return Snapshot(
        generation=row.generation,
        phase=row.phase,
        reason=row.reason,
        counts=None if row.counts is None else json.loads(row.counts),
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def is_current(session: Session, source: str, generation: int, phase: str) -> bool:
    """Whether `generation` is `source`'s latest snapshot and in `phase`; locks the state's
    row on PostgreSQL until the transaction ends, so a newer snapshot waits for this one's
    write (SQLite serialises writers anyway)."""
    found = session.execute(
        sqlalchemy.select(_STATE.c.generation, _STATE.c.phase)
        .where(_STATE.c.source == source)
        .with_for_update()
    ).first()
    return found is not None and tuple(found) == (generation, phase)


def known(
    session: Session, source: str, doc_ids: Sequence[str]
) -> dict[str, tuple[str | None, int]]:
    """For each of `doc_ids` the store knows, by id: the hash of the row last enqueued (None:
    never enqueued) and the generation it was last seen in."""
    rows = session.execute(
        sqlalchemy.select(_SEEN.c.doc_id, _SEEN.c.digest, _SEEN.c.seen)
        .where(_SEEN.c.source == source)
        .where(in_texts(session, _SEEN.c.doc_id, "ids")),
        {"ids": list(doc_ids)},
    )
    return {doc_id: (digest, seen) for doc_id, digest, seen in rows}


def stamp(
    session: Session,
    source: str,
    generation: int,
    *,
    unchanged: Sequence[str],
    staged: Sequence[StagedRow],
) -> None:
    """Mark ids as given by snapshot `generation`: `unchanged` ones with nothing staged,
    `staged` ones with their new row (inserted when new). Check `is_current` first."""
    if unchanged:
        session.execute(
            sqlalchemy.update(_SEEN)
            .where(_SEEN.c.source == source)
            .where(in_texts(session, _SEEN.c.doc_id, "ids"))
            .values(seen=generation, staged_digest=None, staged_row=None),
            {"ids": list(unchanged)},
        )
    if not staged:
        return
    insert = dialect_insert(session, SnapshotSeen)
    session.connection().execute(
        insert.on_conflict_do_update(
            index_elements=["source", "doc_id"],
            set_={
                "seen": insert.excluded.seen,
                "staged_digest": insert.excluded.staged_digest,
                "staged_row": insert.excluded.staged_row,
            },
        ),
        [
            {
                "source": source,
                "doc_id": row.doc_id,
                "digest": None,
                "seen": generation,
                "staged_digest": row.digest,
                "staged_row": row.row_json,
            }
            for row in staged
        ],
    )


def count(session: Session, source: str, generation: int) -> Found:
    """Count what snapshot `generation`, read whole, would change (see `Found`)."""
    c = _SEEN.c
    is_staged = c.staged_digest.is_not(None)
    in_it = c.seen == generation
    sent = c.digest.is_not(None)
    row = session.execute(
        sqlalchemy.select(
            _sum(in_it & is_staged & c.digest.is_(None)),
            _sum(in_it & is_staged & sent),
            _sum(in_it),
            _sum((c.seen < generation) & sent),
            _sum(sent),
        ).where(c.source == source)
    ).one()
    return Found(*(int(value or 0) for value in row))


def _sum(condition: Any) -> Any:
    return func.sum(sqlalchemy.case((condition, 1), else_=0))


def settle_reading(
    session: Session,
    source: str,
    generation: int,
    *,
    counts: dict[str, int],
    held: str | None,
) -> None:
    """Snapshot `generation` was read whole: keep what it found, and hold it (`held` says
    why) or let it be applied. Check `is_current` first."""
    session.execute(
        sqlalchemy.update(_STATE)
        .where(_STATE.c.source == source)
        .values(
            phase="applying" if held is None else "held",
            reason=held,
            counts=json.dumps(counts),
        )
    )


def fail(session: Session, source: str, generation: int, reason: str, *, now: datetime) -> bool:
    """Snapshot `generation` could not be read: it changes nothing, and says why. False (and
    nothing done) when a newer snapshot superseded it."""
    updated = session.execute(
        sqlalchemy.update(_STATE)
        .where(_STATE.c.source == source)
        .where(_STATE.c.generation == generation)
        .values(phase="failed", reason=reason, finished_at=now)
    )
    return bool(getattr(updated, "rowcount", 0))


def confirm(session: Session, source: str) -> Snapshot | None:
    """Confirm `source`'s held snapshot: it is to be applied as it was read. Returns it (now
    `applying`), or None when no snapshot of the source is held (or a newer one just began)."""
    snapshot = latest(session, source)
    if snapshot is None or snapshot.phase != "held":
        return None
    updated = session.execute(
        sqlalchemy.update(_STATE)
        .where(_STATE.c.source == source)
        .where(_STATE.c.generation == snapshot.generation)
        .where(_STATE.c.phase == "held")
        .values(phase="applying")
    )
    if not getattr(updated, "rowcount", 0):
        return None
    return Snapshot(**{**asdict(snapshot), "phase": "applying"})


def done(session: Session, source: str, generation: int, *, now: datetime) -> None:
    """Snapshot `generation` is applied. Check `is_current` first."""
    session.execute(
        sqlalchemy.update(_STATE)
        .where(_STATE.c.source == source)
        .values(phase="done", reason=None, finished_at=now)
    )


def staged(
    session: Session, source: str, generation: int, *, after: str | None, limit: int
) -> list[Staged]:
    """Up to `limit` rows staged by snapshot `generation`, in id order after id `after`."""
    c = _SEEN.c
    query = (
        sqlalchemy.select(c.doc_id, c.staged_digest, c.staged_row)
        .where(c.source == source)
        .where(c.seen == generation)
        .where(c.staged_digest.is_not(None))
        .order_by(c.doc_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(c.doc_id > after)
    return [Staged(*row) for row in session.execute(query)]


def settle_staged(session: Session, source: str, doc_ids: Sequence[str]) -> None:
    """The rows these ids staged have their changes enqueued: each staged hash becomes the
    one last sent."""
    session.execute(
        sqlalchemy.update(_SEEN)
        .where(_SEEN.c.source == source)
        .where(in_texts(session, _SEEN.c.doc_id, "ids"))
        .values(digest=_SEEN.c.staged_digest, staged_digest=None, staged_row=None),
        {"ids": list(doc_ids)},
    )


def absent(
    session: Session, source: str, generation: int, *, after: str | None, limit: int
) -> list[tuple[str, bool]]:
    """Up to `limit` ids not in snapshot `generation`, in id order after `after`, each with
    whether its row was ever enqueued (a row never sent needs no delete)."""
    c = _SEEN.c
    query = (
        sqlalchemy.select(c.doc_id, c.digest.is_not(None))
        .where(c.source == source)
        .where(c.seen < generation)
        .order_by(c.doc_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(c.doc_id > after)
    return [(doc_id, bool(sent)) for doc_id, sent in session.execute(query)]


def forget(session: Session, source: str, doc_ids: Sequence[str]) -> None:
    """Forget ids (their deletes are enqueued, or they were never sent)."""
    if doc_ids:
        session.execute(
            sqlalchemy.delete(_SEEN)
            .where(_SEEN.c.source == source)
            .where(in_texts(session, _SEEN.c.doc_id, "ids")),
            {"ids": list(doc_ids)},
        )


def keep_absent(session: Session, source: str, doc_ids: Sequence[str]) -> None:
    """Keep absent ids' hashes (a source that sends no deletes) but nothing they staged."""
    if doc_ids:
        session.execute(
            sqlalchemy.update(_SEEN)
            .where(_SEEN.c.source == source)
            .where(in_texts(session, _SEEN.c.doc_id, "ids"))
            .values(staged_digest=None, staged_row=None),
            {"ids": list(doc_ids)},
        )
