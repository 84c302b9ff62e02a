"""Group commit: the work of concurrent callers in one transaction, one flush to disk for all.

Each caller is answered only once the transaction holding its work has committed (or failed).
The rows are written by the caller's group function; this module only forms the groups.
"""

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from service.store.db import Database

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# The most items one transaction takes: a bound on its size, and on the latency it adds.
MAX_GROUP = 256


class CommitError(Exception):
    """The caller's work was not committed, nothing of it was written: retry later."""


class StoppedError(CommitError):
    """The group commit is closed (the service is stopping): nothing was written."""


@dataclass(eq=False)
class _Waiting(Generic[T, R]):
    """One caller's item and, once its group is done, its result or the error that failed it."""

    item: T
    # asyncio's own event: a tenth of anyio's to make, and one is made per caller.
    done: asyncio.Event = field(default_factory=asyncio.Event)
    results: list[R] = field(default_factory=list)
    error: BaseException | None = None

    def answer(self, result: R) -> None:
        self.results.append(result)
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def outcome(self) -> R:
        if isinstance(self.error, StoppedError):
            raise StoppedError(str(self.error))
        if self.error is not None:
            raise CommitError(f"the store failed: {_describe(self.error)}") from self.error
        return self.results[0]


class GroupCommit(Generic[T, R]):
    """Commits the items of concurrent `submit` calls together: `fn(session, items)` once a
    group, in one transaction (`Database.run`), then answers each caller with its result.

    A group is whatever waits when the previous one is done (at most `max_group` items): no
    caller waits for others to arrive, and under load the groups grow instead of queueing on
    the database's write lock. `fn` returns one result per item, in order, and must write
    nothing for an item it refuses. When it raises, the group is rolled back and each item is
    committed again alone, so one failing item fails only its own caller; when the store itself
    fails (`OperationalError`: unreachable, locked past its timeout, out of disk), every caller
    of the group gets `CommitError` at once.
    """

    def __init__(
        self,
        db: Database,
        fn: Callable[[Session, Sequence[T]], Sequence[R]],
        *,
        max_group: int = MAX_GROUP,
    ) -> None:
        self._db = db
        self._fn = fn
        self._max_group = max_group
        self._send, self._receive = anyio.create_memory_object_stream[_Waiting[T, R]](math.inf)

    async def submit(self, item: T) -> R:
        """`item`'s result, once the transaction that wrote it has committed.

        Raises `CommitError` (caused by the store's error) if it did not commit, `StoppedError`
        after `close()`. A cancelled caller's item is still committed, or not, with its group.
        """
        waiting: _Waiting[T, R] = _Waiting(item)
        try:
            self._send.send_nowait(waiting)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise StoppedError("the service is stopping: nothing was written") from None
        await waiting.done.wait()
        return waiting.outcome()

    async def run(self) -> None:
        """Commit groups as items arrive, until `close()` (then the items already submitted are
        committed first). A group in flight is finished even if this is cancelled; items still
        waiting then get `StoppedError`."""
        try:
            async for first in self._receive:
                group = [first, *self._waiting()]
                with anyio.CancelScope(shield=True):
                    await self._commit(group)
        finally:
            self._refuse_waiting()
            self._receive.close()

    def close(self) -> None:
        """Take no more items; `run` returns once those submitted are answered. Idempotent."""
        self._send.close()

    def _waiting(self) -> list[_Waiting[T, R]]:
        """The items already waiting, up to a group's size (less the first)."""
        found: list[_Waiting[T, R]] = []
        while len(found) < self._max_group - 1:
            try:
                found.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        return found

    def _refuse_waiting(self) -> None:
        stopped = StoppedError("the service is stopping: nothing was written")
        while True:
            try:
                self._receive.receive_nowait().fail(stopped)
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return

    async def _commit(self, group: list[_Waiting[T, R]]) -> None:
        try:
            results = await self._db.run(self._apply, [waiting.item for waiting in group])
        except OperationalError as error:
            log.error(
                "group commit failed, the store is failing: items=%d error=%s",
                len(group),
                _describe(error),
            )
            for waiting in group:
                waiting.fail(error)
            return
        except Exception as error:
            if len(group) == 1:
                log.error("commit failed, nothing written: error=%s", _describe(error))
                group[0].fail(error)
                return
            log.warning(
                "group commit failed, committing its items one by one: items=%d error=%s",
                len(group),
                _describe(error),
            )
            for waiting in group:
                await self._commit([waiting])
            return
        for waiting, result in zip(group, results, strict=True):
            waiting.answer(result)

    def _apply(self, session: Session, items: Sequence[T]) -> list[R]:
        results = list(self._fn(session, items))
        if len(results) != len(items):
            raise ValueError(f"{len(results)} results for {len(items)} items")
        return results


def _describe(error: BaseException) -> str:
    """The error's class and the first line of the driver's message: never the statement or
    its parameters (SQLAlchemy's own message holds both, and so document bodies)."""
    cause = error.orig if isinstance(error, DBAPIError) else error
    lines = str(cause).splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"
