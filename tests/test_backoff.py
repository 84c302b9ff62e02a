"""Retry delays stay within their exponential, capped bounds."""

import random

from hypothesis import given
from hypothesis import strategies as st

from service.backoff import delay_s


@given(
    attempt=st.integers(min_value=-5, max_value=10_000),
    base_s=st.floats(min_value=0.001, max_value=100),
    cap_s=st.floats(min_value=0.001, max_value=10_000),
    seed=st.integers(),
)
def test_a_delay_is_between_zero_and_the_capped_exponential(
    attempt: int, base_s: float, cap_s: float, seed: int
) -> None:
    wait = delay_s(attempt, base_s=base_s, cap_s=cap_s, rng=random.Random(seed))
    assert 0 <= wait <= min(cap_s, base_s * 2.0 ** min(max(attempt, 1) - 1, 62))


def test_delays_grow_until_the_cap() -> None:
    ceilings = [
        max(delay_s(attempt, base_s=1, cap_s=10, rng=random.Random(seed)) for seed in range(200))
        for attempt in (1, 2, 3, 8)
    ]
    assert [round(ceiling) for ceiling in ceilings] == [1, 2, 4, 10]
