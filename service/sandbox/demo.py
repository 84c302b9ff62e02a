"""`pandasync demo`: the whole flow on embedded defaults, in a scratch folder.

Starts the PANDA-compatible server (as slow as PANDA 1.1), a CouchDB-protocol server
(pouchdb-server from node_modules) and `pandasync serve` as real processes, writes documents
to CouchDB and pushes changes, and shows them arriving in PANDA. Only orchestration: every
step goes through the CLI or HTTP.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[2]
POUCHDB_SERVER = ROOT / "node_modules" / ".bin" / "pouchdb-server"
EMAIL = "demo@example.com"
API_KEY = "pandasync-demo-key"
# The demo's own Standard Webhooks secret (whsec_ + base64 of 24 bytes); used nowhere else.
WEBHOOK_SECRET = "whsec_cGFuZGFzeW5jLWRlbW8td2ViaG9vay1rZXk="
DEADLINE_S = 30.0

CONFIG = """
database_url = "sqlite:///{folder}/pandasync.db"

[panda]
url = "http://127.0.0.1:{panda_port}"
email = "{email}"
api_key = "{api_key}"
timeout_s = 5

[server]
port = {service_port}

[delivery]
idle_poll_s = 0.2

[[sources]]
name = "stories"
kind = "couchdb"
dataset = {{ slug = "demo-stories", name = "Demo stories" }}
columns = [
    {{ name = "Headline", field = "title" }},
    {{ name = "Author", field = "author.name" }},
    {{ name = "Words", field = "words" }},
]

[sources.couchdb]
url = "http://127.0.0.1:{couchdb_port}"
database = "newsroom"
batch_wait_s = 0.05
heartbeat_s = 2
timeout_s = 10
filter = {{ field = "type", equals = "story" }}

[[sources]]
name = "tips"
kind = "webhook"
dataset = {{ slug = "demo-tips", name = "Demo tips" }}
columns = [{{ name = "Tip", field = "text" }}, {{ name = "From", field = "from" }}]
webhook = {{ signature = "standard-webhooks", secrets = ["{secret}"] }}

[[sources]]
name = "tweets"
kind = "snapshot"
id_field = "id"
dataset = {{ slug = "demo-tweets", name = "Demo tweets (PANDA's API tutorial)" }}
columns = [{{ name = "Text", field = "text" }}, {{ name = "From", field = "from_user" }}]

