"""Snapshot sources against real servers: an HTTP server the test serves, the store on SQLite
and PostgreSQL (whose database also holds the tables the SQL reader queries), and the
PANDA-compatible server the changes are delivered to."""

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy
from sqlalchemy import select

from service.changes import Op
from service.config import DeliverySettings, Settings, SourceSettings
from service.ingress.shares import FeedShares
from service.ingress.snapshots import Snapshotter
from service.sources import external_ids, snapshot
from service.store import outbox, snapshots
from service.store.db import Database
from service.store.tables import OutboxEntry
from tests.fixtures.panda import RunningPanda
from tests.fixtures.service import ROOT
from tests.fixtures.snapshots import SnapshotServer
from tests.test_poller import deliver
from tests.test_webhooks import serving
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

# Delivery in PANDA's largest bulk PUTs, for the large snapshots.
BULK = DeliverySettings(batch_size=1000)

COLUMNS = [
    {"name": "text", "field": "text"},
    {"name": "id", "field": "id"},
    {"name": "from_user", "field": "from_user"},
]


def source_of(name: str = "tweets", **snapshot: Any) -> SourceSettings:
    return SourceSettings.model_validate(
        {
            "name": name,
            "kind": "snapshot",
            "id_field": "id",
            "dataset": {"slug": name, "name": name.title()},
            "columns": COLUMNS,
            "snapshot": snapshot,
        }
    )


def tweet(number: int, text: str = "hello") -> dict[str, object]:
    return {"text": f"{text} {number}", "id": number, "from_user": f"user{number % 97}"}


def keys_data(rows: Sequence[dict[str, object]]) -> bytes:
    """PANDA's tutorial shape: `{"keys": [...], "data": [[...], ...]}`."""
    keys = ["text", "id", "from_user"]
    return json.dumps({"keys": keys, "data": [[row[key] for key in keys] for row in rows]}).encode()


def row_of(record: dict[str, object]) -> list[object]:
    return [str(record["text"]), str(record["id"]), str(record["from_user"])]


def pending_changes(database: Database) -> dict[str, tuple[Op, list[str] | None]]:
    """The outbox's changes by doc_id: op and row."""

    def read(session: Any) -> dict[str, tuple[Op, list[str] | None]]:
        entries = session.exec(select(OutboxEntry)).all()
        return {
            entry[0].doc_id: (
                Op(entry[0].op),
                None if entry[0].row is None else json.loads(entry[0].row),
            )
            for entry in entries
        }

    return database.run_sync(read)


