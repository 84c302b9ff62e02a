"""Catch-up benchmark: 100,000 changes from a fresh SQLite store into the PANDA-compatible server.

Not a test. Run it with `.venv/bin/python bench/catchup.py [--changes N] [--sample N]`. It prints,
all measured in this run on this machine:

- the server's own bulk-PUT ceiling (requests handed to its ASGI app in-process, no network);
- the sink ceiling: the same rows sent straight to the server by a plain bulk-PUT loop;
- a plain script that reads the same changes and bulk-PUTs them with no store and no
  checkpoint, as PANDA's own CouchDB example does (the price of safety is the gap to it);
- pandasync: the changes enqueued into a fresh store (timed apart), then drained by the
  delivery engine; and its ratio to the sink ceiling;
- pandasync row by row, on a smaller sample;
- on a VM, the CPU time it lost to other guests meanwhile (steal time), which skews the rates.
"""

import argparse
import asyncio
import gc
import os
import platform
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import httpx
import orjson
from sqlmodel import Session
from starlette.types import Message, Scope

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import outbox, panda
from service.changes import Change, Op
from service.config import DeliverySettings
from service.db import Database, create_engine, migrate
from service.delivery import Delivery
from service.fake_panda import FakePandaOptions, create_app
from tests.fixtures.panda import RunningPanda, start_fake_panda

SOURCE = "bench"
DATASET = panda.Dataset(slug="bench", name="Bench", columns=("Headline", "Author", "Words"))
BULK = panda.BULK_LIMIT
ENQUEUE_BATCH = 500  # what the CouchDB poller commits at a time by default
REPEATS = 3
# A supplementary run against a slower server, nearer a real PANDA that commits each write to
# Solr: how much of the gap above is pandasync's own per-row cost.
SLOW_LATENCY_S = 0.05
SLOW_SAMPLE = 100_000


def changes(count: int) -> list[Change]:
    """`count` upserts of distinct documents, rows of three short text values."""
    return [
        Change(
            SOURCE,
            f"story-{index}",
            f"story{index}",
            Op.UPSERT,
            (f"Headline number {index}", f"Author {index % 97}", str(100 + index % 900)),
        )
        for index in range(count)
    ]


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores; Python {platform.python_version()},"
        f" SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}"
    )


def bulk_body(batch: Sequence[Change]) -> bytes:
    objects = [
        {"data": list(change.row or ()), "external_id": change.external_id} for change in batch
    ]
    return orjson.dumps({"objects": objects})


async def server_ceiling(batch_changes: list[Change]) -> float:
    """Rows/s the server's ASGI app takes in bulk PUTs handed to it in-process."""
    app = create_app(FakePandaOptions())
    options = FakePandaOptions()
    headers = [
        (b"panda-email", options.email.encode()),
        (b"panda-api-key", options.api_key.encode()),
        (b"content-type", b"application/json"),
    ]

    async def call(method: str, path: str, body: bytes, query: bytes = b"") -> int:
        scope: Scope = {
            "type": "http",
            "method": method,
            "path": path,
            "query_string": query,
            "headers": headers,
        }
        sent = False
        status = 0

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        return status

    path = f"/api/1.0/dataset/{DATASET.slug}/"
    created = await call("PUT", path, b'{"name": "Bench"}', b"columns=Headline,Author,Words")
    assert created == 201, created
    bodies = [bulk_body(batch_changes[i : i + BULK]) for i in range(0, len(batch_changes), BULK)]
    started = time.perf_counter()
    for body in bodies:
        assert await call("PUT", f"{path}data/", body) == 202
    return len(batch_changes) / (time.perf_counter() - started)


P = ParamSpec("P")
T = TypeVar("T")


