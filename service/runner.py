"""The runner: supervises the long-running loops (delivery now, source pollers later).

A loop that crashes is logged and restarted with backoff; `health()` shows it. Stopping asks
every loop to finish its unit of work, waits a grace period, then cancels. Serves no HTTP.
"""

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import anyio

from service import backoff

log = logging.getLogger(__name__)


class Loop(Protocol):
    """A unit the runner supervises: `run()` until `stop()`."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class LoopHealth:
    """One supervised loop as /readyz shows it."""

    running: bool
    restarts: int
    last_crash: str | None


class Runner:
    """Runs named loops side by side and restarts any that crash."""

    def __init__(
        self,
        loops: Mapping[str, Loop],
        *,
        restart_base_s: float = 1.0,
        restart_cap_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self._loops = dict(loops)
        self._restart_base_s = restart_base_s
        self._restart_cap_s = restart_cap_s
        self._rng = rng or random.Random()
        self._health = {name: LoopHealth(False, 0, None) for name in self._loops}
        self._stopping = anyio.Event()
        self._finished = anyio.Event()
        self._scope: anyio.CancelScope | None = None

    def health(self) -> dict[str, LoopHealth]:
        """Each loop's state; a loop that is not running is being restarted or was stopped."""
        return dict(self._health)

    async def run(self) -> None:
        """Run every loop until `stop()`; returns when all have finished."""
        try:
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as group:
                    for name, loop in self._loops.items():
                        group.start_soon(self._supervise, name, loop)
        finally:
            self._finished.set()

    async def stop(self, *, grace_s: float) -> None:
        """Ask loops to stop, wait up to `grace_s` for work in flight, then cancel them.

        Cancelling is safe: outbox commits are atomic and PANDA calls idempotent. Returns at
        once if `run()` never started (a `run()` started later then returns at once too).
        """
        self._stopping.set()
        for loop in self._loops.values():
            loop.stop()
        if self._scope is None:
            return
        with anyio.move_on_after(grace_s):
            await self._finished.wait()
        if self._scope is not None and not self._finished.is_set():
            log.warning("loops did not stop within the grace period: grace_s=%s", grace_s)
            self._scope.cancel()
            await self._finished.wait()

    async def _supervise(self, name: str, loop: Loop) -> None:
        crashes = 0
        while not self._stopping.is_set():
            self._health[name] = LoopHealth(True, crashes, self._health[name].last_crash)
            try:
                await loop.run()
            except Exception as error:
                crashes += 1
                reason = f"{type(error).__name__}: {error}"
                self._health[name] = LoopHealth(False, crashes, reason)
                log.exception("loop crashed, restarting: loop=%s restarts=%d", name, crashes)
                wait_s = backoff.delay_s(
                    crashes, base_s=self._restart_base_s, cap_s=self._restart_cap_s, rng=self._rng
                )
                with anyio.move_on_after(wait_s):
                    await self._stopping.wait()
                continue
            break
        self._health[name] = LoopHealth(False, crashes, self._health[name].last_crash)