async def test_a_first_snapshot_sends_every_row_and_a_second_one_only_what_changed(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    first = [tweet(number) for number in range(1, 11)]
    url = snapshot_server.serve("/tweets.json", keys_data(first))
    source = source_of(url=url, format="keys-data", deletes=True)
    snapshotter = Snapshotter(source, database)

    status = await snapshotter.run_once()

    assert pending_changes(database) == {
        str(record["id"]): (Op.UPSERT, row_of(record)) for record in first
    }
    assert (status.state, status.reason, status.generation) == ("idle", None, 1)
    assert status.last == {
        "rows_read": 10,
        "new": 10,
        "changed": 0,
        "unchanged": 0,
        "gone": 0,
        "deleted": 0,
        "duplicates": 0,
        "skipped": 0,
        "known": 0,
    }
    database.run_sync(_clear_outbox)
    # Row 3 changes, row 4 goes, row 11 is new.
    second = [tweet(3, "changed")] + [r for r in first if r["id"] not in (3, 4)] + [tweet(11)]
    snapshot_server.serve("/tweets.json", keys_data(second))

    status = await snapshotter.run_once()

    assert pending_changes(database) == {
        "3": (Op.UPSERT, row_of(tweet(3, "changed"))),
        "4": (Op.DELETE, None),
        "11": (Op.UPSERT, row_of(tweet(11))),
    }
    assert status.last is not None
    assert (status.last["new"], status.last["changed"], status.last["deleted"]) == (1, 1, 1)
    assert status.last["unchanged"] == 8


def _clear_outbox(session: Any) -> None:
    session.execute(sqlalchemy.delete(OutboxEntry))


async def test_a_snapshot_unchanged_since_the_last_sends_nothing(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    url = snapshot_server.serve("/t.json", json.dumps([tweet(n) for n in range(5)]).encode())
    snapshotter = Snapshotter(source_of(url=url, deletes=True), database)
    await snapshotter.run_once()
    database.run_sync(_clear_outbox)

    status = await snapshotter.run_once()

    assert pending_changes(database) == {}
    assert status.last is not None
    assert (status.last["unchanged"], status.state) == (5, "idle")


@pytest.mark.parametrize(
    ("fmt", "body", "content_type"),
    [
        ("json", lambda rows: json.dumps(rows).encode(), "application/json"),
        ("keys-data", keys_data, "application/json"),
        (
            "jsonl",
            lambda rows: "".join(json.dumps(row) + "\n" for row in rows).encode(),
            "application/x-ndjson",
        ),
        ("csv", lambda rows: _csv(rows).encode(), "text/csv"),
        # A spreadsheet's export: a byte order mark, CRLF line ends.
        ("csv", lambda rows: _csv(rows).encode("utf-8-sig"), "text/csv"),
    ],
)
async def test_each_format_gives_the_same_rows(
    migrated_sqlite_url: str,
    snapshot_server: SnapshotServer,
    fmt: str,
    body: Any,
    content_type: str,
) -> None:
    # A quoted newline and a comma in a CSV field, and non-ASCII text.
    rows = [tweet(1, "a, b\nc"), tweet(2, "ça va"), tweet(3)]
    url = snapshot_server.serve("/t", body(rows), content_type=content_type)
    database = Database.open(migrated_sqlite_url)
    try:
        await Snapshotter(source_of(url=url, format=fmt), database).run_once()
        assert pending_changes(database) == {
            str(row["id"]): (Op.UPSERT, row_of(row)) for row in rows
        }
    finally:
        database.close()


def _csv(rows: Sequence[dict[str, object]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["text", "id", "from_user"])
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


async def test_a_header_token_from_the_environment_is_sent(
    migrated_sqlite_url: str, snapshot_server: SnapshotServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWEETS_TOKEN", "Bearer s3cret")
    url = snapshot_server.serve(
        "/t", json.dumps([tweet(1)]).encode(), required=("Authorization", "Bearer s3cret")
    )
    source = source_of(url=url, headers_env={"Authorization": "TWEETS_TOKEN"})
    database = Database.open(migrated_sqlite_url)
    try:
        status = await Snapshotter(source, database).run_once()
    finally:
        database.close()
    assert (status.state, status.last and status.last["new"]) == ("idle", 1)
    assert "s3cret" not in repr(source)


def _known_rows(database: Database, name: str = "tweets") -> dict[str, tuple[str | None, int]]:
    ids = [str(n) for n in range(1000)]
    return database.run_sync(snapshots.known, name, ids)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"cut_at": 40}, "broke off while sending the snapshot"),
        ({"status": 503}, "answered HTTP 503"),
    ],
)
async def test_a_snapshot_that_cannot_be_read_whole_changes_nothing(
    database: Database,
    snapshot_server: SnapshotServer,
    options: dict[str, object],
    reason: str,
) -> None:
    rows = [tweet(n) for n in range(1, 21)]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    snapshotter = Snapshotter(source_of(url=url, deletes=True), database)
    first = await snapshotter.run_once()
    database.run_sync(_clear_outbox)
    known = _known_rows(database)
    snapshot_server.serve("/t", json.dumps(rows[:2]).encode(), **options)

    status = await snapshotter.run_once()

    assert (status.state, pending_changes(database), _known_rows(database)) == (
        "failed",
        {},
        known,
    )
    # The last snapshot read whole is still shown, with the failed one's reason.
    assert (status.generation, status.last) == (2, first.last)
    assert status.reason is not None
    assert reason in status.reason


