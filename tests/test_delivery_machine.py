"""A state machine over enqueue, deliver, fail, retry, crash and restart, against the real
PANDA-compatible server on both stores: PANDA ends equal to the last change per row, and no
newer change is ever lost on the way.
"""

import concurrent.futures
import itertools
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlmodel import Session, delete, select

from service.changes import Change, Op
from service.config import DeliverySettings
from service.delivery import panda
from service.delivery.engine import Delivery
from service.store import outbox
from service.store.db import Database
from service.store.tables import DeadLetter, DocState, OutboxEntry
from tests.fakes.clock import FakeClock
from tests.fixtures.panda import RunningPanda, local_client
from tests.waiting import wait_until

DATASET = panda.Dataset(slug="stories", name="Stories", columns=("Headline", "Version"))
SETTINGS = DeliverySettings(
    batch_size=2, lease_s=120, retry_base_s=1, retry_cap_s=60, breaker_failures=2
)
DOCS = ("a", "b", "c", "d", "e")
FAULTS: dict[str, dict[str, object]] = {
    "server errors": {"error_rate": 1.0},
    "some server errors": {"error_rate": 0.5},
    "locked": {"locked": ["stories"]},
    "down": {"down": True},
    "down with retry-after": {"down": True, "retry_after_s": 5},
}
DEADLINE_S = 10.0


def clear(session: Session) -> None:
    for table in (OutboxEntry, DeadLetter, DocState):
        session.exec(delete(table))


def queued_changes(session: Session) -> dict[str, Change]:
    return {entry.doc_id: outbox.change_of(entry) for entry in session.exec(select(OutboxEntry))}


def shows(rows: dict[str, list[object]], change: Change) -> bool:
    """Whether PANDA's rows show `change` for its document."""
    if change.op is Op.DELETE:
        return change.external_id not in rows
    return rows.get(change.external_id) == list(change.row or ())


def rows_despite_faults(server: RunningPanda) -> dict[str, list[object]]:
    """PANDA's rows, read with the faults lifted for the moment (they are put back)."""
    with local_client() as http:
        faults: dict[str, Any] = http.get(f"{server.url}/_fake/faults").json()
    server.clear_faults()
    try:
        return server.rows("stories")
    finally:
        server.set_faults(**faults)


class DeliveryMachine(RuleBasedStateMachine):
    """Changes to a few documents, delivered through faults, retries, crashes and restarts."""

    server: ClassVar[RunningPanda]
    database: ClassVar[Database]
    portal: ClassVar[BlockingPortal]
    # One client for every example (making one loads CA certificates, about 40 ms of CPU).
    http: ClassVar[httpx.AsyncClient]

    def __init__(self) -> None:
        super().__init__()
        self.database.run_sync(clear)
        self.server.reset()
        self.clock = FakeClock()
        self.last: dict[str, Change] = {}
        self.versions = itertools.count(1)
        self.delivery = self.started()

    def started(self) -> Delivery:
        client = panda.PandaClient(self.http, email=self.server.email, api_key=self.server.api_key)
        return Delivery(
            self.database,
            client,
            {"stories": DATASET},
            SETTINGS,
            request_timeout_s=5,
            clock=self.clock,
        )

    @rule(doc=st.sampled_from(DOCS), headline=st.none() | st.sampled_from(["x", "y"]))
    def enqueue(self, doc: str, headline: str | None) -> None:
        if headline is None:
            change = Change("stories", doc, doc, Op.DELETE)
        else:
            change = Change("stories", doc, doc, Op.UPSERT, (headline, str(next(self.versions))))
        self.database.run_sync(outbox.enqueue, [change], now=self.clock())
        self.last[doc] = change

    @rule()
    def deliver(self) -> None:
        self.portal.call(self.delivery.run_once)

    @rule()
    def step(self) -> None:
        self.portal.call(self.delivery.step)

    @rule(fault=st.sampled_from(sorted(FAULTS)))
    def fail(self, fault: str) -> None:
        self.server.set_faults(**FAULTS[fault])

    @rule()
    def heal(self) -> None:
        self.server.clear_faults()

    @rule()
    def wait_for_retries(self) -> None:
        self.clock.advance(SETTINGS.retry_cap_s)

    @rule()
    def restart(self) -> None:
        self.delivery = self.started()

    @rule(doc=st.sampled_from(DOCS), headline=st.none() | st.sampled_from(["x", "y"]))
    def enqueue_mid_request(self, doc: str, headline: str | None) -> None:
        """A change arrives while a delivery (perhaps of an older change to it) is out."""
        self.server.set_faults(hang=True)
        future = self.portal.start_task_soon(self.delivery.run_once)
        wait_until(lambda: future.done() or self.server.stats()["held"] == 1, what="a request")
        self.enqueue(doc, headline)
        self.server.clear_faults()
        future.result(timeout=DEADLINE_S)

    @rule()
    def crash_mid_request(self) -> None:
        """The process dies with a request out: its claims keep their lease until it ends."""
        self.server.set_faults(hang=True)
        future = self.portal.start_task_soon(self.delivery.run_once)
        wait_until(lambda: future.done() or self.server.stats()["held"] == 1, what="a request")
        future.cancel()
        concurrent.futures.wait([future])
        self.server.clear_faults()
        wait_until(lambda: self.server.stats()["held"] == 0, what="the cut-off request to end")
        self.delivery = self.started()
        self.clock.advance(SETTINGS.lease_s)

    @invariant()
    def no_newer_change_is_lost(self) -> None:
        queued = self.database.run_sync(queued_changes)
        rows = rows_despite_faults(self.server)
        for doc, change in self.last.items():
            assert queued.get(doc) == change or shows(rows, change), (doc, change)

    def teardown(self) -> None:
        self.server.clear_faults()
        self.delivery = self.started()
        self.clock.advance(SETTINGS.lease_s)
        for _ in range(20):
            self.portal.call(self.delivery.run_once)
            if self.database.run_sync(outbox.pending, None) == 0:
                break
            self.clock.advance(SETTINGS.retry_cap_s)
        expected = {
            doc: list(change.row) for doc, change in self.last.items() if change.row is not None
        }
        assert self.database.run_sync(outbox.pending, None) == 0
        assert self.server.rows("stories") == expected


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal(backend="asyncio") as running:
        yield running


def panda_http(server: RunningPanda) -> httpx.AsyncClient:
    return panda.make_http(url=server.url, timeout_s=5)


def test_panda_ends_with_the_last_change_per_row_through_faults_and_restarts(
    panda: RunningPanda, database: Database, portal: BlockingPortal
) -> None:
    with portal.wrap_async_context_manager(panda_http(panda)) as http:
        bound = type(
            "BoundDeliveryMachine",
            (DeliveryMachine,),
            {"server": panda, "database": database, "portal": portal, "http": http},
        )
        run_state_machine_as_test(
            bound,
            settings=settings(
                max_examples=20,
                stateful_step_count=12,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
