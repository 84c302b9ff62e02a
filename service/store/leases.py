"""Delivery leases: which delivery may send a source's outbox entries, one at a time.

A source's lease is one row (`DeliveryLease`): each lease taken gets the next `lease_id`, runs
until `until` unless renewed, and names its holder (`holders.Holder`). A claim takes the lease
when it is free, has run out, or its holder has provably ended (a crash on this machine); the
holding delivery renews it while a batch is out and ends it when the batch is settled.
Functions run inside the caller's transaction; the row is locked (FOR UPDATE) where it decides.
"""

import logging
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy
from sqlalchemy import CursorResult
from sqlmodel import Session, update

from service.store import holders
from service.store.db import dialect_insert
from service.store.tables import DeliveryLease, table_of

log = logging.getLogger(__name__)


def holds(session: Session, source: str, lease: int) -> bool:
    """Whether `lease` is still `source`'s lease (locked until the transaction ends); logs
    when another delivery has taken it over."""
    leases = table_of(DeliveryLease).c
    held = session.execute(
        sqlalchemy.select(leases.lease_id).where(leases.source == source).with_for_update()
    ).scalar_one_or_none()
    if held == lease:
        return True
    log.warning("delivery lease lost, another delivery took the source over: source=%s", source)
    return False


def end(session: Session, source: str, lease: int, *, keep: bool = False) -> None:
    """End `source`'s lease `lease` so that the next delivery may claim at once.

    With `keep`, the lease runs on until it expires instead: for a request cut off in flight,
    which PANDA may still apply, so no delivery sends a newer change of its rows before then.
    A lease another delivery has taken over is left alone.
    """
    if keep or not holds(session, source, lease):
        return
    leases = table_of(DeliveryLease)
    session.execute(
        update(leases).where(leases.c.source == source).values(until=None, claimed_to=None)
    )


def renew(
    session: Session, source: str, lease: int, *, now: datetime, until: datetime
) -> str | None:
    """Hold `source`'s lease `lease` on until `until` (the heartbeat of a delivery holding
    it). None once renewed; when it is no longer held (taken over, ended, or run out at
    `now`), why not (`why_lost`), read in the same transaction."""
    leases = table_of(DeliveryLease)
    return renew_row(leases, leases.c.lease_id, session, source, lease, now=now, until=until)


def renew_row(
    table: sqlalchemy.Table,
    key: sqlalchemy.Column[int],
    session: Session,
    source: str,
    held: int,
    *,
    now: datetime,
    until: datetime,
) -> str | None:
    """`renew` for a lease table (`source`, `holder`, `until`) whose lease is `key` = `held`:
    the delivery leases' and the feed leases' (`follows.renew`)."""
    renewed = session.execute(
        update(table)
        .where(table.c.source == source, key == held, table.c.until > now)
        .values(until=until)
    )
    assert isinstance(renewed, CursorResult)
    if renewed.rowcount == 1:
        return None
    row = session.execute(
        sqlalchemy.select(key, table.c.holder, table.c.until).where(table.c.source == source)
    ).one_or_none()
    if row is None:
        return why_lost(taken=True, holder=None, until=None, now=now)
    return why_lost(taken=row[0] != held, holder=row.holder, until=row.until, now=now)


def why_lost(*, taken: bool, holder: str | None, until: datetime | None, now: datetime) -> str:
    """Why a lease was found lost at `now`: taken over (by `holder`, as stored), ended, or run
    out before it was renewed with no one taking it over (`until` its end)."""
    if taken:
        described = holders.Holder.of(holder)
        return f"taken over by {'another process' if described is None else described.describe()}"
    if until is None:
        return "ended"
    late_s = (now - until).total_seconds()
    return (
        f"ran out {late_s:.1f} s before it was renewed, and no one took it over: the renewal"
        " came late (the store busy, or this process stalled)"
    )


def until(session: Session, source: str, now: datetime) -> datetime | None:
    """When `source`'s lease runs out, if a delivery holds it at `now`; None when it is free.

    After a request cut off at shutdown, or a crash on another machine, the lease stays until
    then and the source's entries wait for it (a crashed process's lease on this machine is
    taken over at once)."""
    return held_by(session, source, now)[0]