class MeteredDatabase(Database):
    """A store that counts the CPU time its transactions take, in whichever thread runs them."""

    store_cpu_s = 0.0

    def run_sync(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        started = time.thread_time()
        try:
            return super().run_sync(fn, *args, **kwargs)
        finally:
            self.store_cpu_s += time.thread_time() - started


@dataclass(frozen=True)
class Costs:
    """What one run cost: CPU per row of this process (and of its store's transactions) and of
    the server, and the median time PANDA took to answer a bulk PUT."""

    client_us: float
    store_us: float | None
    server_us: float | None
    answer_ms: float


class Meter:
    """Measures `Costs` from `start()` to `stop()`: this process's CPU (every thread), the
    server's (from /proc, None elsewhere), and each PUT's time to answer on `http`."""

    def __init__(self, server: RunningPanda, http: httpx.AsyncClient) -> None:
        self._pid = server.pid
        self._answers: list[float] = []
        http.event_hooks = {"request": [self._sent], "response": [self._answered]}

    async def _sent(self, request: httpx.Request) -> None:
        request.extensions["bench_sent"] = time.perf_counter()

    async def _answered(self, response: httpx.Response) -> None:
        if response.request.method == "PUT":
            self._answers.append(time.perf_counter() - response.request.extensions["bench_sent"])

    def start(self, database: MeteredDatabase | None = None) -> None:
        self._database = database
        self._store = 0.0 if database is None else database.store_cpu_s
        self._client = _process_cpu_s()
        self._server = _server_cpu_s(self._pid)
        self._answers.clear()

    def stop(self, rows: int) -> Costs:
        client = _process_cpu_s() - self._client
        server = _server_cpu_s(self._pid)
        store = None if self._database is None else self._database.store_cpu_s - self._store
        return Costs(
            client_us=client / rows * 1e6,
            store_us=None if store is None else store / rows * 1e6,
            server_us=None
            if server is None or self._server is None
            else (server - self._server) / rows * 1e6,
            answer_ms=statistics.median(self._answers) * 1000,
        )


def stolen_s() -> float | None:
    """CPU seconds the hypervisor has given other guests instead of this machine (the `steal`
    column of /proc/stat, all cores), or None where it cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_cpu_s(pid: int) -> float | None:
    """The server process's user + system CPU seconds, from /proc (None without it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sink_ceiling(
    server: RunningPanda,
    batch_changes: list[Change],
    latency_s: float = 0.0,
    costs: list[Costs] | None = None,
) -> float:
    """Rows/s of a plain loop of bulk PUTs, 1000 rows each, straight to the server (its
    `Costs` appended to `costs`)."""
    await reset(server, latency_s)
    async with panda.make_http(url=server.url, timeout_s=60) as http:
        await panda.PandaClient(http, email=server.email, api_key=server.api_key).ensure_dataset(
            DATASET
        )
        headers = {**server.auth, "Content-Type": "application/json"}
        path = f"/api/1.0/dataset/{DATASET.slug}/data/"
        meter = Meter(server, http)
        meter.start()
        started = time.perf_counter()
        for index in range(0, len(batch_changes), BULK):
            answer = await http.put(
                path, content=bulk_body(batch_changes[index : index + BULK]), headers=headers
            )
            answer.raise_for_status()
        elapsed = time.perf_counter() - started
        if costs is not None:
            costs.append(meter.stop(len(batch_changes)))
    await check_rows(server, len(batch_changes))
    return len(batch_changes) / elapsed


async def plain_script(server: RunningPanda, feed: list[Change]) -> float:
    """Rows/s of a script that reads the changes and bulk-PUTs them: no store, no checkpoint."""
    await reset(server)
    async with panda.make_http(url=server.url, timeout_s=60) as http:
        client = panda.PandaClient(http, email=server.email, api_key=server.api_key)
        await client.ensure_dataset(DATASET)
        started = time.perf_counter()
        puts: list[tuple[str, Sequence[str]]] = []
        deletes: list[str] = []
        for change in feed:
            if change.op is Op.DELETE:
                deletes.append(change.external_id)
            else:
                puts.append((change.external_id, change.row or ()))
            if len(puts) == BULK:
                await client.put_rows(DATASET.slug, puts)
                puts = []
        await client.put_rows(DATASET.slug, puts)
        for external_id in deletes:
            await client.delete_row(DATASET.slug, external_id)
        elapsed = time.perf_counter() - started
    await check_rows(server, len(feed))
    return len(feed) / elapsed


