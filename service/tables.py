"""The local store's tables: checkpoints, the outbox and its dead letters (SQLModel).

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
    Text,
    TypeDecorator,
    UniqueConstraint,
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


class OutboxEntry(_Table, table=True):
    """The latest undelivered change of one source document (one entry per document).

    `row` is a JSON array of strings (NULL for a delete); `answers` a JSON list of the recent
    delivery answers, newest last. `version` grows each time a newer change replaces the entry.
    `claimed_until` is the lease of a delivery in flight.
    """

    __tablename__: ClassVar[str] = "outbox_entry"
    __table_args__ = (
        UniqueConstraint("source", "doc_id"),
        CheckConstraint("op IN ('upsert', 'delete')", name="op"),
        CheckConstraint("""(op = 'upsert') = ("row" IS NOT NULL)""", name="row_matches_op"),
        Index("ix_outbox_entry_due", "next_attempt_at", "id"),
        # AUTOINCREMENT: a deleted entry's id is never reused, so a stale claim cannot match
        # a newer entry by id and version.
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(sa_type=Text)
    doc_id: str = Field(sa_type=Text)
    external_id: str = Field(sa_type=Text)
    op: str = Field(sa_type=Text)
    row: str | None = Field(default=None, sa_type=Text)
    version: int
    attempts: int
    answers: str = Field(sa_type=Text)
    next_attempt_at: datetime = Field(sa_type=UTCDateTime)
    claimed_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class DeadLetter(_Table, table=True):
    """A change PANDA refused for good, with every answer that put it here."""

    __tablename__: ClassVar[str] = "dead_letter"
    __table_args__ = (Index("ix_dead_letter_source_doc_id", "source", "doc_id"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(sa_type=Text)
    doc_id: str = Field(sa_type=Text)
    external_id: str = Field(sa_type=Text)
    op: str = Field(sa_type=Text)
    row: str | None = Field(default=None, sa_type=Text)
    version: int
    attempts: int
    answers: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
