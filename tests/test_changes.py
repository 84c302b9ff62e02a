"""`service.changes`: source versions normalise so that versions of one document compare."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.changes import SourceVersion


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1, "n:1"),
        (1.0, "n:1"),
        (-0.0, "n:0"),
        (1.50, "n:1.5"),
        (100, "n:1E+2"),
        (10**30 + 1, "n:1000000000000000000000000000001"),
        ("2026-01-02T03:04:05Z", "t:2026-01-02T03:04:05.000000Z"),
        ("2026-01-02t05:04:05.5+02:00", "t:2026-01-02T03:04:05.500000Z"),
        ("2026-01-02 03:04:05.1234567z", "t:2026-01-02T03:04:05.123456Z"),
        ("0001-01-01T00:00:00-01:00", "t:0001-01-01T01:00:00.000000Z"),
    ],
)
def test_versions_are_normalised_so_equal_ones_have_equal_text(value: object, text: str) -> None:
    assert SourceVersion.of(value) == SourceVersion(text)


@pytest.mark.parametrize(
    "value",
    [
        True,
        None,
        "7",
        "2026-01-02",
        "2026-01-02T03:04:05",
        "2026-01-02T23:59:60Z",
        "2026-02-30T00:00:00Z",
        "0001-01-01T00:00:00+01:00",
        float("nan"),
        float("inf"),
        [1],
    ],
)
def test_anything_but_a_finite_number_or_an_rfc3339_time_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"a number or an RFC 3339 time|finite"):
        SourceVersion.of(value)


@given(st.integers(), st.integers())
def test_integers_order_as_integers(first: int, second: int) -> None:
    assert SourceVersion.of(first).older_than(SourceVersion.of(second)) == (first < second)


@given(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(allow_nan=False, allow_infinity=False),
)
def test_floats_order_as_floats(first: float, second: float) -> None:
    assert SourceVersion.of(first).older_than(SourceVersion.of(second)) == (first < second)


@given(
    st.datetimes(datetime(1000, 1, 2), datetime(9000, 1, 1), timezones=st.just(UTC)),
    st.timedeltas(timedelta(days=-3), timedelta(days=3)),
    st.integers(-14 * 60, 14 * 60),
)
def test_times_order_as_instants_whatever_their_offset(
    moment: datetime, gap: timedelta, offset_minutes: int
) -> None:
    later = (moment + gap).astimezone(timezone(timedelta(minutes=offset_minutes)))
    first, second = SourceVersion.of(moment.isoformat()), SourceVersion.of(later.isoformat())
    assert (first.older_than(second), second.older_than(first)) == (
        gap > timedelta(0),
        gap < timedelta(0),
    )


def test_a_number_and_a_time_do_not_compare() -> None:
    number, time = SourceVersion.of(5), SourceVersion.of("2026-01-02T03:04:05Z")
    assert (number.older_than(time), time.older_than(number)) == (False, False)
