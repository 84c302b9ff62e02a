"""Feed leases: which replica follows a source's feed, one at a time; and the live replicas.

A source's feed lease is one row (`FeedLease`): each take gets the next `token`, runs until
`until` unless renewed, and names its holder. A replica takes a lease that is free, has run
out, or whose holder has provably ended (a crash on this machine), and commits pages of the
feed only while `holds` says its token is still the source's, in the commit's transaction:
a replica frozen past its lease writes nothing once it wakes. Every replica also renews its
own `Replica` row, so that each knows how many share the work. Functions run inside the
caller's transaction; rows are locked (FOR UPDATE) where they decide.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy
from sqlmodel import Session, delete, update

from service.store import holders
from service.store.db import dialect_insert
from service.store.leases import renew_row
from service.store.tables import FeedLease, Replica, table_of

log = logging.getLogger(__name__)

# A replica row not renewed for this long after its `until` is removed by the others.
FORGET_AFTER = timedelta(minutes=10)


@dataclass(frozen=True)
class Held:
    """Who follows a source's feed (`holders.Holder.describe()`), since when, until when."""

    holder: str | None
    since: datetime | None
    until: datetime


def take(
    session: Session,
    source: str,
    holder: str,
    *,
    clock: Callable[[], datetime],
    lease_s: float,
    free: bool,
) -> int | None:
    """Take (or keep) `source`'s feed lease for `holder` for `lease_s`; its token, or None
    when another replica holds it. With `free` False, only a lease `holder` holds already is
    kept (a replica at its share takes no more).

    The time is read from `clock` once the lease's row is locked: a time read before would be
    stale by however long the lock was waited for, behind a commit under the lease or its
    giving back, and the new lease would seem taken before that commit."""
    insert = dialect_insert(session, FeedLease)
    session.execute(
        insert.values(source=source, token=0).on_conflict_do_nothing(index_elements=["source"])
    )
    leases = insert.table.c
    row = session.execute(
        sqlalchemy.select(leases.token, leases.holder, leases.until)
        .where(leases.source == source)
        .with_for_update()
    ).one()
    now = clock()
    until = now + timedelta(seconds=lease_s)
    live = row.until is not None and row.until > now
    table = table_of(FeedLease)
    if live and row.holder == holder:
        session.execute(update(table).where(table.c.source == source).values(until=until))
        return int(row.token)
    if not free or (live and not _gone(source, row.holder)):
        return None
    token = int(row.token) + 1
    session.execute(
        update(table)
        .where(table.c.source == source)
        .values(token=token, holder=holder, taken_at=now, until=until)
    )
    return token


def _gone(source: str, holder_text: str | None) -> bool:
    holder = holders.Holder.of(holder_text)
    if holder is None or not holders.gone(holder):
        return False
    log.warning(
        "feed lease of a process that has ended taken over: source=%s holder=%s",
        source,
        holder.describe(),
    )
    return True


def renew(
    session: Session, source: str, token: int, *, now: datetime, until: datetime
) -> str | None:
    """Hold `source`'s lease `token` on until `until`. None once renewed; when it is no longer
    held (taken over, given back, or run out at `now`), why not (`leases.renew_row`), read
    in the same transaction."""
    table = table_of(FeedLease)
    return renew_row(table, table.c.token, session, source, token, now=now, until=until)


def holds(session: Session, source: str, token: int, now: datetime) -> bool:
    """Whether `token` is `source`'s live lease at `now`, the row locked until the transaction
    ends (so no one takes it over before a commit under it is done)."""
    leases = table_of(FeedLease).c
    row = session.execute(
        sqlalchemy.select(leases.token, leases.until)
        .where(leases.source == source)
        .with_for_update()
    ).one_or_none()
    return row is not None and row.token == token and row.until is not None and row.until > now


def give_back(session: Session, source: str, token: int) -> None:
    """End `source`'s lease `token`, if still held, so another replica may take it at once."""
    table = table_of(FeedLease)
    session.execute(
        update(table).where(table.c.source == source, table.c.token == token).values(until=None)
    )


def held(session: Session, now: datetime) -> dict[str, Held]:
    """Every source's live feed lease at `now`, by source."""
    leases = table_of(FeedLease).c
    rows = session.execute(
        sqlalchemy.select(leases.source, leases.holder, leases.taken_at, leases.until).where(
            leases.until > now
        )
    )
    return {row.source: Held(_describe(row.holder), row.taken_at, row.until) for row in rows.all()}


def _describe(holder_text: str | None) -> str | None:
    holder = holders.Holder.of(holder_text)
    return None if holder is None else holder.describe()


def heartbeat(session: Session, holder: str, *, now: datetime, until: datetime) -> int:
    """Renew `holder`'s replica row until `until`; returns how many replicas are alive at
    `now` (itself included). Rows long run out are removed."""
    insert = dialect_insert(session, Replica)
    table = insert.table
    session.execute(
        insert.values(holder=holder, started_at=now, until=until).on_conflict_do_update(
            index_elements=["holder"], set_={"until": until}
        )
    )
    session.execute(delete(table).where(table.c.until < now - FORGET_AFTER))
    alive = session.execute(sqlalchemy.select(table.c.holder).where(table.c.until > now))
    # A replica that provably ended (a crash on this machine) no longer counts.
    return sum(
        not holders.gone(found) if (found := holders.Holder.of(text)) else True for (text,) in alive
    )


def replicas(session: Session, now: datetime) -> list[tuple[str | None, datetime]]:
    """The live replicas at `now` (`describe()`, started at), oldest first."""
    table = table_of(Replica).c
    rows = session.execute(
        sqlalchemy.select(table.holder, table.started_at)
        .where(table.until > now)
        .order_by(table.started_at)
    )
    return [(_describe(holder), started) for holder, started in rows.all()]


def leave(session: Session, holder: str) -> None:
    """`holder` stops: its replica row and every feed lease it holds end now."""
    table = table_of(FeedLease)
    session.execute(update(table).where(table.c.holder == holder).values(until=None))
    session.execute(delete(table_of(Replica)).where(table_of(Replica).c.holder == holder))