def fresh_store(folder: Path, name: str) -> MeteredDatabase:
    url = f"sqlite:///{folder / name}"
    migrate(url)
    return MeteredDatabase(create_engine(url))


def enqueue(database: Database, feed: list[Change]) -> float:
    """Commit the changes to the outbox as the poller would (500 a transaction); seconds."""
    started = time.perf_counter()
    for index in range(0, len(feed), ENQUEUE_BATCH):
        database.run_sync(
            outbox.enqueue, feed[index : index + ENQUEUE_BATCH], now=datetime.now(UTC)
        )
    return time.perf_counter() - started


async def pandasync(
    server: RunningPanda,
    database: MeteredDatabase,
    count: int,
    settings: DeliverySettings,
    latency_s: float = 0.0,
    costs: list[Costs] | None = None,
) -> float:
    """Rows/s of the delivery engine draining `count` queued changes (its `Costs` appended to
    `costs`)."""
    await reset(server, latency_s)
    async with panda.make_http(url=server.url, timeout_s=60) as http:
        client = panda.PandaClient(http, email=server.email, api_key=server.api_key)
        delivery = Delivery(database, client, {SOURCE: DATASET}, settings, request_timeout_s=60)
        meter = Meter(server, http)
        meter.start(database)
        started = time.perf_counter()
        handled = await delivery.run_once()
        elapsed = time.perf_counter() - started
        if costs is not None:
            costs.append(meter.stop(count))
    status = delivery.status()
    assert (handled, status.delivered, status.dead_lettered) == (count, count, 0), status
    assert database.run_sync(outbox.pending, None) == 0
    await check_rows(server, count)
    return count / elapsed


async def reset(server: RunningPanda, latency_s: float = 0.0) -> None:
    """No datasets; with `latency_s` added to every answer, as a slower PANDA would take."""
    async with httpx.AsyncClient() as http:
        (await http.post(f"{server.url}/_fake/reset")).raise_for_status()
        if latency_s:
            faults = {"latency_s": latency_s}
            (await http.put(f"{server.url}/_fake/faults", json=faults)).raise_for_status()


async def check_rows(server: RunningPanda, count: int, slug: str = DATASET.slug) -> None:
    async with httpx.AsyncClient(headers=server.auth) as http:
        answer = await http.get(f"{server.url}/api/1.0/dataset/{slug}/")
        answer.raise_for_status()
        assert answer.json()["row_count"] == count, answer.json()["row_count"]


def quiet_heap() -> None:
    """Collect the garbage of earlier measurements and freeze what lives on (the feed, the
    modules), so that no measurement pays for walking another's objects."""
    gc.collect()
    gc.freeze()


async def best(measure: Callable[[], Awaitable[float]]) -> tuple[float, list[float]]:
    """The median of `REPEATS` runs, and the runs."""
    runs = []
    for _ in range(REPEATS):
        quiet_heap()
        runs.append(await measure())
    return statistics.median(runs), runs


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


def line(label: str, rate: float, note: str = "") -> None:
    say(f"  {label:<46} {rate:>10,.0f} rows/s  {note}".rstrip())


