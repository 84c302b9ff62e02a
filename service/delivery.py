"""Delivery: claim due outbox entries per dataset, write them to PANDA in batches, settle them.

Acknowledges only what PANDA confirmed (a change that arrived meanwhile is an entry of its own
and goes out next); "retry later" goes back into the outbox and backs the dataset off,
"permanent" becomes a dead letter, a 401 pauses delivery loudly. Knows nothing of FastAPI.
"""

import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter

import anyio
from sqlmodel import Session

from service import outbox
from service.batching import BatchSizer, Bisection, plan
from service.breaker import Breaker
from service.config import DeliverySettings
from service.db import Database
from service.panda import Dataset as PandaDataset
from service.panda import (
    DatasetMismatchError,
    DatasetMissingError,
    PandaClient,
    PermanentError,
    RetryableError,
    TargetError,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Timer = Callable[[], float]
# PANDA answers 403 only while another process holds the dataset's lock (panda-api.md §3.3.7).
LOCKED = 403
_EXTERNAL_ID = attrgetter("external_id")
_ROW_JSON = attrgetter("row_json")
# How many claimed batches may wait behind the one at PANDA.
_CLAIMED_AHEAD = 2
# How long a drain claims under one lease. Then it ends, and a new drain takes a new lease:
# on PostgreSQL an entry whose transaction committed after entries with higher ids were
# claimed lies behind the lease's claims, and only a new lease claims it.
_DRAIN_S = 30.0


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class DatasetDelivery:
    """One dataset's delivery state, for /status."""

    slug: str
    batch_size: int
    failures: int
    breaker_open: bool
    retry_at: datetime | None


@dataclass(frozen=True)
class DeliveryStatus:
    """What delivery is doing, for /status and /readyz; never holds a secret."""

    paused: str | None
    stopped_sources: Mapping[str, str]
    retrying_until: datetime | None
    delivered: int
    dead_lettered: int
    last_error: str | None
    datasets: Mapping[str, DatasetDelivery]


@dataclass(eq=False)
class _Lane:
    """One source's dataset: a single writer at a time, its batch size and its breaker."""

    source: str
    dataset: PandaDataset
    sizer: BatchSizer
    breaker: Breaker
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    wake: anyio.Event = field(default_factory=anyio.Event)
    ensured: bool = False
    stopped: str | None = None


@dataclass(frozen=True)
class _Batch:
    """Entries claimed together, when at most `limit` were asked for: as
    claims, or packed by the store (`outbox.Packed`, upserts only)."""

    claims: list[outbox.Claim]
    packed: outbox.Packed | None
    limit: int
    # The drain's fence (`_Drain.fence`): no request of the batch starts once it is due.
    fence: anyio.CancelScope

    @property
    def count(self) -> int:
        """How many entries the batch holds."""
        return len(self.claims) + (0 if self.packed is None else self.packed.count)


@dataclass(eq=False)
class _Tally:
    """What became of one batch's claims (or packed entries), settled in one transaction.

    Claims end `delivered`, `dead` or `retry` (packed parts `delivered_packed` or
    `retry_packed`, or are taken apart into claims); `in_doubt` holds those of the request
    that is out. At settling, a request still in doubt (cut off) keeps the source's lease,
    since PANDA may yet apply it; every claim not accounted for stays due.
    """

    claims: Sequence[outbox.Claim]
    packed: outbox.Packed | None = None
    delivered: list[outbox.Claim] = field(default_factory=list)
    delivered_packed: list[outbox.Packed] = field(default_factory=list)
    dead: list[tuple[outbox.Claim, outbox.Answer]] = field(default_factory=list)
    retry: list[outbox.Claim] = field(default_factory=list)
    retry_packed: list[outbox.Packed] = field(default_factory=list)
    # PANDA's answer to the retried claims, and when to try them again.
    retry_as: tuple[outbox.Answer, datetime] | None = None
    in_doubt: Sequence[outbox.Claim] | outbox.Packed = ()
    went_on: bool = False
    # Some claims were put off for a later batch (a second change to a row in this one).
    put_off: bool = False

    def retry_failed(self, answer: outbox.Answer, *, at: datetime) -> None:
        """The claims of the request that failed are tried again `at`, with `answer` recorded
        as their attempt; the batch's claims not sent yet stay due without an attempt. A
        request for no claims (creating the dataset) fails them all."""
        if isinstance(self.in_doubt, outbox.Packed):
            self.retry_packed = [self.in_doubt]
        elif self.in_doubt:
            self.retry = list(self.in_doubt)
        else:  # creating the dataset failed: nothing of the batch was sent
            self.retry = list(self.claims)
            self.retry_packed = [] if self.packed is None else [self.packed]
        self.in_doubt = ()
        self.retry_as = (answer, at)

    def doubted(self) -> int:
        """How many rows the request in doubt holds."""
        if isinstance(self.in_doubt, outbox.Packed):
            return self.in_doubt.count
        return len(self.in_doubt)


@dataclass(eq=False)
class _Drain:
    """One drain of a lane: batches claimed and waiting their turn, the batch at PANDA, and
    batches delivered but not settled yet. Delivery and the store hand work over here."""

    # How many more batches may be claimed (None: no limit).
    claims_left: int | None
    # The source's lease the drain claims under, once it has claimed anything.
    lease: int | None = None
    ready: deque[_Batch] = field(default_factory=deque)
    current: _Tally | None = None
    finished: list[_Tally] = field(default_factory=list)
    handled: int = 0
    # Set when a claim came back empty or the lane must not claim now: no batch is coming.
    exhausted: bool = False
    # Set when delivery stops going on: the store's task (`_claim_ahead`) claims no more.
    halted: bool = False
    # Set when a batch put claims off: they go out under the next lease.
    put_off: bool = False
    # Set when the drain stopped claiming after `_DRAIN_S`; when its first claim was made.
    aged: bool = False
    started: datetime | None = None
    poked: anyio.Event = field(default_factory=anyio.Event)
    # Cuts the drain's requests off before its lease could run out unrenewed (see
    # `Delivery._keep_lease`): its deadline moves on with each renewal.
    fence: anyio.CancelScope = field(default_factory=lambda: anyio.CancelScope(deadline=math.inf))
    # Set when a renewal found the lease taken over (or ended).
    lost: bool = False

    def more_coming(self) -> bool:
        """Whether another batch may yet be claimed."""
        return not self.exhausted and self.claims_left != 0

    def room(self) -> bool:
        """Whether the store should claim now: more may come and few batches are waiting."""
        return self.more_coming() and len(self.ready) < _CLAIMED_AHEAD

    def poke(self) -> None:
        """Wake whoever waits for the other side (`await drain.poked.wait()`)."""
        self.poked.set()
        self.poked = anyio.Event()

    def leftovers(self) -> list[_Tally]:
        """Every tally not settled yet (batches still waiting as tallies of nothing sent);
        the drain holds none afterwards."""
        tallies = self.finished
        if self.current is not None:
            tallies.append(self.current)
        tallies.extend(_Tally(batch.claims, batch.packed) for batch in self.ready)
        self.finished, self.current = [], None
        self.ready.clear()
        return tallies


class _StopBatchError(Exception):
    """The batch cannot go on; its claims are already accounted for in its tally."""


class Delivery:
    """Delivers outbox entries to PANDA: per dataset one writer, datasets in parallel.

    Upserts go in bulk PUTs whose size adapts to PANDA's answers, deletes one by one (or
    everything row by row, `row_by_row`); a refused bulk PUT is bisected so only the bad rows
    become dead letters. Failures back the dataset off behind its circuit breaker.

    `step()` sends one batch per dataset; `run()` follows the outbox until `stop()`;
    `run_once()` drains everything due and returns. Safe beside other replicas: a source's
    entries go out under its lease, one delivery at a time. The lease is short (`lease_s`)
    and renewed every third of it while a delivery holds it, so a replica that dies or
    freezes is taken over within `lease_s`; a delivery whose lease went unrenewed for two
    thirds of it cuts its requests off, before anyone else may take the lease.
    """

    def __init__(
        self,
        db: Database,
        panda: PandaClient,
        datasets: Mapping[str, PandaDataset],
        settings: DeliverySettings,
        *,
        request_timeout_s: float,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
        timer: Timer = time.monotonic,
    ) -> None:
        self._db = db
        self._panda = panda
        self._settings = settings
        self._request_timeout_s = request_timeout_s
        self._clock = clock
        self._timer = timer
        rng = rng or random.Random()
        self._lanes = {
            source: _Lane(
                source=source,
                dataset=dataset,
                sizer=BatchSizer(
                    start=settings.batch_size,
                    minimum=settings.min_batch_size,
                    maximum=settings.max_batch_size,
                    slow_s=settings.slow_batch_s,
                ),
                breaker=Breaker(
                    threshold=settings.breaker_failures,
                    base_s=settings.retry_base_s,
                    cap_s=settings.retry_cap_s,
                    rng=rng,
                ),
            )
            for source, dataset in datasets.items()
        }
        self._limiter = anyio.CapacityLimiter(settings.parallel_datasets)
        self._paused: str | None = None
        self._delivered = 0
        self._dead_lettered = 0
        self._last_error: str | None = None
        self._stopping = False
        self._stopped = anyio.Event()

    def status(self) -> DeliveryStatus:
        """A snapshot of the delivery state."""
        waits = [lane.breaker.retry_at for lane in self._lanes.values() if lane.breaker.retry_at]
        return DeliveryStatus(
            paused=self._paused,
            stopped_sources={
                lane.source: lane.stopped for lane in self._lanes.values() if lane.stopped
            },
            retrying_until=min(waits, default=None),
            delivered=self._delivered,
            dead_lettered=self._dead_lettered,
            last_error=self._last_error,
            datasets={
                lane.source: DatasetDelivery(
                    slug=lane.dataset.slug,
                    batch_size=lane.sizer.size,
                    failures=lane.breaker.failures,
                    breaker_open=lane.breaker.open,
                    retry_at=lane.breaker.retry_at,
                )
                for lane in self._lanes.values()
            },
        )

    def notify(self) -> None:
        """Wake the loop: new entries were committed to the outbox."""
        for lane in self._lanes.values():
            lane.wake.set()

    def stop(self) -> None:
        """Stop claiming; batches in flight get `shutdown_grace_s` to finish, then `run()`
        cuts their requests off and returns (see `run`)."""
        self._stopping = True
        self._stopped.set()
        self.notify()

    async def run(self) -> None:
        """Deliver until `stop()`, each dataset as its entries come due (or `notify()`).

        After `stop()`, batches in flight get `shutdown_grace_s`; requests still out then are
        cut off: their source keeps its lease (PANDA may yet apply them), and its entries go
        out again after it. The store stays consistent either way.
        """
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._cut_off_after_grace, outer.cancel_scope)
            async with anyio.create_task_group() as lanes:
                lanes.start_soon(self._stopped.wait)
                for lane in self._lanes.values():
                    lanes.start_soon(self._follow, lane)
            outer.cancel_scope.cancel()

    async def run_once(self) -> int:
        """Deliver until nothing is due (or every dataset must wait); returns claims handled."""
        return await self._each_lane(None)

    async def step(self) -> int:
        """Deliver one batch per dataset that may send, in parallel; returns claims handled
        (0: nothing due, paused, stopped or backing off). Unsent claims are released."""
        return await self._each_lane(1)

    async def _each_lane(self, batches: int | None) -> int:
        counts: list[int] = []

        async def drain(lane: _Lane) -> None:
            counts.append(await self._drain(lane, batches=batches))

        async with anyio.create_task_group() as group:
            for lane in self._lanes.values():
                group.start_soon(drain, lane)
        return sum(counts)

    async def _cut_off_after_grace(self, scope: anyio.CancelScope) -> None:
        await self._stopped.wait()
        await anyio.sleep(self._settings.shutdown_grace_s)
        log.warning(
            "delivery did not finish within its grace period, cutting requests off:"
            " shutdown_grace_s=%s",
            self._settings.shutdown_grace_s,
        )
        scope.cancel()

    async def _follow(self, lane: _Lane) -> None:
        while not self._stopping:
            handled = await self._drain(lane)
            with anyio.move_on_after(self._idle_s(lane, handled)):
                await lane.wake.wait()
            lane.wake = anyio.Event()

    def _idle_s(self, lane: _Lane, handled: int) -> float:
        """How long `_follow` rests after a drain that handled `handled` claims."""
        wait_s = lane.breaker.wait_s(self._clock())
        if wait_s:
            return min(wait_s, self._settings.retry_cap_s)
        if handled and lane.breaker.retry_at is not None:
            return 0.0  # the batch failed, and its wait is already over
        return self._settings.idle_poll_s

    def _ready(self, lane: _Lane) -> bool:
        return (
            not self._stopping
            and self._paused is None
            and lane.stopped is None
            and lane.breaker.ready(self._clock())
        )

    async def _drain(self, lane: _Lane, *, batches: int | None = None) -> int:
        """Deliver `lane`'s due entries batch after batch (at most `batches`) until none is
        due or the lane must wait; returns how many claims were handled.

        While batches go to PANDA one after another, the store settles those delivered and
        claims the next ones ahead (`_deliver_claiming_ahead`), so store work overlaps PANDA's.
        A probe (open breaker) goes alone, settled before anything more is claimed. Whatever
        happens, settled claims are written and unsent ones released before returning. Claims
        put off for a later batch (a second change to one row) go out in another drain under
        a new lease, unless `batches` limits this one; so do entries left after `_DRAIN_S`.
        """
        handled = 0
        while True:
            drain = _Drain(claims_left=batches)
            handled += await self._drain_once(lane, drain)
            if not ((drain.put_off or drain.aged) and batches is None and self._ready(lane)):
                return handled

    async def _drain_once(self, lane: _Lane, drain: _Drain) -> int:
        """`_drain` under one lease, kept alive beside it (`_keep_lease`)."""
        async with lane.lock, anyio.create_task_group() as keeper:
            keeper.start_soon(self._keep_lease, lane, drain)
            try:
                with drain.fence:
                    await self._exchange(lane, drain, [], claim=True)
                    while drain.ready and (lane.breaker.open or not drain.more_coming()):
                        await self._deliver_alone(lane, drain)
                    if drain.ready:
                        await self._deliver_claiming_ahead(lane, drain)
            finally:
                keeper.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self._exchange(lane, drain, drain.leftovers(), claim=False)
        if drain.fence.cancelled_caught:
            why = "taken over by another delivery" if drain.lost else "could not be renewed"
            self._last_error = f"delivery lease of source {lane.source} {why}"
            log.warning(
                "delivery lease %s, requests cut off and claims left to the lease's next"
                " holder: source=%s",
                why,
                lane.source,
            )
        return drain.handled

    async def _keep_lease(self, lane: _Lane, drain: _Drain) -> None:
        """Renew the drain's lease every third of `lease_s` while it holds one. After each
        renewal the drain's fence allows two thirds of `lease_s` more: a request still out
        when the lease went unrenewed that long (the store unreachable, the process frozen,
        the lease taken over) is cut off while the lease still holds, so no other delivery
        can send a newer change of its rows before it ends."""
        lease_s = self._settings.lease_s
        while True:
            await anyio.sleep(lease_s / 3)
            lease = drain.lease
            if lease is None:
                continue
            started, now = anyio.current_time(), self._clock()
            try:
                held = await self._db.run(
                    outbox.renew_lease,
                    lane.source,
                    lease,
                    now=now,
                    until=now + timedelta(seconds=lease_s),
                )
            except Exception as error:  # the store: the fence decides
                log.warning(
                    "delivery lease not renewed: source=%s error=%s",
                    lane.source,
                    type(error).__name__,
                )
                continue
            if drain.lease != lease:
                continue
            if not held:
                drain.lost = True
                drain.fence.cancel()
                return
            drain.fence.deadline = started + lease_s * 2 / 3

    async def _deliver_alone(self, lane: _Lane, drain: _Drain) -> None:
        """Deliver the next batch, then settle it and claim the next one if the lane may go on."""
        tally = await self._deliver_batch(lane, drain)
        settling, drain.finished = drain.finished, []
        go_on = tally.went_on and self._ready(lane)
        await self._exchange(lane, drain, settling, claim=go_on)

    async def _deliver_claiming_ahead(self, lane: _Lane, drain: _Drain) -> None:
        """Deliver the claimed batches in order while the store, beside it, settles those
        delivered and keeps up to `_CLAIMED_AHEAD` batches claimed; stops at the first batch
        after which the lane must not go on, or when no batch is coming."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._claim_ahead, lane, drain)
            try:
                while True:
                    while not drain.ready and drain.more_coming():
                        await drain.poked.wait()
                    if not drain.ready:
                        return
                    tally = await self._deliver_batch(lane, drain)
                    if not (tally.went_on and self._ready(lane)):
                        return
            finally:
                drain.halted = True
                drain.poke()

    async def _claim_ahead(self, lane: _Lane, drain: _Drain) -> None:
        """The store's side of `_deliver_claiming_ahead`: whenever there is room for another
        batch, settle what was delivered and claim it, in one transaction; until halted."""
        while True:
            while not (drain.halted or drain.room()):
                await drain.poked.wait()
            if drain.halted:
                return
            settling, drain.finished = drain.finished, []
            await self._exchange(lane, drain, settling, claim=True)
            drain.poke()

    async def _deliver_batch(self, lane: _Lane, drain: _Drain) -> _Tally:
        """Deliver the drain's next claimed batch; its tally joins `drain.finished` after."""
        batch = drain.ready.popleft()
        drain.poke()  # room for the store to claim another
        drain.handled += batch.count
        tally = drain.current = _Tally(batch.claims, batch.packed)
        await self._deliver(lane, batch, tally)
        drain.current = None
        drain.finished.append(tally)
        drain.put_off = drain.put_off or tally.put_off
        return tally

    async def _exchange(
        self, lane: _Lane, drain: _Drain, settling: list[_Tally], claim: bool
    ) -> None:
        """Settle `settling` and, if `claim` and the lane may go on, claim the lane's next
        batch into `drain.ready`; without `claim`, end the drain's lease too (kept to its
        expiry while a request cut off may still be applied). One transaction, never cut off,
        so no outcome is lost. A claim that finds nothing, or may not be made now, marks the
        drain exhausted."""
        with anyio.CancelScope(shield=True):
            started, now = anyio.current_time(), self._clock()
            wanted = lane.sizer.size * self._settings.batches_per_claim
            if (
                claim
                and drain.started is not None
                and now - drain.started >= timedelta(seconds=_DRAIN_S)
            ):
                drain.aged = True
            may_claim = claim and not drain.aged and drain.more_coming() and self._ready(lane)
            limit = lane.breaker.limit(wanted) if may_claim else 0
            if claim and not limit:
                drain.exhausted = True
            ending = None if claim or drain.lease is None else drain.lease
            if not (settling or limit or ending is not None):
                return
            delivered, dead, claims, packed = await self._db.run(
                _settle_and_claim,
                settling,
                source=lane.source,
                now=now,
                lease_s=self._settings.lease_s,
                limit=limit,
                pack=not self._settings.row_by_row,
                lease=drain.lease,
                ending=ending,
            )
            if ending is not None:
                drain.lease = None
            self._delivered += delivered
            self._dead_lettered += dead
            if not limit:
                return
            if packed is not None and packed.count:
                drain.lease = packed.lease
            elif claims:
                drain.lease, packed = claims[0].lease, None
            else:
                drain.exhausted = True
                return
            drain.fence.deadline = started + self._settings.lease_s * 2 / 3
            drain.ready.append(_Batch(claims, packed, limit, drain.fence))
            if drain.started is None:
                drain.started = now
            if drain.claims_left is not None:
                drain.claims_left -= 1

    async def _deliver(self, lane: _Lane, batch: _Batch, tally: _Tally) -> None:
        """Send one batch to PANDA and record in `tally` what became of each claim; sets
        `tally.went_on` when the whole batch was handled and the lane may go on."""
        requests = plan(batch.claims, row_by_row=self._settings.row_by_row)
        tally.put_off = bool(requests.later)
        async with self._limiter:
            try:
                await self._ensure(lane, batch, tally)
                await self._put_packed_batch(lane, batch, tally)
                await self._put_in_batches(lane, batch, tally, requests.bulk)
                for held in requests.single:
                    await self._send_one(lane, batch, tally, held)
            except _StopBatchError:
                return
        tally.went_on = True

    async def _ensure(self, lane: _Lane, batch: _Batch, tally: _Tally) -> None:
        if lane.ensured:
            return
        refusal = await self._request(
            lane, batch, tally, [], lambda: self._panda.ensure_dataset(lane.dataset)
        )
        if refusal is not None:
            self._stop_lane(
                lane,
                f"PANDA refused to create dataset {lane.dataset.slug} ({refusal.detail}):"
                " fix the source's dataset settings",
            )
            raise _StopBatchError
        lane.ensured = True

    async def _put_in_batches(
        self, lane: _Lane, batch: _Batch, tally: _Tally, claims: list[outbox.Claim]
    ) -> None:
        """Upsert `claims` in bulk PUTs of the lane's batch size (as it adapts), one after
        another; stops before the next PUT once the lane must not go on (stopping, paused)."""
        start = 0
        while start < len(claims):
            if start and not self._ready(lane):
                raise _StopBatchError
            size = lane.sizer.size
            await self._put(lane, batch, tally, claims[start : start + size])
            start += size

    async def _put(
        self, lane: _Lane, batch: _Batch, tally: _Tally, claims: list[outbox.Claim]
    ) -> None:
        """Upsert `claims` in one bulk PUT; if PANDA refuses it, find the bad rows."""
        refusal = await self._put_rows(lane, batch, tally, claims)
        if refusal is not None:
            await self._refused(lane, batch, tally, claims, refusal)

    async def _put_packed_batch(self, lane: _Lane, batch: _Batch, tally: _Tally) -> None:
        """Upsert the batch's packed entries in bulk PUTs of the lane's batch size (as it
        adapts), one after another; stops before the next PUT once the lane must not go on."""
        if batch.packed is None:
            return
        start = 0
        while start < batch.packed.count:
            if start and not self._ready(lane):
                raise _StopBatchError
            size = lane.sizer.size
            await self._put_packed(lane, batch, tally, batch.packed.part(start, start + size))
            start += size

    async def _put_packed(
        self, lane: _Lane, batch: _Batch, tally: _Tally, part: outbox.Packed
    ) -> None:
        """Upsert packed entries in one bulk PUT; if it is refused, take them apart into
        claims and find the bad rows."""
        refusal = await self._bulk_put(lane, batch, tally, part, part.external_ids, part.rows)
        if refusal is None:
            tally.delivered_packed.append(part)
            return
        claims = await self._db.run(outbox.claims_of, part)
        await self._refused(lane, batch, tally, claims, refusal)

    async def _refused(
        self,
        lane: _Lane,
        batch: _Batch,
        tally: _Tally,
        claims: list[outbox.Claim],
        refusal: PermanentError,
    ) -> None:
        """PANDA (or the client) refused the bulk PUT of `claims`: dead-letter the rows at
        fault and deliver the rest (none left: newer changes replaced them all meanwhile)."""
        if not claims:
            return
        named = set(refusal.external_ids)
        unfit = [held for held in claims if held.external_id in named]
        if unfit and len(unfit) < len(claims):
            # The client refused these rows itself, before sending anything.
            for held in unfit:
                tally.dead.append((held, _answer(refusal)))
                self._log_refusal(held, refusal)
            rest = [held for held in claims if held.external_id not in named]
            await self._put(lane, batch, tally, rest)
            return
        await self._bisect(lane, batch, tally, claims, refusal)

    async def _bisect(
        self,
        lane: _Lane,
        batch: _Batch,
        tally: _Tally,
        claims: list[outbox.Claim],
        refusal: PermanentError,
    ) -> None:
        bisection = Bisection(len(claims), refusal)
        while (rows := bisection.next()) is not None:
            part = [claims[index] for index in rows]
            bisection.record(await self._put_rows(lane, batch, tally, part))
        for index, answer in bisection.refused:
            tally.dead.append((claims[index], _answer(answer)))
            self._log_refusal(claims[index], answer)

    async def _put_rows(
        self, lane: _Lane, batch: _Batch, tally: _Tally, claims: list[outbox.Claim]
    ) -> PermanentError | None:
        """One bulk PUT of `claims`; None when PANDA took it (they are delivered), else the
        refusal."""
        rows = list(map(_ROW_JSON, claims))
        assert None not in rows, "only upserts go into a bulk PUT"
        external_ids = list(map(_EXTERNAL_ID, claims))
        refusal = await self._bulk_put(lane, batch, tally, claims, external_ids, rows)
        if refusal is None:
            tally.delivered.extend(claims)
        return refusal

    async def _bulk_put(
        self,
        lane: _Lane,
        batch: _Batch,
        tally: _Tally,
        held: Sequence[outbox.Claim] | outbox.Packed,
        external_ids: list[str],
        rows: list[str],
    ) -> PermanentError | None:
        """One bulk PUT of `held`'s rows (`rows[i]` the JSON text of row `external_ids[i]`);
        None when PANDA took it, else the refusal. Its time adapts the batch size."""
        # Full: as many rows as this PUT was allowed (by the batch size, or by the claim's
        # limit when the batch was claimed before the size grew).
        full = len(rows) >= min(lane.sizer.size, batch.limit)
        started = self._timer()
        refusal = await self._request(
            lane,
            batch,
            tally,
            held,
            lambda: self._panda.put_rows_json(lane.dataset.slug, external_ids, rows),
        )
        if refusal is None or refusal.status is not None:  # PANDA answered
            lane.sizer.took(self._timer() - started, full=full)
        return refusal

    async def _send_one(
        self, lane: _Lane, batch: _Batch, tally: _Tally, held: outbox.Claim
    ) -> None:
        refusal = await self._request(
            lane, batch, tally, [held], lambda: self._panda.apply(lane.dataset.slug, held.change)
        )
        if refusal is None:
            tally.delivered.append(held)
            return
        tally.dead.append((held, _answer(refusal)))
        self._log_refusal(held, refusal)

    async def _request(
        self,
        lane: _Lane,
        batch: _Batch,
        tally: _Tally,
        claims: Sequence[outbox.Claim] | outbox.Packed,
        call: Callable[[], Awaitable[None]],
    ) -> PermanentError | None:
        """Make one PANDA request for `claims`: None when PANDA took it, its refusal when it
        refused it for good. Raises `_StopBatchError` when the batch cannot go on (lease
        not renewed, retry later, paused target, stopped source), after recording why.
        """
        if batch.fence.cancel_called or anyio.current_time() >= batch.fence.deadline:
            raise _StopBatchError  # checked here too: a process woken late runs I/O first
        tally.in_doubt = claims
        try:
            await self._timed(call)
        except TargetError as error:
            tally.in_doubt = ()
            self._pause(str(error))
            raise _StopBatchError from None
        except DatasetMismatchError as error:
            tally.in_doubt = ()
            self._stop_lane(lane, str(error))
            raise _StopBatchError from None
        except RetryableError as error:
            self._failed(lane, tally, error)
            raise _StopBatchError from None
        except PermanentError as error:
            tally.in_doubt = ()
            if error.status is not None:  # PANDA answered (None: refused before sending)
                self._answers_again(lane)
            return error
        tally.in_doubt = ()
        self._answers_again(lane)
        return None

    async def _timed(self, call: Callable[[], Awaitable[None]]) -> None:
        # httpx's own timeouts bound each read and write, not the whole exchange.
        with anyio.move_on_after(self._request_timeout_s) as scope:
            await call()
        if scope.cancelled_caught:
            raise RetryableError(f"no answer from PANDA within {self._request_timeout_s:g} s")

    def _failed(self, lane: _Lane, tally: _Tally, error: RetryableError) -> None:
        if isinstance(error, DatasetMissingError):
            lane.ensured = False
        if error.status != LOCKED:
            # A lock held elsewhere says nothing about how big a batch PANDA can take.
            lane.sizer.shrink()
        now = self._clock()
        was_open = lane.breaker.open
        wait_s = lane.breaker.failed(now, retry_after_s=error.retry_after_s)
        answer = outbox.Answer(status=error.status, detail=error.detail)
        tally.retry_failed(answer, at=now + timedelta(seconds=wait_s))
        self._last_error = f"PANDA: {error.detail}"
        log.warning(
            "PANDA asked to retry later: source=%s status=%s rows=%d retry_in_s=%.1f",
            lane.source,
            error.status,
            len(tally.retry) + sum(part.count for part in tally.retry_packed),
            wait_s,
        )
        if lane.breaker.open and not was_open:
            log.warning(
                "circuit breaker open, probing with one row at a time: source=%s failures=%d",
                lane.source,
                lane.breaker.failures,
            )

    def _answers_again(self, lane: _Lane) -> None:
        if lane.breaker.succeeded():
            log.info("PANDA answers again, circuit breaker closed: source=%s", lane.source)

    def _pause(self, reason: str) -> None:
        log.error("delivery paused: %s", reason)
        self._paused = self._last_error = reason

    def _stop_lane(self, lane: _Lane, reason: str) -> None:
        log.error("delivery stopped for a source: source=%s reason=%s", lane.source, reason)
        lane.stopped = self._last_error = reason

    def _log_refusal(self, held: outbox.Claim, refusal: PermanentError) -> None:
        self._last_error = f"PANDA refused a row: {refusal.detail}"
        log.warning(
            "PANDA refused a change, kept as a dead letter: source=%s doc_id=%s status=%s",
            held.source,
            held.doc_id,
            refusal.status,
        )


