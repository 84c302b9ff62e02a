"""`pandasync demo`: the whole flow on embedded defaults, in a scratch folder.

Starts the PANDA-compatible server and `pandasync serve` as real processes, puts changes in,
and shows them arriving in PANDA. Only orchestration: every step goes through the CLI or HTTP.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

EMAIL = "demo@example.com"
API_KEY = "pandasync-demo-key"
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
lease_s = 30
idle_poll_s = 0.2

[[sources]]
name = "stories"
kind = "webhook"
dataset = {{ slug = "demo-stories", name = "Demo stories" }}
columns = [
    {{ name = "Headline", field = "title" }},
    {{ name = "Author", field = "author.name" }},
    {{ name = "Words", field = "words" }},
]
"""

RECORDS = [
    {"_id": "flood-2026", "title": "River floods the old town", "author": {"name": "Ana"}},
    {"_id": "Budget/2027", "title": "Council passes budget", "words": 812},
    {"_id": "café", "title": "Café reopens", "author": {"name": "Rémi"}, "words": 240},
    {"_id": "typo", "title": "This one gets deleted"},
]


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


def run(console: Console) -> None:
    """Run the demo end to end; raises on the first step that does not work."""
    with tempfile.TemporaryDirectory(prefix="pandasync-demo-") as scratch, ExitStack() as stack:
        folder = Path(scratch)
        panda_port, service_port = free_port(), free_port()
        config = folder / "pandasync.toml"
        config.write_text(
            CONFIG.format(
                folder=folder,
                panda_port=panda_port,
                service_port=service_port,
                email=EMAIL,
                api_key=API_KEY,
            ),
            encoding="utf-8",
        )
        panda_url = f"http://127.0.0.1:{panda_port}"
        console.rule("1. a PANDA-compatible server (rows in memory)")
        stack.enter_context(
            process(
                ["fake-panda", "--port", str(panda_port), "--email", EMAIL, "--api-key", API_KEY],
                log=folder / "fake-panda.log",
            )
        )
        wait_until(lambda: answers(f"{panda_url}/_fake/stats"), what="the PANDA server")
        console.print(f"PANDA at {panda_url}")
        console.rule("2. pandasync: migrate the store, serve")
        console.print(pandasync("migrate", "--config", str(config)))
        stack.enter_context(
            process(["serve", "--config", str(config)], log=folder / "pandasync.log")
        )
        service_url = f"http://127.0.0.1:{service_port}"
        wait_until(lambda: answers(f"{service_url}/readyz"), what="pandasync to be ready")
        console.print(f"pandasync at {service_url}")
        console.rule("3. changes go into the outbox")
        for record in RECORDS:
            console.print(pandasync("push", "stories", json.dumps(record), "--config", str(config)))
        console.print(pandasync("push", "stories", "--delete", "typo", "--config", str(config)))
        console.rule("4. ... and arrive in PANDA")
        rows = _rows_when_settled(panda_url, expected=len(RECORDS) - 1)
        console.print(_table(rows))
        status = httpx.get(f"{service_url}/status", timeout=5).json()
        console.print("pandasync /status:", json.dumps(status["sources"], ensure_ascii=False))


def _rows_when_settled(panda_url: str, *, expected: int) -> list[dict[str, object]]:
    params = {"limit": "100", "email": EMAIL, "api_key": API_KEY}
    url = f"{panda_url}/api/1.0/dataset/demo-stories/data/"
    found: list[dict[str, object]] = []

    def settled() -> bool:
        response = httpx.get(url, params=params, timeout=5)
        found[:] = response.json()["objects"] if response.status_code == 200 else []
        return len(found) == expected

    wait_until(settled, what=f"{expected} rows in PANDA")
    return found


def _table(rows: list[dict[str, object]]) -> Table:
    table = Table("external_id", "Headline", "Author", "Words", title="rows in PANDA")
    for row in rows:
        data = row["data"]
        assert isinstance(data, list)
        table.add_row(str(row["external_id"]), *(str(value) for value in data))
    return table


def main() -> None:
    """Entry point for `pandasync demo`."""
    run(Console())
