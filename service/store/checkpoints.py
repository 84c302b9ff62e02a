"""Checkpoints: the seq up to which each source's changes are safely in the outbox.

Reads and writes inside the caller's transaction (never commits); a seq is opaque and kept
verbatim, never parsed or compared.
"""

from sqlmodel import Session

from service.changes import Seq
from service.clock import utcnow
from service.store.db import dialect_insert
from service.store.tables import Checkpoint


def load(session: Session, source: str) -> Seq | None:
    """The seq last saved for `source`, exactly as saved, or `None` if there is none yet."""
    checkpoint = session.get(Checkpoint, source)
    return None if checkpoint is None else Seq(checkpoint.seq)


def save(session: Session, source: str, seq: Seq, *, token: int | None = None) -> None:
    """Set `source`'s checkpoint to `seq` (insert or replace, in one statement), written under
    feed lease `token` (None: without one, e.g. by an operator).

    Takes effect when the caller's transaction commits, together with the changes it
    enqueued. Does not compare with the previous seq: the caller decides what is newer.
    """
    insert = dialect_insert(session, Checkpoint).values(
        source=source, seq=seq.json_text, updated_at=utcnow(), token=token
    )
    excluded = insert.excluded
    session.exec(
        insert.on_conflict_do_update(
            index_elements=["source"],
            set_={"seq": excluded.seq, "updated_at": excluded.updated_at, "token": excluded.token},
        )
    )


def reset(session: Session, source: str) -> Seq | None:
    """Forget `source`'s checkpoint, so its next start reads from `couchdb.since` again.

    Returns the seq that was saved (None if there was none). For `pandasync reset-checkpoint`
    after CouchDB refused the checkpoint (a recreated or restored database); restart after.
    """
    checkpoint = session.get(Checkpoint, source)
    if checkpoint is None:
        return None
    session.delete(checkpoint)
    session.flush()
    return Seq(checkpoint.seq)
