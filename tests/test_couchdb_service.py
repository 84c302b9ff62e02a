"""`pandasync serve` with a CouchDB source: SIGKILL during catch-up loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.changes import Seq
from service.sources import external_ids
from service.store import checkpoints, dead_letters, outbox
from service.store.db import Database
from tests.fixtures.couchdb import CouchDatabase
from tests.fixtures.panda import RunningPanda, free_port, local_client
from tests.fixtures.service import ROOT, serving, wait_until

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
batch_size = 200
# A killed process's leases run out soon, so the restarted one takes its claims over.
lease_s = 2.5
idle_poll_s = 0.05
retry_base_s = 0.05
retry_cap_s = 0.2

[[sources]]
name = "stories"
kind = "couchdb"
dataset = {{ slug = "stories", name = "Stories" }}
columns = [{{ name = "Title", field = "title" }}, {{ name = "Words", field = "words" }}]

[sources.couchdb]
url = "{couchdb_url}"
database = "{database}"
batch_size = 50
batch_wait_s = 0.02
heartbeat_s = 1
timeout_s = 5
retry_base_s = 0.05
retry_cap_s = 0.5
"""


def expected_rows(couchdb: CouchDatabase) -> dict[str, list[object]]:
    """What PANDA must hold: one row per live document, by external_id."""
    return {
        external_ids.encode(doc_id): [str(doc.get("title", "")), str(doc.get("words", ""))]
        for doc_id, doc in couchdb.documents().items()
    }


def retitle(couchdb: CouchDatabase, doc_ids: list[str], title: str) -> None:
    docs = [couchdb.get(doc_id) for doc_id in doc_ids]
    couchdb.bulk([{**doc, "title": title} for doc in docs if doc is not None])


def wait_until_delivered(database: Database, last: Seq) -> None:
    """Wait until the source's checkpoint is `last` and its outbox is empty."""
    wait_until(
        lambda: (
            database.run_sync(checkpoints.load, "stories") == last
            and database.run_sync(outbox.pending, None) == 0
        ),
        what="every change read and delivered",
    )


@dataclass(frozen=True)
class Service:
    """A config file for `pandasync serve` and the port it serves on."""

    config: Path
    port: int

    def get(self, path: str) -> httpx.Response:
        with local_client(timeout=2) as http:
            return http.get(f"http://127.0.0.1:{self.port}{path}")

    def answers(self, path: str, status: int) -> bool:
        try:
            return self.get(path).status_code == status
        except httpx.TransportError:
            return False


@pytest.fixture
def service(
    tmp_path: Path, panda: RunningPanda, couchdb: CouchDatabase, migrated_sqlite_url: str
) -> Service:
    path = tmp_path / "pandasync.toml"
    port = free_port()
    text = CONFIG.format(
        database_url=migrated_sqlite_url,
        panda_url=panda.url,
        email=panda.email,
        api_key=panda.api_key,
        couchdb_url=couchdb.server_url,
        database=couchdb.name,
        port=port,
    )
    path.write_text(text, encoding="utf-8")
    return Service(path, port)


def test_a_service_killed_during_catch_up_ends_with_exactly_the_databases_documents(
    service: Service,
    couchdb: CouchDatabase,
    panda: RunningPanda,
    migrated_sqlite_url: str,
    tmp_path: Path,
) -> None:
    count = 400
    couchdb.bulk([{"_id": f"s{n:04}", "title": f"t{n}", "words": n} for n in range(count)])
    retitle(couchdb, [f"s{n:04}" for n in range(0, count, 20)], "updated")
    for n in range(5, count, 40):
        couchdb.delete(f"s{n:04}")
    database = Database.open(migrated_sqlite_url)
    # A slow PANDA keeps the first process's deliveries in flight when it is killed, however
    # fast the catch-up runs on this machine.
    panda.set_faults(latency_s=0.2)
    try:
        with serving(service.config, tmp_path / "first.log") as first:
            wait_until(
                lambda: database.run_sync(checkpoints.load, "stories") is not None,
                what="a first checkpoint",
            )
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        panda.clear_faults()
        assert len(panda.rows("stories")) < len(expected_rows(couchdb)), "killed mid catch-up"
        retitle(couchdb, [f"s{n:04}" for n in range(1, count, 30)], "updated while down")
        for n in range(3, count, 50):
            couchdb.delete(f"s{n:04}")
        couchdb.bulk([{"_id": f"new{n}", "title": "late"} for n in range(20)])
        couchdb.put("ephemeral", title="created and deleted while down")
        couchdb.delete("ephemeral")
        expected = expected_rows(couchdb)
        last = Seq.of(couchdb.update_seq())
        with serving(service.config, tmp_path / "second.log"):
            wait_until_delivered(database, last)
        assert panda.rows("stories") == expected
        assert database.run_sync(dead_letters.stored, None) == []
    finally:
        database.close()


