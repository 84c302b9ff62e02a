"""The poller against pouchdb-server over sockets: changes reach the outbox with their checkpoint.

End-to-end tests deliver the outbox to the PANDA-compatible server and compare its rows with the
database's documents.
"""

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from service.changes import Seq, Unmapped
from service.config import CouchDBSettings, DeliverySettings, Settings, SourceSettings
from service.delivery import panda
from service.delivery.engine import Delivery
from service.ingress.poller import Poller, PollerStatus, build_pollers, replay_unmapped
from service.sources import couchdb as couchdb_source
from service.sources import external_ids
from service.sources.couchdb import FeedBrokenError
from service.store import checkpoints, dead_letters, outbox
from service.store.checkpoints import reset as reset_checkpoint
from service.store.db import Database
from service.store.tables import Checkpoint, OutboxEntry
from tests.fixtures.couchdb import CouchDatabase, PouchDBServer, silent_couchdb, start_pouchdb
from tests.fixtures.panda import RunningPanda, free_port
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

COLUMNS = [{"name": "Title", "field": "title"}, {"name": "Words", "field": "words"}]
# Quick settings for tests: short pages, quick heartbeats and reconnects.
QUICK = {
    "batch_wait_s": 0.02,
    "heartbeat_s": 0.5,
    "timeout_s": 5,
    "retry_base_s": 0.05,
    "retry_cap_s": 0.2,
}
DEADLINE_S = 20.0


def source_of(settings: CouchDBSettings, name: str = "stories") -> SourceSettings:
    return SourceSettings.model_validate(
        {
            "name": name,
            "kind": "couchdb",
            "dataset": {"slug": name, "name": name.title()},
            "columns": COLUMNS,
            "couchdb": QUICK | settings.model_dump(exclude_unset=True),
        }
    )


def source_for(couchdb: CouchDatabase, name: str = "stories", **settings: Any) -> SourceSettings:
    return source_of(couchdb.settings(**settings), name)


@pytest.fixture
def store(migrated_sqlite_url: str) -> Iterator[Database]:
    database = Database.open(migrated_sqlite_url)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def queued(session: Session) -> dict[str, tuple[str, list[str] | None]]:
    """The outbox by doc_id: (op, row)."""
    found: dict[str, tuple[str, list[str] | None]] = {}
    for entry in session.exec(select(OutboxEntry)).all():
        row = outbox.change_of(entry).row
        found[entry.doc_id] = (entry.op, None if row is None else list(row))
    return found


def expected_rows(couchdb: CouchDatabase) -> dict[str, list[str]]:
    """What PANDA must hold: one row per live, non-design document, by external_id."""
    return {
        external_ids.encode(doc_id): [str(doc.get("title", "")), str(doc.get("words", ""))]
        for doc_id, doc in couchdb.documents().items()
        if not doc_id.startswith("_design/")
    }


async def deliver(
    store: Database,
    running: RunningPanda,
    source: SourceSettings,
    *,
    drained: bool = True,
    settings: DeliverySettings | None = None,
) -> None:
    """Deliver everything due to PANDA; fails on any refusal (and, with `drained`, if
    anything is left in the outbox)."""
    dataset = panda.Dataset(
        slug=source.dataset.slug,
        name=source.dataset.name,
        columns=tuple(column.name for column in source.columns),
    )
    async with panda.make_http(url=running.url, timeout_s=5) as client:
        pandas = panda.PandaClient(client, email=running.email, api_key=running.api_key)
        delivery = Delivery(
            store,
            pandas,
            {source.name: dataset},
            settings or DeliverySettings(),
            request_timeout_s=5,
        )
        await delivery.run_once()
    assert delivery.status().last_error is None
    if drained:
        assert await store.run(outbox.pending, None) == 0


@asynccontextmanager
async def running(*pollers: Poller) -> AsyncIterator[None]:
    """The pollers' `run()` in the background until the block ends; then stop and wait."""
    async with anyio.create_task_group() as group:
        for poller in pollers:
            group.start_soon(poller.run)
        try:
            yield
        finally:
            for poller in pollers:
                poller.stop()


