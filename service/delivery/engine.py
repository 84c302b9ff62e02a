"""Delivery: claim a batch of due outbox entries per dataset, write it to PANDA, settle it.

A delivery step reads: claim a batch (taking the source's lease), plan it, put it (bisecting
what PANDA refuses), settle it in one transaction (ending the lease). Acknowledges only what
PANDA confirmed (a change that arrived meanwhile is an entry of its own and goes out next);
"retry later" goes back into the outbox and backs the dataset off, "permanent" becomes a dead
letter, a 401 pauses delivery loudly. Knows nothing of FastAPI.
"""

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import attrgetter

import anyio
from sqlmodel import Session

from service.clock import Clock, utcnow
from service.config import DeliverySettings
from service.delivery.batching import BatchSizer, Bisection, plan
from service.delivery.breaker import Breaker
from service.delivery.panda import Dataset as PandaDataset
from service.delivery.panda import (
    DatasetMismatchError,
    DatasetMissingError,
    PandaClient,
    PermanentError,
    RetryableError,
    TargetError,
)
from service.metrics import Metrics
from service.store import delivered, leases, outbox
from service.store.db import Database
from service.store.delivered import claim_hash

log = logging.getLogger(__name__)

Timer = Callable[[], float]
# PANDA answers 403 only while another process holds the dataset's lock (panda-api.md §3.3.7).
LOCKED = 403
# While a source's changes go out, one line says how it goes per this many seconds.
SUMMARY_EVERY_S = 10.0
_EXTERNAL_ID = attrgetter("external_id")
_ROW_JSON = attrgetter("row_json")


@dataclass(frozen=True)
class DatasetDelivery:
    """One dataset's delivery state, for /status."""

    slug: str
    batch_size: int
    failures: int
    breaker_open: bool
    retry_at: datetime | None
    paused: bool = False


@dataclass(frozen=True)
class DeliveryStatus:
    """What delivery is doing, for /status and /readyz; never holds a secret."""

    paused: str | None
    stopped_sources: Mapping[str, str]
    retrying_until: datetime | None
    delivered: int
    dead_lettered: int
    # Changes settled without a request: PANDA held their rows already.
    unchanged: int
    last_error: str | None
    datasets: Mapping[str, DatasetDelivery]


@dataclass(eq=False)
class _Dataset:
    """One source's dataset: a single writer at a time, its batch size and its breaker."""

    source: str
    target: PandaDataset
    sizer: BatchSizer
    breaker: Breaker
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    wake: anyio.Event = field(default_factory=anyio.Event)
    ensured: bool = False
    stopped: str | None = None
    # Paused by an operator (`Delivery.hold`): nothing more is sent until `release`.
    held: bool = False
    # Delivered, dead-lettered and unchanged since the last summary line, and when that was
    # (timer).
    since_summary: tuple[int, int, int] = (0, 0, 0)
    summary_at: float | None = None


@dataclass(eq=False)
class _Batch:
    """The claims of one delivery step and what became of each, settled in one transaction.

    Claims end `delivered`, `dead` or `retry`; `in_doubt` holds those of the request that is
    out. At settling, a request still in doubt (cut off) keeps the source's lease, since
    PANDA may yet apply it; every claim not accounted for stays due, no attempt counted.
    `fence` cuts the step's requests off before its lease could run out unrenewed
    (`Delivery._keep_lease`): its deadline moves on with each renewal.
    """

    claims: list[outbox.Claim]
    limit: int
    delivered: list[outbox.Claim] = field(default_factory=list)
    # Settled without a request: PANDA holds these rows already (`Delivery._sift`).
    unchanged: list[outbox.Claim] = field(default_factory=list)
    dead: list[tuple[outbox.Claim, outbox.Answer]] = field(default_factory=list)
    retry: list[outbox.Claim] = field(default_factory=list)
    # PANDA's answer to the retried claims, and when to try them again.
    retry_as: tuple[outbox.Answer, datetime] | None = None
    in_doubt: Sequence[outbox.Claim] = ()
    # Set when the whole batch was handled and the dataset may go on.
    went_on: bool = False
    # Bulk PUTs and single writes begun (bisection's PUTs not counted).
    writes: int = 0
    fence: anyio.CancelScope = field(default_factory=lambda: anyio.CancelScope(deadline=math.inf))
    # Why the lease was lost, once a renewal found it taken over, ended or run out.
    lost: str | None = None

    @property
    def lease(self) -> int:
        """The source's lease the batch was claimed under."""
        return self.claims[0].lease

    def retry_failed(self, answer: outbox.Answer, *, at: datetime) -> None:
        """The claims of the request that failed are tried again `at`, with `answer` recorded
        as their attempt; the batch's claims not sent yet stay due without an attempt. A
        request for no claims (creating the dataset) fails them all."""
        self.retry = list(self.in_doubt or self.claims)
        self.in_doubt = ()
        self.retry_as = (answer, at)


