"""Feed leases: one replica follows a feed at a time, work spreads, and a replica whose lease
passed writes nothing. On both stores."""

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from service.changes import Change, Op, Seq
from service.ingress.poller import LeaseLostError, commit
from service.ingress.shares import FeedShares
from service.sources.couchdb import Page
from service.store import checkpoints, follows, outbox
from service.store.db import Database
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def page(seq: str, *doc_ids: str) -> Page:
    changes = tuple(Change("feed", doc_id, doc_id, Op.UPSERT, ("t",)) for doc_id in doc_ids)
    return Page(changes=changes, seq=Seq.of(seq), rows=len(changes), skipped=0, caught_up=True)


def take(database: Database, holder: str, at: datetime, *, free: bool = True) -> int | None:
    return database.run_sync(follows.take, "feed", holder, clock=lambda: at, lease_s=6, free=free)


async def test_a_lease_is_held_by_one_replica_until_it_runs_out_or_is_given_back(
    database: Database,
) -> None:
    assert take(database, "a", T0) == 1
    assert take(database, "b", T0 + timedelta(seconds=5)) is None
    assert take(database, "a", T0 + timedelta(seconds=5)) == 1  # kept, renewed to 11 s
    assert take(database, "b", T0 + timedelta(seconds=10)) is None
    assert take(database, "b", T0 + timedelta(seconds=12)) == 2  # run out: taken over
    database.run_sync(follows.give_back, "feed", 2)
    assert take(database, "a", T0 + timedelta(seconds=13), free=False) is None  # at its share
    assert take(database, "a", T0 + timedelta(seconds=13)) == 3


async def test_a_page_read_under_a_lease_that_passed_commits_nothing(database: Database) -> None:
    first = take(database, "a", T0)
    assert first is not None
    database.run_sync(commit, "feed", page("1", "d1"), now=T0, token=first)
    second = take(database, "b", T0 + timedelta(seconds=7))  # a froze past its lease
    assert second == first + 1
    # a wakes with a page it read before: refused, in the commit's own transaction.
    with pytest.raises(LeaseLostError):
        database.run_sync(
            commit, "feed", page("2", "d2"), now=T0 + timedelta(seconds=8), token=first
        )
    # Its own clock says the lease has passed, even before anyone took it over.
    assert take(database, "b", T0 + timedelta(seconds=8)) == second
    with pytest.raises(LeaseLostError):
        database.run_sync(
            commit, "feed", page("3", "d3"), now=T0 + timedelta(seconds=20), token=second
        )
    assert database.run_sync(checkpoints.load, "feed") == Seq.of("1")
    assert database.run_sync(outbox.pending, "feed") == 1


async def test_feeds_spread_over_the_replicas_and_come_back_when_one_leaves(
    database: Database,
) -> None:
    sources = ["one", "two", "three", "four"]
    lease_s = 0.6
    first = FeedShares(database, sources, lease_s=lease_s, holder="replica-a")
    second = FeedShares(database, sources, lease_s=lease_s, holder="replica-b")

    async def follow(shares: FeedShares, source: str) -> None:
        """What a poller does: follow the feed under its lease, again once it is lost."""
        while True:
            token = await shares.acquire(source)
            with anyio.CancelScope() as reading:
                await shares.keep(source, token, reading)

    async def replica(shares: FeedShares) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(shares.run)
            for source in sources:
                group.start_soon(follow, shares, source)

    first_runs = anyio.CancelScope()

    async def run_first() -> None:
        with first_runs:
            await replica(first)

    async with anyio.create_task_group() as group:
        group.start_soon(run_first)
        await eventually(lambda: len(first.following()) == 4, what="a alone follows all four")
        group.start_soon(replica, second)
        await eventually(
            lambda: (len(first.following()), len(second.following())) == (2, 2),
            what="two feeds each",
            deadline_s=20,
        )
        assert not set(first.following()) & set(second.following())
        first_runs.cancel()  # a stops (SIGTERM) and gives its feeds back at once
        await first.leave()
        await eventually(lambda: len(second.following()) == 4, what="b takes all back")
        group.cancel_scope.cancel()


async def keep_until_lost(shares: FeedShares, token: int) -> None:
    """Follow "feed" under `token` until the lease is found lost."""
    with anyio.fail_after(10), anyio.CancelScope() as reading:
        await shares.keep("feed", token, reading)
    assert reading.cancel_called


async def test_a_lease_that_ran_out_unrenewed_is_logged_as_such_not_as_taken_over(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    moment = [T0]
    shares = FeedShares(database, ["feed"], lease_s=0.3, clock=lambda: moment[0], holder="a")
    token = await shares.acquire("feed")
    moment[0] = T0 + timedelta(seconds=60)  # the renewal comes a minute late

    await keep_until_lost(shares, token)

    assert "feed lease lost" in caplog.text
    assert "why=ran out 59.7 s before it was renewed, and no one took it over" in caplog.text
    assert "taken over" not in caplog.text
    assert not shares.following()


async def test_a_lease_taken_over_is_logged_as_taken_over(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    moment = [T0]
    shares = FeedShares(database, ["feed"], lease_s=0.3, clock=lambda: moment[0], holder="a")
    token = await shares.acquire("feed")
    moment[0] = T0 + timedelta(seconds=60)
    assert take(database, "b", moment[0]) == token + 1

    await keep_until_lost(shares, token)

    assert "feed lease lost" in caplog.text
    assert "why=taken over by" in caplog.text
    assert "ran out" not in caplog.text