async def test_inserts_updates_and_deletes_arrive_in_panda(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient, panda: RunningPanda
) -> None:
    source = source_for(couchdb)
    poller = Poller(source, store, http)
    couchdb.put("s1", title="Flood", words=12)
    couchdb.put("s2", title="Fire", words=3)
    couchdb.put("s3", title="Drought", words=40)
    await poller.run_once()
    await deliver(store, panda, source)
    assert panda.rows("stories") == {
        "s1": ["Flood", "12"],
        "s2": ["Fire", "3"],
        "s3": ["Drought", "40"],
    }
    couchdb.put("s1", title="Flood, updated", words=13)
    couchdb.delete("s2")
    await poller.run_once()
    await deliver(store, panda, source)
    assert panda.rows("stories") == {"s1": ["Flood, updated", "13"], "s3": ["Drought", "40"]}


async def test_the_winning_revision_of_a_conflicted_document_is_the_row(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient, panda: RunningPanda
) -> None:
    source = source_for(couchdb)
    poller = Poller(source, store, http)
    couchdb.put("a", title="local", words=1)
    # A replicated edit on another branch: revision 9 beats revision 1.
    couchdb.bulk([{"_id": "a", "_rev": "9-deadbeef", "title": "replicated"}], new_edits=False)
    await poller.run_once()
    await deliver(store, panda, source)
    assert panda.rows("stories") == {"a": ["replicated", ""]}
    couchdb.bulk([{"_id": "a", "_rev": "9-deadbeef", "_deleted": True}])
    assert (couchdb.get("a") or {}).get("title") == "local", "CouchDB's own winner"
    await poller.run_once()
    await deliver(store, panda, source)
    assert panda.rows("stories") == {"a": ["local", "1"]}, "the other branch wins again"


AWKWARD_IDS = [
    "with space",
    "a/b/c",
    "über",
    "日本語",
    "🙂 emoji",
    "Doc",
    "doc",
    "DOC",
    "AND",
    "under_score",
    "dash-id",
]


async def test_ids_with_spaces_slashes_unicode_and_case_differences_each_get_their_row(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient, panda: RunningPanda
) -> None:
    source = source_for(couchdb)
    poller = Poller(source, store, http)
    couchdb.bulk([{"_id": doc_id, "title": doc_id} for doc_id in AWKWARD_IDS])
    await poller.run_once()
    await deliver(store, panda, source)
    assert panda.rows("stories") == {
        external_ids.encode(doc_id): [doc_id, ""] for doc_id in AWKWARD_IDS
    }
    couchdb.delete("doc")
    couchdb.delete("a/b/c")
    await poller.run_once()
    await deliver(store, panda, source)
    assert panda.rows("stories") == {
        external_ids.encode(doc_id): [doc_id, ""]
        for doc_id in AWKWARD_IDS
        if doc_id not in ("doc", "a/b/c")
    }


async def test_a_document_created_and_deleted_between_two_reads_leaves_no_row(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient, panda: RunningPanda
) -> None:
    source = source_for(couchdb)
    poller = Poller(source, store, http)
    couchdb.put("kept", title="Kept")
    await poller.run_once()
    couchdb.put("brief", title="Gone soon")
    couchdb.delete("brief")
    await poller.run_once()
    assert await store.run(queued) == {"kept": ("upsert", ["Kept", ""]), "brief": ("delete", None)}
    await deliver(store, panda, source)
    assert panda.rows("stories") == {"kept": ["Kept", ""]}
    assert await store.run(dead_letters.stored, None) == []


async def test_design_documents_and_filtered_out_documents_leave_no_row(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient, panda: RunningPanda
) -> None:
    source = source_for(couchdb, filter={"field": "type", "equals": "story"})
    poller = Poller(source, store, http)
    couchdb.bulk(
        [
            {"_id": "_design/views", "views": {}},
            {"_id": "s1", "type": "story", "title": "Flood"},
            {"_id": "s2", "type": "story", "title": "Fire"},
            {"_id": "ad", "type": "ad", "title": "Buy"},
        ]
    )
    await poller.run_once()
    await deliver(store, panda, source)
    assert panda.rows("stories") == {"s1": ["Flood", ""], "s2": ["Fire", ""]}
    couchdb.put("s2", type="retracted", title="Fire")
    await poller.run_once()
    await deliver(store, panda, source)
    assert panda.rows("stories") == {"s1": ["Flood", ""]}, "a story that stops matching goes"


