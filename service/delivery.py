"""Delivery: claim due outbox entries, apply them to PANDA, and record the outcome.

Acknowledges only what PANDA confirmed; "retry later" goes back into the outbox with a delay,
"permanent" becomes a dead letter, a 401 pauses delivery loudly. Knows nothing of FastAPI.
"""

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio

from service import backoff, outbox
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


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class DeliveryStatus:
    """What delivery is doing, for /status and /readyz; never holds a secret."""

    paused: str | None
    stopped_sources: Mapping[str, str]
    retrying_until: datetime | None
    delivered: int
    dead_lettered: int
    last_error: str | None


class Delivery:
    """Delivers outbox entries to PANDA one row at a time.

    `step()` handles one claimed batch; `run()` repeats it until `stop()`; `run_once()`
    drains everything due and returns. Safe to run beside other replicas: claims are leased.
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
    ) -> None:
        self._db = db
        self._panda = panda
        self._datasets = dict(datasets)
        self._settings = settings
        self._request_timeout_s = request_timeout_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._ensured: set[str] = set()
        self._paused: str | None = None
        self._stopped_sources: dict[str, str] = {}
        self._not_before: datetime | None = None
        self._failures = 0
        self._delivered = 0
        self._dead_lettered = 0
        self._last_error: str | None = None
        self._stopping = False
        self._wake = anyio.Event()

    def status(self) -> DeliveryStatus:
        """A snapshot of the delivery state."""
        return DeliveryStatus(
            paused=self._paused,
            stopped_sources=dict(self._stopped_sources),
            retrying_until=self._not_before,
            delivered=self._delivered,
            dead_lettered=self._dead_lettered,
            last_error=self._last_error,
        )

    def notify(self) -> None:
        """Wake the loop: new entries were committed to the outbox."""
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming; the batch in flight finishes, `run()` then returns."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Deliver until `stop()`; idles `idle_poll_s` (or until notified) when nothing is due."""
        while not self._stopping:
            if await self.step():
                continue
            with anyio.move_on_after(self._idle_s()):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def run_once(self) -> int:
        """Deliver until nothing is due (or delivery is paused); returns entries handled."""
        total = 0
        while handled := await self.step():
            total += handled
        return total

    async def step(self) -> int:
        """Claim one batch of due entries and deliver them in order.

        Returns how many claims were handled (0: nothing due, paused or backing off).
        Claims not reached (a failure stopped the batch, or cancellation) are released.
        """
        sources = [name for name in self._datasets if name not in self._stopped_sources]
        now = self._clock()
        if self._paused or not sources or (self._not_before and now < self._not_before):
            return 0
        claims = await self._db.run(
            outbox.claim,
            now=now,
            lease_s=self._settings.lease_s,
            limit=self._settings.batch_size,
            sources=sources,
        )
        pending = list(claims)
        try:
            while pending and self._lease_left(now):
                went_on = await self._deliver(pending[0])
                pending.pop(0)
                if not went_on:
                    break
        finally:
            with anyio.CancelScope(shield=True):
                await self._release(pending)
        return len(claims)

    def _lease_left(self, claimed_at: datetime) -> bool:
        # Never start a request that could outlive its lease: another replica could then
        # claim a newer change of the same row and be overwritten by this older one.
        expires = claimed_at + timedelta(seconds=self._settings.lease_s)
        return self._clock() + timedelta(seconds=self._request_timeout_s) < expires

    async def _release(self, claims: Sequence[outbox.Claim]) -> None:
        if claims:
            await self._db.run(outbox.release, claims)

    async def _deliver(self, claim: outbox.Claim) -> bool:
        """Apply one claimed change; True when the batch may go on."""
        change = claim.change
        dataset = self._datasets[change.source]
        try:
            await self._ensure(dataset)
            await self._panda.apply(dataset.slug, change)
        except TargetError as error:
            return await self._pause(claim, str(error))
        except (DatasetMismatchError, _DatasetError) as error:
            return await self._stop_source(claim, str(error))
        except RetryableError as error:
            return await self._retry(claim, error)
        except PermanentError as error:
            return await self._dead_letter(claim, error)
        await self._db.run(outbox.ack, claim)
        self._failures = 0
        self._not_before = None
        self._delivered += 1
        return True

    async def _ensure(self, dataset: PandaDataset) -> None:
        if dataset.slug in self._ensured:
            return
        try:
            await self._panda.ensure_dataset(dataset)
        except PermanentError as error:
            raise _DatasetError(
                f"PANDA refused to create dataset {dataset.slug} ({error}):"
                " fix the source's dataset settings"
            ) from error
        self._ensured.add(dataset.slug)

    async def _pause(self, claim: outbox.Claim, reason: str) -> bool:
        log.error("delivery paused: %s", reason)
        self._paused = self._last_error = reason
        await self._release([claim])
        return False

    async def _stop_source(self, claim: outbox.Claim, reason: str) -> bool:
        source = claim.change.source
        log.error("delivery stopped for a source: source=%s reason=%s", source, reason)
        self._stopped_sources[source] = self._last_error = reason
        await self._release([claim])
        return False

    async def _retry(self, claim: outbox.Claim, error: RetryableError) -> bool:
        if isinstance(error, DatasetMissingError):
            self._ensured.discard(self._datasets[claim.change.source].slug)
        self._failures += 1
        wait_s = error.retry_after_s
        if wait_s is not None:
            # PANDA's (or a proxy's) Retry-After is honoured, but never beyond our own cap.
            wait_s = min(wait_s, self._settings.retry_cap_s)
        else:
            wait_s = backoff.delay_s(
                self._failures,
                base_s=self._settings.retry_base_s,
                cap_s=self._settings.retry_cap_s,
                rng=self._rng,
            )
        now = self._clock()
        at = now + timedelta(seconds=wait_s)
        answer = outbox.Answer(status=error.status, detail=error.detail)
        await self._db.run(outbox.retry_later, claim, at=at, answer=answer, now=now)
        self._not_before = at
        self._last_error = f"PANDA: {error.detail}"
        log.warning(
            "PANDA asked to retry later: source=%s doc_id=%s status=%s retry_in_s=%.1f",
            claim.change.source,
            claim.change.doc_id,
            error.status,
            wait_s,
        )
        return False

    async def _dead_letter(self, claim: outbox.Claim, error: PermanentError) -> bool:
        answer = outbox.Answer(status=error.status, detail=error.detail)
        if await self._db.run(outbox.dead_letter, claim, answer=answer, now=self._clock()):
            self._dead_lettered += 1
        self._last_error = f"PANDA refused a row: {error.detail}"
        log.warning(
            "PANDA refused a change, kept as a dead letter: source=%s doc_id=%s status=%s",
            claim.change.source,
            claim.change.doc_id,
            error.status,
        )
        return True

    def _idle_s(self) -> float:
        if self._not_before is None:
            return self._settings.idle_poll_s
        remaining = (self._not_before - self._clock()).total_seconds()
        return max(0.0, min(remaining, self._settings.retry_cap_s))


class _DatasetError(Exception):
    """PANDA refused to create the dataset itself; the source stops until its config is fixed."""