async def main(count: int, sample: int) -> None:
    say(f"catch-up of {count:,} changes into the PANDA-compatible server")
    say(f"machine: {machine()}")
    stolen_before = stolen_s()
    started = time.perf_counter()
    feed = changes(count)
    with start_fake_panda() as server, tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        server_rate, _ = await best(lambda: server_ceiling(feed))
        sink_costs: list[Costs] = []
        sink_rate, sink_runs = await best(lambda: sink_ceiling(server, feed, costs=sink_costs))
        plain_rate, _ = await best(lambda: plain_script(server, feed))
        engine_runs: list[float] = []
        engine_costs: list[Costs] = []
        enqueue_s: list[float] = []
        for run in range(REPEATS):
            database = fresh_store(store, f"bulk-{run}.db")
            enqueue_s.append(enqueue(database, feed))
            quiet_heap()
            engine_runs.append(
                await pandasync(server, database, count, DeliverySettings(), costs=engine_costs)
            )
            database.close()
        engine_rate = statistics.median(engine_runs)
        database = fresh_store(store, "row-by-row.db")
        enqueue(database, feed[:sample])
        quiet_heap()
        row_rate = await pandasync(server, database, sample, DeliverySettings(row_by_row=True))
        database.close()
        slow = feed[:SLOW_SAMPLE]
        quiet_heap()
        slow_sink = await sink_ceiling(server, slow, SLOW_LATENCY_S)
        database = fresh_store(store, "slow.db")
        enqueue(database, slow)
        quiet_heap()
        slow_engine = await pandasync(
            server, database, len(slow), DeliverySettings(), SLOW_LATENCY_S
        )
        database.close()
    say(f"results (median of {REPEATS} runs where marked):")
    line("server's own bulk-PUT ceiling (in-process)", server_rate, "(median)")
    line("sink ceiling (plain bulk-PUT loop, 1000/PUT)", sink_rate, _runs(sink_runs))
    line("plain script (no store, no checkpoint)", plain_rate, "(median)")
    line("pandasync (store + delivery engine)", engine_rate, _runs(engine_runs))
    line(f"pandasync row by row ({sample:,}-change sample)", row_rate)
    say(f"  enqueueing into the fresh store, not timed above: {statistics.median(enqueue_s):.1f} s")
    sink = _of_median(sink_runs, sink_costs)
    engine = _of_median(engine_runs, engine_costs)
    say("costs in the median runs above, pandasync / sink loop:")
    say(
        f"  CPU a row: this process {engine.client_us:.1f} / {sink.client_us:.1f} µs"
        f" (pandasync's store transactions {_us(engine.store_us)} of it),"
        f" the server {_us(engine.server_us)} / {_us(sink.server_us)}"
    )
    say(f"  PANDA's median answer to a bulk PUT: {engine.answer_ms:.2f} / {sink.answer_ms:.2f} ms")
    say(f"ratio pandasync / sink ceiling: {engine_rate / sink_rate:.2f} (target 0.8 or more)")
    stolen_after = stolen_s()
    if stolen_before is not None and stolen_after is not None:
        lost = stolen_after - stolen_before
        say(
            f"CPU time the VM lost to other guests during the run: {lost:.1f} s of"
            f" {time.perf_counter() - started:.0f} s (more than a few seconds: run it again)"
        )
    say(f"price of safety: pandasync runs at {engine_rate / plain_rate:.2f} of the plain script")
    say(
        f"row by row: {row_rate / engine_rate:.3f} of bulk; the {count:,}-change catch-up row by"
        f" row would take about {count / row_rate:,.0f} s (scaled from the sample)"
    )
    say(
        f"with {SLOW_LATENCY_S * 1000:.0f} ms added to every answer ({SLOW_SAMPLE:,} changes,"
        f" one run): sink {slow_sink:,.0f} rows/s, pandasync {slow_engine:,.0f} rows/s,"
        f" ratio {slow_engine / slow_sink:.2f}"
    )


def _of_median(runs: Sequence[float], costs: Sequence[Costs]) -> Costs:
    """The costs of the run whose rate is the median of `runs` (odd `REPEATS`)."""
    return costs[list(runs).index(statistics.median(runs))]


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} µs"


def _runs(runs: Sequence[float]) -> str:
    return "(median; runs " + ", ".join(f"{run:,.0f}" for run in runs) + ")"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2_000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.changes, arguments.sample))
