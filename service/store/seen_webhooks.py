"""Delivery ids each webhook source has sent, so a redelivered webhook is applied only once.

Functions run inside the caller's transaction: an id is recorded together with the webhook's
changes, or not at all. They never commit.
"""

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlmodel import Session, col, delete

from service.store.db import bind_time, execute_values
from service.store.tables import SeenWebhook, table_of


def remember(
    session: Session, source: str, webhook_id: str, *, now: datetime, retention_s: float
) -> bool:
    """Record that `source` sent the webhook `webhook_id` at `now`; False if it did before.

    Before means within the last `retention_s` seconds: an id last seen longer ago counts as
    new again. Of concurrent transactions recording one id, exactly one gets True (the others
    wait for it to commit; if it rolls back, the next one gets True).
    """
    return webhook_id in remember_many(
        session, source, [webhook_id], now=now, retention_s=retention_s
    )


def remember_many(
    session: Session, source: str, webhook_ids: Sequence[str], *, now: datetime, retention_s: float
) -> set[str]:
    """`remember` for many ids in one statement: those that were new, now recorded at `now`.

    An id given twice is new at most once (its first time).
    """
    if not webhook_ids:
        return set()
    at = bind_time(session, now)
    # A row comes back only when it was inserted or its expired id renewed. Each id once:
    # PostgreSQL refuses an upsert that touches one row twice.
    returned = execute_values(
        session,
        "INSERT INTO seen_webhook (source, webhook_id, seen_at)",
        [(source, webhook_id, at) for webhook_id in dict.fromkeys(webhook_ids)],
        tail="ON CONFLICT (source, webhook_id) DO UPDATE SET seen_at = excluded.seen_at"
        " WHERE seen_webhook.seen_at < ? RETURNING webhook_id",
        tail_parameters=[bind_time(session, now - timedelta(seconds=retention_s))],
    )
    return {webhook_id for (webhook_id,) in returned}


def seen(
    session: Session, source: str, webhook_ids: Sequence[str], *, now: datetime, retention_s: float
) -> set[str]:
    """Which of `webhook_ids` `source` sent within the last `retention_s` seconds; writes
    nothing."""
    if not webhook_ids:
        return set()
    columns = table_of(SeenWebhook).c
    found = session.connection().execute(
        select(columns.webhook_id)
        .where(columns.source == source)
        .where(columns.webhook_id.in_(set(webhook_ids)))
        .where(columns.seen_at >= now - timedelta(seconds=retention_s))
    )
    return set(found.scalars())


def prune(session: Session, source: str, *, before: datetime) -> int:
    """Forget the ids `source` sent before `before`; returns how many were forgotten."""
    statement = (
        delete(SeenWebhook)
        .where(col(SeenWebhook.source) == source)
        .where(col(SeenWebhook.seen_at) < before)
    )
    return session.connection().execute(statement).rowcount
