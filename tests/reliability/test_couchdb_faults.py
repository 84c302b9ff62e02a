"""CouchDB misbehaving under churn: the `_changes` connection cut mid-feed, the feed stalled
(a TCP proxy that stops forwarding), the server restarted. The feed reconnects by itself and
PANDA ends equal to CouchDB."""

from pathlib import Path

import httpx
import pytest

from tests.fixtures.couchdb import CouchDatabase, start_pouchdb
from tests.fixtures.panda import RunningPanda, local_client
from tests.fixtures.proxy import FaultProxy, start_proxy
from tests.fixtures.service import wait_until
from tests.reliability.load import Churn, Service, steady, wait_until_equal, write_service

# CouchDB changes made during and after a fault (about 25 a second).
CHANGES = 15


def feed_state(service: Service) -> str | None:
    try:
        with local_client(timeout=2) as http:
            answer = http.get(f"{service.url}/status")
    except httpx.TransportError:
        return None
    state: str = answer.json()["sources"]["feed"]["feed"]["state"]
    return state


def reconnected(proxy: FaultProxy, connections: int) -> None:
    wait_until(lambda: proxy.connections > connections, what="the feed to reconnect")


def more(churn: Churn, count: int) -> None:
    made = churn.changes
    wait_until(lambda: churn.changes >= made + count, what=f"{count} more CouchDB changes")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["cut", "stalled"])
def test_a_feed_cut_or_stalled_mid_feed_reconnects_and_panda_ends_equal_to_couchdb(
    fault: str,
    panda: RunningPanda,
    couchdb: CouchDatabase,
    migrated_sqlite_url: str,
    tmp_path: Path,
    reliability_scale: int,
) -> None:
    port = int(couchdb.server_url.rsplit(":", 1)[1])
    with start_proxy(port) as proxy:
        service = write_service(
            tmp_path,
            database_url=migrated_sqlite_url,
            panda=panda,
            couchdb=couchdb,
            couchdb_url=proxy.url,
        )
        churn = Churn(couchdb, seed=3)
        with service.running():
            with steady(churn):
                wait_until(lambda: feed_state(service) == "live", what="the feed to be live")
                for _ in range(2 * reliability_scale):
                    connections = proxy.connections
                    if fault == "cut":
                        proxy.cut()
                    else:
                        proxy.mode = "stall"
                        # Silent past its timeout_s (2 s): the feed gives the connection up.
                        wait_until(
                            lambda: feed_state(service) == "retrying",
                            what="the stalled feed to be noticed",
                        )
                        proxy.mode = "pass"
                    reconnected(proxy, connections)
                    more(churn, CHANGES)
            wait_until_equal(panda, couchdb)


@pytest.mark.timeout(120)
def test_a_couchdb_restarted_under_churn_is_read_on_from_and_panda_ends_equal_to_it(
    panda: RunningPanda, migrated_sqlite_url: str, tmp_path: Path, reliability_scale: int
) -> None:
    with start_pouchdb(tmp_path / "pouchdb", on_disk=True) as server:
        couchdb = server.create("news")
        service = write_service(
            tmp_path, database_url=migrated_sqlite_url, panda=panda, couchdb=couchdb
        )
        churn = Churn(couchdb, seed=4)
        try:
            with service.running():
                with steady(churn) as stepping:
                    wait_until(lambda: feed_state(service) == "live", what="the feed to be live")
                    for _ in range(reliability_scale):
                        more(churn, CHANGES)
                        with stepping:  # no change is made while the server is down
                            server.restart()
                        more(churn, CHANGES)
                wait_until_equal(panda, couchdb)
        finally:
            couchdb.destroy()
