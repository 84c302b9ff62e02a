"""Scale-out benchmark: 1, 2 and 3 `pandasync serve` replicas on one PostgreSQL store.

Not a test. Run it with `.venv/bin/python bench/replicas.py [--docs N] [--seconds S]`
(PostgreSQL at $TEST_POSTGRES_URL or 127.0.0.1:5432/test; pouchdb-server from node_modules).
For each replica count, all measured in this run on this machine:

- catch-up: four CouchDB databases of `--docs` documents each, four datasets, against a server
  as slow as PANDA 1.1 (`fake-panda --cost panda-1.1`: 30 ms a request plus 2.4 ms a row, one
  request at a time): rows per second from the replicas' start to the last row in PANDA, and
  the ratio to that server's ceiling for the same rows in 1,000-row PUTs;
- webhooks: signed-less webhooks (one change each, unique ids) posted for `--seconds` by 16
  concurrent clients spread over the replicas: accepted (202) per second, p50 and p99.

Writes the figures to bench/replicas.json too.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.catchup import machine
from service.sandbox.fake_panda import PANDA_1_1
from service.store import outbox
from service.store.db import Database, migrate
from tests.fixtures.couchdb import start_pouchdb
from tests.fixtures.panda import free_port, start_fake_panda
from tests.fixtures.service import serving
from tests.fixtures.store import postgres_schema
from tests.waiting import wait_until

FEEDS = ("a", "b", "c", "d")
CLIENTS = 16
CONFIG = """
database_url = "{database_url}"

[panda]
url = "{panda_url}"
email = "{email}"
api_key = "{api_key}"

[server]
port = {port}

[delivery]
idle_poll_s = 0.05

[logging]
format = "text"

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
columns = [{{ name = "Title", field = "title" }}, {{ name = "Words", field = "words" }}]

[sources.couchdb]
url = "{couchdb_url}"
database = "{database}"
"""


def configs(folder: Path, url: str, panda: object, feeds: str, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"replica{index}.toml"
        path.write_text(
            CONFIG.format(
                database_url=url,
                panda_url=panda.url,  # type: ignore[attr-defined]
                email=panda.email,  # type: ignore[attr-defined]
                api_key=panda.api_key,  # type: ignore[attr-defined]
                port=free_port(),
                feeds=feeds,
            )
        )
        paths.append(path)
    return paths


def port_of(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("port = "):
            return int(line.removeprefix("port = "))
    raise ValueError(path)


async def post_webhooks(ports: list[int], seconds: float) -> tuple[int, list[float]]:
    """Post unique webhooks from `CLIENTS` clients for `seconds`; (accepted, latencies)."""
    accepted = 0
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS)

    async def client(number: int) -> None:
        nonlocal accepted
        async with httpx.AsyncClient(limits=limits, timeout=10) as http:
            for sent in range(10**9):
                if time.monotonic() >= deadline:
                    return
                port = ports[(number + sent) % len(ports)]
                doc_id = f"c{number}n{sent}"
                body = {"changes": [{"op": "upsert", "id": doc_id, "row": {"title": doc_id}}]}
                started = time.monotonic()
                answer = await http.post(f"http://127.0.0.1:{port}/webhooks/hooks", json=body)
                latencies.append(time.monotonic() - started)
                accepted += answer.status_code == 202

    await asyncio.gather(*(client(number) for number in range(CLIENTS)))
    return accepted, latencies


def run(count: int, docs: int, seconds: float, folder: Path, couchdb: object) -> dict[str, float]:
    databases = {name: couchdb.create() for name in FEEDS}  # type: ignore[attr-defined]
    for database in databases.values():
        rows = [{"_id": f"doc{n}", "title": f"title {n}", "words": n} for n in range(docs)]
        database.bulk(rows)
    feeds = "".join(
        FEED.format(name=name, couchdb_url=db.server_url, database=db.name)
        for name, db in databases.items()
    )
    result: dict[str, float] = {"replicas": count}
    with ExitStack() as stack:
        url = stack.enter_context(postgres_schema())
        migrate(url)
        store = Database.open(url)
        stack.callback(store.close)
        panda = stack.enter_context(start_fake_panda(cost=PANDA_1_1))
        paths = configs(folder, url, panda, feeds, count)
        started = time.monotonic()
        for index, path in enumerate(paths):
            stack.enter_context(serving(path, folder / f"r{count}-{index}.log"))
        total = docs * len(FEEDS)

        def done() -> bool:
            with httpx.Client(base_url=panda.url, headers=panda.auth) as http:
                counts = []
                for name in FEEDS:
                    answer = http.get(f"/api/1.0/dataset/{name}/")
                    counts.append(answer.json().get("row_count") or 0 if answer.is_success else 0)
            return sum(counts) >= total

        wait_until(done, what="every row in PANDA", deadline_s=3600)
        took = time.monotonic() - started
        ceiling_s = len(FEEDS) * PANDA_1_1.seconds(1000) * (docs / 1000)
        result["catchup_rows_per_s"] = total / took
        result["catchup_ratio"] = ceiling_s / took
        ports = [port_of(path) for path in paths]
        accepted, latencies = asyncio.run(post_webhooks(ports, seconds))
        result["webhooks_per_s"] = accepted / seconds
        result["webhook_p50_ms"] = statistics.median(latencies) * 1000
        result["webhook_p99_ms"] = statistics.quantiles(latencies, n=100)[98] * 1000
        wait_until(lambda: store.run_sync(outbox.pending, None) == 0, what="webhooks delivered")
    for database in databases.values():
        database.destroy()
    return result


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000, help="documents a CouchDB database")
    parser.add_argument("--seconds", type=float, default=5.0, help="webhook load per run")
    args = parser.parse_args()
    results = []
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (folder / "pouchdb").mkdir()
        couchdb = stack.enter_context(start_pouchdb(folder / "pouchdb"))
        for count in (1, 2, 3):
            results.append(run(count, args.docs, args.seconds, folder, couchdb))
    say(f"machine: {machine()}")
    say(
        f"catch-up of {len(FEEDS)} x {args.docs:,} documents into {len(FEEDS)} datasets of a"
        f" server as slow as PANDA 1.1; webhooks from {CLIENTS} clients for {args.seconds:g} s"
    )
    say("replicas  catch-up rows/s  of the ceiling  webhooks/s  p50 ms  p99 ms")
    for result in results:
        say(
            f"{result['replicas']:>8.0f}  {result['catchup_rows_per_s']:>15,.0f}"
            f"  {result['catchup_ratio']:>14.2f}  {result['webhooks_per_s']:>10,.0f}"
            f"  {result['webhook_p50_ms']:>6.1f}  {result['webhook_p99_ms']:>6.1f}"
        )
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
