"""The local store's tables: checkpoints, the outbox, delivery leases, dead letters, document
states, webhook ids, snapshot hashes and states.

Only table definitions and column types; reading and writing rows is `checkpoints` and `outbox`.
"""

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Dialect,
    Index,
    MetaData,
    Table,
    Text,
    TypeDecorator,
    inspect,
)
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

# Named constraints, so migrations can refer to them on SQLite (batch mode) and PostgreSQL alike.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC `datetime` that round-trips identically on SQLite and PostgreSQL.

    Binding a naive datetime raises `ValueError`. SQLite has no time zones, so values are stored
    there as naive UTC text (fixed width, so text order is time order); PostgreSQL stores
    `timestamptz`. Values always come back with `tzinfo=UTC`.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to UTC; naive for SQLite. Raises `ValueError` on a naive datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime cannot be stored: {value!r} needs a time zone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Read back as an aware UTC datetime."""
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class _Table(SQLModel, registry=registry(metadata=metadata)):
    """Every pandasync table lives in `metadata` (not SQLModel's global one)."""


class Checkpoint(_Table, table=True):
    """The seq up to which a source's changes are in the outbox."""

    __tablename__: ClassVar[str] = "checkpoint"

    source: str = Field(sa_type=Text, primary_key=True)
    seq: str = Field(sa_type=Text)  # `Seq.json_text`, verbatim
    updated_at: datetime = Field(sa_type=UTCDateTime)
    # The feed lease (`FeedLease.token`) it was written under; NULL when written without one.
    token: int | None = Field(default=None)


class _HeldChange(_Table):
    """The columns an outbox entry and a dead letter share: a change and its answers so far."""

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(sa_type=Text)
    doc_id: str = Field(sa_type=Text)
    external_id: str = Field(sa_type=Text)
    op: str = Field(sa_type=Text)
    row: str | None = Field(default=None, sa_type=Text)
    version: int
    source_version: str | None = Field(default=None, sa_type=Text)
    attempts: int
    answers: str = Field(sa_type=Text)


class OutboxEntry(_HeldChange, table=True):
    """An accepted change waiting for delivery; entries are appended, in acceptance order (`id`).

    `row` is a JSON array of strings (NULL for a delete); `answers` a JSON list of the recent
    delivery answers, newest last. `version` is the document's local version (`DocState`) when
    this change was accepted; `source_version` is the change's `SourceVersion.text`, if the
    source sent one. A document has at most one entry: its latest change, which
    `DocState.entry_id` names. A newer change deletes the older entry, even one a delivery
    holds: only that delivery sends the source's changes, and it sends the newer one after.
    """

    __tablename__: ClassVar[str] = "outbox_entry"
    __table_args__ = (
        CheckConstraint("op IN ('upsert', 'delete')", name="op"),
        CheckConstraint("""(op = 'upsert') = ("row" IS NOT NULL)""", name="row_matches_op"),
        # Delivery claims a source's entries in id order from here.
        Index("ix_outbox_entry_source_id", "source", "id"),
        # AUTOINCREMENT: a deleted entry's id is never reused, so neither a stale claim nor a
        # stale `DocState.entry_id` can name a newer entry.
        {"sqlite_autoincrement": True},
    )

    next_attempt_at: datetime = Field(sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class DeliveryLease(_Table, table=True):
    """Which delivery may send a source's outbox entries: one at a time, until `until`.

    Each lease taken gets the next `lease_id`; `claimed_to` is the highest entry id claimed
    under it (entries up to it may be in flight). `until` is NULL once the lease has ended;
    a lease whose `until` has passed, or whose holder has provably ended, may be taken over.
    """

    __tablename__: ClassVar[str] = "delivery_lease"

    source: str = Field(sa_type=Text, primary_key=True)
    lease_id: int
    until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    claimed_to: int | None = Field(default=None)
    # The process holding it (`holders.Holder.text()`), kept after it ended, for status.
    holder: str | None = Field(default=None, sa_type=Text)


class FeedLease(_Table, table=True):
    """Which replica follows a source's feed: one at a time, until `until`.

    Each take gets the next `token`; a replica commits a page of the feed only while its token
    is the source's and `until` has not passed, checked in the commit's own transaction.
    `until` is NULL once the lease was given back.
    """

    __tablename__: ClassVar[str] = "feed_lease"

    source: str = Field(sa_type=Text, primary_key=True)
    token: int
    holder: str | None = Field(default=None, sa_type=Text)  # `holders.Holder.text()`
    taken_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    until: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Replica(_Table, table=True):
    """A running pandasync process sharing the store, seen alive until `until`."""

    __tablename__: ClassVar[str] = "replica"

    holder: str = Field(sa_type=Text, primary_key=True)  # `holders.Holder.text()`
    started_at: datetime = Field(sa_type=UTCDateTime)
    until: datetime = Field(sa_type=UTCDateTime)


class DeadLetter(_HeldChange, table=True):
    """A change PANDA refused for good, with every answer that put it here."""

    __tablename__: ClassVar[str] = "dead_letter"
    __table_args__ = (Index("ix_dead_letter_source_doc_id", "source", "doc_id"),)

    created_at: datetime = Field(sa_type=UTCDateTime)


class DocState(_Table, table=True):
    """Every document a source has changed: its local version and the newest source version.

    `version` grows by one with each accepted change and is never reset, not even when the
    outbox entry is acked or dead-lettered: a later change always gets a higher version than
    any earlier one of the document. `source_version` is the newest `SourceVersion.text`
    accepted (NULL while the source sent none); an older change is stale.
    """

    __tablename__: ClassVar[str] = "doc_state"

    source: str = Field(sa_type=Text, primary_key=True)
    doc_id: str = Field(sa_type=Text, primary_key=True)
    version: int
    source_version: str | None = Field(default=None, sa_type=Text)
    # The document's latest entry (`OutboxEntry.id`); it may since have been delivered.
    entry_id: int | None = Field(default=None)
    # What PANDA acknowledged last for the document (`delivered.row_hash` of the dataset,
    # external_id and row, or of no row for a delete); NULL while not known, e.g. while a
    # request for it is out. An equal change need not be sent.
    delivered: str | None = Field(default=None, sa_type=Text)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class SeenWebhook(_Table, table=True):
    """A delivery id a webhook source sent (`webhook-id`, `X-GitHub-Delivery`), and when.

    Kept for the source's dedup retention, so a redelivered webhook is not applied twice.
    """

    __tablename__: ClassVar[str] = "seen_webhook"
    __table_args__ = (Index("ix_seen_webhook_source_seen_at", "source", "seen_at"),)

    source: str = Field(sa_type=Text, primary_key=True)
    webhook_id: str = Field(sa_type=Text, primary_key=True)
    seen_at: datetime = Field(sa_type=UTCDateTime)


class SnapshotSeen(_Table, table=True):
    """An id a snapshot source gave: the hash of its row last enqueued, and the last snapshot
    (generation) it was in.

    `digest` is NULL while the id's row was never enqueued. `staged_digest` and `staged_row`
    (the row's JSON array text) hold a new or changed row the snapshot under way found; they
    become `digest` and an outbox entry in one transaction once the snapshot is applied.
    """

    __tablename__: ClassVar[str] = "snapshot_seen"

    source: str = Field(sa_type=Text, primary_key=True)
    doc_id: str = Field(sa_type=Text, primary_key=True)
    digest: str | None = Field(default=None, sa_type=Text)
    seen: int
    staged_digest: str | None = Field(default=None, sa_type=Text)
    staged_row: str | None = Field(default=None, sa_type=Text)


class SnapshotState(_Table, table=True):
    """A snapshot source's latest snapshot: its generation, how far it got and what it found.

    `phase` is `reading`, `applying`, `held` (waiting for an operator's confirmation, `reason`
    says why), `done` or `failed` (`reason` says why); `counts` is a JSON object of what the
    last snapshot read whole found (see `service.sources.snapshot.Counts`), NULL before one;
    `finished_at` when the last snapshot that ended did.
    """

    __tablename__: ClassVar[str] = "snapshot_state"
    __table_args__ = (
        CheckConstraint("phase IN ('reading', 'applying', 'held', 'done', 'failed')", name="phase"),
    )

    source: str = Field(sa_type=Text, primary_key=True)
    generation: int
    phase: str = Field(sa_type=Text)
    reason: str | None = Field(default=None, sa_type=Text)
    counts: str | None = Field(default=None, sa_type=Text)
    started_at: datetime = Field(sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


def table_of(model: type[SQLModel]) -> Table:
    """The SQLAlchemy table of one of these models, for Core statements."""
    table = inspect(model).local_table
    assert isinstance(table, Table)
    return table