[sources.snapshot]
url = "http://127.0.0.1:{snapshot_port}/tweets.json"
format = "keys-data"
interval_s = 1
deletes = true
"""

DOCUMENTS = [
    {"_id": "flood-2026", "type": "story", "title": "River floods", "author": {"name": "Ana"}},
    {"_id": "Budget/2027", "type": "story", "title": "Council passes budget", "words": 812},
    {"_id": "café", "type": "story", "title": "Café reopens", "author": {"name": "Rémi"}},
    {"_id": "typo", "type": "story", "title": "This one gets deleted"},
    {"_id": "memo-1", "type": "memo", "title": "Not a story: filtered out"},
    {"_id": "_design/views", "views": {}},
]
STORY_COLUMNS = ("Headline", "Author", "Words")
TIPS: list[dict[str, object]] = [
    {"op": "upsert", "id": "tip 1", "row": {"text": "Check the minutes", "from": "reader"}},
    {"op": "upsert", "id": "tip 2", "row": {"text": "Bridge closed again?", "from": "caller"}},
]


# PANDA's API tutorial's endpoint: {"keys": [...], "data": [[...], ...]}, no changelog.
TWEETS: dict[str, list[object]] = {
    "keys": ["text", "id", "from_user"],
    "data": [
        ["Polls open at 7", "t1", "cityclerk"],
        ["Road closed on Main St", "t2", "dot"],
        ["Storm warning tonight", "t3", "weather"],
        ["Library hours extended", "t4", "library"],
        ["Lost dog near the park", "t5", "resident"],
    ],
}


class _Endpoint:
    """A JSON endpoint of the demo's own (a thread serving `body` at any path)."""

    def __init__(self, body: object) -> None:
        self.body = body
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = json.dumps(endpoint.body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the demo prints what matters."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> "_Endpoint":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _environment() -> dict[str, str]:
    # The demo runs on its own config only: no PANDASYNC_* override from the user's shell.
    return {name: value for name, value in os.environ.items() if not name.startswith("PANDASYNC_")}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_until(condition: Callable[[], bool], *, what: str, deadline_s: float = DEADLINE_S) -> None:
    """Poll `condition` until it holds; raises `TimeoutError` naming `what` after the deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up waiting for {what} after {deadline_s:g} s")
        time.sleep(0.05)


def answers(url: str) -> bool:
    """True when `url` answers 200."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def process(args: list[str], *, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A `pandasync` subcommand as a child process, stopped with SIGTERM on exit."""
    with log.open("wb") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            stdout=output,
            stderr=output,
            env=_environment(),
        )
        try:
            yield child
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def pandasync(*args: str) -> str:
    """Run a `pandasync` subcommand to completion and return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        env=_environment(),
    )
    if done.returncode:
        raise RuntimeError(f"pandasync {args[0]} failed:\n{done.stdout}{done.stderr}")
    return done.stdout.strip()


def couchdb(url: str, method: str, path: str, body: object = None) -> dict[str, object]:
    """One request to the CouchDB-protocol server; raises with its answer on an error."""
    response = httpx.request(method, f"{url}/{path}", json=body, timeout=10)
    if response.status_code >= 400:
        raise RuntimeError(f"CouchDB {method} /{path}: {response.status_code} {response.text}")
    answer: dict[str, object] = response.json()
    return answer


def run(console: Console) -> None:
    """Run the demo end to end; raises on the first step that does not work."""
    with tempfile.TemporaryDirectory(prefix="pandasync-demo-") as scratch, ExitStack() as stack:
        folder = Path(scratch)
        panda_port, service_port, couchdb_port = free_port(), free_port(), free_port()
        tweets = stack.enter_context(_Endpoint(TWEETS))
        config = folder / "pandasync.toml"
        config.write_text(
            CONFIG.format(
                folder=folder,
                panda_port=panda_port,
                service_port=service_port,
                couchdb_port=couchdb_port,
                snapshot_port=tweets.port,
                secret=WEBHOOK_SECRET,
                email=EMAIL,
                api_key=API_KEY,
            ),
            encoding="utf-8",
        )
        panda_url = f"http://127.0.0.1:{panda_port}"
        couchdb_url = f"http://127.0.0.1:{couchdb_port}"
        console.rule("1. a PANDA-compatible server (as slow as PANDA 1.1) and a CouchDB server")
        fake_panda = ["fake-panda", "--port", str(panda_port), "--email", EMAIL]
        stack.enter_context(
            process(
                [*fake_panda, "--api-key", API_KEY, "--cost", "panda-1.1"],
                log=folder / "fake-panda.log",
            )
        )
        stack.enter_context(_pouchdb_server(couchdb_port, folder / "couchdb"))
        wait_until(lambda: answers(f"{panda_url}/_fake/stats"), what="the PANDA server")
        wait_until(lambda: answers(couchdb_url), what="the CouchDB server")
        couchdb(couchdb_url, "PUT", "newsroom")
        couchdb(couchdb_url, "POST", "newsroom/_bulk_docs", {"docs": DOCUMENTS})
        console.print(f"PANDA at {panda_url}; CouchDB at {couchdb_url}/newsroom with")
        console.print(f"  {len(DOCUMENTS)} documents (one memo and one design document)")
        console.rule("2. pandasync: migrate the store, serve")
        console.print(pandasync("migrate", "--config", str(config)))
        stack.enter_context(
            process(["serve", "--config", str(config)], log=folder / "pandasync.log")
        )
        service_url = f"http://127.0.0.1:{service_port}"
        wait_until(lambda: answers(f"{service_url}/readyz"), what="pandasync to be ready")
        console.print(f"pandasync at {service_url}")
        console.rule("3. the CouchDB catch-up arrives in PANDA")
        rows = _rows_when_settled(panda_url, "demo-stories", expected=4)
        console.print(_table(rows, *STORY_COLUMNS))
        console.rule("4. live changes: an edit and a delete in CouchDB")
        _edit_and_delete(couchdb_url)
        rows = _rows_when_settled(panda_url, "demo-stories", expected=3, showing="(update)")
        console.print(_table(rows, *STORY_COLUMNS))
        console.rule("5. a signed webhook (Standard Webhooks) for the tips source")
        answer = _send_webhook(f"{service_url}/webhooks/tips", TIPS)
        console.print(f"POST /webhooks/tips → {answer.status_code} {answer.text}")
        rows = _rows_when_settled(panda_url, "demo-tips", expected=len(TIPS))
        console.print(_table(rows, "Tip", "From"))
        console.rule("6. no changelog: a JSON endpoint of PANDA's API tutorial, read every second")
        rows = _rows_when_settled(panda_url, "demo-tweets", expected=len(TWEETS["data"]))
        console.print(_table(rows, "Text", "From"))
        writes = _writes(panda_url)
        console.print("at the endpoint: t5 removed, t2 changed; t1, t3 and t4 as they were")
        tweets.body = {
            "keys": TWEETS["keys"],
            "data": [
                ["Polls open at 7", "t1", "cityclerk"],
                ["Main St open again", "t2", "dot"],
                ["Storm warning tonight", "t3", "weather"],
                ["Library hours extended", "t4", "library"],
            ],
        }
        rows = _rows_when_settled(panda_url, "demo-tweets", expected=4, showing="open again")
        console.print(_table(rows, "Text", "From"))
        console.print(
            f"PANDA writes for that snapshot: {_writes(panda_url) - writes} (one bulk PUT of"
            " the changed row, one DELETE); the unchanged rows cost PANDA nothing"
        )
        status = httpx.get(f"{service_url}/status", timeout=5).json()
        for name, source in status["sources"].items():
            console.print(f"/status {name}: checkpoint {source['checkpoint']},", end=" ")
            console.print(f"pending {source['pending']}, dead letters {source['dead_letters']}")


@contextmanager
def _pouchdb_server(port: int, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    if not POUCHDB_SERVER.exists():
        raise RuntimeError("pouchdb-server is not installed: run `make install` (npm ci)")
    folder.mkdir()
    args = ["--in-memory", "--host", "127.0.0.1", "--port", str(port), "--no-color"]
    with (folder / "server.log").open("wb") as output:
        child = subprocess.Popen(
            [str(POUCHDB_SERVER), *args], cwd=folder, stdout=output, stderr=output
        )
    try:
        yield child
    finally:
        child.terminate()
        child.wait(timeout=15)


def _send_webhook(url: str, changes: list[dict[str, object]]) -> httpx.Response:
    """POST changes in pandasync's format, signed as Standard Webhooks specifies."""
    from standardwebhooks import Webhook

    body = json.dumps({"changes": changes})
    webhook_id = f"msg_demo_{time.time_ns()}"
    now = datetime.now(UTC)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(WEBHOOK_SECRET).sign(webhook_id, now, body),
    }
    return httpx.post(url, content=body, headers=headers, timeout=10)


