"""Three `pandasync serve` replicas on one PostgreSQL store, under load from three CouchDB
databases and webhooks: one SIGKILLed mid-stream, later another, a third SIGSTOPped past
its lease and woken. PANDA ends equal to the sources; the lease history recorded here shows
each feed followed by one replica at a time and no page committed under a lease that had
been taken over; each takeover takes under 10 s with the default lease."""

import itertools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from sqlmodel import Session

from service.sources import external_ids
from service.store import outbox
from service.store.db import Database
from service.store.tables import Checkpoint, FeedLease, table_of
from tests.fixtures.couchdb import CouchDatabase, PouchDBServer
from tests.fixtures.panda import RunningPanda, free_port, local_client
from tests.fixtures.service import serving, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(240)]

FEEDS = ("feed_a", "feed_b", "feed_c")
CONFIG = """
database_url = "{database_url}"

[panda]
url = "{panda_url}"
email = "{email}"
api_key = "{api_key}"
timeout_s = 1

[server]
port = {port}

[delivery]
idle_poll_s = 0.05
retry_base_s = 0.05
retry_cap_s = 0.5

[[sources]]
name = "hooks"
kind = "webhook"
dataset = {{ slug = "hooks", name = "Hooks" }}
columns = [{{ name = "Title", field = "title" }}]
webhook = {{ signature = "none" }}
{feeds}
"""
FEED = """
[[sources]]
name = "{name}"
kind = "couchdb"
dataset = {{ slug = "{name}", name = "{name}" }}
columns = [{{ name = "Title", field = "title" }}]

[sources.couchdb]
url = "{couchdb_url}"
database = "{database}"
batch_size = 20
heartbeat_s = 1
timeout_s = 5
retry_base_s = 0.05
retry_cap_s = 0.5
"""


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def holder(self) -> str:
        return f"pid {self.process.pid}"


@dataclass
class History:
    """What the store said, polled every few milliseconds: each lease token seen per feed
    (holder, when taken) and each checkpoint written (its token, when)."""

    tokens: dict[tuple[str, int], tuple[str | None, datetime | None]] = field(default_factory=dict)
    writes: set[tuple[str, int | None, datetime]] = field(default_factory=set)
    # When (monotonic) each token was first seen.
    seen_at: dict[tuple[str, int], float] = field(default_factory=dict)


def record(session: Session, history: History) -> None:
    leases = table_of(FeedLease).c
    for source, token, holder, taken_at in session.execute(
        sqlalchemy.select(leases.source, leases.token, leases.holder, leases.taken_at)
    ):
        history.tokens.setdefault((source, token), (holder, taken_at))
        history.seen_at.setdefault((source, token), time.monotonic())
    points = table_of(Checkpoint).c
    for source, token, updated_at in session.execute(
        sqlalchemy.select(points.source, points.token, points.updated_at)
    ):
        history.writes.add((source, token, updated_at))


def follower(database: Database, source: str) -> tuple[int, str | None] | None:
    """The feed's live lease: (token, holder text), or None."""
    leases = table_of(FeedLease).c

    def read(session: Session) -> tuple[int, str | None] | None:
        row = session.execute(
            sqlalchemy.select(leases.token, leases.holder, leases.until).where(
                leases.source == source
            )
        ).one_or_none()
        if row is None or row.until is None:
            return None
        return int(row.token), row.holder

    return database.run_sync(read)


class Load:
    """Writes to the CouchDB databases and posts webhooks to the replicas until stopped."""

    def __init__(self, databases: dict[str, CouchDatabase], ports: list[int]) -> None:
        self.databases = databases
        self.ports = ports
        self.hooks: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._http = local_client(timeout=2)
        self.error: BaseException | None = None

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._http.close()

    def _run(self) -> None:
        try:
            for round_ in itertools.count():
                if self._stop.is_set():
                    return
                for name, database in self.databases.items():
                    docs = [
                        {"_id": f"{name}-{round_}-{n}", "title": f"t{round_}"} for n in range(3)
                    ]
                    database.bulk(docs)
                    if round_ % 4 == 3:  # churn: an update and a delete of older documents
                        old = database.get(f"{name}-{round_ - 2}-0")
                        if old is not None:
                            database.bulk([{**old, "title": "updated"}])
                        database.delete(f"{name}-{round_ - 3}-1")
                self._hook(f"h{round_}", f"hook {round_}")
                time.sleep(0.05)  # pacing the load, not waiting for anything
        except BaseException as error:  # reported by the test
            self.error = error

    def _hook(self, doc_id: str, title: str) -> None:
        """Post until one replica takes it (the same body again elsewhere is harmless)."""
        body = {"changes": [{"op": "upsert", "id": doc_id, "row": {"title": title}}]}
        for port in itertools.cycle(self.ports):
            try:
                answer = self._http.post(f"http://127.0.0.1:{port}/webhooks/hooks", json=body)
            except httpx.TransportError:
                continue
            if answer.status_code == 202:
                self.hooks[external_ids.encode(doc_id)] = title
                return
            answer.raise_for_status()  # anything but 202 is the test's own mistake


@pytest.fixture
def databases(couchdb_server: PouchDBServer) -> Iterator[dict[str, CouchDatabase]]:
    made = {name: couchdb_server.create() for name in FEEDS}
    try:
        yield made
    finally:
        for database in made.values():
            database.destroy()


