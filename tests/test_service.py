"""`pandasync serve` as a real process: changes survive SIGKILL and arrive after a restart."""

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from sqlmodel import Session, select

from service.changes import Change, Op
from service.clock import utcnow
from service.store import dead_letters, holders, outbox
from service.store.db import Database
from service.store.tables import DeliveryLease, OutboxEntry
from tests.fixtures.panda import RunningPanda, free_port, local_client
from tests.fixtures.service import serving, wait_until

CONFIG = """
database_url = "{url}"

[panda]
url = "{panda_url}"
email = "{email}"
api_key = "{api_key}"
timeout_s = 1

[server]
port = {port}

[delivery]
lease_s = 2.5
idle_poll_s = 0.05
retry_base_s = 0.05
retry_cap_s = 0.2

[[sources]]
name = "stories"
kind = "webhook"
dataset = {{ slug = "stories", name = "Stories" }}
columns = [{{ name = "Headline", field = "title" }}]
webhook = {{ signature = "none" }}
"""


def url_of(database: Database) -> str:
    return database.engine.url.render_as_string(hide_password=False)


def readyz(port: int) -> int | None:
    """The status of /readyz, or None while the service does not answer yet."""
    try:
        with local_client(timeout=1) as http:
            return http.get(f"http://127.0.0.1:{port}/readyz").status_code
    except httpx.TransportError:
        return None


@pytest.fixture
def config(tmp_path: Path, panda: RunningPanda, database: Database) -> tuple[Path, int]:
    port = free_port()
    path = tmp_path / "pandasync.toml"
    text = CONFIG.format(
        url=url_of(database),
        panda_url=panda.url,
        email=panda.email,
        api_key=panda.api_key,
        port=port,
    )
    path.write_text(text, encoding="utf-8")
    return path, port


def enqueue(database: Database, doc_id: str, title: str) -> None:
    change = Change("stories", doc_id, doc_id, Op.UPSERT, (title,))
    database.run_sync(outbox.enqueue, [change], now=utcnow())


def leased(session: Session) -> bool:
    lease = session.get(DeliveryLease, "stories")
    return lease is not None and lease.until is not None


def test_a_service_killed_mid_delivery_delivers_the_change_after_a_restart(
    panda: RunningPanda, database: Database, config: tuple[Path, int], tmp_path: Path
) -> None:
    path, _ = config
    enqueue(database, "s1", "Flood")
    panda.set_faults(hang=True)
    with serving(path, tmp_path / "first.log") as first:
        wait_until(lambda: database.run_sync(leased), what="the change to be claimed")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    panda.clear_faults()
    assert panda.rows("stories") == {}
    assert database.run_sync(outbox.pending, None) == 1
    with serving(path, tmp_path / "second.log"):
        wait_until(lambda: panda.rows("stories") == {"s1": ["Flood"]}, what="the row in PANDA")
        wait_until(lambda: database.run_sync(outbox.pending, None) == 0, what="the ack")


def test_a_service_killed_while_panda_is_down_delivers_everything_once_it_is_up(
    panda: RunningPanda, database: Database, config: tuple[Path, int], tmp_path: Path
) -> None:
    path, port = config
    for index in range(5):
        enqueue(database, f"s{index}", f"title {index}")
    panda.set_faults(down=True)
    with serving(path, tmp_path / "first.log") as first:
        wait_until(lambda: panda.stats()["requests"] >= 3, what="a few refused attempts")  # type: ignore[operator]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    panda.clear_faults()
    with serving(path, tmp_path / "second.log"):
        expected = {f"s{index}": [f"title {index}"] for index in range(5)}
        wait_until(lambda: panda.rows("stories") == expected, what="every row in PANDA")
        wait_until(lambda: readyz(port) == 200, what="/readyz")
    assert database.run_sync(dead_letters.stored, None) == []


@pytest.mark.anyio
@pytest.mark.timeout(60)  # a process start and 100 webhooks, on a busy machine
async def test_every_webhook_answered_202_is_in_the_store_after_a_kill_amid_concurrent_ones(
    panda: RunningPanda, database: Database, config: tuple[Path, int], tmp_path: Path
) -> None:
    path, port = config
    panda.set_faults(down=True)  # the changes stay in the outbox
    url = f"http://127.0.0.1:{port}/webhooks/stories"
    answered: list[str] = []
    with serving(path, tmp_path / "serve.log") as child:
        wait_until(lambda: readyz(port) is not None, what="the service to answer")

        async def send(client: httpx.AsyncClient, worker: int) -> None:
            for number in itertools.count():
                doc_id = f"w{worker}-{number}"
                change = {"op": "upsert", "id": doc_id, "row": {"title": doc_id}}
                try:
                    answer = await client.post(url, json={"changes": [change]})
                except httpx.TransportError:
                    return
                if answer.status_code == 202:
                    answered.append(doc_id)
                if len(answered) >= 100 and child.poll() is None:
                    child.send_signal(signal.SIGKILL)  # 15 other webhooks are in flight

        async with httpx.AsyncClient(timeout=10) as client, anyio.create_task_group() as group:
            for worker in range(16):
                group.start_soon(send, client, worker)
        child.wait(timeout=10)
    kept = database.run_sync(lambda session: set(session.exec(select(OutboxEntry.doc_id))))
    assert (len(answered) >= 100, set(answered) - kept) == (True, set())


