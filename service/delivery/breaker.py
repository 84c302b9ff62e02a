"""A circuit breaker per PANDA dataset: after failures delivery waits, and while PANDA keeps
failing only one small probe goes out at a time. Pure: time and randomness come from the caller.
"""

import random
from datetime import datetime, timedelta

from service import backoff


class Breaker:
    """Whether delivery to one dataset may send now, and how many entries.

    Every failure makes the dataset wait: exponential backoff with full jitter from `base_s`,
    never less than the `Retry-After` PANDA (or a proxy) asked for, never more than `cap_s`.
    After `threshold` failures in a row the breaker is open: when the wait is over, one probe
    of a single entry goes out; its success closes the breaker, its failure opens it again
    for longer. So a PANDA that is down sees no hot loop and no full batches.
    """

    def __init__(self, *, threshold: int, base_s: float, cap_s: float, rng: random.Random) -> None:
        self._threshold = threshold
        self._base_s = base_s
        self._cap_s = cap_s
        self._rng = rng
        self.failures = 0
        self.retry_at: datetime | None = None

    @property
    def open(self) -> bool:
        """Whether the last `threshold` (or more) attempts all failed."""
        return self.failures >= self._threshold

    def ready(self, now: datetime) -> bool:
        """Whether a request may go out at `now` (the wait after the last failure is over)."""
        return self.retry_at is None or now >= self.retry_at

    def wait_s(self, now: datetime) -> float:
        """Seconds from `now` until a request may go out (0 when it may already)."""
        if self.retry_at is None:
            return 0.0
        return max(0.0, (self.retry_at - now).total_seconds())

    def limit(self, size: int) -> int:
        """How many entries the next batch may hold: `size`, or one probe while open."""
        return 1 if self.open else size

    def failed(self, now: datetime, *, retry_after_s: float | None = None) -> float:
        """Count a failure at `now`; returns the seconds to wait before the next attempt."""
        self.failures += 1
        jittered = backoff.delay_s(
            self.failures, base_s=self._base_s, cap_s=self._cap_s, rng=self._rng
        )
        wait_s = min(self._cap_s, max(retry_after_s or 0.0, jittered))
        self.retry_at = now + timedelta(seconds=wait_s)
        return wait_s

    def succeeded(self) -> bool:
        """Count a success: closes the breaker. Returns whether it was open."""
        was_open = self.open
        self.failures = 0
        self.retry_at = None
        return was_open
