"""What the reliability suites share: a `pandasync serve` with a CouchDB source and a webhook
source, steady load on both (CouchDB churn: creates, updates, deletes; webhooks), and what PANDA
must end up holding. Sizes grow with `--reliability-scale` (`PANDASYNC_RELIABILITY_SCALE`)."""

import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.sources import external_ids
from tests.fixtures.couchdb import CouchDatabase
from tests.fixtures.panda import RunningPanda, free_port, local_client
from tests.fixtures.service import serving, wait_until

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
batch_size = 100
lease_s = 2.5
idle_poll_s = 0.05
retry_base_s = 0.05
retry_cap_s = 0.5

[[sources]]
name = "feed"
kind = "couchdb"
dataset = {{ slug = "feed", name = "Feed" }}
columns = [{{ name = "Title", field = "title" }}, {{ name = "Words", field = "words" }}]

[sources.couchdb]
url = "{couchdb_url}"
database = "{database}"
batch_size = 50
batch_wait_s = 0.02
heartbeat_s = 0.5
timeout_s = 2
retry_base_s = 0.05
retry_cap_s = 0.5

[[sources]]
name = "hooks"
kind = "webhook"
dataset = {{ slug = "hooks", name = "Hooks" }}
columns = [{{ name = "Title", field = "title" }}]
webhook = {{ signature = "none" }}
"""
# Pauses between two changes of the load generators: about 25 CouchDB changes and 25 webhooks
# a second, steady, far under what the service keeps up with.
PACE_S = 0.04


@dataclass(frozen=True)
class Service:
    """A config for `pandasync serve` and the port it serves on."""

    config: Path
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with local_client(timeout=1) as http:
                return http.get(f"{self.url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    @contextmanager
    def running(self) -> Iterator[subprocess.Popen[bytes]]:
        """`pandasync serve` until the block ends, once it answers."""
        with serving(self.config, self.log) as child:
            wait_until(self.healthy, what="pandasync to answer", deadline_s=30)
            yield child

    def kill(self, child: subprocess.Popen[bytes]) -> None:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)


def write_service(
    folder: Path, *, database_url: str, panda: RunningPanda, couchdb: CouchDatabase, **urls: str
) -> Service:
    """A service delivering to `panda` (or `panda_url`) from `couchdb` (or `couchdb_url`)."""
    port = free_port()
    text = CONFIG.format(
        database_url=database_url,
        panda_url=urls.get("panda_url", panda.url),
        email=panda.email,
        api_key=panda.api_key,
        couchdb_url=urls.get("couchdb_url", couchdb.server_url),
        database=couchdb.name,
        port=port,
    )
    config = folder / "pandasync.toml"
    config.write_text(text, encoding="utf-8")
    return Service(config, port, folder / "serve.log")


@dataclass
class Churn:
    """CouchDB churn: each step creates, updates or deletes a document (seeded, repeatable)."""

    couchdb: CouchDatabase
    seed: int
    changes: int = 0
    live: list[str] = field(default_factory=list)
    _next: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def step(self) -> None:
        """One change to CouchDB; raises httpx's errors while it is down."""
        roll = self._random.random()
        if not self.live or roll < 0.5:
            doc_id = f"d{self._next:05}"
            self._next += 1
            self.couchdb.put(doc_id, title=f"new {doc_id}", words=self._next)
            self.live.append(doc_id)
        elif roll < 0.8:
            doc_id = self._random.choice(self.live)
            self.couchdb.put(doc_id, title=f"updated {self.changes}", words=self.changes)
        else:
            doc_id = self.live.pop(self._random.randrange(len(self.live)))
            self.couchdb.delete(doc_id)
        self.changes += 1


@dataclass
class Hooks:
    """Webhooks to the `hooks` source: upserts and deletes, every answer's status kept."""

    url: str
    seed: int
    rows: dict[str, list[object]] = field(default_factory=dict)
    statuses: list[int | str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._client = local_client(base_url=self.url, timeout=5)

    def step(self) -> None:
        """Post one change; a 202 makes it part of what PANDA must hold."""
        doc_id = f"w{self._random.randrange(200):03}"
        deleting = doc_id in self.rows and self._random.random() < 0.3
        title = f"hook {len(self.statuses)}"
        change: dict[str, object] = (
            {"op": "delete", "id": doc_id}
            if deleting
            else {"op": "upsert", "id": doc_id, "row": {"title": title}}
        )
        try:
            status: int | str = self._client.post(
                "/webhooks/hooks", json={"changes": [change]}
            ).status_code
        except httpx.TransportError as error:
            status = type(error).__name__
        self.statuses.append(status)
        if status != 202:
            return
        if deleting:
            del self.rows[doc_id]
        else:
            self.rows[doc_id] = [title]

    def close(self) -> None:
        self._client.close()


@contextmanager
def steady(*generators: Churn | Hooks) -> Iterator[threading.Lock]:
    """Run each generator's `step` in a thread of its own until the block ends.

    Yields the lock every step holds: hold it to pause the load (e.g. while CouchDB restarts).
    """
    stopped = threading.Event()
    stepping = threading.Lock()
    errors: list[BaseException] = []

    def run(generator: Churn | Hooks) -> None:
        try:
            while not stopped.is_set():
                with stepping:
                    generator.step()
                stopped.wait(PACE_S)  # paces the load, waits for nothing
        except BaseException as error:  # reported by the test's thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(one,), daemon=True) for one in generators]
    for thread in threads:
        thread.start()
    try:
        yield stepping
    finally:
        stopped.set()
        for thread in threads:
            thread.join(timeout=10)
    assert errors == [], f"the load generator failed: {errors[0]!r}"


def feed_rows(couchdb: CouchDatabase) -> dict[str, list[object]]:
    """What PANDA's `feed` dataset must hold: one row per live document, by external_id."""
    return {
        external_ids.encode(doc_id): [str(doc.get("title", "")), str(doc.get("words", ""))]
        for doc_id, doc in couchdb.documents().items()
    }


def wait_until_equal(
    panda: RunningPanda, couchdb: CouchDatabase, hooks: Hooks | None = None, deadline_s: float = 90
) -> None:
    """Wait until PANDA holds exactly the CouchDB documents (and the accepted webhooks)."""
    expected = feed_rows(couchdb)
    wait_until(
        lambda: panda.rows("feed") == expected,
        what="PANDA's feed equal to CouchDB",
        deadline_s=deadline_s,
    )
    if hooks is not None:
        wait_until(
            lambda: panda.rows("hooks") == hooks.rows,
            what="PANDA's hooks equal to the webhooks accepted",
            deadline_s=deadline_s,
        )
