"""Dead letters: changes PANDA refused for good, and documents that could not become a change
(`UNMAPPED`); list, show, replay and discard them.

Functions run inside the caller's transaction on its `Session`: they never commit and never call
PANDA or CouchDB. A replay puts the change back into the outbox under the usual version rules,
so it can never overwrite newer data; delivery then sends it like any other change. An unmapped
document is replayed from the document as CouchDB holds it now (`poller.replay_unmapped`).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import Session, col, func, select

from service.changes import Change, Unmapped
from service.store import outbox
from service.store.tables import DeadLetter, DocState, OutboxEntry

log = logging.getLogger(__name__)

# The `op` of a dead letter that holds no change: a document that could not become one.
UNMAPPED = "unmapped"


@dataclass(frozen=True)
class Letter:
    """One dead letter: the change (None for an unmapped document), its local version, and
    every answer PANDA gave to it (for an unmapped document: why, at which seq)."""

    id: int
    source: str
    doc_id: str
    op: str
    change: Change | None
    version: int
    attempts: int
    created_at: datetime
    answers: list[tuple[datetime, outbox.Answer]]

    @property
    def last_answer(self) -> outbox.Answer | None:
        """PANDA's last answer, the one that made this a dead letter."""
        return self.answers[-1][1] if self.answers else None


@dataclass(frozen=True)
class Replay:
    """What a replay did, by dead letter id.

    `replayed`: back in the outbox (the dead letter is gone). `superseded`: the document has a
    newer change (queued, delivered or dead), so replaying would overwrite it; the dead letter
    stays until discarded. `missing`: no such dead letter. `unmapped`: documents to read from
    their source again (left alone here). `still_unmapped`: read again, and still no change
    (the reason by id; the dead letter stays).
    """

    replayed: list[int] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    unmapped: list[int] = field(default_factory=list)
    still_unmapped: dict[int, str] = field(default_factory=dict)


def _letter(dead: DeadLetter) -> Letter:
    assert dead.id is not None
    return Letter(
        id=dead.id,
        source=dead.source,
        doc_id=dead.doc_id,
        op=dead.op,
        change=None if dead.op == UNMAPPED else outbox.change_of(dead),
        version=dead.version,
        attempts=dead.attempts,
        created_at=dead.created_at,
        answers=outbox.answers_of(dead),
    )


def stored(
    session: Session,
    source: str | None = None,
    *,
    limit: int | None = None,
    after: int | None = None,
) -> list[DeadLetter]:
    """The dead letters as stored, oldest first, for one source or all (the first `limit`
    whose id is above `after`)."""
    query = select(DeadLetter).order_by(col(DeadLetter.id)).limit(limit)
    if source is not None:
        query = query.where(col(DeadLetter.source) == source)
    if after is not None:
        query = query.where(col(DeadLetter.id) > after)
    return list(session.exec(query).all())


def count(session: Session, source: str) -> int:
    """How many dead letters `source` has."""
    query = select(func.count()).select_from(DeadLetter).where(col(DeadLetter.source) == source)
    return session.exec(query).one()


def find(
    session: Session,
    source: str | None = None,
    *,
    limit: int | None = None,
    after: int | None = None,
) -> list[Letter]:
    """The dead letters, oldest first, of one source or all (the first `limit` whose id is
    above `after`)."""
    return [_letter(dead) for dead in stored(session, source, limit=limit, after=after)]


def show(session: Session, letter_id: int) -> Letter | None:
    """One dead letter with every answer, or None when there is no such dead letter."""
    dead = session.get(DeadLetter, letter_id)
    return None if dead is None else _letter(dead)


