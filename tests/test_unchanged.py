"""Write only what changed: a change that would write what PANDA holds already costs PANDA
nothing, and anything PANDA may hold that the store did not see acknowledged is sent again.

Against the PANDA-compatible server over real sockets, on both stores.
"""

from collections.abc import AsyncIterator

import httpx
import pytest

from service.config import DeliverySettings
from service.delivery.engine import Delivery
from service.store.db import Database
from tests.fakes.clock import FakeClock
from tests.fixtures.panda import RunningPanda
from tests.test_delivery import SETTINGS, delete, delivery_to, delivery_with, enqueue, upsert

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def delivery(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> AsyncIterator[Delivery]:
    async with delivery_with(panda, database, clock) as running:
        yield running


def writes(panda: RunningPanda) -> int:
    count = panda.stats()["writes"]
    assert isinstance(count, int)
    return count


async def test_a_change_repeating_what_panda_holds_is_settled_without_a_request(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "Flood", "12"), upsert("s2", "Fire", "3"))
    assert await delivery.run_once() == 2
    before = writes(panda)
    # A CouchDB edit of a field that is no column, a webhook sent twice: the same rows again.
    await enqueue(database, clock, upsert("s1", "Flood", "12"), upsert("s2", "Fire", "4"))
    assert await delivery.run_once() == 2
    assert writes(panda) == before + 1
    assert panda.rows("stories") == {"s1": ["Flood", "12"], "s2": ["Fire", "4"]}
    status = delivery.status()
    assert (status.delivered, status.unchanged) == (3, 1)


async def test_a_row_changed_and_changed_back_is_sent_each_time(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    for words in ("12", "13", "12"):
        await enqueue(database, clock, upsert("s1", "Flood", words))
        await delivery.run_once()
    assert panda.rows("stories") == {"s1": ["Flood", "12"]}
    assert delivery.status().unchanged == 0


async def test_a_delete_of_a_row_panda_no_longer_has_is_not_sent(
    panda: RunningPanda, database: Database, clock: FakeClock, delivery: Delivery
) -> None:
    await enqueue(database, clock, upsert("s1", "Flood", "12"))
    await delivery.run_once()
    await enqueue(database, clock, delete("s1"))
    await delivery.run_once()
    before = writes(panda)
    await enqueue(database, clock, delete("s1"))
    assert await delivery.run_once() == 1
    assert writes(panda) == before
    assert delivery.status().unchanged == 1


async def test_with_skip_unchanged_off_every_change_is_sent(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    settings = SETTINGS.model_copy(update={"skip_unchanged": False})
    async with delivery_with(panda, database, clock, settings) as delivery:
        await enqueue(database, clock, upsert("s1", "Flood", "12"))
        await delivery.run_once()
        before = writes(panda)
        await enqueue(database, clock, upsert("s1", "Flood", "12"))
        await delivery.run_once()
        assert writes(panda) == before + 1
        assert delivery.status().unchanged == 0


async def test_a_dataset_made_anew_gets_every_row_again(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    async with delivery_with(panda, database, clock) as delivery:
        await enqueue(database, clock, upsert("s1", "Flood", "12"))
        await delivery.run_once()
    panda.reset()  # the dataset is gone, as if deleted in PANDA while pandasync was down
    async with delivery_with(panda, database, clock) as delivery:
        await enqueue(database, clock, upsert("s1", "Flood", "12"))
        await delivery.run_once()
        assert panda.rows("stories") == {"s1": ["Flood", "12"]}
        assert delivery.status().unchanged == 0


class AnswerLost(httpx.AsyncBaseTransport):
    """Forwards every request; while `armed`, a row write reaches PANDA and its answer is
    lost on the way back, as when a connection dies after PANDA committed."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.armed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if self.armed and request.method == "PUT" and "/data/" in request.url.path:
            await response.aread()
            raise httpx.ReadError("connection reset after PANDA answered", request=request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_row_panda_may_hold_without_an_answer_is_sent_again_when_changed_back(
    panda: RunningPanda, database: Database, clock: FakeClock
) -> None:
    transport = AnswerLost()
    settings = DeliverySettings(batch_size=10, lease_s=120, retry_base_s=1, retry_cap_s=60)
    async with delivery_to(
        panda.url,
        database,
        clock,
        email=panda.email,
        api_key=panda.api_key,
        settings=settings,
        transport=transport,
    ) as delivery:
        await enqueue(database, clock, upsert("s1", "Flood", "12"))
        await delivery.run_once()
        transport.armed = True
        await enqueue(database, clock, upsert("s1", "Flood", "13"))
        await delivery.run_once()
        assert panda.rows("stories") == {"s1": ["Flood", "13"]}  # written, not acknowledged
        transport.armed = False
        # Back to what PANDA acknowledged last: not what PANDA holds, so it must go out.
        await enqueue(database, clock, upsert("s1", "Flood", "12"))
        clock.advance(120)
        await delivery.run_once()
        assert panda.rows("stories") == {"s1": ["Flood", "12"]}
        assert delivery.status().unchanged == 0