def _edit_and_delete(couchdb_url: str) -> None:
    flood = couchdb(couchdb_url, "GET", "newsroom/flood-2026")
    couchdb(couchdb_url, "PUT", "newsroom/flood-2026", {**flood, "title": "River floods (update)"})
    typo = couchdb(couchdb_url, "GET", "newsroom/typo")
    couchdb(couchdb_url, "DELETE", f"newsroom/typo?rev={typo['_rev']}")


def _rows_when_settled(
    panda_url: str, slug: str, *, expected: int, showing: str = ""
) -> list[dict[str, object]]:
    """The dataset's rows once there are `expected` of them (and one holds `showing`)."""
    params = {"limit": "100", "email": EMAIL, "api_key": API_KEY}
    url = f"{panda_url}/api/1.0/dataset/{slug}/data/"
    found: list[dict[str, object]] = []

    def settled() -> bool:
        response = httpx.get(url, params=params, timeout=5)
        objects = response.json()["objects"] if response.status_code == 200 else []
        # PANDA's listing may hold other datasets' rows (panda-api.md §3.2).
        found[:] = [row for row in objects if row["dataset"] == f"/api/1.0/dataset/{slug}/"]
        return len(found) == expected and showing in json.dumps(found, ensure_ascii=False)

    wait_until(settled, what=f"{expected} rows in PANDA dataset {slug}")
    return found


def _writes(panda_url: str) -> int:
    """The write requests the PANDA-compatible server has answered so far."""
    writes = httpx.get(f"{panda_url}/_fake/stats", timeout=5).json()["writes"]
    assert isinstance(writes, int)
    return writes


def _table(rows: list[dict[str, object]], *columns: str) -> Table:
    table = Table("external_id", *columns, title="rows in PANDA")
    for row in rows:
        data = row["data"]
        assert isinstance(data, list)
        table.add_row(str(row["external_id"]), *(str(value) for value in data))
    return table


def main() -> None:
    """Entry point for `pandasync demo`."""
    run(Console())
