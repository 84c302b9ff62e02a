"""The feeds this replica follows, among the replicas sharing the store.

Each source's feed is followed by one replica at a time, under its feed lease
(`store.follows`). A replica takes a free feed while it follows fewer than its share (the
feeds divided by the replicas alive, rounded up), renews what it follows every third of
`lease_s`, and gives a feed back when it follows more than its share (a replica joined), so
work spreads. A feed whose lease could not be renewed for two thirds of `lease_s` (the store
out of reach, the process frozen) is let go before anyone may take it over; the commit of a
page checks the lease in its own transaction anyway. `leave()` gives everything back at once,
for a clean shutdown. Knows nothing of CouchDB or FastAPI.
"""

import logging
import math
import random
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

import anyio

from service.clock import Clock, utcnow
from service.store import follows, holders
from service.store.db import Database

log = logging.getLogger(__name__)


class FeedShares:
    """Which of `sources` this replica follows; see the module's words."""

    def __init__(
        self,
        db: Database,
        sources: Sequence[str],
        *,
        lease_s: float,
        clock: Clock = utcnow,
        holder: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._db = db
        self._sources = list(sources)
        self._lease_s = lease_s
        self._clock = clock
        self._holder = holder or holders.me().text()
        self._rng = rng or random.Random()
        self._held: dict[str, int] = {}
        self._replicas = 1
        # Feeds given back, and until when (monotonic) this replica leaves them to others.
        self._resting: dict[str, float] = {}
        self._scope: anyio.CancelScope | None = None
        self._stopping = False

    @property
    def replicas(self) -> int:
        """How many replicas were alive at the last heartbeat (at least this one)."""
        return self._replicas

    def share(self) -> int:
        """How many feeds this replica follows at most."""
        return math.ceil(len(self._sources) / max(1, self._replicas))

    def following(self) -> dict[str, int]:
        """The feeds this replica follows, with their lease tokens."""
        return dict(self._held)

    def stop(self) -> None:
        """Stop `run()` (then `leave()` gives everything back)."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Renew this replica's own row every third of `lease_s`, counting the replicas,
        until `stop()`."""
        with anyio.CancelScope() as self._scope:
            if self._stopping:
                self._scope.cancel()
            await self._beat()
        self._scope = None

    async def _beat(self) -> None:
        while True:
            now = self._clock()
            try:
                self._replicas = max(
                    1,
                    await self._db.run(
                        follows.heartbeat, self._holder, now=now, until=self._until()
                    ),
                )
            except Exception as error:  # the store: the feed leases decide
                log.warning("replica heartbeat not written: error=%s", type(error).__name__)
            await anyio.sleep(self._lease_s / 3)

    async def acquire(self, source: str) -> int:
        """Wait until this replica follows `source`; its lease token."""
        while True:
            free = len(self._held) < self.share() and time.monotonic() >= self._resting.get(
                source, 0.0
            )
            token = await self._db.run(
                follows.take,
                source,
                self._holder,
                clock=self._clock,
                lease_s=self._lease_s,
                free=free,
            )
            if token is not None:
                if self._held.get(source) != token:
                    log.info("following the feed: source=%s", source)
                self._held[source] = token
                return token
            await anyio.sleep(self._lease_s / 3 * self._rng.uniform(0.5, 1.0))

    async def keep(self, source: str, token: int, reading: anyio.CancelScope) -> None:
        """While `reading` follows `source`, renew its lease every third of `lease_s`; cancel
        `reading` when the lease is lost, could not be renewed for two thirds of `lease_s`,
        or is given back (this replica follows more than its share)."""
        renewed = anyio.current_time()
        while True:
            await anyio.sleep(self._lease_s / 3)
            if self._over_share(source):
                # Reading stops first: a commit under way (shielded) ends under this lease
                # rather than being refused by the lease just given back.
                reading.cancel()
                with anyio.CancelScope(shield=True):
                    await self._give_back(source, token)
                return
            now = self._clock()
            try:
                lost = await self._db.run(
                    follows.renew, source, token, now=now, until=self._until()
                )
            except Exception as error:  # the store out of reach
                if anyio.current_time() - renewed >= self._lease_s * 2 / 3:
                    log.warning(
                        "feed lease not renewed in time, letting the feed go: source=%s error=%s",
                        source,
                        type(error).__name__,
                    )
                    self.lost(source)
                    reading.cancel()
                    return
                continue
            if lost is not None:
                log.warning(
                    "feed lease lost, reading stops until the feed is taken again: source=%s"
                    " why=%s",
                    source,
                    lost,
                )
                self.lost(source)
                reading.cancel()
                return
            renewed = anyio.current_time()

    def lost(self, source: str) -> None:
        """This replica no longer follows `source` (its lease was found taken over)."""
        self._held.pop(source, None)

    async def leave(self) -> None:
        """Give every feed back and remove this replica's row: a clean shutdown."""
        self._held.clear()
        with anyio.CancelScope(shield=True):
            await self._db.run(follows.leave, self._holder)

    def _over_share(self, source: str) -> bool:
        """Whether `source` is the feed to give back: the last by name while this replica
        follows more than its share."""
        return len(self._held) > self.share() and source == max(self._held)

    async def _give_back(self, source: str, token: int) -> None:
        self._held.pop(source, None)
        self._resting[source] = time.monotonic() + self._lease_s
        await self._db.run(follows.give_back, source, token)
        log.info(
            "feed given back for another replica to follow: source=%s replicas=%d",
            source,
            self._replicas,
        )

    def _until(self) -> datetime:
        return self._clock() + timedelta(seconds=self._lease_s)
