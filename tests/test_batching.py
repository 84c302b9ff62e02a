"""Batch decisions: splitting a batch into requests, adapting its size, bisecting a refusal."""

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.changes import Change, Op
from service.delivery.batching import BatchSizer, Bisection, Plan, plan
from service.store.outbox import Claim

LEASE = datetime(2026, 1, 1, tzinfo=UTC)


def claim(entry_id: int, external_id: str, op: Op = Op.UPSERT) -> Claim:
    row = ("a", "b") if op is Op.UPSERT else None
    change = Change("stories", f"doc-{entry_id}", external_id, op, row)
    return Claim.holding(change, entry_id=entry_id, version=1, attempts=0, claimed_until=LEASE)


def test_upserts_go_in_bulk_and_deletes_one_by_one() -> None:
    a, b, c = claim(1, "a"), claim(2, "b", Op.DELETE), claim(3, "c")
    assert plan([a, b, c], row_by_row=False) == Plan(bulk=[a, c], single=[b], later=[])


def test_row_by_row_sends_every_change_on_its_own() -> None:
    a, b = claim(1, "a"), claim(2, "b", Op.DELETE)
    split = plan([a, b], row_by_row=True)
    assert (split.bulk, split.single, split.later) == ([], [a, b], [])


def test_a_second_change_to_one_row_waits_for_a_later_batch() -> None:
    first, second, other = claim(1, "x"), claim(2, "x", Op.DELETE), claim(3, "y")
    split = plan([first, second, other], row_by_row=False)
    assert (split.bulk, split.single, split.later) == ([first, other], [], [second])


@given(
    st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from(list(Op))), max_size=12),
    st.booleans(),
)
def test_each_row_goes_once_per_batch_in_claim_order(
    specs: list[tuple[str, Op]], row_by_row: bool
) -> None:
    claims = [claim(index, external_id, op) for index, (external_id, op) in enumerate(specs)]
    split = plan(claims, row_by_row=row_by_row)
    firsts = [
        held
        for index, held in enumerate(claims)
        if held.external_id not in {earlier.external_id for earlier in claims[:index]}
    ]
    assert split.later == [held for held in claims if held not in firsts]
    assert split.bulk == [held for held in firsts if held.op is Op.UPSERT and not row_by_row]
    assert split.single == [held for held in firsts if held not in split.bulk]


def sizer(start: int = 100) -> BatchSizer:
    return BatchSizer(start=start, minimum=10, maximum=1000, slow_s=4.0)


def test_a_full_batch_answered_fast_doubles_the_size_up_to_the_maximum() -> None:
    batches = sizer(300)
    sizes = []
    for _ in range(3):
        batches.took(0.1, full=True)
        sizes.append(batches.size)
    assert sizes == [600, 1000, 1000]


def test_a_put_that_was_not_full_leaves_the_size_alone() -> None:
    batches = sizer()
    batches.took(0.1, full=False)
    assert batches.size == 100


def test_an_answer_between_half_and_all_of_slow_leaves_the_size_alone() -> None:
    batches = sizer()
    batches.took(3.0, full=True)
    assert batches.size == 100


def test_a_slow_answer_halves_the_size_down_to_the_minimum() -> None:
    batches = sizer(40)
    sizes = []
    for _ in range(4):
        batches.took(5.0, full=False)
        sizes.append(batches.size)
    assert sizes == [20, 10, 10, 10]


def test_an_error_halves_the_size() -> None:
    batches = sizer()
    batches.shrink()
    assert batches.size == 50


@pytest.mark.parametrize(("start", "minimum", "maximum"), [(5, 10, 100), (200, 10, 100), (0, 0, 1)])
def test_a_size_outside_its_bounds_is_refused(start: int, minimum: int, maximum: int) -> None:
    with pytest.raises(ValueError, match="minimum <= start <= maximum"):
        BatchSizer(start=start, minimum=minimum, maximum=maximum, slow_s=1.0)


def run(size: int, bad: set[int]) -> tuple[list[tuple[int, str]], set[int], int]:
    """Bisect a batch against a PANDA that refuses any bulk PUT holding a bad row.

    Returns the refused rows with their answers, the rows written, and the PUTs sent.
    """
    bisection = Bisection(size, "the whole batch")
    written: set[int] = set()
    puts = 0
    while (rows := bisection.next()) is not None:
        puts += 1
        if bad & set(rows):
            bisection.record(f"PUT {puts}")
        else:
            bisection.record(None)
            written.update(rows)
    return bisection.refused, written, puts


@st.composite
def batches_with_bad_rows(draw: st.DrawFn) -> tuple[int, set[int]]:
    size = draw(st.integers(min_value=1, max_value=300))
    bad = draw(st.sets(st.integers(min_value=0, max_value=size - 1), min_size=1, max_size=6))
    return size, bad


@given(batches_with_bad_rows())
def test_bisection_refuses_exactly_the_bad_rows_and_writes_every_other(
    batch: tuple[int, set[int]],
) -> None:
    size, bad = batch
    refused, written, _ = run(size, bad)
    assert ({index for index, _ in refused}, written) == (bad, set(range(size)) - bad)


@given(batches_with_bad_rows())
def test_bisection_needs_about_log2_n_puts_per_bad_row(batch: tuple[int, set[int]]) -> None:
    size, bad = batch
    _, _, puts = run(size, bad)
    assert puts <= len(bad) * (math.ceil(math.log2(size)) + 1)


@given(st.integers(min_value=2, max_value=2000), st.data())
def test_one_bad_row_costs_at_most_ceil_log2_n_plus_one_puts(
    size: int, data: st.DataObject
) -> None:
    bad = data.draw(st.integers(min_value=0, max_value=size - 1))
    _, _, puts = run(size, {bad})
    assert puts <= math.ceil(math.log2(size)) + 1


def test_a_lone_refused_row_needs_no_further_put() -> None:
    assert run(1, {0}) == ([(0, "the whole batch")], set(), 0)


def test_a_refused_row_keeps_the_answer_to_the_smallest_put_that_held_it() -> None:
    refused, _, _ = run(4, {0})
    assert refused == [(0, "PUT 2")]


def test_a_bisection_needs_a_row() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        Bisection(0, "answer")


def test_a_bisection_wants_each_answer_before_the_next_put() -> None:
    bisection = Bisection(4, "answer")
    bisection.next()
    with pytest.raises(RuntimeError, match="record the answer"):
        bisection.next()


def test_a_bisection_takes_no_answer_for_nothing_sent() -> None:
    with pytest.raises(RuntimeError, match="nothing was sent"):
        Bisection(4, "answer").record(None)
