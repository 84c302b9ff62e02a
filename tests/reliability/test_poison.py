"""Poison rows among good ones: rows PANDA refuses (the `refuse_ids` fault: a 400 naming the
external_id) and CouchDB documents that cannot be mapped, scattered among good documents and
webhooks. Only they become dead letters; everything else reaches PANDA."""

import json
import random
from pathlib import Path

import pytest

from service.sources import external_ids
from service.store import dead_letters, outbox
from service.store.db import Database
from tests.fixtures.couchdb import CouchDatabase
from tests.fixtures.panda import RunningPanda, local_client
from tests.fixtures.service import wait_until
from tests.reliability.load import write_service

# A title nested deeper than a PANDA cell can hold as text: the document cannot be mapped.
DEEP = "[" * 2000 + '"bottom"' + "]" * 2000


@pytest.mark.timeout(120)
def test_only_the_poison_rows_become_dead_letters_and_every_other_row_is_delivered(
    panda: RunningPanda,
    couchdb: CouchDatabase,
    migrated_sqlite_url: str,
    tmp_path: Path,
    reliability_scale: int,
) -> None:
    count = 300 * reliability_scale
    picks = random.Random(5)
    refused = {f"d{n:05}" for n in picks.sample(range(count), 6)}
    unmappable = {f"d{n:05}" for n in picks.sample(range(count), 6)} - refused
    refused_hooks = {f"w{n:03}" for n in picks.sample(range(60), 4)}
    panda.set_faults(refuse_ids=sorted(refused | refused_hooks))
    docs = [
        {"_id": f"d{n:05}", "title": "POISON" if f"d{n:05}" in unmappable else f"t{n}", "words": n}
        for n in range(count)
    ]
    couchdb.bulk_text(json.dumps(docs).replace('"POISON"', DEEP))
    service = write_service(
        tmp_path, database_url=migrated_sqlite_url, panda=panda, couchdb=couchdb
    )
    database = Database.open(migrated_sqlite_url)
    try:
        with service.running():
            for n in range(60):
                change = {"op": "upsert", "id": f"w{n:03}", "row": {"title": f"hook {n}"}}
                with local_client(base_url=service.url) as http:
                    answer = http.post("/webhooks/hooks", json={"changes": [change]})
                assert answer.status_code == 202
            wait_until(
                lambda: (
                    database.run_sync(outbox.pending, None) == 0
                    and len(database.run_sync(dead_letters.find, None))
                    == len(refused | unmappable | refused_hooks)
                ),
                what="every change delivered or dead",
            )
            letters = database.run_sync(dead_letters.find, None)
        panda.clear_faults()
        assert sorted((letter.source, letter.doc_id, letter.op) for letter in letters) == sorted(
            [("feed", doc_id, "upsert") for doc_id in refused]
            + [("feed", doc_id, dead_letters.UNMAPPED) for doc_id in unmappable]
            + [("hooks", doc_id, "upsert") for doc_id in refused_hooks]
        )
        assert panda.rows("feed") == {
            external_ids.encode(str(doc["_id"])): [str(doc["title"]), str(doc["words"])]
            for doc in docs
            if doc["_id"] not in refused | unmappable
        }
        assert panda.rows("hooks") == {
            f"w{n:03}": [f"hook {n}"] for n in range(60) if f"w{n:03}" not in refused_hooks
        }
    finally:
        database.close()