class _StopBatchError(Exception):
    """The batch cannot go on; its claims are already accounted for in the batch."""


class Delivery:
    """Delivers outbox entries to PANDA: per dataset one writer, datasets in parallel.

    Upserts go in bulk PUTs whose size adapts to PANDA's answers, deletes one by one (or
    everything row by row, `row_by_row`); a refused bulk PUT is bisected so only the bad rows
    become dead letters. Failures back the dataset off behind its circuit breaker.

    `step()` sends one batch per dataset; `run()` follows the outbox until `stop()`;
    `run_once()` delivers everything due and returns. Safe beside other replicas: a source's
    entries go out under its lease, one delivery at a time. The lease is short (`lease_s`)
    and renewed every third of it while a batch is out, so a replica that dies or freezes is
    taken over within `lease_s`; a delivery whose lease went unrenewed for two thirds of it
    cuts its requests off, before anyone else may take the lease.
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
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._panda = panda
        self._settings = settings
        self._request_timeout_s = request_timeout_s
        self._clock = clock
        self._timer = timer
        self._metrics = metrics or Metrics()
        rng = rng or random.Random()
        self._datasets = {
            source: _Dataset(
                source=source,
                target=target,
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
            for source, target in datasets.items()
        }
        self._limiter = anyio.CapacityLimiter(settings.parallel_datasets)
        self._paused: str | None = None
        self._delivered = 0
        self._unchanged = 0
        self._dead_lettered = 0
        self._last_error: str | None = None
        self._stopping = False
        self._stopped = anyio.Event()

    def status(self) -> DeliveryStatus:
        """A snapshot of the delivery state."""
        datasets = self._datasets.values()
        waits = [dataset.breaker.retry_at for dataset in datasets if dataset.breaker.retry_at]
        return DeliveryStatus(
            paused=self._paused,
            stopped_sources={
                dataset.source: dataset.stopped for dataset in datasets if dataset.stopped
            },
            retrying_until=min(waits, default=None),
            delivered=self._delivered,
            unchanged=self._unchanged,
            dead_lettered=self._dead_lettered,
            last_error=self._last_error,
            datasets={
                dataset.source: DatasetDelivery(
                    slug=dataset.target.slug,
                    batch_size=dataset.sizer.size,
                    failures=dataset.breaker.failures,
                    breaker_open=dataset.breaker.open,
                    retry_at=dataset.breaker.retry_at,
                    paused=dataset.held,
                )
                for dataset in datasets
            },
        )

    def hold(self, source: str) -> None:
        """Pause the source's delivery: the batch in flight finishes, no other is claimed."""
        self._datasets[source].held = True
        log.info(
            "delivery paused by an operator: source=%s dataset=%s",
            source,
            self._datasets[source].target.slug,
        )

    def release(self, source: str) -> None:
        """Resume the source's delivery after `hold`."""
        dataset = self._datasets[source]
        dataset.held = False
        dataset.wake.set()
        log.info(
            "delivery resumed by an operator: source=%s dataset=%s",
            source,
            dataset.target.slug,
        )

    def notify(self) -> None:
        """Wake the loop: new entries were committed to the outbox."""
        for dataset in self._datasets.values():
            dataset.wake.set()

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
            async with anyio.create_task_group() as followers:
                followers.start_soon(self._stopped.wait)
                for dataset in self._datasets.values():
                    followers.start_soon(self._follow, dataset)
            outer.cancel_scope.cancel()

    async def run_once(self) -> int:
        """Deliver until nothing is due (or every dataset must wait); returns claims handled."""
        return await self._each_dataset(None)

    async def step(self) -> int:
        """Deliver one batch per dataset that may send, in parallel; returns claims handled
        (0: nothing due, paused, stopped or backing off)."""
        return await self._each_dataset(1)

    async def _each_dataset(self, batches: int | None) -> int:
        counts: list[int] = []

        async def deliver(dataset: _Dataset) -> None:
            counts.append(await self._deliver_due(dataset, batches=batches))

        async with anyio.create_task_group() as group:
            for dataset in self._datasets.values():
                group.start_soon(deliver, dataset)
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

    async def _follow(self, dataset: _Dataset) -> None:
        while not self._stopping:
            handled = await self._deliver_due(dataset)
            with anyio.move_on_after(self._idle_s(dataset, handled)):
                await dataset.wake.wait()
            dataset.wake = anyio.Event()

    def _idle_s(self, dataset: _Dataset, handled: int) -> float:
        """How long `_follow` rests after delivering `handled` claims."""
        wait_s = dataset.breaker.wait_s(self._clock())
        if wait_s:
            return min(wait_s, self._settings.retry_cap_s)
        if handled and dataset.breaker.retry_at is not None:
            return 0.0  # the batch failed, and its wait is already over
        return self._settings.idle_poll_s

    def _ready(self, dataset: _Dataset) -> bool:
        return (
            not self._stopping
            and self._paused is None
            and dataset.stopped is None
            and not dataset.held
            and dataset.breaker.ready(self._clock())
        )

    async def _deliver_due(self, dataset: _Dataset, *, batches: int | None = None) -> int:
        """Deliver `dataset`'s due entries batch after batch (at most `batches`) until none
        is due or the dataset must wait; returns how many claims were handled."""
        handled = 0
        while (batches is None or batches > 0) and self._ready(dataset):
            batch = await self._deliver_batch(dataset)
            if batch is None:
                return handled
            handled += len(batch.claims)
            if batches is not None:
                batches -= 1
            if not batch.went_on:
                return handled
        return handled

    async def _deliver_batch(self, dataset: _Dataset) -> _Batch | None:
        """One delivery step: claim a batch, send it, settle it. None when nothing was due
        (or another delivery holds the source)."""
        async with dataset.lock:
            limit = dataset.breaker.limit(dataset.sizer.size)
            started, now = anyio.current_time(), self._clock()
            claims = await self._db.run(
                outbox.claim_many,
                source=dataset.source,
                now=now,
                lease_s=self._settings.lease_s,
                limit=limit,
            )
            if not claims:
                return None
            batch = _Batch(claims, limit)
            batch.fence.deadline = started + self._settings.lease_s * 2 / 3
            try:
                async with anyio.create_task_group() as keeper:
                    keeper.start_soon(self._keep_lease, dataset, batch)
                    with batch.fence:
                        await self._send(dataset, batch)
                    keeper.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    acked, dead = await self._db.run(
                        _settle, batch, dataset=dataset.target.slug, now=self._clock()
                    )
                self._delivered += acked
                self._unchanged += len(batch.unchanged)
                self._dead_lettered += dead
                self._count(dataset, batch, acked, dead)
            if batch.fence.cancelled_caught:
                self._lost_lease(dataset, batch)
            return batch

    def _count(self, dataset: _Dataset, batch: _Batch, acked: int, dead: int) -> None:
        """The batch's outcome in the metrics (counts, each delivered change's freshness) and,
        once every `SUMMARY_EVERY_S` while changes go out, in one log line."""
        done, refused, same = dataset.since_summary
        dataset.since_summary = (done + acked, refused + dead, same + len(batch.unchanged))
        now_s = self._timer()
        if dataset.summary_at is None:
            dataset.summary_at = now_s
        elif now_s - dataset.summary_at >= SUMMARY_EVERY_S:
            done, refused, same = dataset.since_summary
            log.info(
                "delivering: source=%s dataset=%s delivered=%d dead_lettered=%d unchanged=%d"
                " in %.0f s batch_size=%d",
                dataset.source,
                dataset.target.slug,
                done,
                refused,
                same,
                now_s - dataset.summary_at,
                dataset.sizer.size,
            )
            dataset.since_summary, dataset.summary_at = (0, 0, 0), now_s
        labels = (dataset.source, dataset.target.slug)
        self._metrics.delivered.labels(*labels).inc(acked)
        self._metrics.unchanged.labels(*labels).inc(len(batch.unchanged))
        self._metrics.dead_lettered.labels(*labels).inc(dead)
        if batch.retry_as is not None:
            self._metrics.retried.labels(*labels).inc(len(batch.retry))
        now = self._clock()
        freshness = self._metrics.freshness.labels(dataset.source)
        for claim in batch.delivered:
            if claim.accepted_at is not None:
                freshness.observe(max(0.0, (now - claim.accepted_at).total_seconds()))

    async def _keep_lease(self, dataset: _Dataset, batch: _Batch) -> None:
        """Renew the batch's lease every third of `lease_s`. After each renewal its fence
        allows two thirds of `lease_s` more: a request still out when the lease went
        unrenewed that long (the store unreachable, the process frozen, the lease taken
        over) is cut off while the lease still holds, so no other delivery can send a newer
        change of its rows before it ends."""
        lease_s = self._settings.lease_s
        while True:
            await anyio.sleep(lease_s / 3)
            started, now = anyio.current_time(), self._clock()
            try:
                lost = await self._db.run(
                    leases.renew,
                    dataset.source,
                    batch.lease,
                    now=now,
                    until=now + timedelta(seconds=lease_s),
                )
            except Exception as error:  # the store: the fence decides
                log.warning(
                    "delivery lease not renewed: source=%s error=%s",
                    dataset.source,
                    type(error).__name__,
                )
                continue
            if lost is not None:
                batch.lost = lost
                batch.fence.cancel()
                return
            batch.fence.deadline = started + lease_s * 2 / 3

    def _lost_lease(self, dataset: _Dataset, batch: _Batch) -> None:
        why = "could not be renewed" if batch.lost is None else batch.lost
        self._last_error = f"delivery lease of source {dataset.source} {why}"
        log.warning(
            "delivery lease %s, requests cut off and claims left to the lease's next holder:"
            " source=%s",
            why,
            dataset.source,
        )

    async def _send(self, dataset: _Dataset, batch: _Batch) -> None:
        """Send one batch to PANDA and record in it what became of each claim; sets
        `batch.went_on` when the whole batch was handled and the dataset may go on."""
        async with self._limiter:
            try:
                await self._ensure(dataset, batch)
                sending = await self._sift(dataset, batch)
                # Claims put off (a second change to a row of the batch) stay due for the
                # next batch.
                requests = plan(sending, row_by_row=self._settings.row_by_row)
                await self._put_in_bulk(dataset, batch, requests.bulk)
                for claim in requests.single:
                    self._go_on(dataset, batch)
                    await self._send_one(dataset, batch, claim)
            except _StopBatchError:
                return
        batch.went_on = True

    async def _sift(self, dataset: _Dataset, batch: _Batch) -> list[outbox.Claim]:
        """The batch's claims that must be sent. Those that would write what PANDA holds
        already are settled without a request (`skip_unchanged`); what PANDA holds of the
        others is forgotten first, in a transaction of its own (`delivered.sift`)."""
        slug = dataset.target.slug
        skip = self._settings.skip_unchanged
        sending: list[outbox.Claim] = []
        for claim in batch.claims:
            if skip and claim.delivered is not None and claim.delivered == claim_hash(slug, claim):
                batch.unchanged.append(claim)
            else:
                sending.append(claim)
        known = batch.unchanged or any(claim.delivered is not None for claim in sending)
        if known and not await self._db.run(delivered.sift, batch.unchanged, sending):
            batch.unchanged.clear()
            raise _StopBatchError
        return sending

    def _go_on(self, dataset: _Dataset, batch: _Batch) -> None:
        """Before a batch's next write: stop there once the dataset must not go on (stopping,
        paused); its first write goes regardless."""
        if batch.writes and not self._ready(dataset):
            raise _StopBatchError
        batch.writes += 1

    async def _ensure(self, dataset: _Dataset, batch: _Batch) -> None:
        if dataset.ensured:
            return
        created = False

        async def ensure() -> None:
            nonlocal created
            created = await self._panda.ensure_dataset(dataset.target)

        refusal = await self._request(dataset, batch, [], "dataset", ensure)
        if created:
            # A new, empty dataset: whatever PANDA held of the source's rows is gone.
            await self._db.run(delivered.forget, dataset.source)
            for claim in batch.claims:
                claim.delivered = None
        if refusal is not None:
            self._stop_source(
                dataset,
                f"PANDA refused to create dataset {dataset.target.slug} ({refusal.detail}):"
                " fix the source's dataset settings",
            )
            raise _StopBatchError
        dataset.ensured = True

    async def _put_in_bulk(
        self, dataset: _Dataset, batch: _Batch, claims: list[outbox.Claim]
    ) -> None:
        """Upsert `claims` in bulk PUTs of the dataset's batch size (as it adapts), one after
        another."""
        start = 0
        while start < len(claims):
            self._go_on(dataset, batch)
            size = dataset.sizer.size
            await self._put(dataset, batch, claims[start : start + size])
            start += size

    async def _put(self, dataset: _Dataset, batch: _Batch, claims: list[outbox.Claim]) -> None:
        """Upsert `claims` in one bulk PUT; if PANDA refuses it, find the bad rows."""
        refusal = await self._put_rows(dataset, batch, claims)
        if refusal is None:
            return
        named = set(refusal.external_ids)
        unfit = [claim for claim in claims if claim.external_id in named]
        if unfit and len(unfit) < len(claims):
            # The client refused these rows itself, before sending anything.
            for claim in unfit:
                self._dead(batch, claim, refusal)
            await self._put(dataset, batch, [c for c in claims if c.external_id not in named])
            return
        bisection = Bisection(len(claims), refusal)
        while (rows := bisection.next()) is not None:
            part = [claims[index] for index in rows]
            bisection.record(await self._put_rows(dataset, batch, part))
        for index, answer in bisection.refused:
            self._dead(batch, claims[index], answer)

    async def _put_rows(
        self, dataset: _Dataset, batch: _Batch, claims: list[outbox.Claim]
    ) -> PermanentError | None:
        """One bulk PUT of `claims`; None when PANDA took it (they are delivered), else the
        refusal. Its time adapts the batch size."""
        rows = list(map(_ROW_JSON, claims))
        assert None not in rows, "only upserts go into a bulk PUT"
        external_ids = list(map(_EXTERNAL_ID, claims))
        # Full: as many rows as this PUT was allowed (by the batch size, or by the claim's
        # limit when the batch was claimed before the size grew).
        full = len(rows) >= min(dataset.sizer.size, batch.limit)
        started = self._timer()
        refusal = await self._request(
            dataset,
            batch,
            claims,
            "bulk",
            lambda: self._panda.put_rows_json(dataset.target.slug, external_ids, rows),
        )
        if refusal is None or refusal.status is not None:  # PANDA answered
            dataset.sizer.took(self._timer() - started, full=full)
        if refusal is None:
            batch.delivered.extend(claims)
        return refusal

    async def _send_one(self, dataset: _Dataset, batch: _Batch, claim: outbox.Claim) -> None:
        refusal = await self._request(
            dataset,
            batch,
            [claim],
            "row",
            lambda: self._panda.apply(dataset.target.slug, claim.change),
        )
        if refusal is None:
            batch.delivered.append(claim)
        else:
            self._dead(batch, claim, refusal)

    async def _request(
        self,
        dataset: _Dataset,
        batch: _Batch,
        claims: Sequence[outbox.Claim],
        kind: str,
        call: Callable[[], Awaitable[None]],
    ) -> PermanentError | None:
        """Make one PANDA request (`kind`: bulk, row or dataset) for `claims`: None when PANDA
        took it, its refusal when it refused it for good. Raises `_StopBatchError` when the
        batch cannot go on (lease not renewed, retry later, paused target, stopped source),
        after recording why.
        """
        if batch.fence.cancel_called or anyio.current_time() >= batch.fence.deadline:
            raise _StopBatchError  # checked here too: a process woken late runs I/O first
        batch.in_doubt = claims
        try:
            await self._timed(call, dataset, kind)
        except TargetError as error:
            batch.in_doubt = ()
            self._pause(str(error))
            raise _StopBatchError from None
        except DatasetMismatchError as error:
            batch.in_doubt = ()
            self._stop_source(dataset, str(error))
            raise _StopBatchError from None
        except RetryableError as error:
            self._failed(dataset, batch, error)
            raise _StopBatchError from None
        except PermanentError as error:
            batch.in_doubt = ()
            if error.status is not None:  # PANDA answered (None: refused before sending)
                self._answers_again(dataset)
            return error
        batch.in_doubt = ()
        self._answers_again(dataset)
        return None

    async def _timed(
        self, call: Callable[[], Awaitable[None]], dataset: _Dataset, kind: str
    ) -> None:
        """`call()` within the request timeout, its time and outcome in the metrics."""
        outcome, started = "cut_off", self._timer()
        try:
            # httpx's own timeouts bound each read and write, not the whole exchange.
            with anyio.move_on_after(self._request_timeout_s) as scope:
                await call()
            if scope.cancelled_caught:
                raise RetryableError(f"no answer from PANDA within {self._request_timeout_s:g} s")
            outcome = "ok"
        except PermanentError:
            outcome = "refused"
            raise
        except RetryableError:
            outcome = "retry"
            raise
        except (TargetError, DatasetMismatchError):
            outcome = "error"
            raise
        finally:
            self._metrics.panda_requests.labels(dataset.target.slug, kind, outcome).observe(
                self._timer() - started
            )

    def _failed(self, dataset: _Dataset, batch: _Batch, error: RetryableError) -> None:
        if isinstance(error, DatasetMissingError):
            dataset.ensured = False
        if error.status != LOCKED:
            # A lock held elsewhere says nothing about how big a batch PANDA can take.
            dataset.sizer.shrink()
        now = self._clock()
        was_open = dataset.breaker.open
        wait_s = dataset.breaker.failed(now, retry_after_s=error.retry_after_s)
        answer = outbox.Answer(status=error.status, detail=error.detail)
        batch.retry_failed(answer, at=now + timedelta(seconds=wait_s))
        self._last_error = f"PANDA: {error.detail}"
        log.warning(
            "PANDA asked to retry later: source=%s dataset=%s status=%s rows=%d retry_in_s=%.1f",
            dataset.source,
            dataset.target.slug,
            error.status,
            len(batch.retry),
            wait_s,
        )
        if dataset.breaker.open and not was_open:
            log.warning(
                "circuit breaker open, probing with one row at a time: source=%s dataset=%s"
                " failures=%d",
                dataset.source,
                dataset.target.slug,
                dataset.breaker.failures,
            )

    def _answers_again(self, dataset: _Dataset) -> None:
        if dataset.breaker.succeeded():
            log.info(
                "PANDA answers again, circuit breaker closed: source=%s dataset=%s",
                dataset.source,
                dataset.target.slug,
            )

    def _pause(self, reason: str) -> None:
        log.error("delivery paused: %s", reason)
        self._paused = self._last_error = reason

    def _stop_source(self, dataset: _Dataset, reason: str) -> None:
        log.error(
            "delivery stopped for a source: source=%s dataset=%s reason=%s",
            dataset.source,
            dataset.target.slug,
            reason,
        )
        dataset.stopped = self._last_error = reason

    def _dead(self, batch: _Batch, claim: outbox.Claim, refusal: PermanentError) -> None:
        batch.dead.append((claim, outbox.Answer(status=refusal.status, detail=refusal.detail)))
        self._last_error = f"PANDA refused a row: {refusal.detail}"
        log.warning(
            "PANDA refused a change, kept as a dead letter: source=%s dataset=%s doc_id=%r"
            " status=%s",
            claim.source,
            self._datasets[claim.source].target.slug,
            claim.doc_id,
            refusal.status,
        )


def _settle(session: Session, batch: _Batch, *, dataset: str, now: datetime) -> tuple[int, int]:
    """Write the batch's outcome and end its lease (kept on while a request is in doubt);
    returns (entries removed as delivered, dead letters made)."""
    source = batch.claims[0].source
    acked = outbox.ack_many(session, batch.delivered)
    delivered.record(session, dataset, batch.delivered)
    dead = sum(
        outbox.dead_letter(session, claim, answer=answer, now=now) for claim, answer in batch.dead
    )
    if batch.retry_as is not None:
        answer, at = batch.retry_as
        outbox.retry_many(session, batch.retry, at=at, answer=answer, now=now)
    # Claims neither delivered, dead nor retried stay due as they were, for the next lease.
    if batch.in_doubt:
        log.warning(
            "request cut off, the source keeps its lease and its changes go out again after"
            " it: source=%s rows=%d",
            source,
            len(batch.in_doubt),
        )
    leases.end(session, source, batch.lease, keep=bool(batch.in_doubt))
    return acked, dead
