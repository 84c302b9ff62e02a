"""The store's engine: `Database.run(fn, ...)` runs `fn(session, ...)` in one transaction.

Opens SQLite or PostgreSQL, checks and migrates the schema (Alembic); holds no business logic.
"""

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import anyio.to_thread
import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    URL,
    BigInteger,
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    Table,
    Text,
    TypeDecorator,
    any_,
    bindparam,
    event,
    func,
    inspect,
    make_url,
    select,
)
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlmodel import Session, SQLModel

P = ParamSpec("P")
T = TypeVar("T")

# The repository's `alembic/` folder, next to `service/`.
ALEMBIC_DIR = Path(__file__).resolve().parents[2] / "alembic"
# How long an SQLite writer waits for another one's transaction before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000
_SUPPORTED = ("sqlite:///path/to/pandasync.db", "postgresql://user@host/database")


class DatabaseUrlError(ValueError):
    """`database_url` is not a URL pandasync can use: fix the setting."""


def database_url(url: str) -> URL:
    """Parse a database URL, rewriting `postgresql://` (and `postgres://`) to psycopg 3.

    Raises `DatabaseUrlError` (never quoting the URL, which may hold a password) unless the
    URL is SQLite (pysqlite) or PostgreSQL (psycopg).
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(
            f"database_url is not a database URL: write one like {' or '.join(_SUPPORTED)}"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise DatabaseUrlError(
            f"database_url uses {parsed.drivername!r}, which pandasync does not support: "
            f"use {' or '.join(_SUPPORTED)}"
        )
    return parsed


# PostgreSQL ends a session idle inside a transaction for this long (see _configure_postgresql).
IDLE_IN_TRANSACTION_MS = 5000


class SchemaError(Exception):
    """The database's schema does not match this pandasync: the message says what to run."""


class UnreachableError(Exception):
    """The database at `database_url` cannot be reached: the message says which (password
    hidden), why, and what to check."""


def create_engine(url: str) -> Engine:
    """A SQLAlchemy engine for `url` (see `database_url`), set up for concurrent writers.

    SQLite: usable from any thread, WAL journal, a busy timeout, foreign keys on, and every
    transaction starts with `BEGIN IMMEDIATE` so concurrent writers queue on the busy timeout
    instead of failing when a reader upgrades to a writer. Connects lazily.
    """
    parsed = database_url(url)
    if parsed.get_backend_name() == "postgresql":
        engine = sa_create_engine(parsed, pool_pre_ping=True)
        event.listen(engine, "connect", _configure_postgresql)
        event.listen(engine, "do_executemany", _executemany_then_sync)
        return engine
    engine = sa_create_engine(parsed, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _configure_sqlite)
    event.listen(engine, "begin", _begin_immediate)
    return engine


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy's documented pysqlite recipe: stop sqlite3 from emitting its own (deferred)
    # BEGIN, and emit BEGIN IMMEDIATE on the engine's `begin` event instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # FULL, not WAL's usual NORMAL: a committed change must survive a power cut.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _configure_postgresql(dbapi_connection: Any, _record: Any) -> None:
    # A replica frozen inside a transaction (SIGSTOP, a stalled VM) would hold its row locks,
    # and with them every lease it locked, until its connection died: PostgreSQL ends such a
    # session after this, well within a lease, so the others can take over.
    cursor = dbapi_connection.cursor()
    cursor.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
    cursor.close()
    dbapi_connection.commit()


def _executemany_then_sync(
    cursor: Any, statement: str, parameters: Any, context: Any
) -> Literal[True]:
    """SQLAlchemy's executemany on PostgreSQL, with `executemany` below (True: done)."""
    executemany(cursor, statement, parameters, context.dialect)
    return True


def executemany(cursor: Any, statement: str, parameters: Any, dialect: Dialect) -> None:
    """`cursor.executemany`, then, on PostgreSQL (psycopg), one plain statement on the same
    connection.

    psycopg sends the rows in pipeline mode, and PostgreSQL arms its idle-in-transaction
    timeout only when it answers a complete command: after a pipeline's last message it did
    not (measured on PostgreSQL 15 with psycopg 3.3). A replica frozen between such a batch
    and its commit (SIGSTOP, `docker pause`) then kept its row locks, and the feed and
    delivery leases behind them, for as long as its connection lived, where
    `IDLE_IN_TRANSACTION_MS` is meant to end its session. The plain statement after the
    batch arms the timeout again; it leaves `cursor` (its row count) alone.
    """
    cursor.executemany(statement, parameters)
    if dialect.name == "postgresql":
        cursor.connection.execute("SELECT 1")


def _begin_immediate(connection: Connection) -> None:
    # On the driver's connection: through `exec_driver_sql` it cost a sixth of a whole group
    # commit (bench/webhook_ingest.py). Its errors (busy past the timeout) as SQLAlchemy's.
    _Driver(connection.connection.driver_connection, connection.dialect).execute(
        "BEGIN IMMEDIATE", ()
    )


# Rows in one multi-row statement of `execute_values` at most: with the widest table's 12
# columns, well under SQLite's 32,766 bound parameters and PostgreSQL's 65,535.
ROWS_PER_STATEMENT = 256