def held_by(session: Session, source: str, now: datetime) -> tuple[datetime | None, str | None]:
    """`until`, and who holds the lease (`host pid N`, "a process that has ended" when
    provably gone, None when free or unknown)."""
    leases = table_of(DeliveryLease).c
    row = session.execute(
        sqlalchemy.select(leases.until, leases.holder).where(leases.source == source)
    ).one_or_none()
    if row is None or row.until is None or row.until <= now:
        return None, None
    holder = holders.Holder.of(row.holder)
    if holder is None:
        return row.until, None
    ended = " (a process that has ended: taken over at the next claim)"
    return row.until, holder.describe() + (ended if holders.gone(holder) else "")


def start_claim(
    session: Session, source: str, now: datetime, lease: int | None
) -> tuple[int, int] | None:
    """The lease a claim goes under and the entry id it claims after; None when it may not
    claim (another delivery holds the source, or `lease` was lost or has ended)."""
    held = _locked_lease(session, source)
    if lease is None:
        if held.until is not None and held.until > now and not _holder_gone(source, held):
            _log_waiting(source, held)
            return None  # another delivery holds the source
        return held.lease_id + 1, 0
    if held.lease_id != lease or held.until is None:
        log.warning("delivery lease lost or ended, nothing claimed under it: source=%s", source)
        return None
    return lease, held.claimed_to or 0


def hold(session: Session, source: str, lease: int, until: datetime, claimed_to: int) -> datetime:
    """Hold `source`'s lease `lease` until `until`, entries up to `claimed_to` claimed."""
    leases = table_of(DeliveryLease)
    session.execute(
        update(leases)
        .where(leases.c.source == source)
        .values(lease_id=lease, until=until, claimed_to=claimed_to, holder=holders.me().text())
    )
    return until


@dataclass(frozen=True)
class _Lease:
    lease_id: int
    until: datetime | None
    claimed_to: int | None
    holder: str | None


def _holder_gone(source: str, held: _Lease) -> bool:
    """Whether the process holding `held` has provably ended (a crash on this machine): then
    its lease is taken over at once instead of waiting until it runs out. The dead process's
    requests ended with it (PANDA applies a request it had begun under its dataset lock, which
    holds off the next writer: panda-api.md §3.3.7)."""
    holder = holders.Holder.of(held.holder)
    if holder is None or not holders.gone(holder):
        return False
    log.warning(
        "delivery lease of a process that has ended taken over: source=%s holder=%s until=%s",
        source,
        holder.describe(),
        held.until.isoformat(timespec="seconds") if held.until else None,
    )
    return True


# The (source, holder) pairs waited for, so that waiting for another process is logged once
# per holder (replicas take turns at a source's lease all the time).
_waited_for: set[tuple[str, str | None]] = set()


def _log_waiting(source: str, held: _Lease) -> None:
    if (source, held.holder) in _waited_for:
        return
    _waited_for.add((source, held.holder))
    holder = holders.Holder.of(held.holder)
    until = held.until.isoformat(timespec="seconds") if held.until else None
    if holder == holders.me():
        log.info(
            "delivery waits for its source's lease to run out, kept for a request cut off"
            " that PANDA may still apply: source=%s until=%s",
            source,
            until,
        )
        return
    log.info(
        "delivery waits, another process holds the source's lease and renews it: source=%s"
        " holder=%s until=%s",
        source,
        holder.describe() if holder else "unknown",
        until,
    )


def _locked_lease(session: Session, source: str) -> _Lease:
    """`source`'s lease row, created (lease 0, ended) when missing, locked until the
    transaction ends."""
    insert = dialect_insert(session, DeliveryLease)
    session.execute(
        insert.values(source=source, lease_id=0).on_conflict_do_nothing(index_elements=["source"])
    )
    leases = insert.table.c
    row = session.execute(
        sqlalchemy.select(leases.lease_id, leases.until, leases.claimed_to, leases.holder)
        .where(leases.source == source)
        .with_for_update()
    ).one()
    return _Lease(row.lease_id, row.until, row.claimed_to, row.holder)