def test_a_source_couchdb_refuses_shows_in_readyz_and_status_without_its_password(
    service: Service, tmp_path: Path
) -> None:
    text = service.config.read_text(encoding="utf-8")
    text = text.replace(
        "batch_size = 50\n", 'batch_size = 50\nusername = "reader"\npassword = "s3cret-pw"\n'
    )
    service.config.write_text(text, encoding="utf-8")
    log = tmp_path / "serve.log"
    with serving(service.config, log):
        wait_until(lambda: service.answers("/readyz", 503), what="/readyz to answer 503")
        readyz = service.get("/readyz").text
        status = service.get("/status").text
    assert "source stories stopped" in readyz
    assert "401 unauthorized, Name or password is incorrect." in readyz
    assert "401" in status
    assert "s3cret-pw" not in readyz + status + log.read_text()


# A value nested 2,000 levels deep, as JSON text (CouchDB stores such documents).
DEEP = "[" * 2000 + '"bottom"' + "]" * 2000


def test_hostile_documents_never_hold_the_others_back_and_replay_once_the_mapping_is_fixed(
    service: Service,
    couchdb: CouchDatabase,
    panda: RunningPanda,
    migrated_sqlite_url: str,
    tmp_path: Path,
) -> None:
    docs: list[dict[str, object]] = [
        {"_id": f"s{n:04}", "title": f"t{n}", "headline": f"t{n}", "words": n} for n in range(995)
    ]
    separators = "a\u2028b\u2029c\u0085d\x0be\x1cf"
    docs += [
        # Nested 2,000 levels deep outside the columns: a correct row.
        {"_id": "deep", "title": "deep notes", "headline": "deep notes", "notes": "DEEP"},
        # Its mapped field cannot be written as text: a dead letter, until the mapping is fixed.
        {"_id": "deeptitle", "title": "DEEP", "headline": "fixed", "words": 7},
        {"_id": "id\u2028with\u2029separators\u0085", "title": separators, "headline": separators},
        {"_id": "text", "title": separators, "headline": separators, "words": "x\u2028y"},
        {"_id": "after", "title": "written last", "headline": "written last"},
    ]
    couchdb.bulk_text(json.dumps(docs).replace('"DEEP"', DEEP))
    last = Seq.of(couchdb.update_seq())
    database = Database.open(migrated_sqlite_url)
    try:
        with serving(service.config, tmp_path / "first.log"):
            wait_until_delivered(database, last)
        expected = {
            external_ids.encode(str(doc["_id"])): [str(doc["title"]), str(doc.get("words", ""))]
            for doc in docs
            if doc["_id"] != "deeptitle"
        }
        assert panda.rows("stories") == expected
        (letter,) = database.run_sync(dead_letters.find, "stories")
        assert (letter.doc_id, letter.op) == ("deeptitle", dead_letters.UNMAPPED)
        assert letter.last_answer is not None
        assert "field `title` holds a value nested too deeply" in letter.last_answer.detail
        listed = run_cli("dead-letters", "list", "--config", str(service.config))
        assert "deeptitle" in listed.stdout
        fixed = service.config.read_text(encoding="utf-8").replace(
            'field = "title"', 'field = "headline"'
        )
        service.config.write_text(fixed, encoding="utf-8")
        replayed = run_cli(
            "dead-letters",
            "replay",
            "--source",
            "stories",
            "--all",
            "--config",
            str(service.config),
        )
        assert f"replayed 1: {letter.id}" in replayed.stdout
        run_cli("sync", "--once", "--config", str(service.config))
        assert panda.rows("stories")["deeptitle"] == ["fixed", "7"]
        assert database.run_sync(dead_letters.find, "stories") == []
    finally:
        database.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PANDASYNC")}
    env["COLUMNS"] = "200"  # rich's tables wrap whole ids at 80
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_status_shows_the_state_of_each_source_of_the_running_service(
    service: Service, couchdb: CouchDatabase, tmp_path: Path
) -> None:
    couchdb.bulk([{"_id": f"s{n}", "title": "t"} for n in range(3)])
    stopped = run_cli("status", "--config", str(service.config))
    assert "not running" in stopped.stdout
    with serving(service.config, tmp_path / "serve.log"):
        wait_until(lambda: service.answers("/readyz", 200), what="/readyz to answer 200")
        wait_until(
            lambda: service.get("/status").json()["sources"]["stories"]["feed"]["state"] == "live",
            what="the source to be live",
        )
        shown = run_cli("status", "--config", str(service.config))
        metrics = service.get("/metrics").text
    assert "live" in shown.stdout
    assert 'pandasync_source_state{source="stories",state="live"} 1.0' in metrics
    assert 'pandasync_source_state{source="stories",state="retrying"} 0.0' in metrics
    assert 'pandasync_changes_received_total{source="stories"} 3.0' in metrics