def execute_values(
    session: Session,
    head: str,
    rows: Sequence[Sequence[Any]],
    *,
    tail: str = "",
    tail_parameters: Sequence[Any] = (),
) -> list[Any]:
    """Run `{head} VALUES (...), (...) {tail}` over `rows`, each a tuple of parameters, in
    statements of a power of two rows, at most `ROWS_PER_STATEMENT`; the rows they return
    (`RETURNING` in `tail`), in no set order. `tail` holds a `?` (and no other) for each of
    `tail_parameters`, bound after each statement's rows.

    Plain SQL on the driver's cursor, in the session's transaction: the hot path's statements
    cost a fraction of their SQLAlchemy form (bench/webhook_ingest.py). The driver's errors
    are raised as SQLAlchemy's (`OperationalError`...), without the parameters. Times must be
    bound as `bind_time` gives them; values are never rendered into the SQL.

    Powers of two, so that a statement has one of nine shapes whatever the number of rows:
    the drivers keep each connection's recent statements prepared (sqlite3 128 of them, 1.5 KiB
    of SQLite's memory a row of VALUES), and a shape for every count would fill that cache
    with statements of hundreds of KiB.
    """
    driver = _Driver.of(session)
    returned: list[Any] = []
    start = 0
    while start < len(rows):
        size = min(ROWS_PER_STATEMENT, 1 << ((len(rows) - start).bit_length() - 1))
        page = rows[start : start + size]
        start += size
        group = f"({', '.join(['?'] * len(page[0]))})"
        values = ", ".join([group] * len(page))
        parameters = (*chain.from_iterable(page), *tail_parameters)
        returned += driver.execute(f"{head} VALUES {values} {tail}", parameters)
    return returned


def execute_many(session: Session, statement: str, rows: Sequence[Sequence[Any]]) -> None:
    """Run `statement` (plain SQL, `?` for each parameter and nowhere else) once for each row
    of parameters, on the driver's cursor in the session's transaction (see
    `execute_values`)."""
    _Driver.of(session).execute(statement, rows, many=True)


_DRIVER = "pandasync.driver"


@dataclass(frozen=True)
class _Driver:
    """The driver's own connection under a session's transaction, and its dialect."""

    connection: Any
    dialect: Dialect

    @classmethod
    def of(cls, session: Session) -> "_Driver":
        """The session's, found once a transaction (`Session.connection` costs as much as a
        statement here)."""
        transaction = session.get_transaction()
        found = session.info.get(_DRIVER)
        if found is not None and transaction is not None and found[0] is transaction:
            driver: _Driver = found[1]
            return driver
        connection = session.connection()
        driver = cls(connection.connection.driver_connection, connection.dialect)
        session.info[_DRIVER] = (session.get_transaction(), driver)
        return driver

    def execute(self, statement: str, parameters: Any, *, many: bool = False) -> list[Any]:
        """Run `statement` (`?` placeholders) with `parameters` (a sequence of them when
        `many`); the rows it returns."""
        if self.dialect.paramstyle != "qmark":
            statement = statement.replace("?", "%s")
        dbapi = self.dialect.loaded_dbapi
        cursor = self.connection.cursor()
        try:
            if many:
                executemany(cursor, statement, parameters, self.dialect)
                return []
            cursor.execute(statement, parameters)
            return cursor.fetchall() if cursor.description else []
        except dbapi.Error as error:
            raise DBAPIError.instance(
                statement, None, error, dbapi.Error, hide_parameters=True, dialect=self.dialect
            ) from error
        finally:
            cursor.close()


def bind_time(session: Session, value: datetime) -> datetime | str:
    """`value` (aware) as `execute_values` binds a `UTCDateTime` column: what
    `tables.UTCDateTime` stores, naive UTC text on SQLite (SQLAlchemy's format for it)."""
    if session.get_bind().dialect.name == "postgresql":
        return value
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def dialect_insert(session: Session, model: type[SQLModel]) -> sqlite.Insert | postgresql.Insert:
    """A Core INSERT into `model`'s table that has the session's `on_conflict_do_update`."""
    table = inspect(model).local_table
    assert isinstance(table, Table)
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


class _JsonIntegers(TypeDecorator[list[int]]):
    """A list of integers bound as one JSON array text, for SQLite's `json_each`."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: list[int] | None, dialect: Dialect) -> str | None:
        return None if value is None else orjson.dumps(value).decode()


def in_integers(session: Session, column: ColumnElement[int], name: str) -> ColumnElement[bool]:
    """`column IN` the list of integers bound as parameter `name`, however long it is.

    One parameter, not one per value: the statement compiles once and stays cached, where
    an expanding IN is rendered anew for each length.
    """
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(BigInteger)))
    values = func.json_each(bindparam(name, type_=_JsonIntegers())).table_valued("value")
    return column.in_(select(values.c.value))


class _JsonTexts(TypeDecorator[list[str]]):
    """A list of strings bound as one JSON array text, for SQLite's `json_each`."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> str | None:
        # ASCII escapes: a lone surrogate (which JSON allows) binds as text too.
        return None if value is None else json.dumps(value)


