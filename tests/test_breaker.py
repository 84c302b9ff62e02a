"""The per-dataset circuit breaker: waits after failures, one-row probes while open."""

import random
from datetime import UTC, datetime, timedelta

from service.delivery.breaker import Breaker

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def breaker(threshold: int = 3, seed: int = 0) -> Breaker:
    return Breaker(threshold=threshold, base_s=1.0, cap_s=60.0, rng=random.Random(seed))


def test_a_fresh_breaker_lets_full_batches_through_at_once() -> None:
    fresh = breaker()
    assert (fresh.ready(NOW), fresh.open, fresh.limit(500)) == (True, False, 500)


def test_a_failure_waits_a_jittered_backoff_before_the_next_attempt() -> None:
    failing = breaker()
    wait_s = failing.failed(NOW)
    assert 0 <= wait_s <= 1.0
    assert failing.retry_at == NOW + timedelta(seconds=wait_s)
    assert (failing.ready(NOW + timedelta(seconds=wait_s)), failing.limit(500)) == (True, 500)


def test_it_is_not_ready_before_the_wait_is_over() -> None:
    failing = breaker()
    failing.failed(NOW, retry_after_s=30)
    assert failing.ready(NOW + timedelta(seconds=29.9)) is False


def test_retry_after_is_honoured_as_the_least_wait() -> None:
    assert breaker().failed(NOW, retry_after_s=30) == 30


def test_retry_after_never_waits_beyond_the_cap() -> None:
    assert breaker().failed(NOW, retry_after_s=86_400) == 60


def test_repeated_failures_open_it_and_only_one_row_probes() -> None:
    failing = breaker(threshold=3)
    opened = []
    for _ in range(3):
        failing.failed(NOW)
        opened.append((failing.open, failing.limit(500)))
    assert opened == [(False, 500), (False, 500), (True, 1)]


def test_waits_grow_with_the_failures_up_to_the_cap() -> None:
    failing = breaker(threshold=1)
    ceilings = []
    for failure in range(1, 10):
        wait_s = failing.failed(NOW)
        ceilings.append(min(60.0, 2.0 ** (failure - 1)))
        assert 0 <= wait_s <= ceilings[-1]
    assert ceilings[-1] == 60


def test_a_success_closes_it_and_says_whether_it_was_open() -> None:
    failing = breaker(threshold=1)
    failing.failed(NOW)
    assert failing.succeeded() is True
    assert (failing.open, failing.failures, failing.retry_at, failing.succeeded()) == (
        False,
        0,
        None,
        False,
    )


def test_the_wait_counts_down_to_the_next_attempt_and_stays_at_zero() -> None:
    failing = breaker()
    failing.failed(NOW, retry_after_s=30)
    waits = [failing.wait_s(NOW + timedelta(seconds=seconds)) for seconds in (0, 10, 30, 99)]
    assert (waits, breaker().wait_s(NOW)) == ([30, 20, 0, 0], 0)