def replay(session: Session, letter_ids: Sequence[int], *, now: datetime) -> Replay:
    """Put the dead letters' changes back into the outbox, due at `now`, in id order.

    A change is replayed only while it is its document's newest (`letter.version` is the
    document's current version) and no outbox entry holds the document; otherwise it is
    superseded and left alone. A replayed change counts as a newly accepted change: it gets the
    next version, so whatever happens to it, later changes still win.
    """
    done = Replay()
    for letter_id in sorted(set(letter_ids)):
        dead = session.get(DeadLetter, letter_id)
        if dead is None:
            done.missing.append(letter_id)
        elif dead.op == UNMAPPED:
            done.unmapped.append(letter_id)
        elif _replayed(session, dead, now):
            done.replayed.append(letter_id)
        else:
            done.superseded.append(letter_id)
    return done


def replay_source(
    session: Session,
    source: str,
    *,
    now: datetime,
    after: int | None = None,
    limit: int | None = None,
) -> Replay:
    """`replay` the dead letters of `source`: every one, or the first `limit` whose id is
    above `after` (a page of them, for one transaction each)."""
    query = select(col(DeadLetter.id)).where(col(DeadLetter.source) == source)
    if after is not None:
        query = query.where(col(DeadLetter.id) > after)
    query = query.order_by(col(DeadLetter.id)).limit(limit)
    return replay(
        session, [letter_id for letter_id in session.exec(query) if letter_id is not None], now=now
    )


def discard(session: Session, letter_ids: Sequence[int]) -> list[int]:
    """Delete the dead letters for good; returns the ids that existed, in order."""
    discarded = []
    for letter_id in sorted(set(letter_ids)):
        dead = session.get(DeadLetter, letter_id)
        if dead is not None:
            session.delete(dead)
            discarded.append(letter_id)
    session.flush()
    return discarded


def _replayed(session: Session, dead: DeadLetter, now: datetime) -> bool:
    # Lock the document's state first, so no change of it is accepted between the checks
    # and the enqueue (PostgreSQL; SQLite serialises writers anyway).
    state = session.get(
        DocState, (dead.source, dead.doc_id), with_for_update=True, populate_existing=True
    )
    if state is None or state.version != dead.version:
        return False
    if state.entry_id is not None and session.get(OutboxEntry, state.entry_id) is not None:
        return False  # the document's latest entry is still queued
    if outbox.enqueue(session, [outbox.change_of(dead)], now=now).accepted != 1:
        return False  # pragma: no cover - the newest change of a document is never stale
    session.delete(dead)
    session.flush()
    log.info(
        "dead letter replayed: source=%s doc_id=%r version=%d",
        dead.source,
        dead.doc_id,
        dead.version,
    )
    return True


def keep_unmapped(
    session: Session, source: str, unmapped: Sequence[Unmapped], *, now: datetime
) -> None:
    """Keep documents that could not become a change as dead letters (`UNMAPPED`), each with
    its seq and reason, so that nothing is skipped without a trace."""
    for problem in unmapped:
        at = "no seq" if problem.seq is None else f"seq {problem.seq.json_text}"
        detail = f"could not become a row ({at}): {problem.reason}"
        session.add(
            DeadLetter(
                source=source,
                doc_id=problem.doc_id,
                external_id="",
                op=UNMAPPED,
                row=None,
                version=0,
                attempts=1,
                answers=outbox.answers_text([(now, outbox.Answer(None, detail))]),
                created_at=now,
            )
        )
    session.flush()


def unmapped_letter(session: Session, letter_id: int) -> tuple[str, str] | None:
    """The (source, doc_id) of an unmapped document's dead letter; None if there is none."""
    dead = session.get(DeadLetter, letter_id)
    if dead is None or dead.op != UNMAPPED:
        return None
    return dead.source, dead.doc_id


def settle_unmapped(
    session: Session, letter_id: int, change: Change | None, *, now: datetime
) -> bool:
    """Replace an unmapped document's dead letter with `change` (read from its source again;
    None: nothing to replicate, e.g. a design document). Returns False when the dead letter
    is gone already."""
    dead = session.get(DeadLetter, letter_id)
    if dead is None or dead.op != UNMAPPED:
        return False
    if change is not None:
        outbox.enqueue(session, [change], now=now)
    session.delete(dead)
    session.flush()
    log.info("unmapped document replayed: source=%s doc_id=%r", dead.source, dead.doc_id)
    return True
