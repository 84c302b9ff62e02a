"""Live lag benchmark: from a CouchDB write's acknowledgement to its row in PANDA.

Not a test. Run it with `.venv/bin/python bench/lag.py [--rates 100 500] [--duration S]
[--json PATH]` (after `make install`). It starts the project's pouchdb-server, the
PANDA-compatible server (free: no cost) and `pandasync serve` (a fresh SQLite store, one
CouchDB source, the default settings), writes one new document at a time to CouchDB at a
steady rate (an open loop: each write is sent at its planned time, whatever the earlier ones
are doing) for `--duration` seconds a rate, and prints, all measured in this run on this
machine:

- for each rate, the lag of every document (from the moment CouchDB acknowledged its PUT to
  the moment PANDA answered 2xx to the PUT that wrote its row): p50, p99, max, and p99's
  ratio to the goal (under 250 ms at 100 changes/s);
- the write rate CouchDB actually took and its own PUT latency, so a slow writer shows.

How the arrival is seen: the PANDA-compatible server runs in a process of this script's,
wrapped in a few lines of ASGI that note the time (CLOCK_MONOTONIC, the same clock in every
process of the machine) each row's external_id was in a 2xx answer to a PUT of rows. Nothing
polls, so the resolution is the clock's and the measurement adds no wait; a row is readable in
PANDA from that moment on. The result is also written as JSON (`--json`, default
`bench/lag.json`).
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catchup import machine, say

from service.store.db import migrate
from tests.fixtures.couchdb import CouchDatabase, start_pouchdb
from tests.fixtures.panda import free_port
from tests.waiting import eventually, wait_until

ROOT = Path(__file__).resolve().parents[1]
SLUG = "lag"
GOAL_P99_MS = 250.0
GOAL_RATE = 100
# The writer sends a `_bulk_docs` of rate * TICK_S documents every TICK_S: pouchdb-server
# cannot take hundreds of single-document requests a second on this machine.
TICK_S = 0.02
START_TIMEOUT_S = 30.0
# How long after the last write every row must have reached PANDA.
DRAIN_TIMEOUT_S = 30.0
EMAIL = "panda@example.com"
API_KEY = "pandasync-demo-key"

CONFIG = """
database_url = "sqlite:///{folder}/pandasync.db"

[server]
host = "127.0.0.1"
port = {port}

[panda]
url = "{panda}"
email = "{email}"
api_key = "{api_key}"

[[sources]]
name = "lag"
kind = "couchdb"
dataset = {{ slug = "{slug}", name = "Lag" }}
columns = [{{ name = "Headline", field = "title" }}, {{ name = "Written", field = "written" }}]
couchdb = {{ url = "{couchdb}", database = "{database}"{couchdb_extra} }}
"""


class Arrivals:
    """ASGI wrapper around the PANDA-compatible server: the monotonic time each row's
    external_id was first in a 2xx answer to a PUT of rows; `GET /_lag/arrivals` lists them."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._seen: dict[str, float] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/_lag/arrivals":
            body = orjson.dumps(self._seen)
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "PUT" or "/data/" not in path:
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def receiving() -> Any:
            message = await receive()
            chunks.append(message.get("body", b""))
            return message

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                self._note(time.monotonic(), path, b"".join(chunks))
            await send(message)

        await self._app(scope, receiving, sending)

    def _note(self, now: float, path: str, body: bytes) -> None:
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        ids = (
            [tail] if tail != "data" else [o["external_id"] for o in orjson.loads(body)["objects"]]
        )
        for external_id in ids:
            self._seen.setdefault(external_id, now)