# The catch-up itself must take under 30 s; writing the 10,000 documents to CouchDB first is
# not part of it, and the suite's 30 s timeout would count it.
@pytest.mark.timeout(60)
async def test_a_10000_document_catch_up_reaches_the_outbox(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    count = 10_000
    couchdb.bulk([{"_id": f"doc{index:05}", "title": f"t{index}"} for index in range(count)])
    poller = Poller(source_for(couchdb, batch_size=1000), store, http)
    started = time.monotonic()
    async with running(poller):
        await eventually(lambda: poller.status().changes_seen == count, what="the catch-up")
    elapsed_s = time.monotonic() - started
    assert await store.run(outbox.pending, "stories") == count
    assert (await store.run(checkpoints.load, "stories")) == Seq.of(count)
    assert elapsed_s < 30, f"{count / elapsed_s:.0f} rows/s"


async def test_live_changes_are_followed_and_each_commit_wakes_delivery(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    woken: list[int] = []
    poller = Poller(source_for(couchdb), store, http, on_commit=lambda: woken.append(1))
    async with running(poller):
        await eventually(lambda: poller.status().state == "live", what="the feed")
        couchdb.put("live", title="Breaking")
        await eventually(lambda: poller.status().changes_seen == 1, what="the live change")
    assert await store.run(queued) == {"live": ("upsert", ["Breaking", ""])}
    assert woken == [1]
    assert poller.status().state == "stopped"


async def test_a_held_source_closes_its_feed_and_reads_on_from_its_checkpoint_when_released(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    poller = Poller(source_for(couchdb), store, http)
    async with running(poller):
        await eventually(lambda: poller.status().state == "live", what="the feed")
        poller.hold()
        await eventually(lambda: poller.status().state == "paused", what="the pause")
        couchdb.put("during", title="Written while paused")
        held = poller.status()
        poller.release()
        await eventually(lambda: poller.status().changes_seen == 1, what="the change after it")
    assert (held.held, held.changes_seen) == (True, 0)
    assert await store.run(queued) == {"during": ("upsert", ["Written while paused", ""])}


async def test_a_catch_up_logs_its_start_and_its_end_not_a_line_per_page(
    couchdb: CouchDatabase,
    store: Database,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 30 rows, pages of 5: the last page is full, and only the quiet after it says caught up.
    couchdb.bulk([{"_id": f"d{n:02}", "title": "t"} for n in range(30)])
    poller = Poller(source_for(couchdb, batch_size=5), store, http)
    with caplog.at_level(logging.INFO, logger="service.ingress.poller"):
        async with running(poller):
            await eventually(lambda: poller.status().state == "live", what="the catch-up")
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(":")[0] for line in lines if "catching up" in line] == ["catching up"]
    (caught_up,) = [line for line in lines if line.startswith("caught up")]
    assert caught_up.startswith("caught up: source=stories read=")


async def test_a_first_start_from_now_skips_existing_documents_and_pins_its_start(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    couchdb.put("old", title="Old")
    poller = Poller(source_for(couchdb, since="now"), store, http)
    assert await poller.run_once() == 0
    assert await store.run(checkpoints.load, "stories") == Seq.of(1)
    couchdb.put("new", title="New")
    assert await Poller(source_for(couchdb, since="now"), store, http).run_once() == 1
    assert await store.run(queued) == {"new": ("upsert", ["New", ""])}


async def test_a_new_poller_resumes_from_the_checkpoint(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    couchdb.bulk([{"_id": f"d{index}"} for index in range(3)])
    assert await Poller(source_for(couchdb), store, http).run_once() == 3
    couchdb.put("d3")
    again = Poller(source_for(couchdb), store, http)
    assert (await again.step(), again.status().checkpoint) == (1, "4")


def refuse_checkpoint_writes(session: Session) -> None:
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            text(
                "CREATE TRIGGER refuse_checkpoint BEFORE INSERT ON checkpoint"
                " BEGIN SELECT RAISE(ABORT, 'checkpoint refused'); END"
            )
        )
        return
    session.execute(
        text(
            "CREATE FUNCTION refuse_checkpoint() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'checkpoint refused'; END $$"
        )
    )
    session.execute(
        text(
            "CREATE TRIGGER refuse_checkpoint BEFORE INSERT ON checkpoint"
            " FOR EACH ROW EXECUTE FUNCTION refuse_checkpoint()"
        )
    )


def allow_checkpoint_writes(session: Session) -> None:
    suffix = "" if session.get_bind().dialect.name == "sqlite" else " ON checkpoint"
    session.execute(text(f"DROP TRIGGER refuse_checkpoint{suffix}"))


async def test_the_checkpoint_is_committed_in_the_same_transaction_as_the_changes(
    couchdb: CouchDatabase, database: Database, http: httpx.AsyncClient
) -> None:
    couchdb.bulk([{"_id": "a", "title": "A"}, {"_id": "b", "title": "B"}])
    poller = Poller(source_for(couchdb), database, http)
    await database.run(refuse_checkpoint_writes)
    with pytest.raises(Exception, match="checkpoint refused"):
        await poller.step()
    assert await database.run(outbox.pending, None) == 0, "no change without its checkpoint"
    await database.run(allow_checkpoint_writes)
    assert await poller.step() == 2
    assert await database.run(outbox.pending, None) == 2
    assert await database.run(checkpoints.load, "stories") == Seq.of(2)


async def test_the_couchdb_server_restarted_mid_feed_is_followed_again(
    tmp_path: Path, store: Database, http: httpx.AsyncClient
) -> None:
    with start_pouchdb(tmp_path / "pouchdb", on_disk=True) as server:
        couchdb = server.create("news")
        poller = Poller(source_for(couchdb, retry_base_s=0.05, retry_cap_s=0.2), store, http)
        async with running(poller):
            couchdb.put("before", title="Before")
            await eventually(lambda: poller.status().changes_seen == 1, what="the first change")
            await eventually(lambda: poller.status().state == "live", what="the live feed")
            # In a thread, so the poller meets the outage as it happens.
            await anyio.to_thread.run_sync(server.stop)
            await eventually(lambda: poller.status().state == "retrying", what="the outage")
            during = poller.status()
            await anyio.to_thread.run_sync(server.start)
            couchdb.put("after", title="After")
            await eventually(lambda: poller.status().changes_seen >= 2, what="the second change")
            after = poller.status()
        couchdb.destroy()
    assert await store.run(queued) == {
        "before": ("upsert", ["Before", ""]),
        "after": ("upsert", ["After", ""]),
    }
    assert "lost CouchDB" in (during.last_error or "")
    assert (after.state, after.last_error) == ("live", None)
    assert "lost CouchDB" in (after.previous_error or "")
    assert after.previous_error_at is not None


async def test_a_silent_feed_is_reopened_from_the_checkpoint(
    store: Database, http: httpx.AsyncClient
) -> None:
    requests: list[bytes] = []
    await store.run(checkpoints.save, "stories", Seq.of(41))
    async with silent_couchdb(requests) as url:
        settings = CouchDBSettings.model_validate(
            {"url": url, "database": "news", "heartbeat_s": 0.05, "timeout_s": 0.2}
        )
        poller = Poller(source_of(settings), store, http)
        async with running(poller):
            await eventually(lambda: len(requests) >= 2, what="a second connection")
    assert all(b"since=41&" in request for request in requests[:2])
    assert "no byte for 0.2 s" in (poller.status().last_error or "")


async def test_a_missing_database_stops_only_its_own_source(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    missing = Poller(source_for(couchdb, "gone", database="no-such-db"), store, http)
    present = Poller(source_for(couchdb), store, http)
    async with running(missing, present):
        await eventually(lambda: missing.status().state == "stopped", what="the stop")
        couchdb.put("s1", title="Still flowing")
        await eventually(lambda: present.status().changes_seen == 1, what="the other source")
        assert missing.status() == PollerStatus(
            state="stopped",
            reason=missing.status().reason,
            checkpoint=None,
            changes_seen=0,
            skipped=0,
            pending=None,
            last_error=missing.status().reason,
        )
    assert "does not exist" in (missing.status().reason or "")


async def test_wrong_credentials_stop_the_source_and_never_show_the_password(
    couchdb: CouchDatabase,
    store: Database,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = source_for(couchdb, username="reader", password="s3cret-pw")
    poller = Poller(source, store, http)
    with caplog.at_level(logging.DEBUG):
        async with running(poller):
            await eventually(lambda: poller.status().state == "stopped", what="the stop")
    reason = poller.status().reason or ""
    assert "401 unauthorized, Name or password is incorrect." in reason
    assert "username and password" in reason
    assert "s3cret-pw" not in repr(poller.status()) + caplog.text


async def test_a_bad_since_stops_the_source_once_with_the_reset_command(store: Database) -> None:
    seen: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"error": "bad_request", "reason": "Malformed sequence supplied in 'since'."}
        return httpx.Response(400, json=body)

    await store.run(checkpoints.save, "stories", Seq.of("13-g1AAAACbeJzLYWBg"))
    settings = CouchDBSettings.model_validate({"url": "http://couch.test", "database": "news"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as mocked:
        poller = Poller(source_of(settings), store, mocked)
        async with running(poller):
            await eventually(lambda: poller.status().state == "stopped", what="the stop")
            await anyio.wait_all_tasks_blocked()
    assert len(seen) == 1, "a stopped source does not retry"
    assert "pandasync reset-checkpoint stories" in (poller.status().reason or "")
    assert await store.run(checkpoints.load, "stories") == Seq.of("13-g1AAAACbeJzLYWBg")


async def test_a_stopped_sources_checkpoint_is_set_at_once_and_read_from_at_the_next_start(
    couchdb_server: PouchDBServer, store: Database, http: httpx.AsyncClient
) -> None:
    later = CouchDatabase(couchdb_server.url, f"later-{uuid.uuid4().hex[:8]}")
    source = source_for(later)
    poller = Poller(source, store, http)
    try:
        async with running(poller):
            await eventually(lambda: poller.status().state == "stopped", what="the stop")
            # The database appears; the operator sets the checkpoint past its first two changes.
            later.create()
            later.put("a", title="A")
            later.put("b", title="B")
            past_b = later.update_seq()
            later.put("c", title="C")
            # As the admin API asks it of a running source: its feed is closed already.
            with anyio.fail_after(2):
                was, now = await poller.set_checkpoint(past_b, running=True)
            assert (was, now) == (None, Seq.of(past_b))
            assert (poller.status().state, poller.status().changes_seen) == ("stopped", 0)
        restarted = Poller(source, store, http)
        async with running(restarted):
            await eventually(
                lambda: restarted.status().changes_seen == 1, what="the change after it"
            )
        assert list(await store.run(queued)) == ["c"]
    finally:
        later.destroy()


# A CouchDB 3 seq, from couchdb-3.5.0-transcript.txt.
COUCHDB3_SEQ = (
    "5-g1AAAACbeJzLYWBgYMpgTmEQTM4vTc5ISXIwNDLXMwBCwxyQVCJDUv3___-zMpgTmXOBAuwpKZapRmaG2DTg"
    "MSaPBUgyNACp_1DTmMCmmVpamhsbGWDTlwUAHqwn_Q"
)


async def test_a_couchdb3_seq_is_stored_verbatim_and_sent_back_as_it_came(
    store: Database,
) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        results = [{"seq": COUCHDB3_SEQ, "id": "a", "doc": {"_id": "a", "title": "A"}}]
        if request.url.params["since"] != "0":
            results = []
        return httpx.Response(
            200, json={"results": results, "last_seq": COUCHDB3_SEQ, "pending": 0}
        )

    settings = CouchDBSettings.model_validate({"url": "http://couch.test", "database": "news"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as mocked:
        poller = Poller(source_of(settings), store, mocked)
        assert (await poller.step(), await poller.step()) == (1, 0)
    stored = await store.run(lambda session: session.get(Checkpoint, "stories"))
    assert stored is not None
    assert stored.seq == json.dumps(COUCHDB3_SEQ)
    assert [request.url.params["since"] for request in seen] == ["0", COUCHDB3_SEQ]


class Stream(httpx.AsyncByteStream):
    """A body of the given lines, then (if `hang`) nothing more until the client gives up."""

    def __init__(self, lines: list[str], *, hang: bool) -> None:
        self.lines = lines
        self.hang = hang

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for line in self.lines:
            yield f"{line}\n".encode()
        if self.hang:
            await anyio.Event().wait()


async def test_a_couchdb3_feed_that_ends_is_reopened_from_its_last_seq(store: Database) -> None:
    seen: list[httpx.Request] = []
    first = [
        json.dumps({"seq": None, "id": "a", "doc": {"_id": "a", "title": "A"}}),
        json.dumps({"seq": "7-g1A", "id": "b", "doc": {"_id": "b", "title": "B"}}),
        json.dumps({"last_seq": COUCHDB3_SEQ, "pending": 0}),
    ]

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=Stream(first if len(seen) == 1 else [], hang=True))

    await store.run(checkpoints.save, "stories", Seq.of("3-g1A"))
    settings = CouchDBSettings.model_validate(
        {"url": "http://couch.test", "database": "news", "batch_size": 1}
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as mocked:
        poller = Poller(source_of(settings), store, mocked)
        async with running(poller):
            await eventually(lambda: len(seen) == 2, what="a second connection")
    assert [request.url.params["since"] for request in seen] == ["3-g1A", COUCHDB3_SEQ]
    assert await store.run(checkpoints.load, "stories") == Seq.of(COUCHDB3_SEQ)
    assert (await store.run(queued)).keys() == {"a", "b"}
    assert poller.status().last_error is None, "an ended feed is no error"


async def test_a_poller_stopped_before_it_runs_returns_at_once(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    poller = Poller(source_for(couchdb), store, http)
    poller.stop()
    with anyio.fail_after(5):
        await poller.run()
    assert (poller.status().state, poller.status().changes_seen) == ("stopped", 0)


async def test_run_once_on_a_missing_database_stops_the_source_and_reads_nothing(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    poller = Poller(source_for(couchdb, database="no-such-db"), store, http)
    assert (await poller.run_once(), await poller.step()) == (0, 0)
    assert poller.status().state == "stopped"


async def test_run_once_on_an_unreachable_server_raises_and_keeps_the_error(
    store: Database, http: httpx.AsyncClient
) -> None:
    settings = CouchDBSettings.model_validate(
        {"url": f"http://127.0.0.1:{free_port()}", "database": "news"}
    )
    poller = Poller(source_of(settings), store, http)
    with pytest.raises(FeedBrokenError, match="lost CouchDB"):
        await poller.run_once()
    assert "lost CouchDB" in (poller.status().last_error or "")


async def test_run_once_reads_page_after_page_and_commits_every_one(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    couchdb.bulk([{"_id": f"doc{index:04}", "title": f"t{index}"} for index in range(1050)])
    poller = Poller(source_for(couchdb, batch_size=100), store, http)
    assert await poller.run_once() == 1050
    assert await store.run(outbox.pending, "stories") == 1050
    assert await store.run(checkpoints.load, "stories") == Seq.of(1050)


class _BreaksAtChangesRequest(httpx.AsyncHTTPTransport):
    """Passes requests through, but the `_changes` request number `at` fails to connect."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self._at = at
        self._seen = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/_changes"):
            self._seen += 1
            if self._seen == self._at:
                raise httpx.ConnectError("refused for the test", request=request)
        return await super().handle_async_request(request)


async def test_run_once_commits_the_pages_read_before_the_feed_broke(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    couchdb.bulk([{"_id": f"doc{index:03}", "title": f"t{index}"} for index in range(500)])
    source = source_for(couchdb, batch_size=100)
    async with httpx.AsyncClient(transport=_BreaksAtChangesRequest(at=3)) as breaking:
        with pytest.raises(FeedBrokenError):
            await Poller(source, store, breaking).run_once()
    # Page 3 failed while page 2 was committing: pages 1 and 2 and their checkpoint stay.
    assert await store.run(outbox.pending, "stories") == 200
    assert await store.run(checkpoints.load, "stories") == Seq.of(200)
    assert await Poller(source, store, http).run_once() == 300
    assert await store.run(outbox.pending, "stories") == 500


async def test_a_store_failure_ends_run_for_the_runner_and_shows_in_status(
    couchdb: CouchDatabase, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    broken = Database.open(f"sqlite:///{tmp_path}/missing/folder/pandasync.db")
    poller = Poller(source_for(couchdb), broken, http)
    try:
        with pytest.raises(OperationalError):
            await poller.run()
    finally:
        broken.close()
    assert "OperationalError" in (poller.status().last_error or "")


async def test_reset_checkpoint_forgets_the_seq_so_the_next_start_begins_again(
    store: Database,
) -> None:
    await store.run(checkpoints.save, "stories", Seq.of("13-g1AAAACbeJzLYWBg"))
    assert await store.run(reset_checkpoint, "stories") == Seq.of("13-g1AAAACbeJzLYWBg")
    assert await store.run(checkpoints.load, "stories") is None
    assert await store.run(reset_checkpoint, "stories") is None


async def test_status_shows_the_checkpoint_changes_seen_and_pending(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    couchdb.bulk([{"_id": "_design/v"}, {"_id": "a"}, {"_id": "b"}])
    poller = Poller(source_for(couchdb), store, http)
    await poller.run_once()
    assert poller.status() == PollerStatus(
        state="live",
        reason=None,
        checkpoint="3",
        changes_seen=3,
        skipped=0,
        pending=2,
        last_error=None,
    )


async def test_build_pollers_makes_one_poller_per_couchdb_source(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    settings = Settings.model_validate(
        {
            "panda": {"url": "http://panda.test", "email": "e@x", "api_key": "k"},
            "sources": [
                source_for(couchdb, "stories"),
                {
                    "name": "hooks",
                    "kind": "webhook",
                    "dataset": {"slug": "hooks", "name": "Hooks"},
                    "columns": COLUMNS,
                },
            ],
        }
    )
    assert list(build_pollers(settings, store, http)) == ["stories"]


async def test_a_full_outbox_pauses_the_feed_until_delivery_makes_room(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient, panda: RunningPanda
) -> None:
    couchdb.bulk([{"_id": f"s{index}", "title": f"t{index}"} for index in range(10)])
    source = source_for(couchdb, batch_size=3)
    poller = Poller(source, store, http, high_water=4)
    async with running(poller):
        await eventually(lambda: poller.status().state == "paused", what="the pause")
        assert 4 <= await store.run(outbox.pending, None) < 10, "the backlog was not all read"
        await deliver(store, panda, source, drained=False)  # the feed may resume meanwhile
        await eventually(lambda: poller.status().changes_seen == 10, what="the rest of the feed")
    await deliver(store, panda, source)
    assert panda.rows("stories") == expected_rows(couchdb)


async def test_a_source_catching_up_says_so_until_it_is_live(
    couchdb: CouchDatabase, store: Database, http: httpx.AsyncClient
) -> None:
    couchdb.bulk([{"_id": f"d{n}"} for n in range(5)])
    poller = Poller(source_for(couchdb, batch_size=2), store, http)
    await poller.step()
    assert (poller.status().state, poller.status().changes_seen) == ("catching_up", 2)
    await poller.run_once()
    assert (poller.status().state, poller.status().changes_seen) == ("live", 5)


async def test_a_source_that_keeps_failing_is_retrying_and_warns_once_a_minute(
    store: Database, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    settings = CouchDBSettings(
        url=f"http://127.0.0.1:{free_port()}", database="gone", retry_base_s=0.01, retry_cap_s=0.02
    )
    poller = Poller(source_of(settings, "stories"), store, http)
    with caplog.at_level(logging.DEBUG, logger="service.ingress.poller"):
        async with running(poller):
            await eventually(lambda: poller.status().attempts >= 5, what="five attempts")
            status = poller.status()
    assert status.state == "retrying"
    assert status.retrying_since is not None
    assert status.next_attempt_at is not None
    assert status.retrying_since <= status.next_attempt_at
    assert "lost CouchDB" in (status.last_error or "")
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "attempts=1" in warnings[0].getMessage()


def couch_row(n: int) -> str:
    return json.dumps({"seq": n, "id": f"d{n}", "doc": {"_id": f"d{n}", "title": f"t{n}"}})


def couch_pages(
    garbled_in_pages: bool,
) -> Callable[[httpx.Request], httpx.Response]:
    """CouchDB with rows d1..d3 whose continuous feed garbles row d2; its `feed=normal`
    pages garble it too when `garbled_in_pages`. Scripted: a real server cannot garble."""

    def text(n: int, garble: bool) -> str:
        return couch_row(n)[:-5] if garble and n == 2 else couch_row(n)

    def handle(request: httpx.Request) -> httpx.Response:
        params = request.url.params
        after = int(params["since"])
        if params["feed"] == "continuous":
            body = "".join(text(n, True) + "\n" for n in range(after + 1, 4))
            return httpx.Response(200, text=body)
        wanted = range(after + 1, min(after + int(params["limit"]), 3) + 1)
        rows = ",\n".join(text(n, garbled_in_pages) for n in wanted)
        last = wanted[-1] if wanted else after
        return httpx.Response(200, text=f'{{"results":[\n{rows}\n],\n"last_seq":{last}}}')

    return handle


async def test_a_feed_line_that_cannot_be_parsed_is_read_again_as_pages(
    store: Database,
) -> None:
    settings = CouchDBSettings(url="http://couch.test", database="news", batch_size=4)
    await store.run(checkpoints.save, "stories", Seq.of(0))
    async with httpx.AsyncClient(transport=httpx.MockTransport(couch_pages(False))) as http:
        poller = Poller(source_of(settings), store, http)
        async with running(poller):
            await eventually(lambda: poller.status().changes_seen >= 3, what="three rows")
    assert await store.run(queued) == {f"d{n}": ("upsert", [f"t{n}", ""]) for n in range(1, 4)}
    assert await store.run(checkpoints.load, "stories") == Seq.of(3)


async def test_a_row_that_cannot_be_parsed_even_alone_stops_the_source_before_it(
    store: Database,
) -> None:
    settings = CouchDBSettings(url="http://couch.test", database="news", batch_size=4)
    await store.run(checkpoints.save, "stories", Seq.of(0))
    async with httpx.AsyncClient(transport=httpx.MockTransport(couch_pages(True))) as http:
        poller = Poller(source_of(settings), store, http)
        async with running(poller):
            await eventually(lambda: poller.status().reason is not None, what="the stop")
            status = poller.status()
    assert status.state == "stopped"
    assert "cannot be read even alone" in (status.reason or "")
    assert "not JSON" in (status.reason or "")
    assert await store.run(checkpoints.load, "stories") == Seq.of(1)
    assert list(await store.run(queued)) == ["d1"]


# A page bound small enough for a few documents of `WORDS` to pass it together.
PAGE_BYTES = 20_000
WORDS = "w" * 3000


async def test_pages_too_large_together_are_read_in_smaller_pages_and_nothing_is_missed(
    couchdb: CouchDatabase,
    store: Database,
    http: httpx.AsyncClient,
    panda: RunningPanda,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(couchdb_source, "MAX_PAGE_BYTES", PAGE_BYTES)
    source = source_for(couchdb, batch_size=10)
    couchdb.bulk([{"_id": f"big{n:02}", "title": f"t{n}", "words": WORDS} for n in range(25)])
    poller = Poller(source, store, http)

    assert await poller.run_once() == 25
    await deliver(store, panda, source)

    assert panda.rows("stories") == expected_rows(couchdb)
    assert poller.status().state != "stopped"
    # No page past the bound was taken: each was cut off there and read again smaller.
    assert f"runs past {PAGE_BYTES} bytes" in caplog.text
    # Followed live too: the first page of a new start is read around the same way.
    couchdb.bulk([{"_id": f"late{n}", "title": "late", "words": WORDS} for n in range(12)])
    async with running(poller):
        await eventually(lambda: poller.status().changes_seen >= 37, what="the late documents")
    await deliver(store, panda, source)
    assert panda.rows("stories") == expected_rows(couchdb)


async def test_a_document_over_the_page_bound_even_alone_stops_the_source_before_it(
    couchdb: CouchDatabase,
    store: Database,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(couchdb_source, "MAX_PAGE_BYTES", PAGE_BYTES)
    monkeypatch.setattr(couchdb_source, "MAX_LINE_BYTES", PAGE_BYTES)
    source = source_for(couchdb, batch_size=10)
    couchdb.bulk([{"_id": f"a{n}", "title": "small"} for n in range(3)])
    couchdb.put("huge", title="huge", words="w" * (PAGE_BYTES + 1))
    couchdb.put("z", title="after")
    once, live = Poller(source, store, http), Poller(source_for(couchdb, "live"), store, http)

    assert await once.run_once() == 3
    async with running(live):
        await eventually(lambda: live.status().reason is not None, what="the live source's stop")

    for poller in (once, live):
        status = poller.status()
        assert status.state == "stopped"
        assert f"runs past {PAGE_BYTES} bytes" in (status.reason or "")
        assert "cannot be read even alone" in (status.reason or "")
    assert sorted(await store.run(queued)) == ["a0", "a1", "a2"]


async def test_replaying_unmapped_documents_leaves_one_over_the_bound_and_replays_the_rest(
    couchdb: CouchDatabase,
    store: Database,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(couchdb_source, "MAX_PAGE_BYTES", PAGE_BYTES)
    source = source_for(couchdb)
    couchdb.put("small", title="small")
    couchdb.put("huge", title="huge", words="w" * (PAGE_BYTES + 1))
    now = datetime.now(UTC)
    unmapped = [
        Unmapped(doc_id, Seq.of(1), "a mapping that failed") for doc_id in ("small", "huge")
    ]
    await store.run(dead_letters.keep_unmapped, "stories", unmapped, now=now)
    letters = {letter.doc_id: letter.id for letter in await store.run(dead_letters.find, "stories")}

    done = await replay_unmapped(store, http, {"stories": source}, list(letters.values()), now=now)

    assert done.replayed == [letters["small"]]
    assert list(done.still_unmapped) == [letters["huge"]]
    assert f"runs past {PAGE_BYTES} bytes" in done.still_unmapped[letters["huge"]]
    assert await store.run(queued) == {"small": ("upsert", ["small", ""])}