async def test_a_body_that_does_not_parse_changes_nothing(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    rows = [tweet(n) for n in range(1, 21)]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    snapshotter = Snapshotter(source_of(url=url, deletes=True), database)
    await snapshotter.run_once()
    database.run_sync(_clear_outbox)
    # A whole HTTP answer whose JSON stops in the middle of the list.
    snapshot_server.serve("/t", json.dumps(rows).encode()[:-30])

    status = await snapshotter.run_once()

    assert (status.state, pending_changes(database)) == ("failed", {})
    assert status.reason is not None
    assert "does not parse" in status.reason


@pytest.mark.parametrize("shape", ["json", "keys-data"])
async def test_a_record_past_the_bound_fails_the_snapshot_and_long_bodies_of_short_ones_pass(
    database: Database,
    snapshot_server: SnapshotServer,
    monkeypatch: pytest.MonkeyPatch,
    shape: str,
) -> None:
    monkeypatch.setattr(snapshot, "MAX_RECORD_BYTES", 1024 * 1024)
    # 8 MB in all, none of its records over 300 KB: read, whatever the body's length.
    long = [tweet(n, "x" * 300_000) for n in range(1, 28)]
    body = (lambda rows: json.dumps(rows).encode()) if shape == "json" else keys_data
    url = snapshot_server.serve("/t", body(long))
    snapshotter = Snapshotter(source_of(url=url, format=shape), database)
    read = await snapshotter.run_once()
    # One record of 2 MB: the snapshot fails before it is built whole, and changes nothing.
    snapshot_server.serve("/t", body([tweet(1), tweet(2, "y" * 2_000_000), tweet(3)]))
    database.run_sync(_clear_outbox)
    refused = await snapshotter.run_once()
    assert (read.state, read.last and read.last["new"]) == ("idle", 27)
    assert (refused.state, pending_changes(database)) == ("failed", {})
    assert "a record runs past 1048576 bytes" in (refused.reason or "")


async def test_an_empty_snapshot_is_held_and_deletes_nothing(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    url = snapshot_server.serve("/t", json.dumps([tweet(n) for n in range(5)]).encode())
    snapshotter = Snapshotter(source_of(url=url, deletes=True), database)
    await snapshotter.run_once()
    database.run_sync(_clear_outbox)
    snapshot_server.serve("/t", b"[]")

    status = await snapshotter.run_once()

    assert (status.state, status.reason, pending_changes(database)) == (
        "held",
        "the snapshot is empty: it would delete every row",
        {},
    )


async def test_the_delete_guard_holds_until_confirmed(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    url = snapshot_server.serve("/t", json.dumps([tweet(n) for n in range(10)]).encode())
    snapshotter = Snapshotter(source_of(url=url, deletes=True), database)
    await snapshotter.run_once()
    database.run_sync(_clear_outbox)
    # 3 of 10 rows gone (30% > 20%), and one changed.
    snapshot_server.serve(
        "/t", json.dumps([tweet(0, "changed")] + [tweet(n) for n in range(1, 7)]).encode()
    )

    held = await snapshotter.run_once()
    again = await snapshotter.run_once()

    reason = "the snapshot would delete 3 of 10 rows (30%, more than max_delete_fraction 20%)"
    assert (held.state, held.reason) == ("held", reason)
    assert (again.state, again.reason, again.generation) == ("held", reason, 2 + 1)
    assert pending_changes(database) == {}

    confirmed = await snapshotter.confirm()
    status = await snapshotter.run_once()

    assert confirmed is not None
    assert confirmed.generation == 3
    assert status.state == "idle"
    assert pending_changes(database) == {
        "0": (Op.UPSERT, row_of(tweet(0, "changed"))),
        "7": (Op.DELETE, None),
        "8": (Op.DELETE, None),
        "9": (Op.DELETE, None),
    }


async def test_a_held_snapshot_clears_when_the_next_looks_normal(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    rows = [tweet(n) for n in range(10)]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    snapshotter = Snapshotter(source_of(url=url, deletes=True), database)
    await snapshotter.run_once()
    database.run_sync(_clear_outbox)
    snapshot_server.serve("/t", json.dumps(rows[:5]).encode())
    assert (await snapshotter.run_once()).state == "held"
    snapshot_server.serve("/t", json.dumps(rows[:9]).encode())

    status = await snapshotter.run_once()

    assert (status.state, pending_changes(database)) == ("idle", {"9": (Op.DELETE, None)})


async def test_without_deletes_a_gone_row_stays_and_comes_back_unchanged(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    rows = [tweet(n) for n in range(10)]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    snapshotter = Snapshotter(source_of(url=url), database)
    await snapshotter.run_once()
    database.run_sync(_clear_outbox)
    snapshot_server.serve("/t", json.dumps(rows[:2]).encode())
    gone = await snapshotter.run_once()
    snapshot_server.serve("/t", json.dumps(rows).encode())

    back = await snapshotter.run_once()

    assert gone.last is not None
    assert back.last is not None
    assert (gone.state, gone.last["gone"], gone.last["deleted"]) == ("idle", 8, 0)
    assert (back.last["unchanged"], pending_changes(database)) == (10, {})


async def test_duplicate_ids_are_reported_and_the_last_row_wins(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    rows = [tweet(1, "first"), tweet(2), tweet(1, "last")]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    # One row per chunk: the duplicate is found across chunks, through the store.
    status = await Snapshotter(source_of(url=url, chunk_rows=1), database).run_once()

    assert pending_changes(database) == {
        "1": (Op.UPSERT, row_of(tweet(1, "last"))),
        "2": (Op.UPSERT, row_of(tweet(2))),
    }
    assert status.last is not None
    assert (status.last["rows_read"], status.last["duplicates"], status.last["new"]) == (3, 1, 2)


async def test_ids_go_through_the_external_id_encoding(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    rows = [{"id": "a/b c", "text": "x", "from_user": "y"}]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    await Snapshotter(source_of(url=url), database).run_once()

    claims = database.run_sync(outbox.claim_many, source="tweets", now=_now(), lease_s=5, limit=10)

    assert [claim.external_id for claim in claims] == [external_ids.encode("a/b c")]


def _now() -> Any:
    from service.clock import utcnow

    return utcnow()


def _tweets(
    numbers: Iterable[int], changed: frozenset[int] = frozenset()
) -> list[dict[str, object]]:
    return [tweet(n, "changed" if n in changed else "hello") for n in numbers]


@pytest.mark.timeout(300)
async def test_100000_rows_synced_then_1_percent_changed_deleted_and_new_sends_exactly_those(
    migrated_sqlite_url: str, snapshot_server: SnapshotServer, panda: RunningPanda
) -> None:
    total = 100_000
    url = snapshot_server.serve("/t", keys_data(_tweets(range(total))))
    source = source_of(url=url, format="keys-data", deletes=True)
    database = Database.open(migrated_sqlite_url)
    try:
        snapshotter = Snapshotter(source, database)
        first = await snapshotter.run_once()
        await deliver(database, panda, source, settings=BULK)
        assert first.last is not None
        assert (first.state, first.last["new"]) == ("idle", total)

        changed = frozenset(range(0, total, 100))  # 1%
        deleted = set(range(1, total, 100))  # 1%
        new = range(total, total + total // 100)  # 1%
        kept = [n for n in range(total) if n not in deleted]
        snapshot_server.serve("/t", keys_data(_tweets([*kept, *new], changed)))
        second = await snapshotter.run_once()

        expected: dict[str, tuple[Op, list[object] | None]]
        expected = {str(n): (Op.UPSERT, row_of(tweet(n, "changed"))) for n in changed}
        expected |= {str(n): (Op.DELETE, None) for n in deleted}
        expected |= {str(n): (Op.UPSERT, row_of(tweet(n))) for n in new}
        assert pending_changes(database) == expected
        assert second.last is not None
        assert (second.last["changed"], second.last["deleted"], second.last["new"]) == (
            1000,
            1000,
            1000,
        )
        await deliver(database, panda, source, settings=BULK)
        assert panda.rows("tweets") == {
            external_ids.encode(str(n)): row_of(tweet(n, "changed" if n in changed else "hello"))
            for n in [*kept, *new]
        }
    finally:
        database.close()


@pytest.mark.postgres
@pytest.mark.timeout(120)
async def test_a_sql_query_on_postgresql_is_a_snapshot_source(migrated_postgres_url: str) -> None:
    engine = sqlalchemy.create_engine(_psycopg(migrated_postgres_url))
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "CREATE TABLE tweets AS SELECT n AS id, 'hello ' || n AS text,"
                " 'user' || (n % 97) AS from_user, (n * 1.5)::numeric AS score"
                " FROM generate_series(1, 5000) AS n"
            )
        )
    # `score` (numeric) is read but mapped to no column.
    query = "SELECT id, text, from_user, score FROM tweets ORDER BY id"
    source = source_of(database_url=migrated_postgres_url, query=query, deletes=True)
    database = Database.open(migrated_postgres_url)
    try:
        snapshotter = Snapshotter(source, database)
        first = await snapshotter.run_once()
        database.run_sync(_clear_outbox)
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text("UPDATE tweets SET text = 'edited' WHERE id = 7"))
            connection.execute(sqlalchemy.text("DELETE FROM tweets WHERE id = 8"))
        second = await snapshotter.run_once()
        changes = pending_changes(database)
    finally:
        database.close()
        engine.dispose()

    assert first.last is not None
    assert (first.state, first.last["new"]) == ("idle", 5000)  # several chunks of 2000
    assert changes == {
        "7": (Op.UPSERT, ["edited", "7", "user7"]),
        "8": (Op.DELETE, None),
    }
    assert second.last is not None
    assert second.last["unchanged"] == 4998


@pytest.mark.postgres
async def test_a_failing_query_changes_nothing_and_says_why(migrated_postgres_url: str) -> None:
    source = source_of(database_url=migrated_postgres_url, query="SELECT * FROM no_such_table")
    database = Database.open(migrated_postgres_url)
    try:
        status = await Snapshotter(source, database).run_once()
        changes = pending_changes(database)
    finally:
        database.close()

    assert (status.state, changes) == ("failed", {})
    assert status.reason is not None
    assert 'relation "no_such_table" does not exist' in status.reason
    assert "postgres@" not in status.reason


def _psycopg(url: str) -> sqlalchemy.URL:
    return sqlalchemy.make_url(url).set(drivername="postgresql+psycopg")


TOKEN = "admin-token-for-tests"
BEARER = {"authorization": f"Bearer {TOKEN}"}


def _service_settings(database: Database, panda: RunningPanda, url: str) -> Settings:
    source = source_of(url=url, deletes=True, interval_s=3600).model_dump(mode="json")
    source["snapshot"]["url"] = url
    return Settings.model_validate(
        {
            "database_url": database.engine.url.render_as_string(hide_password=False),
            "panda": {"url": panda.url, "email": panda.email, "api_key": panda.api_key},
            "server": {"admin_token": TOKEN},
            "delivery": {"idle_poll_s": 0.05, "batch_size": 1000},
            "sources": [source],
        }
    )


async def _snapshot_status(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get("/status", headers=BEARER)
    report: dict[str, Any] = answer.json()["sources"]["tweets"]["snapshot"]
    return report


async def test_through_the_admin_api_a_held_snapshot_waits_for_its_confirmation(
    database: Database, snapshot_server: SnapshotServer, panda: RunningPanda
) -> None:
    rows = [tweet(n) for n in range(10)]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    settings = _service_settings(database, panda, url)
    async with serving(settings, start_runner=True) as (client, _):

        async def reached(state: str, generation: int) -> bool:
            report = await _snapshot_status(client)
            return (report["state"], report["generation"]) == (state, generation)

        async def synced(expected: int) -> bool:
            pending = await database.run(outbox.pending, "tweets")
            return (
                pending == 0
                and len(await anyio.to_thread.run_sync(panda.rows, "tweets")) == expected
            )

        await eventually(lambda: reached("idle", 1), what="the first snapshot")
        await eventually(lambda: synced(10), what="the first snapshot delivered")
        snapshot_server.serve("/t", json.dumps(rows[:5]).encode())
        asked = await client.post("/admin/sources/tweets/snapshot", headers=BEARER)
        await eventually(lambda: reached("held", 2), what="the second snapshot held")
        held = await _snapshot_status(client)
        kept = await anyio.to_thread.run_sync(panda.rows, "tweets")
        confirmed = await client.post("/admin/sources/tweets/confirm-deletes", headers=BEARER)
        await eventually(lambda: reached("idle", 2), what="the confirmed snapshot applied")
        await eventually(lambda: synced(5), what="its deletes delivered")
        again = await client.post("/admin/sources/tweets/confirm-deletes", headers=BEARER)

    assert asked.status_code == 202
    assert held["reason"] == (
        "the snapshot would delete 5 of 10 rows (50%, more than max_delete_fraction 20%)"
    )
    assert (held["last"]["rows_read"], held["last"]["deleted"]) == (5, 5)
    assert len(kept) == 10
    assert (confirmed.status_code, confirmed.json()["generation"]) == (200, 2)
    assert again.status_code == 409
    assert "holds no snapshot waiting for confirmation" in again.json()["detail"]


@pytest.mark.timeout(120)  # five commands, each a process of its own
def test_pandasync_confirm_deletes_applies_a_held_snapshot(
    tmp_path: Path, migrated_sqlite_url: str, snapshot_server: SnapshotServer, panda: RunningPanda
) -> None:
    rows = [tweet(n) for n in range(10)]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    config = tmp_path / "pandasync.toml"
    config.write_text(
        CLI_CONFIG.format(
            database_url=migrated_sqlite_url,
            panda_url=panda.url,
            email=panda.email,
            api_key=panda.api_key,
            url=url,
        ),
        encoding="utf-8",
    )
    first = _pandasync("sync", "--once", "--config", str(config))
    snapshot_server.serve("/t", b"[]")
    empty = _pandasync("sync", "--once", "--config", str(config))
    synced = panda.rows("tweets")
    confirmed = _pandasync("confirm-deletes", "tweets", "--config", str(config))
    again = _pandasync("confirm-deletes", "tweets", "--config", str(config))
    last = _pandasync("sync", "--once", "--config", str(config))

    assert (first.returncode, "delivered 10" in first.stdout) == (0, True)
    assert (empty.returncode, len(synced)) == (0, 10)
    assert "snapshot held, nothing changed: the snapshot is empty" in empty.stderr
    assert confirmed.returncode == 0
    assert "snapshot idle: 0 rows read, 0 new, 0 changed, 10 deleted" in confirmed.stdout
    assert again.returncode == 1
    assert "holds no snapshot waiting for confirmation (its last snapshot is done)" in again.stderr
    assert (last.returncode, panda.rows("tweets")) == (0, {})


def _pandasync(*args: str) -> subprocess.CompletedProcess[str]:
    """`pandasync ARGS` as a user runs it (its own process: it sets up logging its own way)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PANDASYNC")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


CLI_CONFIG = """
database_url = "{database_url}"

[panda]
url = "{panda_url}"
email = "{email}"
api_key = "{api_key}"

[[sources]]
name = "tweets"
kind = "snapshot"
id_field = "id"
dataset = {{ slug = "tweets", name = "Tweets" }}
columns = [
    {{ name = "text", field = "text" }},
    {{ name = "id", field = "id" }},
    {{ name = "from_user", field = "from_user" }},
]

[sources.snapshot]
url = "{url}"
deletes = true
"""


async def test_an_apply_cut_short_is_finished_by_the_next_start_and_loses_no_change(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    rows = [tweet(n) for n in range(10)]
    url = snapshot_server.serve("/t", json.dumps(rows).encode())
    source = source_of(url=url, deletes=True, chunk_rows=3)
    cut: list[Snapshotter] = []
    # Stopped as soon as its first chunk of changes is committed.
    cut.append(Snapshotter(source, database, on_commit=lambda: cut[0].stop()))

    stopped = await cut[0].run_once()
    committed = pending_changes(database)
    resumed = await Snapshotter(source, database).run_once()
    everything = pending_changes(database)
    database.run_sync(_clear_outbox)
    again = await Snapshotter(source, database).run_once()

    assert (stopped.state, len(committed)) == ("stopped", 3)
    assert (resumed.state, resumed.generation) == ("idle", 1)
    assert everything == {str(row["id"]): (Op.UPSERT, row_of(row)) for row in rows}
    assert again.last is not None
    assert (again.last["unchanged"], pending_changes(database)) == (10, {})


async def test_a_token_in_the_url_never_shows_in_the_reason(
    migrated_sqlite_url: str, snapshot_server: SnapshotServer
) -> None:
    url = snapshot_server.serve("/t?api_key=s3cret", b"oops", status=500)
    database = Database.open(migrated_sqlite_url)
    try:
        status = await Snapshotter(source_of(url=url), database).run_once()
    finally:
        database.close()
    assert status.reason == f"source tweets: {snapshot_server.url}/t?… answered HTTP 500: oops"


class CountedBody(httpx.SyncByteStream):
    """A body of `parts` the same part, counting how many were sent."""

    def __init__(self, part: bytes, parts: int) -> None:
        self.part, self.parts, self.sent = part, parts, 0

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.parts):
            self.sent += 1
            yield self.part


def test_a_long_error_page_is_quoted_and_read_no_further_than_its_bound() -> None:
    # A server that streams its error page on and on: a megabyte at a time, 200 MB in all.
    body = CountedBody(b"<p>busy</p>" + b" " * 1024 * 1024, 200)
    transport = httpx.MockTransport(lambda _: httpx.Response(503, stream=body))
    source = source_of(url="http://snapshots.test/t")
    with (
        httpx.Client(transport=transport) as http,
        pytest.raises(snapshot.SnapshotReadError) as raised,
        snapshot.read_http(http, source),
    ):
        pass
    assert str(raised.value).endswith("answered HTTP 503: <p>busy</p>")
    assert body.sent == 1


@pytest.mark.parametrize(
    ("deleted", "known", "held"),
    [(20, 100, False), (21, 100, True), (0, 0, False), (5, 5, True)],
)
def test_the_delete_guard_holds_past_max_delete_fraction_only(
    deleted: int, known: int, held: bool
) -> None:
    settings = source_of(url="http://example.org/t", deletes=True).snapshot
    assert settings is not None
    counts = snapshot.Counts(
        rows_read=known - deleted + 1,
        new=1,
        changed=0,
        unchanged=known - deleted,
        gone=deleted,
        deleted=deleted,
        duplicates=0,
        skipped=0,
        known=known,
    )
    assert (snapshot.held_reason(counts, settings) is not None) == held


async def test_beside_another_replica_only_the_lease_holder_takes_snapshots(
    database: Database, snapshot_server: SnapshotServer
) -> None:
    url = snapshot_server.serve("/tweets.json", keys_data([tweet(1), tweet(2)]))
    source = source_of(url=url, format="keys-data", interval_s=0.1)
    shares = [
        FeedShares(database, ["tweets"], lease_s=1.0, holder=f"replica-{name}") for name in "ab"
    ]
    first, second = (Snapshotter(source, database, shares=share) for share in shares)
    async with anyio.create_task_group() as group:
        group.start_soon(first.run)
        await eventually(lambda: snapshot_server.requests >= 3, what="a few snapshots taken")
        group.start_soon(second.run)
        read = snapshot_server.requests
        await eventually(lambda: snapshot_server.requests >= read + 5, what="more snapshots")
        assert (await second.status()).state == "standby"
        assert "tweets" not in shares[1].following()
        first.stop()  # the first leaves (as on SIGTERM): the second takes over
        await shares[0].leave()
        await eventually(lambda: "tweets" in shares[1].following(), what="the second to follow")
        read = snapshot_server.requests
        await eventually(lambda: snapshot_server.requests > read, what="its own snapshot")
        second.stop()
