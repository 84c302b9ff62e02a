"""`pandasync serve` SIGKILLed at random moments, ten times, while CouchDB churns (creates,
updates, deletes): PANDA ends equal to CouchDB, with no row missing, no row of a deleted
document and no stale value. The rows written more than once are counted and printed."""

import random
import sys
import time
from pathlib import Path

import pytest

from service.sandbox.fake_panda import Cost
from tests.fixtures.couchdb import CouchDatabase
from tests.fixtures.panda import start_fake_panda
from tests.reliability.load import Churn, steady, wait_until_equal, write_service

KILLS = 10
# Every row write costs 1 ms: the fake PANDA's `busy_s` then counts the rows it wrote, and
# deliveries stay in flight long enough to be cut off.
ROW_S = 0.001
COUNTED = Cost("counted", request_s=0.0, row_s=ROW_S)


@pytest.mark.timeout(300)
def test_panda_ends_equal_to_couchdb_after_sigkills_at_random_moments_amid_churn(
    couchdb: CouchDatabase, migrated_sqlite_url: str, tmp_path: Path, reliability_scale: int
) -> None:
    seed = random.randrange(2**32)
    moments = random.Random(seed)
    kills = KILLS * reliability_scale
    with start_fake_panda(cost=COUNTED) as panda:
        service = write_service(
            tmp_path, database_url=migrated_sqlite_url, panda=panda, couchdb=couchdb
        )
        churn = Churn(couchdb, seed)
        with steady(churn):
            for _ in range(kills):
                with service.running() as child:
                    # Chooses the moment of the kill within the process's work; waits for nothing.
                    time.sleep(moments.uniform(0.0, 1.0))
                    service.kill(child)
        with service.running():
            wait_until_equal(panda, couchdb)
        stats = panda.stats()
    busy_s = stats["busy_s"]
    assert isinstance(busy_s, float)
    written = round(busy_s / ROW_S)
    # A change superseded before its delivery is never written, so this is a lower bound.
    duplicates = max(0, written - churn.changes)
    sys.stdout.write(
        f"\ncrash: seed={seed} kills={kills} changes={churn.changes} rows_written={written}"
        f" duplicate_writes>={duplicates} requests={stats['requests']}\n"
    )
    assert churn.changes > 0
