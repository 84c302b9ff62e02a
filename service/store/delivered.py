"""What PANDA holds of each document, as far as the store knows: so an unchanged row is not sent.

Each document's state (`DocState.delivered`) keeps a hash of what PANDA acknowledged last for
it: the dataset slug, the external_id and the row (or no row, for a delete). A claimed change
with the same hash would write what PANDA already has: it is settled without a request.
Before any other claim goes out its hash is cleared, in a transaction committed before the
request: a request that fails, is cut off or dies with the process leaves "not known", so
the document's next change is always sent. Functions run inside the caller's transaction.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlmodel import Session

from service.changes import Change, Op
from service.store import leases, outbox
from service.store.db import in_integers
from service.store.outbox import Claim
from service.store.tables import DocState, OutboxEntry, table_of


def row_hash(slug: str, external_id: str, row_json: str | None) -> str:
    """The hash of PANDA holding `row_json` (a row's JSON array text, as the outbox stores it;
    None: no row) as row `external_id` of dataset `slug`."""
    text = f"{slug}\n{external_id}\n{'' if row_json is None else row_json}\n{row_json is None}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def claim_hash(slug: str, claim: Claim) -> str:
    """`row_hash` of what delivering `claim` to dataset `slug` leaves in PANDA."""
    return row_hash(slug, claim.external_id, claim.row_json)


def sift(session: Session, unchanged: Sequence[Claim], sending: Sequence[Claim]) -> bool:
    """Before a batch goes out: settle the `unchanged` claims (PANDA holds them already) and
    forget what PANDA holds of the documents of `sending` (their requests may land or not).

    Returns False, changing nothing, when the claims' lease was lost.
    """
    known = [claim for claim in sending if claim.delivered is not None]
    claims = [*unchanged, *known]
    if not claims:
        return True
    if not leases.holds(session, claims[0].source, claims[0].lease):
        return False
    outbox.ack_many(session, unchanged)
    _set(session, [(claim, None) for claim in known])
    return True


def record(session: Session, slug: str, delivered: Sequence[Claim]) -> None:
    """PANDA acknowledged `delivered` (claims of one lease) in dataset `slug`; nothing is
    recorded when their lease was lost."""
    if delivered and leases.holds(session, delivered[0].source, delivered[0].lease):
        _set(session, [(claim, claim_hash(slug, claim)) for claim in delivered])


def forget(session: Session, source: str) -> None:
    """Nothing is known any more of what PANDA holds of `source`'s documents (its dataset was
    created anew, or an operator says PANDA was changed by hand)."""
    table = table_of(DocState)
    session.execute(
        update(table)
        .where(table.c.source == source)
        .where(table.c.delivered.is_not(None))
        .values(delivered=None)
    )


def _set(session: Session, values: Sequence[tuple[Claim, str | None]]) -> None:
    if not values:
        return
    table = table_of(DocState)
    session.connection().execute(
        update(table)
        .where(table.c.source == bindparam("key_source"))
        .where(table.c.doc_id == bindparam("key_doc_id"))
        .values(delivered=bindparam("new_delivered")),
        [
            {"key_source": claim.source, "key_doc_id": claim.doc_id, "new_delivered": value}
            for claim, value in values
        ],
    )


@dataclass(frozen=True, slots=True)
class Document:
    """A document of a source as the store knows it: what PANDA acknowledged last for it
    (`DocState.delivered`) and the operation of its change waiting for delivery, if any."""

    doc_id: str
    delivered: str | None
    pending: Op | None


def documents(session: Session, source: str) -> list[Document]:
    """Every document `source` ever changed."""
    states, entries = table_of(DocState).c, table_of(OutboxEntry).c
    rows = session.execute(
        select(states.doc_id, states.delivered, entries.op)
        .select_from(
            table_of(DocState).outerjoin(table_of(OutboxEntry), entries.id == states.entry_id)
        )
        .where(states.source == source)
    )
    return [Document(doc_id, known, None if op is None else Op(op)) for doc_id, known, op in rows]


def forget_documents(session: Session, source: str, doc_ids: Sequence[str]) -> None:
    """Nothing is known any more of what PANDA holds of these documents of `source`: their
    next change is sent whatever it holds."""
    table = table_of(DocState)
    session.connection().execute(
        update(table)
        .where(table.c.source == source)
        .where(table.c.doc_id == bindparam("key_doc_id"))
        .values(delivered=None),
        [{"key_doc_id": doc_id} for doc_id in doc_ids],
    )


def delete_orphans(session: Session, slug: str, orphans: Sequence[Change], *, now: datetime) -> int:
    """Queue `orphans` (deletes of rows PANDA holds that no document of their source has),
    less those whose document has become a row meanwhile; returns how many were queued.

    The documents' states are locked first, so a change of one taken in at the same time
    waits and goes out after the delete, never before it.
    """
    keys = {(change.source, change.doc_id) for change in orphans}
    states = outbox.lock_states(session, keys, now)
    entries = table_of(OutboxEntry).c
    pending_ids = [state.entry_id for state in states.values() if state.entry_id is not None]
    upserts = set(
        session.execute(
            select(entries.source, entries.doc_id)
            .where(in_integers(session, entries.id, "ids"))
            .where(entries.op == Op.UPSERT.value),
            {"ids": pending_ids},
        ).all()
    )
    known = dict(
        session.execute(
            select(table_of(DocState).c.doc_id, table_of(DocState).c.delivered)
            .where(table_of(DocState).c.source.in_({source for source, _ in keys}))
            .where(table_of(DocState).c.doc_id.in_({doc_id for _, doc_id in keys}))
        ).all()
    )
    gone = [
        change
        for change in orphans
        if (change.source, change.doc_id) not in upserts
        and known.get(change.doc_id) in (None, row_hash(slug, change.external_id, None))
    ]
    outbox.enqueue(session, gone, now=now)
    return len(gone)