def serve_panda(port: int) -> None:
    import uvicorn

    from service.sandbox.fake_panda import FakePandaOptions, create_app

    app = Arrivals(create_app(FakePandaOptions(email=EMAIL, api_key=API_KEY)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def started(command: list[str], url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` until the block ends (SIGTERM by PID), once `url` answers."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PANDASYNC")}
    with log.open("ab") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=output, env=env)
    try:
        wait_until(
            lambda: _answers(url, process, log), what=f"{url} to answer", deadline_s=START_TIMEOUT_S
        )
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)


def _answers(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{process.args!r} exited with code {process.returncode}:\n{tail}")
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.TransportError:
        return False


async def arrivals(panda_url: str) -> dict[str, float]:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{panda_url}/_lag/arrivals")
    answer.raise_for_status()
    seen: dict[str, float] = answer.json()
    return seen


async def write_steadily(
    couchdb: CouchDatabase, prefix: str, rate: int, duration_s: float
) -> tuple[dict[str, float], list[float], float]:
    """Write `rate` new documents a second for `duration_s`, `rate * TICK_S` in one
    `_bulk_docs` every `TICK_S`, each request sent at its planned time (an open loop): the
    monotonic time each document was acknowledged, each request's latency (s), and the rate
    of documents acknowledged."""
    per_tick = max(1, round(rate * TICK_S))
    ticks = int(rate * duration_s) // per_tick
    acknowledged: dict[str, float] = {}
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=couchdb.url, limits=limits, timeout=30) as http:

        async def write(tick: int, planned: float) -> None:
            await asyncio.sleep(max(0.0, planned - time.monotonic()))
            # Letters and digits only: PANDA's external_id is then the document id as is.
            ids = [f"{prefix}n{tick * per_tick + offset:06}" for offset in range(per_tick)]
            docs = [
                {"_id": doc_id, "title": f"Story {doc_id}", "written": time.time()}
                for doc_id in ids
            ]
            sent = time.monotonic()
            answer = await http.post("/_bulk_docs", json={"docs": docs})
            done = time.monotonic()
            answer.raise_for_status()
            refused = [result for result in answer.json() if "error" in result]
            if refused:
                raise RuntimeError(f"CouchDB refused documents: {refused[:3]}")
            acknowledged.update(dict.fromkeys(ids, done))
            latencies.append(done - sent)

        begin = time.monotonic() + 0.1
        async with asyncio.TaskGroup() as group:
            for tick in range(ticks):
                group.create_task(write(tick, begin + tick * TICK_S))
        elapsed = max(acknowledged.values()) - begin
    return acknowledged, latencies, len(acknowledged) / elapsed


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def measure(
    couchdb: CouchDatabase, panda_url: str, rate: int, duration_s: float
) -> dict[str, Any]:
    acknowledged, latencies, achieved = await write_steadily(couchdb, f"r{rate}", rate, duration_s)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        seen = await arrivals(panda_url)
        if all(doc_id in seen for doc_id in acknowledged) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)  # paces the final check only; the lags come from the server
    missing = [doc_id for doc_id in acknowledged if doc_id not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} rows never reached PANDA, e.g. {missing[:3]}")
    lags = [(seen[doc_id] - at) * 1000 for doc_id, at in acknowledged.items()]
    result = {
        "rate_planned": rate,
        "rate_written": round(achieved, 1),
        "documents": len(lags),
        "lag_p50_ms": round(percentile(lags, 0.50), 1),
        "lag_p99_ms": round(percentile(lags, 0.99), 1),
        "lag_max_ms": round(max(lags), 1),
        "lag_mean_ms": round(statistics.fmean(lags), 1),
        "couchdb_put_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "couchdb_put_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "p99_to_goal": round(percentile(lags, 0.99) / GOAL_P99_MS, 2),
    }
    return result


async def warm_up(couchdb: CouchDatabase, panda_url: str) -> None:
    """A few documents through the whole path first (dataset creation, first connections)."""
    acknowledged, _, _ = await write_steadily(couchdb, "warm", 20, 1.0)

    async def arrived() -> bool:
        seen = await arrivals(panda_url)
        return all(doc_id in seen for doc_id in acknowledged)

    await eventually(arrived, what="the warm-up documents in PANDA", deadline_s=START_TIMEOUT_S)


def main(arguments: argparse.Namespace) -> int:
    say("live lag: a CouchDB write acknowledged -> its row written in PANDA (free server)")
    say(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
    wait = arguments.batch_wait_s
    settings = "default settings" if wait is None else f"batch_wait_s = {wait:g}, else defaults"
    say(
        f"`pandasync serve`, {settings}, SQLite store; {arguments.duration:g} s of"
        " writes a rate,"
        f" a request every {TICK_S * 1000:g} ms (an open loop), each a _bulk_docs of new documents"
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch, start_pouchdb(Path(scratch) / "couch") as couch:
        folder = Path(scratch)
        couchdb = couch.create("stories")
        panda_port, port = free_port(), free_port()
        panda_url = f"http://127.0.0.1:{panda_port}"
        command = [sys.executable, __file__, "--serve-panda", str(panda_port)]
        with started(command, f"{panda_url}/_lag/arrivals", folder / "panda.log"):
            config = folder / "pandasync.toml"
            wait = arguments.batch_wait_s
            extra = "" if wait is None else f", batch_wait_s = {wait}"
            config.write_text(
                CONFIG.format(
                    folder=folder,
                    port=port,
                    panda=panda_url,
                    email=EMAIL,
                    api_key=API_KEY,
                    slug=SLUG,
                    couchdb=couch.url,
                    database=couchdb.name,
                    couchdb_extra=extra,
                ),
                encoding="utf-8",
            )
            migrate(f"sqlite:///{folder}/pandasync.db")
            serve = [sys.executable, "-m", "service.cli", "serve", "--config", str(config)]
            log = folder / "pandasync.log"
            with started(serve, f"http://127.0.0.1:{port}/healthz", log):
                try:
                    asyncio.run(warm_up(couchdb, panda_url))
                    for rate in arguments.rates:
                        measuring = measure(couchdb, panda_url, rate, arguments.duration)
                        results.append(asyncio.run(measuring))
                except (AssertionError, RuntimeError):
                    say(f"--- the end of pandasync's log\n{log.read_text()[-3000:]}")
                    say(f"--- the PANDA log\n{(folder / 'panda.log').read_text()[-3000:]}")
                    raise
    say(
        f"  {'changes/s':>9} {'written/s':>9} {'docs':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'max ms':>7}  {'CouchDB write p50/p99 ms':>22}  p99 / 250 ms"
    )
    for run in results:
        say(
            f"  {run['rate_planned']:>9} {run['rate_written']:>9,.0f} {run['documents']:>6}"
            f" {run['lag_p50_ms']:>7.1f} {run['lag_p99_ms']:>7.1f} {run['lag_max_ms']:>7.1f}"
            f"  {run['couchdb_put_p50_ms']:>10.1f} / {run['couchdb_put_p99_ms']:<9.1f}"
            f"  {run['p99_to_goal']:.2f}"
        )
    goal = next((run for run in results if run["rate_planned"] == GOAL_RATE), None)
    if goal is not None:
        met = goal["lag_p99_ms"] < GOAL_P99_MS
        say(
            f"goal: p99 under {GOAL_P99_MS:.0f} ms at {GOAL_RATE} changes/s:"
            f" {goal['lag_p99_ms']:.1f} ms, {'met' if met else 'NOT met'}"
        )
    load = os.getloadavg()[0]
    say(f"load average {load:.1f} at the end (other work on the machine skews every figure)")
    document = {
        "machine": machine(),
        "load_average_at_end": load,
        "couchdb_batch_wait_s": wait,
        "runs": results,
    }
    Path(arguments.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    say(f"written to {arguments.json}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of writes a rate")
    parser.add_argument(
        "--batch-wait-s", type=float, help="the CouchDB source's batch_wait_s (default: its own)"
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "lag.json"))
    parser.add_argument("--serve-panda", type=int, metavar="PORT", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_panda:
        serve_panda(arguments.serve_panda)
        sys.exit(0)
    sys.exit(main(arguments))
