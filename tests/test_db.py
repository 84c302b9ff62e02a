"""`service.store.db`: URLs, transactions, SQLite's setup and UTC datetimes, on both stores."""

import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import anyio
import pytest
from sqlalchemy import DateTime, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, StatementError
from sqlmodel import Session, select

from service.changes import Change, Op, Seq
from service.store import checkpoints, outbox
from service.store.db import (
    Database,
    DatabaseUrlError,
    bind_time,
    database_url,
    execute_many,
    execute_values,
)
from service.store.tables import Checkpoint
from tests.waiting import wait_until


def _save(session: Session, source: str, seq: Seq) -> None:
    checkpoints.save(session, source, seq)


def _save_then_fail(session: Session, source: str, seq: Seq) -> None:
    checkpoints.save(session, source, seq)
    raise RuntimeError("after the write")


def _increment(session: Session, source: str) -> None:
    seq = checkpoints.load(session, source)
    count = 0 if seq is None else seq.value()
    assert isinstance(count, int)
    checkpoints.save(session, source, Seq.of(count + 1))


def test_postgresql_url_is_rewritten_to_psycopg() -> None:
    assert database_url("postgresql://u:p@h/d").render_as_string(hide_password=False) == (
        "postgresql+psycopg://u:p@h/d"
    )


def test_postgres_scheme_is_rewritten_to_psycopg() -> None:
    assert database_url("postgres://u@h/d").drivername == "postgresql+psycopg"


def test_sqlite_url_is_kept() -> None:
    assert str(database_url("sqlite:///pandasync.db")) == "sqlite:///pandasync.db"


def test_unsupported_driver_is_refused_with_the_urls_to_use() -> None:
    with pytest.raises(DatabaseUrlError) as raised:
        database_url("mysql://u:secret@h/d")
    assert str(raised.value) == (
        "database_url uses 'mysql', which pandasync does not support: use "
        "sqlite:///path/to/pandasync.db or postgresql://user@host/database"
    )


def test_unparseable_url_is_refused_without_quoting_it() -> None:
    with pytest.raises(DatabaseUrlError) as raised:
        database_url("secret-password")
    assert "secret" not in str(raised.value)


def test_describe_hides_the_password() -> None:
    database = Database.open("postgresql://user:secret@localhost/db")
    assert database.describe() == "postgresql+psycopg://user:***@localhost/db"
    database.close()


def test_run_sync_commits_and_returns_the_result(database: Database) -> None:
    database.run_sync(_save, "a", Seq.of(1))
    assert database.run_sync(checkpoints.load, "a") == Seq.of(1)


def test_run_sync_rolls_back_when_the_function_raises(database: Database) -> None:
    with pytest.raises(RuntimeError, match="after the write"):
        database.run_sync(_save_then_fail, "a", Seq.of(1))
    assert database.run_sync(checkpoints.load, "a") is None


@pytest.mark.anyio
async def test_run_commits_in_a_worker_thread(database: Database) -> None:
    await database.run(_save, "a", seq=Seq.of("1-abc"))
    assert await database.run(checkpoints.load, "a") == Seq.of("1-abc")


@pytest.mark.anyio
async def test_run_rolls_back_when_the_function_raises(database: Database) -> None:
    with pytest.raises(RuntimeError, match="after the write"):
        await database.run(_save_then_fail, "a", Seq.of(1))
    assert await database.run(checkpoints.load, "a") is None


@pytest.mark.anyio
async def test_concurrent_sqlite_read_then_write_transactions_queue(
    migrated_sqlite_url: str,
) -> None:
    # With sqlite3's own deferred BEGIN these either fail ("database is locked") or lose
    # increments; BEGIN IMMEDIATE makes each wait for the previous one.
    database = Database.open(migrated_sqlite_url)
    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(database.run, _increment, "a")
    assert database.run_sync(checkpoints.load, "a") == Seq.of(20)
    database.close()


def test_sqlite_connections_use_wal_busy_timeout_foreign_keys_and_full_sync(
    migrated_sqlite_url: str,
) -> None:
    database = Database.open(migrated_sqlite_url)
    with database.engine.connect() as connection:
        pragmas = [
            connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
        ]
    database.close()
    assert pragmas == ["wal", 30_000, 1, 2]


