"""End-to-end catch-up benchmark: documents in a CouchDB-protocol server into the PANDA-compatible
server, through pandasync and through a plain script.

Not a test. Run it with `.venv/bin/python bench/couchdb_catchup.py [--docs N]` (after
`make install`: it starts the project's pouchdb-server and the PANDA-compatible server). It
prints, all measured in this run on this machine:

- pandasync, in two stages: the CouchDB poller reading the `_changes` feed into a fresh SQLite
  store (checkpoint in the same transaction), then delivery draining the store into PANDA; and
  the two together;
- a plain script that reads the same feed (pages of `include_docs`) and bulk-PUTs each page,
  with no store and no checkpoint, as PANDA's own CouchDB example does;
- the ratio of the two.
"""

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catchup import check_rows, machine, reset, say

from service.config import DeliverySettings, SourceSettings
from service.delivery import panda
from service.delivery.engine import Delivery
from service.ingress.poller import Poller
from service.store.db import Database, migrate
from tests.fixtures.couchdb import CouchDatabase, start_pouchdb
from tests.fixtures.panda import RunningPanda, start_fake_panda

NAME = "stories"
COLUMNS = [
    {"name": "Headline", "field": "title"},
    {"name": "Author", "field": "author"},
    {"name": "Words", "field": "words"},
]
DATASET = panda.Dataset(slug=NAME, name="Stories", columns=("Headline", "Author", "Words"))
PAGE = 1000  # the plain script's feed page, as large as a bulk PUT


def documents(count: int) -> list[dict[str, Any]]:
    return [
        {
            "_id": f"story{index:07}",
            "title": f"Headline number {index}",
            "author": f"Author {index % 97}",
            "words": 100 + index % 900,
        }
        for index in range(count)
    ]


def source(couchdb: CouchDatabase) -> SourceSettings:
    return SourceSettings.model_validate(
        {
            "name": NAME,
            "kind": "couchdb",
            "dataset": {"slug": DATASET.slug, "name": DATASET.name},
            "columns": COLUMNS,
            "couchdb": couchdb.settings().model_dump(exclude_unset=True),
        }
    )


async def pandasync(
    server: RunningPanda, couchdb: CouchDatabase, folder: Path, count: int
) -> tuple[float, float]:
    """Seconds for the poller to read the feed into a fresh store, and for delivery to drain it."""
    await reset(server)
    url = f"sqlite:///{folder / 'pandasync.db'}"
    migrate(url)
    database = Database.open(url)
    try:
        async with (
            httpx.AsyncClient() as couchdb_http,
            panda.make_http(url=server.url, timeout_s=60) as http,
        ):
            settings = source(couchdb)
            poller = Poller(settings, database, couchdb_http)
            started = time.perf_counter()
            read = await poller.run_once()
            feed_s = time.perf_counter() - started
            client = panda.PandaClient(http, email=server.email, api_key=server.api_key)
            delivery = Delivery(
                database, client, {NAME: DATASET}, DeliverySettings(), request_timeout_s=60
            )
            started = time.perf_counter()
            delivered = await delivery.run_once()
            deliver_s = time.perf_counter() - started
    finally:
        database.close()
    assert (read, delivered) == (count, count), (read, delivered)
    await check_rows(server, count, slug=DATASET.slug)
    return feed_s, deliver_s


async def plain_script(server: RunningPanda, couchdb: CouchDatabase, count: int) -> float:
    """Seconds for a loop that reads `_changes` pages with their documents and bulk-PUTs each."""
    await reset(server)
    fields = [column["field"] for column in COLUMNS]
    async with (
        httpx.AsyncClient(base_url=couchdb.server_url) as feed,
        panda.make_http(url=server.url, timeout_s=60) as http,
    ):
        client = panda.PandaClient(http, email=server.email, api_key=server.api_key)
        await client.ensure_dataset(DATASET)
        started = time.perf_counter()
        since: object = 0
        while True:
            answer = await feed.get(
                f"/{couchdb.name}/_changes",
                params={"include_docs": "true", "limit": str(PAGE), "since": str(since)},
            )
            answer.raise_for_status()
            page = answer.json()
            rows = [
                (change["id"], [str(change["doc"].get(field, "")) for field in fields])
                for change in page["results"]
                if not change.get("deleted")
            ]
            await client.put_rows(DATASET.slug, rows)
            if not page["results"]:
                break
            since = page["last_seq"]
        elapsed = time.perf_counter() - started
    await check_rows(server, count, slug=DATASET.slug)
    return elapsed


async def main(count: int) -> None:
    say(f"catch-up of {count:,} CouchDB documents into the PANDA-compatible server")
    say(f"machine: {machine()}")
    with (
        tempfile.TemporaryDirectory() as folder,
        start_pouchdb(Path(folder) / "couchdb") as couchdb_server,
        start_fake_panda() as server,
    ):
        couchdb = couchdb_server.create(NAME)
        started = time.perf_counter()
        couchdb.bulk(documents(count))
        loaded_s = time.perf_counter() - started
        say(f"  loading the documents into pouchdb-server, not timed below: {loaded_s:.1f} s")
        plain_s = await plain_script(server, couchdb, count)
        feed_s, deliver_s = await pandasync(server, couchdb, Path(folder), count)
    say("results (one run each):")
    rate = {
        "plain script (feed pages -> bulk PUTs)": count / plain_s,
        "pandasync, feed -> store (poller)": count / feed_s,
        "pandasync, store -> PANDA (delivery)": count / deliver_s,
        "pandasync, both stages in turn (sync --once)": count / (feed_s + deliver_s),
    }
    for label, value in rate.items():
        say(f"  {label:<46} {value:>10,.0f} rows/s")
    ratio = plain_s / (feed_s + deliver_s)
    say(f"pandasync (sync --once) runs at {ratio:.2f} of the plain script (the price of safety)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().docs))