def expected(database: CouchDatabase) -> dict[str, list[object]]:
    return {
        external_ids.encode(doc_id): [str(doc.get("title", ""))]
        for doc_id, doc in database.documents().items()
    }


def test_three_replicas_survive_kills_and_a_freeze_and_take_over_in_seconds(
    migrated_postgres_url: str,
    panda: RunningPanda,
    databases: dict[str, CouchDatabase],
    tmp_path: Path,
) -> None:
    feeds = "".join(
        FEED.format(name=name, couchdb_url=db.server_url, database=db.name)
        for name, db in databases.items()
    )
    ports = [free_port() for _ in range(4)]
    configs = []
    for index, port in enumerate(ports):
        path = tmp_path / f"replica{index}.toml"
        path.write_text(
            CONFIG.format(
                database_url=migrated_postgres_url,
                panda_url=panda.url,
                email=panda.email,
                api_key=panda.api_key,
                port=port,
                feeds=feeds,
            ),
            encoding="utf-8",
        )
        configs.append(path)
    store = Database.open(migrated_postgres_url)
    history = History()
    stop_recording = threading.Event()

    def recorder() -> None:
        while not stop_recording.wait(0.02):  # the polling interval of the recording itself
            store.run_sync(record, history)

    recording = threading.Thread(target=recorder, daemon=True)
    takeovers: list[tuple[str, str, float]] = []

    def held_by(replica: Replica) -> dict[str, int]:
        """The feeds `replica` follows, with their tokens."""
        mark = f'"pid": {replica.process.pid},'
        return {
            feed: lease[0]
            for feed in FEEDS
            if (lease := follower(store, feed)) is not None and mark in (lease[1] or "")
        }

    def fail_over(victim: Replica, how: signal.Signals, what: str) -> None:
        held = held_by(victim)
        assert held, f"{victim.name} follows no feed"
        struck = time.monotonic()
        victim.process.send_signal(how)
        for feed, token in held.items():

            def taken_over(feed: str = feed, token: int = token) -> bool:
                lease = follower(store, feed)
                return lease is not None and lease[0] > token

            wait_until(taken_over, what=f"{feed} taken over after {what}", deadline_s=30)
            takeovers.append((what, feed, time.monotonic() - struck))

    with ExitStack() as stack:
        stack.callback(recording.join, 10)
        stack.callback(stop_recording.set)

        def start(index: int) -> Replica:
            log = tmp_path / f"r{index}.log"
            process = stack.enter_context(serving(configs[index], log))
            return Replica(f"r{index}", ports[index], process)

        replicas = [start(index) for index in range(3)]
        recording.start()
        wait_until(
            lambda: sum(len(held_by(replica)) == 1 for replica in replicas) == 3,
            what="the three feeds spread, one a replica",
        )
        with Load(databases, ports[:3]) as load:
            fail_over(replicas[0], signal.SIGKILL, "SIGKILL of r0")
            replicas.append(start(3))
            wait_until(lambda: bool(held_by(replicas[3])), what="r3, joining, to take a feed")
            load.ports[0] = ports[3]
            fail_over(replicas[1], signal.SIGKILL, "SIGKILL of r1")
            wait_until(lambda: bool(held_by(replicas[2])), what="r2 to follow a feed")
            load.ports = [ports[3]]  # r2 is about to freeze
            fail_over(replicas[2], signal.SIGSTOP, "SIGSTOP of r2")
            replicas[2].process.send_signal(signal.SIGCONT)
            load.ports = [ports[2], ports[3]]
            taken = len(load.hooks)
            wait_until(
                lambda: len(load.hooks) > taken + 20 or load.error is not None,
                what="webhooks after the freeze",
            )
        assert load.error is None, load.error
        goal = {feed: expected(db) for feed, db in databases.items()}
        goal["hooks"] = {key: [title] for key, title in load.hooks.items()}
        wait_until(
            lambda: all(panda.rows(feed) == rows for feed, rows in goal.items()),
            what="PANDA equal to every source",
            deadline_s=90,
        )
        wait_until(lambda: store.run_sync(outbox.pending, None) == 0, what="an empty outbox")
    store.run_sync(record, history)
    store.close()
    # The figures the issue asks for, on the test's output (pytest -s, or the report on failure).
    for what, feed, seconds in takeovers:
        sys.stdout.write(f"takeover after {what}: {feed} in {seconds:.1f} s\n")
    assert len(takeovers) >= 3
    assert all(seconds < 10 for _, _, seconds in takeovers), takeovers
    check_history(history)


def check_history(history: History) -> None:
    """Each feed's checkpoints were written under a lease, one follower at a time, never
    under a token once a newer one had been taken."""
    for feed in FEEDS:
        writes = sorted((at, token) for name, token, at in history.writes if name == feed)
        assert writes, f"{feed}: no checkpoint written"
        assert all(token is not None for _, token in writes), f"{feed}: a write without a lease"
        tokens = [token or 0 for _, token in writes]
        assert tokens == sorted(tokens), (feed, writes)
        for at, token in writes:
            newer = [
                taken
                for (name, other), (_, taken) in history.tokens.items()
                if name == feed and other > (token or 0) and taken is not None
            ]
            assert all(at <= taken for taken in newer), (feed, token, at)
