"""`service.store.group_commit`: concurrent callers share a transaction, each answered once it
has committed; a failing item fails only its caller, a failing store every caller of its group."""

from collections.abc import Callable, Sequence

import anyio
import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from service.clock import utcnow
from service.store import seen_webhooks
from service.store.db import Database
from service.store.group_commit import CommitError, GroupCommit, StoppedError
from service.store.tables import SeenWebhook

pytestmark = pytest.mark.anyio

Work = Callable[[Session, Sequence[str]], list[str]]


def recording(groups: list[list[str]], *, refuse: str | None = None) -> Work:
    """Work that remembers each item as a webhook id and answers it upper-cased; raises
    `ValueError` (after writing) for a group holding `refuse`."""

    def work(session: Session, items: Sequence[str]) -> list[str]:
        groups.append(list(items))
        seen_webhooks.remember_many(session, "a", items, now=utcnow(), retention_s=60)
        if refuse in items:
            raise ValueError(f"cannot take {refuse}")
        return [item.upper() for item in items]

    return work


def stored(database: Database) -> list[str]:
    query = select(SeenWebhook.webhook_id).order_by(col(SeenWebhook.webhook_id))
    return database.run_sync(lambda session: list(session.exec(query)))


async def submit_all(commits: GroupCommit[str, str], items: Sequence[str]) -> dict[str, object]:
    """Each item's result, or the class of the error its caller got."""
    outcomes: dict[str, object] = {}

    async def one(item: str) -> None:
        try:
            outcomes[item] = await commits.submit(item)
        except CommitError as error:
            outcomes[item] = type(error)

    async with anyio.create_task_group() as group:
        group.start_soon(commits.run)
        async with anyio.create_task_group() as callers:
            for item in items:
                callers.start_soon(one, item)
        commits.close()
    return outcomes


async def test_concurrent_callers_share_a_transaction_and_each_gets_its_own_result(
    database: Database,
) -> None:
    groups: list[list[str]] = []
    items = [f"id{number:02}" for number in range(20)]
    outcomes = await submit_all(GroupCommit(database, recording(groups)), items)
    assert outcomes == {item: item.upper() for item in items}
    assert (sorted(item for group in groups for item in group), len(groups) < len(items)) == (
        items,
        True,
    )
    assert stored(database) == items


async def test_a_failing_item_fails_only_its_own_caller_and_writes_nothing(
    database: Database,
) -> None:
    groups: list[list[str]] = []
    commits = GroupCommit(database, recording(groups, refuse="bad"))
    outcomes = await submit_all(commits, ["a", "bad", "c"])
    assert outcomes == {"a": "A", "bad": CommitError, "c": "C"}
    assert stored(database) == ["a", "c"]


async def test_when_the_store_fails_every_caller_of_the_group_gets_an_error_and_nothing_is_kept(
    database: Database,
) -> None:
    calls: list[list[str]] = []

    def failing_once(session: Session, items: Sequence[str]) -> list[str]:
        seen_webhooks.remember_many(session, "a", items, now=utcnow(), retention_s=60)
        calls.append(list(items))
        if len(calls) == 1:
            raise OperationalError("COMMIT", {}, OSError("disk I/O error"))
        return list(items)

    commits = GroupCommit(database, failing_once)
    failed = await submit_all(commits, ["a", "b", "c"])
    after = await submit_all(GroupCommit(database, failing_once), ["d"])
    assert (failed, after) == ({"a": CommitError, "b": CommitError, "c": CommitError}, {"d": "d"})
    assert (len(calls[0]), stored(database)) == (3, ["d"])


async def test_after_close_a_caller_is_told_the_service_is_stopping(database: Database) -> None:
    commits = GroupCommit(database, recording([]))
    async with anyio.create_task_group() as group:
        group.start_soon(commits.run)
        commits.close()
    with pytest.raises(StoppedError, match="stopping"):
        await commits.submit("late")
    assert stored(database) == []
