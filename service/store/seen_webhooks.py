"""Delivery ids each webhook source has sent, so a redelivered webhook is applied only once.

Functions run inside the caller's transaction: an id is recorded together with the webhook's
changes, or not at all. They never commit.
"""

from datetime import datetime, timedelta

from sqlmodel import Session, col, delete

from service.store.db import dialect_insert
from service.store.tables import SeenWebhook


def remember(
    session: Session, source: str, webhook_id: str, *, now: datetime, retention_s: float
) -> bool:
    """Record that `source` sent the webhook `webhook_id` at `now`; False if it did before.

    Before means within the last `retention_s` seconds: an id last seen longer ago counts as
    new again. Of concurrent transactions recording one id, exactly one gets True (the others
    wait for it to commit; if it rolls back, the next one gets True).
    """
    insert = dialect_insert(session, SeenWebhook)
    statement = insert.values(source=source, webhook_id=webhook_id, seen_at=now)
    statement = statement.on_conflict_do_update(
        index_elements=["source", "webhook_id"],
        set_={"seen_at": statement.excluded.seen_at},
        where=insert.table.c.seen_at < now - timedelta(seconds=retention_s),
    )
    # A row comes back only when it was inserted or its expired id renewed.
    returned = session.connection().execute(statement.returning(insert.table.c.seen_at))
    return returned.first() is not None


def prune(session: Session, source: str, *, before: datetime) -> int:
    """Forget the ids `source` sent before `before`; returns how many were forgotten."""
    statement = (
        delete(SeenWebhook)
        .where(col(SeenWebhook.source) == source)
        .where(col(SeenWebhook.seen_at) < before)
    )
    return session.connection().execute(statement).rowcount
