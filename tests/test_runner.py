"""The runner restarts crashed loops, reports them, and stops within its grace period."""

import anyio
import pytest

from service.runner import Runner

pytestmark = pytest.mark.anyio


class CrashingLoop:
    """Crashes the first `crashes` times it runs, then runs until stopped."""

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.runs = 0
        self.steady = anyio.Event()
        self._stop = anyio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise RuntimeError(f"crash {self.runs}")
        self.steady.set()
        await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


class StubbornLoop:
    """Ignores `stop()`: only cancellation ends it."""

    def __init__(self) -> None:
        self.cancelled = False

    async def run(self) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise

    def stop(self) -> None:
        pass


async def test_a_crashed_loop_is_restarted_and_its_crash_reported() -> None:
    loop = CrashingLoop(crashes=2)
    runner = Runner({"delivery": loop}, restart_base_s=0.001, restart_cap_s=0.01)
    async with anyio.create_task_group() as group:
        group.start_soon(runner.run)
        with anyio.fail_after(5):
            await loop.steady.wait()
        health = runner.health()["delivery"]
        await runner.stop(grace_s=5)
    assert (loop.runs, health.running, health.restarts, health.last_crash) == (
        3,
        True,
        2,
        "RuntimeError: crash 2",
    )
    assert runner.health()["delivery"].running is False


async def test_stop_cancels_a_loop_that_outlives_the_grace_period() -> None:
    loop = StubbornLoop()
    runner = Runner({"stubborn": loop})
    async with anyio.create_task_group() as group:
        group.start_soon(runner.run)
        await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(5):
            await runner.stop(grace_s=0.05)
    assert loop.cancelled


async def test_stopping_a_runner_that_never_ran_returns_at_once() -> None:
    loop = CrashingLoop(crashes=0)
    runner = Runner({"delivery": loop})
    with anyio.fail_after(1):
        await runner.stop(grace_s=60)
        await runner.run()
    assert (loop.runs, runner.health()["delivery"].running) == (0, False)