def test_datetimes_come_back_as_the_same_instant_in_utc(database: Database) -> None:
    stored = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=timezone(timedelta(hours=-5)))

    def store(session: Session) -> None:
        session.add(Checkpoint(source="a", seq="1", updated_at=stored))

    def read(session: Session) -> datetime:
        return session.exec(select(Checkpoint.updated_at)).one()

    database.run_sync(store)
    read_back = database.run_sync(read)
    assert (read_back, read_back.tzinfo) == (datetime(2026, 3, 4, 10, 6, 7, 891011, UTC), UTC)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
        datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=2))),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_sqlite_stores_datetimes_as_sqlalchemys_datetime_text(
    migrated_sqlite_url: str, moment: datetime
) -> None:
    # Stores written by earlier versions hold SQLAlchemy's text; comparisons and order rely
    # on every row, old or new, having that same fixed-width form.
    database = Database.open(migrated_sqlite_url)
    sources = ["a", "b", "c"]
    later = moment if moment.year == 9999 else moment + timedelta(microseconds=1)

    def store(session: Session) -> None:
        for source, stamp in zip(sources, [moment, moment, later], strict=True):
            session.add(Checkpoint(source=source, seq="1", updated_at=stamp))

    def stored_text(session: Session) -> list[str]:
        query = text("SELECT updated_at FROM checkpoint ORDER BY source")
        return list(session.execute(query).scalars())

    try:
        database.run_sync(store)
        dialect = sqlite.dialect()
        sqlalchemys = DateTime().dialect_impl(dialect).bind_processor(dialect)
        assert sqlalchemys is not None
        expected = [
            sqlalchemys(stamp.astimezone(UTC).replace(tzinfo=None))
            for stamp in (moment, moment, later)
        ]
        assert database.run_sync(stored_text) == expected
    finally:
        database.close()


def test_naive_datetimes_are_refused(database: Database) -> None:
    def store(session: Session) -> None:
        session.add(Checkpoint(source="a", seq="1", updated_at=datetime(2026, 1, 1)))

    with pytest.raises(StatementError, match="naive datetime"):
        database.run_sync(store)


def test_close_is_idempotent(migrated_database_url: str) -> None:
    database = Database.open(migrated_database_url)
    database.run_sync(lambda session: session.connection().execute(text("SELECT 1")))
    database.close()
    database.close()


def test_a_driver_error_of_a_plain_statement_is_sqlalchemys_and_holds_no_parameters(
    database: Database,
) -> None:
    def insert_into_a_missing_table(session: Session) -> None:
        execute_values(session, "INSERT INTO no_such_table (a)", [("secret-row-value",)])

    def through_sqlalchemy(session: Session) -> None:
        session.execute(text("INSERT INTO no_such_table (a) VALUES (:a)"), {"a": "x"})

    with pytest.raises(DBAPIError) as raised:
        database.run_sync(insert_into_a_missing_table)
    with pytest.raises(DBAPIError) as sqlalchemys:
        database.run_sync(through_sqlalchemy)
    assert type(raised.value) is type(sqlalchemys.value)
    assert "no_such_table" in str(raised.value)
    assert "secret-row-value" not in str(raised.value)


def test_plain_statements_see_and_share_the_sessions_transaction(database: Database) -> None:
    stamp = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)

    def write_both_ways(session: Session) -> list[tuple[str, str]]:
        session.add(Checkpoint(source="orm", seq="1", updated_at=stamp))
        session.flush()
        execute_many(
            session,
            "INSERT INTO checkpoint (source, seq, updated_at) VALUES (?, ?, ?)",
            [("plain", "2", bind_time(session, stamp))],
        )
        return [tuple(row) for row in session.execute(text("SELECT source, seq FROM checkpoint"))]

    def read(session: Session) -> list[tuple[str, datetime]]:
        query = select(Checkpoint.source, Checkpoint.updated_at).order_by(Checkpoint.source)
        return [tuple(row) for row in session.exec(query)]  # type: ignore[misc]

    assert sorted(database.run_sync(write_both_ways)) == [("orm", "1"), ("plain", "2")]
    assert database.run_sync(read) == [("orm", stamp), ("plain", stamp)]

    def fail_after_writing(session: Session) -> None:
        execute_many(
            session,
            "INSERT INTO checkpoint (source, seq, updated_at) VALUES (?, ?, ?)",
            [("rolled-back", "3", bind_time(session, stamp))],
        )
        raise ValueError("undo")

    with pytest.raises(ValueError, match="undo"):
        database.run_sync(fail_after_writing)
    assert [source for source, _ in database.run_sync(read)] == ["orm", "plain"]


