"""Waiting on a condition with a deadline: the one way the tests wait for something."""

import inspect
import time
from collections.abc import Awaitable, Callable

import anyio

# How often a condition is looked at again, at most.
POLL_S = 0.01


def _pause(spent_s: float) -> float:
    """The pause before the next look: at least as long as the last look took, so that an
    expensive condition (every row of a dataset read back) takes at most half of a core from
    the processes it waits for, while a cheap one is still looked at every `POLL_S`."""
    return max(POLL_S, spent_s)


def wait_until(condition: Callable[[], bool], *, what: str, deadline_s: float = 60.0) -> None:
    """Poll `condition` until it holds; fail the test naming `what` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        started = time.monotonic()
        if condition():
            return
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(_pause(time.monotonic() - started))


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, what: str, deadline_s: float = 30.0
) -> None:
    """`wait_until` inside the event loop: `condition` may be a coroutine function."""
    deadline = time.monotonic() + deadline_s
    while True:
        started = time.monotonic()
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await anyio.sleep(_pause(time.monotonic() - started))
