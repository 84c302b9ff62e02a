"""Waiting on a condition with a deadline: the one way the tests wait for something."""

import inspect
import time
from collections.abc import Awaitable, Callable

import anyio

# How often a condition is looked at again.
POLL_S = 0.01


def wait_until(condition: Callable[[], bool], *, what: str, deadline_s: float = 60.0) -> None:
    """Poll `condition` until it holds; fail the test naming `what` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(POLL_S)


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, what: str, deadline_s: float = 30.0
) -> None:
    """`wait_until` inside the event loop: `condition` may be a coroutine function."""
    deadline = time.monotonic() + deadline_s
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await anyio.sleep(POLL_S)