def test_enqueues_of_every_size_use_few_statement_shapes(migrated_sqlite_url: str) -> None:
    # sqlite3 keeps each connection's last 128 statements prepared, at 1.5 KiB of SQLite's
    # memory a row of VALUES: one shape for every page size would keep megabytes of them.
    database = Database.open(migrated_sqlite_url)
    statements: set[str] = set()

    def enqueue_pages(session: Session) -> None:
        driver = session.connection().connection.driver_connection
        assert driver is not None
        driver.set_trace_callback(statements.add)
        for size in range(1, 600, 7):
            changes = [
                Change("stories", f"doc{size}-{index}", f"doc{size}_{index}", Op.UPSERT, ("x",))
                for index in range(size)
            ]
            outbox.enqueue(session, changes, now=datetime(2026, 1, 1, tzinfo=UTC))
        driver.set_trace_callback(None)

    try:
        database.run_sync(enqueue_pages)
        entries = database.run_sync(lambda session: outbox.pending(session))
    finally:
        database.close()
    # The callback sees each statement with its values bound: a row is a `('stories', ...`.
    shapes = {(s.split()[2], s.count("('stories',")) for s in statements if s.startswith("INSERT")}
    assert entries == sum(range(1, 600, 7))
    assert shapes == {
        (table, 1 << power) for table in ("doc_state", "outbox_entry") for power in range(9)
    }


# A replica's transaction, frozen after a batch of rows: a multi-row UPDATE of its own
# (`execute_many`) or SQLAlchemy's executemany, then SIGSTOP before the commit.
FROZEN_AFTER_A_BATCH = """
import os, signal, sys
from sqlalchemy import bindparam, update
from sqlmodel import Session
from service.store.db import Database, execute_many
from service.store.tables import Checkpoint, table_of

database = Database.open(sys.argv[1])
with database.engine.connect() as connection:
    # Asked first: a statement after the batch would hide what is tested.
    print(connection.exec_driver_sql("SELECT pg_backend_pid()").scalar(), flush=True)
    connection.commit()
    with connection.begin():
        session = Session(bind=connection)
        if sys.argv[2] == "own":
            statement = "UPDATE checkpoint SET seq = ? WHERE source = ?"
            execute_many(session, statement, [("2", "a"), ("2", "b")])
        else:
            table = table_of(Checkpoint)
            by_key = table.c.source == bindparam("key")
            session.execute(
                update(table).where(by_key).values(seq=bindparam("new")),
                [{"key": "a", "new": "2"}, {"key": "b", "new": "2"}],
            )
        os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.postgres
@pytest.mark.parametrize("batch", ["own", "sqlalchemy"])
def test_a_replica_frozen_after_a_batch_of_rows_has_its_session_ended_by_postgresql(
    migrated_postgres_url: str, batch: str
) -> None:
    database = Database.open(migrated_postgres_url)
    database.run_sync(checkpoints.save, "a", Seq.of("1"))
    database.run_sync(checkpoints.save, "b", Seq.of("1"))
    child = [sys.executable, "-c", FROZEN_AFTER_A_BATCH, migrated_postgres_url, batch]
    with subprocess.Popen(child, stdout=subprocess.PIPE, text=True) as frozen:
        try:
            assert frozen.stdout is not None
            backend = int(frozen.stdout.readline())

            def ended() -> bool:
                query = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
                count = database.run_sync(lambda s: s.execute(query, {"pid": backend}).scalar())
                return count == 0

            # IDLE_IN_TRANSACTION_MS (5 s), and room for a loaded machine: its locks go too.
            wait_until(ended, what="PostgreSQL to end the frozen session", deadline_s=15)
            database.run_sync(checkpoints.save, "a", Seq.of("3"))
            assert database.run_sync(checkpoints.load, "a") == Seq.of("3")
        finally:
            frozen.send_signal(signal.SIGCONT)
            frozen.kill()
            database.close()