def _answer(refusal: PermanentError) -> outbox.Answer:
    return outbox.Answer(status=refusal.status, detail=refusal.detail)


def _settle(session: Session, tally: _Tally, source: str, now: datetime) -> tuple[int, int]:
    """Write one tally's outcome; returns (entries removed as delivered, dead letters made)."""
    delivered = outbox.ack_many(session, tally.delivered)
    delivered += outbox.ack_packed(session, tally.delivered_packed)
    dead = sum(
        outbox.dead_letter(session, held, answer=answer, now=now) for held, answer in tally.dead
    )
    if tally.retry_as is not None:
        answer, at = tally.retry_as
        retried = [*tally.retry]
        for part in tally.retry_packed:
            retried += outbox.claims_of(session, part)
        outbox.retry_many(session, retried, at=at, answer=answer, now=now)
    # Claims neither delivered, dead nor retried stay due as they were: the drain's lease
    # ends with it, and they go out under the next one.
    if tally.in_doubt:
        log.warning(
            "request cut off, the source keeps its lease and its changes go out again after"
            " it: source=%s rows=%d",
            source,
            tally.doubted(),
        )
    return delivered, dead


def _settle_and_claim(
    session: Session,
    tallies: Sequence[_Tally],
    *,
    source: str,
    now: datetime,
    lease_s: float,
    limit: int,
    pack: bool,
    lease: int | None,
    ending: int | None,
) -> tuple[int, int, list[outbox.Claim], outbox.Packed | None]:
    """Settle `tallies`, then claim up to `limit` due entries of `source` (none for 0) under
    `lease` (taking the source's lease if None), packed if `pack` and the store can, or end
    the lease `ending`."""
    delivered = dead = 0
    for tally in tallies:
        removed, refused = _settle(session, tally, source, now)
        delivered += removed
        dead += refused
    if ending is not None:
        in_doubt = any(tally.in_doubt for tally in tallies)
        outbox.end_lease(session, source, ending, keep=in_doubt)
    if limit == 0:
        return delivered, dead, [], None
    if pack:
        packed = outbox.claim_packed(
            session, source=source, now=now, lease_s=lease_s, limit=limit, lease=lease
        )
        if packed is not None:
            return delivered, dead, [], packed
    claims = outbox.claim_many(
        session, source=source, now=now, lease_s=lease_s, limit=limit, lease=lease
    )
    return delivered, dead, claims, None
