"""PANDA misbehaving under steady CouchDB and webhook load, one fault at a time: down, answering
500s, hanging without answering, resetting connections (a TCP proxy between pandasync and the
fake PANDA), slow. Webhooks keep getting 202 during the fault; once it is lifted, delivery
resumes by itself and PANDA ends equal to the sources."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fixtures.couchdb import CouchDatabase
from tests.fixtures.panda import RunningPanda
from tests.fixtures.proxy import FaultProxy, start_proxy
from tests.fixtures.service import wait_until
from tests.reliability.load import Churn, Hooks, steady, wait_until_equal, write_service

# Webhooks posted while a fault is in force (about 25 a second: over a second).
DURING = 30


@dataclass(frozen=True)
class Fault:
    """How to bring a fault about, how to see it is felt, and how to lift it."""

    faults: dict[str, object]
    proxy_mode: str = "pass"

    def start(self, panda: RunningPanda, proxy: FaultProxy) -> None:
        if self.faults:
            panda.set_faults(**self.faults)
        proxy.mode = "reset" if self.proxy_mode == "reset" else "pass"

    def lift(self, panda: RunningPanda, proxy: FaultProxy) -> None:
        proxy.mode = "pass"
        panda.clear_faults()


def _answered(panda: RunningPanda, status: str) -> Callable[[FaultProxy], bool]:
    def felt(_: FaultProxy) -> bool:
        by_status = panda.stats()["by_status"]
        return isinstance(by_status, dict) and by_status.get(status, 0) > 0

    return felt


FAULTS = {
    "down": Fault({"down": True}),
    "500s": Fault({"error_rate": 1.0}),
    "hanging": Fault({"hang": True}),
    "resetting": Fault({}, proxy_mode="reset"),
    "slow": Fault({"latency_s": 0.5}),
}


def _felt(name: str, panda: RunningPanda) -> Callable[[FaultProxy], bool]:
    """Whether pandasync has met the fault (it kept trying PANDA while it was in force)."""
    if name == "down":
        return _answered(panda, "502")
    if name == "500s":
        return _answered(panda, "500")
    if name == "hanging":
        return lambda _: panda.stats()["held"] != 0
    if name == "resetting":
        return lambda proxy: proxy.resets > 0
    return lambda _: True  # slow: every request meets it


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(FAULTS))
def test_a_panda_fault_loses_nothing_keeps_webhooks_accepted_and_delivery_resumes_by_itself(
    name: str,
    panda: RunningPanda,
    couchdb: CouchDatabase,
    migrated_sqlite_url: str,
    tmp_path: Path,
    reliability_scale: int,
) -> None:
    fault = FAULTS[name]
    port = urlsplit(panda.url).port
    assert port is not None
    with start_proxy(port) as proxy:
        service = write_service(
            tmp_path,
            database_url=migrated_sqlite_url,
            panda=panda,
            couchdb=couchdb,
            panda_url=proxy.url,
        )
        churn = Churn(couchdb, seed=1)
        hooks = Hooks(service.url, seed=2)
        with service.running():
            with steady(churn, hooks):
                wait_until(lambda: len(panda.rows("feed")) > 0, what="a first delivery")
                fault.start(panda, proxy)
                posted = len(hooks.statuses)
                felt = _felt(name, panda)
                wait_until(lambda: felt(proxy), what=f"pandasync to meet the fault ({name})")
                wait_until(
                    lambda: len(hooks.statuses) >= posted + DURING * reliability_scale,
                    what="webhooks posted during the fault",
                )
                during = hooks.statuses[posted:]
                fault.lift(panda, proxy)
                lifted = len(hooks.statuses)
                wait_until(lambda: len(hooks.statuses) >= lifted + 10, what="webhooks after it")
            hooks.close()
            assert set(during) == {202}, f"webhooks not accepted during the fault: {during}"
            assert set(hooks.statuses) == {202}
            # The same process, untouched: delivery resumes by itself.
            wait_until_equal(panda, couchdb, hooks)