def test_a_service_restarted_after_sigkill_does_not_wait_for_the_dead_processs_lease(
    service: Service,
    couchdb: CouchDatabase,
    panda: RunningPanda,
    migrated_sqlite_url: str,
    tmp_path: Path,
) -> None:
    text = service.config.read_text(encoding="utf-8")
    # The default delivery.lease_s (120 s): a dead process's lease must not be waited for.
    # Batches of 100 at most: the catch-up takes six requests, so after the first is seen
    # there are rows left for the next one to hang on, however the machine is loaded.
    text = text.replace("lease_s = 2.5\n", "")
    text = text.replace("batch_size = 200\n", "batch_size = 100\nmax_batch_size = 100\n")
    service.config.write_text(text, encoding="utf-8")
    couchdb.bulk([{"_id": f"s{n:04}", "title": f"t{n}", "words": n} for n in range(600)])
    expected = expected_rows(couchdb)
    database = Database.open(migrated_sqlite_url)
    panda.set_faults(latency_s=0.2)  # catch-up lasts long enough to be cut off
    try:
        with serving(service.config, tmp_path / "first.log") as first:
            wait_until(lambda: len(panda.rows("stories")) > 0, what="a first delivery")
            panda.set_faults(hang=True)  # killed with a request in flight, under its lease
            wait_until(lambda: panda.stats()["held"] == 1, what="a request in flight")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        panda.clear_faults()
        delivered = len(panda.rows("stories"))
        assert delivered < len(expected), "killed mid catch-up"
        restarted = time.monotonic()
        with serving(service.config, tmp_path / "second.log"):
            wait_until(
                lambda: len(panda.rows("stories")) > delivered, what="a delivery after restart"
            )
            resumed_s = time.monotonic() - restarted
            wait_until(lambda: panda.rows("stories") == expected, what="PANDA equal to CouchDB")
        # Far under the dead process's 120 s lease: the process's start-up (1.3 s here, most of
        # it imports) and one claim.
        assert resumed_s < 5.0, f"delivery resumed {resumed_s:.2f} s after the restart"
        assert (
            "delivery lease of a process that has ended taken over"
            in (tmp_path / "second.log").read_text()
        )
    finally:
        database.close()


def test_the_admin_api_sets_a_running_sources_checkpoint_and_its_feed_reads_on_from_it(
    service: Service, couchdb: CouchDatabase, tmp_path: Path
) -> None:
    text = service.config.read_text(encoding="utf-8")
    service.config.write_text(
        text.replace("[server]\n", '[server]\nadmin_token = "t0ken"\n'), encoding="utf-8"
    )
    couchdb.bulk([{"_id": f"s{n}", "title": "t"} for n in range(3)])
    auth = {"authorization": "Bearer t0ken"}

    def feed() -> dict[str, Any]:
        with local_client(timeout=2) as http:
            answer = http.get(f"http://127.0.0.1:{service.port}/status", headers=auth)
        report: dict[str, Any] = answer.json()["sources"]["stories"]["feed"]
        return report

    def set_to(to: object) -> dict[str, Any]:
        url = f"http://127.0.0.1:{service.port}/admin/sources/stories/checkpoint"
        with local_client(timeout=30) as http:
            answer = http.post(url, json={"to": to}, headers=auth)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    with serving(service.config, tmp_path / "serve.log"):
        wait_until(lambda: service.answers("/healthz", 200), what="the service")
        wait_until(lambda: feed()["state"] == "live", what="the source to be live")
        before = feed()
        seen = before["changes_seen"]
        now = set_to("now")
        assert now["was"] == before["checkpoint"]
        assert feed()["checkpoint"] == now["now"]
        again = set_to("0")
        assert again["now"] == '"0"'
        wait_until(lambda: feed()["changes_seen"] >= seen + 3, what="the feed read again")
        assert feed()["state"] == "live"
