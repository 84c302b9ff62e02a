"""Catch-up benchmark: changes from a fresh SQLite store into the PANDA-compatible server.

Not a test. Run it with `.venv/bin/python bench/catchup.py [--costed N] [--changes N]
[--sample N]`. It prints, all measured in this run on this machine, against a plain loop of
bulk PUTs that sends the same rows in the same batch sizes (pandasync's), both starting from an
empty PANDA and creating the dataset:

- on a server as slow as PANDA 1.1 (`fake-panda --cost panda-1.1`: 30 ms a request plus 2.4 ms
  a row, one request at a time; `--costed` changes, one run each): pandasync's catch-up rate,
  the loop's, their ratio (target 0.97 or more) and how busy each kept PANDA;
- the same on the free server (no cost; `--changes` changes, median of three runs), and the
  CPU time pandasync's process spends on each delivered row: its own cost, which the costed
  server hides;
- row by row on the costed server (`--sample` changes), against its ceiling of one row a
  request;
- on a VM, the CPU time it lost to other guests meanwhile (steal time), which skews the rates
  of the free server.

The changes are enqueued into each fresh store first, as the poller commits them, not timed.
"""

import argparse
import asyncio
import gc
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.changes import Change, Op
from service.config import DeliverySettings
from service.delivery import panda
from service.delivery.engine import Delivery
from service.sandbox.fake_panda import PANDA_1_1
from service.store import outbox
from service.store.db import Database, create_engine, migrate
from tests.fixtures.panda import RunningPanda, start_fake_panda

SOURCE = "bench"
DATASET = panda.Dataset(slug="bench", name="Bench", columns=("Headline", "Author", "Words"))
DATA_PATH = f"/api/1.0/dataset/{DATASET.slug}/data/"
ENQUEUE_BATCH = 500  # what the CouchDB poller commits at a time by default
REPEATS = 3


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


@dataclass
class Run:
    """One catch-up: rows/s, this process's CPU a row, the share of the time PANDA was busy
    (its cost model's time; 0 on the free server), and the rows of each bulk PUT sent."""

    rate: float
    cpu_us: float
    busy: float
    sizes: list[int] = field(default_factory=list)


class Meter:
    """Times a catch-up from `start()` to `stop()`: wall clock, this process's CPU (every
    thread) and PANDA's busy time; records the rows of each bulk PUT sent on `http`."""

    def __init__(self, server: RunningPanda, http: httpx.AsyncClient) -> None:
        self._server = server
        self.sizes: list[int] = []
        http.event_hooks = {"request": [self._sent]}

    async def _sent(self, request: httpx.Request) -> None:
        if request.method == "PUT" and request.url.path == DATA_PATH:
            self.sizes.append(request.content.count(b'"external_id"'))

    def start(self) -> None:
        self._cpu_s = _process_cpu_s()
        self._started = time.perf_counter()

    async def stop(self, rows: int) -> Run:
        elapsed = time.perf_counter() - self._started
        cpu_s = _process_cpu_s() - self._cpu_s
        busy_s = await _busy_s(self._server)
        return Run(rows / elapsed, cpu_s / rows * 1e6, busy_s / elapsed, self.sizes)


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _busy_s(server: RunningPanda) -> float:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{server.url}/_fake/stats")
    answer.raise_for_status()
    busy_s: float = answer.json()["busy_s"]
    return busy_s