def test_serve_refuses_an_unmigrated_store_and_says_what_to_run(tmp_path: Path) -> None:
    path = tmp_path / "pandasync.toml"
    text = CONFIG.format(
        url=f"sqlite:///{tmp_path}/fresh.db",
        panda_url="http://127.0.0.1:9",
        email="e@x",
        api_key="k",
        port=free_port(),
    )
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, "pandasync migrate" in done.stderr) == (1, True)
    assert not (tmp_path / "fresh.db").exists(), "no empty store left behind"


def test_a_wrong_api_key_makes_readyz_say_so_and_keeps_the_changes(
    panda: RunningPanda, database: Database, config: tuple[Path, int], tmp_path: Path
) -> None:
    path, port = config
    path.write_text(path.read_text().replace(panda.api_key, "not-the-key"), encoding="utf-8")
    enqueue(database, "s1", "Flood")
    log = tmp_path / "serve.log"
    with serving(path, log):
        wait_until(lambda: readyz(port) == 503, what="/readyz to answer 503")
        with local_client() as http:
            body = http.get(f"http://127.0.0.1:{port}/readyz").json()
    assert any("api_key" in problem for problem in body["problems"])
    assert "not-the-key" not in log.read_text()
    assert database.run_sync(outbox.pending, None) == 1


def lease_holder_pid(session: Session) -> int | None:
    lease = session.get(DeliveryLease, "stories")
    holder = None if lease is None else holders.Holder.of(lease.holder)
    return None if holder is None else holder.pid


@pytest.mark.postgres
def test_a_frozen_replica_is_taken_over_within_its_lease_and_sends_nothing_stale_once_woken(
    panda: RunningPanda, migrated_postgres_url: str, tmp_path: Path
) -> None:
    database = Database.open(migrated_postgres_url)
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.toml"
        text = CONFIG.format(
            url=migrated_postgres_url,
            panda_url=panda.url,
            email=panda.email,
            api_key=panda.api_key,
            port=free_port(),
        )
        # The default lease_s (6 s), the time a frozen replica's lease takes to run out, and
        # the default timeout_s (30 s): its requests outlive the lease.
        text = text.replace("lease_s = 2.5\n", "").replace("timeout_s = 1\n", "")
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    docs = [f"s{index:03}" for index in range(300)]
    for doc in docs:
        enqueue(database, doc, "old")
    panda.set_faults(hang=True)
    try:
        with serving(paths[0], tmp_path / "a.log") as a, serving(paths[1], tmp_path / "b.log") as b:
            wait_until(lambda: panda.stats()["held"] == 1, what="a replica's request in flight")
            holder = database.run_sync(lease_holder_pid)
            frozen, other = (a, b) if holder == a.pid else (b, a)
            frozen.send_signal(signal.SIGSTOP)  # alive but silent: a GC pause, a partition
            frozen_at = time.monotonic()
            try:
                for doc in docs:  # newer changes of the rows it has claimed
                    enqueue(database, doc, "new")
                panda.clear_faults()  # its request is applied, as PANDA would
                wait_until(
                    lambda: database.run_sync(lease_holder_pid) == other.pid,
                    what="the other replica to take the lease over",
                )
                taken_s = time.monotonic() - frozen_at
                expected = {doc: ["new"] for doc in docs}
                wait_until(lambda: panda.rows("stories") == expected, what="every new row")
            finally:
                frozen.send_signal(signal.SIGCONT)
            log = tmp_path / ("a.log" if frozen is a else "b.log")
            wait_until(lambda: "requests cut off" in log.read_text(), what="the woken replica")
            waited = (tmp_path / ("b.log" if frozen is a else "a.log")).read_text()
            assert "holds the source's lease and renews it: source=stories" in waited
            assert f" pid {frozen.pid} until=" in waited
            assert panda.rows("stories") == expected, "the woken replica sent old rows"
    finally:
        database.close()
    assert taken_s < 6 + 3, f"the frozen replica's lease was taken over after {taken_s:.1f} s"