def in_texts(session: Session, column: ColumnElement[str], name: str) -> ColumnElement[bool]:
    """`column IN` the list of strings bound as parameter `name` (see `in_integers`)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(Text)))
    values = func.json_each(bindparam(name, type_=_JsonTexts())).table_valued("value")
    return column.in_(select(values.c.value))


def alembic_config(url: str | None = None, *, migrations: Path = ALEMBIC_DIR) -> Config:
    """Alembic's configuration for the scripts in `migrations`, and for `url` if given.

    For `alembic.command` functions; `alembic/env.py` reads the URL back. Raises
    `DatabaseUrlError` for a bad URL.
    """
    config = Config()
    config.set_main_option("script_location", str(migrations))
    config.set_main_option("path_separator", "os")
    if url is not None:
        rendered = database_url(url).render_as_string(hide_password=False)
        # The config is an INI parser: a literal `%` (as in `options=-csearch_path%3D...`)
        # must be written `%%`.
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Apply every Alembic migration up to head to the database at `url`.

    Idempotent (a database already at head is left alone); all in one transaction, so a
    failed migration leaves the database as it was. Raises `DatabaseUrlError` for a bad URL,
    `UnreachableError` when the database cannot be reached.
    """
    try:
        command.upgrade(alembic_config(url), "head")
    except OperationalError as error:
        raise _unreachable(database_url(url), error) from None


def _unreachable(url: URL, error: OperationalError) -> UnreachableError:
    # The driver's own words (psycopg's and sqlite3's never quote the password), first line
    # only: the rest is SQLAlchemy's pointer to its docs.
    reason = str(error.orig or error).strip().splitlines()[0]
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return UnreachableError(
        f"database {url.render_as_string(hide_password=True)} cannot be reached ({reason}):"
        " check database_url and that the database server is running"
    )


def _revisions(revisions: Iterable[str]) -> str:
    return ", ".join(sorted(revisions))


class Database:
    """The store: an engine, and transactions around functions that take a `Session`."""

    def __init__(self, engine: Engine, *, migrations: Path = ALEMBIC_DIR) -> None:
        """Wrap an engine made by `create_engine` (disposed of by `close`).

        `migrations` is the Alembic script folder `check_schema` compares with.
        """
        self._engine = engine
        self._migrations = migrations

    @classmethod
    def open(cls, url: str) -> "Database":
        """A `Database` for `url` (connects lazily; raises `DatabaseUrlError` for a bad URL)."""
        return cls(create_engine(url))

    @property
    def engine(self) -> Engine:
        """The underlying SQLAlchemy engine."""
        return self._engine

    def describe(self) -> str:
        """The database URL for messages, with its password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    async def run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn(session, *args, **kwargs)` in a worker thread, in one transaction.

        Commits when `fn` returns and rolls back when it raises (the exception propagates).
        If the caller is cancelled, the thread still finishes and commits or rolls back:
        the transaction is all or nothing either way. Returned ORM objects are detached
        but keep their loaded attributes.
        """
        return await anyio.to_thread.run_sync(lambda: self.run_sync(fn, *args, **kwargs))

    def run_sync(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`run` in the caller's thread (for the CLI and tests); blocks until committed."""
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            return fn(session, *args, **kwargs)

    def _missing_file(self) -> bool:
        """Whether this is a SQLite database whose file does not exist."""
        url = self._engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return False
        return not url.query.get("uri") and not Path(url.database).exists()

    def check_schema(self) -> None:
        """Raise `SchemaError` unless the database is migrated to exactly this code's head
        (`UnreachableError` when it cannot be reached).

        The message names the database (password hidden) and what to do: run
        `pandasync migrate` (no schema, or an older one), or upgrade pandasync (a newer one).
        """
        if self._missing_file():
            # Connecting would create an empty file, and leave it behind.
            raise SchemaError(
                f"database {self.describe()} does not exist yet: run `pandasync migrate`"
                " to create it"
            )
        script = ScriptDirectory.from_config(alembic_config(migrations=self._migrations))
        heads = set(script.get_heads())
        current = self._current_heads()
        if current == heads:
            return
        where = f"database {self.describe()}"
        if not current:
            raise SchemaError(f"{where} has no pandasync schema: run `pandasync migrate`")
        unknown = current - {revision.revision for revision in script.walk_revisions()}
        if unknown:
            raise SchemaError(
                f"{where} was migrated by a newer pandasync (revision {_revisions(unknown)}): "
                "upgrade pandasync or point database_url elsewhere"
            )
        raise SchemaError(
            f"{where} is at revision {_revisions(current)}, this pandasync needs "
            f"{_revisions(heads)}: run `pandasync migrate`"
        )

    def _current_heads(self) -> set[str]:
        """The revisions the database is at; `UnreachableError` when it cannot be reached."""
        try:
            with self._engine.connect() as connection:
                return set(MigrationContext.configure(connection).get_current_heads())
        except OperationalError as error:
            raise _unreachable(self._engine.url, error) from None

    def close(self) -> None:
        """Close every pooled connection. Idempotent."""
        self._engine.dispose()