def stolen_s() -> float | None:
    """CPU seconds the hypervisor has given other guests instead of this machine (the `steal`
    column of /proc/stat, all cores), or None where it cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


async def plain_loop(server: RunningPanda, feed: list[Change], sizes: Sequence[int]) -> Run:
    """A plain loop of bulk PUTs of `sizes` rows each, straight to the server."""
    assert sum(sizes) == len(feed), (sum(sizes), len(feed))
    await reset(server)
    async with panda.make_http(url=server.url, timeout_s=60) as http:
        headers = {**server.auth, "Content-Type": "application/json"}
        meter = Meter(server, http)
        meter.start()
        client = panda.PandaClient(http, email=server.email, api_key=server.api_key)
        await client.ensure_dataset(DATASET)
        start = 0
        for size in sizes:
            body = bulk_body(feed[start : start + size])
            (await http.put(DATA_PATH, content=body, headers=headers)).raise_for_status()
            start += size
        run = await meter.stop(len(feed))
    await check_rows(server, len(feed))
    return run


def fresh_store(folder: Path, name: str, feed: list[Change]) -> Database:
    """A migrated SQLite store holding `feed` in its outbox, committed as the poller would."""
    url = f"sqlite:///{folder / name}"
    migrate(url)
    database = Database(create_engine(url))
    for index in range(0, len(feed), ENQUEUE_BATCH):
        database.run_sync(
            outbox.enqueue, feed[index : index + ENQUEUE_BATCH], now=datetime.now(UTC)
        )
    return database


async def pandasync(
    server: RunningPanda, database: Database, count: int, settings: DeliverySettings
) -> Run:
    """The delivery engine draining `count` queued changes; checks they all arrived."""
    await reset(server)
    async with panda.make_http(url=server.url, timeout_s=60) as http:
        client = panda.PandaClient(http, email=server.email, api_key=server.api_key)
        delivery = Delivery(database, client, {SOURCE: DATASET}, settings, request_timeout_s=60)
        meter = Meter(server, http)
        meter.start()
        handled = await delivery.run_once()
        run = await meter.stop(count)
    assert handled == count, (handled, count)
    assert database.run_sync(outbox.pending, None) == 0
    await check_rows(server, count)
    return run


async def reset(server: RunningPanda) -> None:
    """No datasets, zero stats."""
    async with httpx.AsyncClient() as http:
        (await http.post(f"{server.url}/_fake/reset")).raise_for_status()


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


async def median_of(measure: Callable[[], Awaitable[Run]]) -> tuple[Run, list[Run]]:
    """The run of median rate among `REPEATS` (odd), and all of them."""
    runs = []
    for _ in range(REPEATS):
        quiet_heap()
        runs.append(await measure())
    return sorted(runs, key=lambda run: run.rate)[REPEATS // 2], runs


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


def line(label: str, run: Run, note: str) -> None:
    say(f"  {label:<36} {run.rate:>9,.0f} rows/s  {note}")


def sizes_text(sizes: Sequence[int]) -> str:
    """`100, 200, 400, 800, 1000 (4 times), 500`."""
    parts = []
    for size, repeats in groupby(sizes):
        times = len(list(repeats))
        parts.append(f"{size}" if times == 1 else f"{size} ({times} times)")
    return ", ".join(parts)


def rates(runs: Sequence[Run]) -> str:
    return "runs " + ", ".join(f"{run.rate:,.0f}" for run in runs)


async def costed(server: RunningPanda, folder: Path, count: int, sample: int) -> None:
    feed = changes(count)
    database = fresh_store(folder, "costed.db", feed)
    engine = await pandasync(server, database, count, DeliverySettings())
    database.close()
    loop = await plain_loop(server, feed, engine.sizes)
    database = fresh_store(folder, "row-by-row.db", feed[:sample])
    rows = await pandasync(server, database, sample, DeliverySettings(row_by_row=True))
    database.close()
    ceiling = 1 / PANDA_1_1.seconds(1)
    say(
        f"on a server as slow as PANDA 1.1 ({PANDA_1_1.request_s * 1000:.0f} ms a request plus"
        f" {PANDA_1_1.row_s * 1000:.1f} ms a row, one request at a time), {count:,} changes,"
        " one run each:"
    )
    line("plain bulk-PUT loop", loop, f"PANDA busy {loop.busy:.1%} of the time")
    line("pandasync (store + delivery engine)", engine, f"PANDA busy {engine.busy:.1%}")
    say(f"  rows in each bulk PUT, the same for both: {sizes_text(engine.sizes)}")
    say(f"ratio pandasync / plain loop: {engine.rate / loop.rate:.3f} (target 0.97 or more)")
    say(
        f"row by row ({sample:,} changes): pandasync {rows.rate:.1f} rows/s, against a ceiling"
        f" of {ceiling:.1f} rows/s (one row a request): {rows.rate / ceiling:.3f} of it,"
        f" PANDA busy {rows.busy:.1%}"
    )


async def free(server: RunningPanda, folder: Path, count: int) -> None:
    feed = changes(count)
    stores = [fresh_store(folder, f"free-{run}.db", feed) for run in range(REPEATS)]
    queued = iter(stores)
    engine, engine_runs = await median_of(
        lambda: pandasync(server, next(queued), count, DeliverySettings())
    )
    for database in stores:
        database.close()
    loop, loop_runs = await median_of(lambda: plain_loop(server, feed, engine.sizes))
    say(f"on the free server (no cost), {count:,} changes, median of {REPEATS} runs:")
    line("plain bulk-PUT loop", loop, f"CPU {loop.cpu_us:.1f} µs a row ({rates(loop_runs)})")
    line("pandasync", engine, f"CPU {engine.cpu_us:.1f} µs a row ({rates(engine_runs)})")
    say(f"ratio pandasync / plain loop: {engine.rate / loop.rate:.2f}")
    say(
        f"pandasync's own cost: {engine.cpu_us:.1f} µs of CPU a delivered row in its process"
        f" (store, delivery, HTTP client), against {PANDA_1_1.row_s * 1e6:,.0f} µs a row at PANDA"
    )


async def main(costed_count: int, free_count: int, sample: int) -> None:
    say("catch-up into the PANDA-compatible server from a fresh SQLite store")
    say(f"machine: {machine()}")
    stolen_before = stolen_s()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        with start_fake_panda(cost=PANDA_1_1) as server:
            await costed(server, Path(scratch), costed_count, sample)
        with start_fake_panda() as server:
            await free(server, Path(scratch), free_count)
    stolen_after = stolen_s()
    if stolen_before is not None and stolen_after is not None:
        lost = stolen_after - stolen_before
        say(
            f"CPU time the VM lost to other guests during the run: {lost:.1f} s of"
            f" {time.perf_counter() - started:.0f} s (more than a few seconds: run it again)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--costed", type=int, default=5_000, help="changes, costed server")
    parser.add_argument("--changes", type=int, default=100_000, help="changes, free server")
    parser.add_argument("--sample", type=int, default=500, help="changes row by row (costed)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.costed, arguments.changes, arguments.sample))
