"""The fake's test controls: faults in force, request statistics, and the `/_fake/` endpoints.

No authentication (tests only). Never touches datasets; `reset` clears them through a callback.
"""

import asyncio
import random
from collections import Counter
from collections.abc import Callable

import orjson

from service.sandbox.fake_panda.cost import Cost
from service.sandbox.fake_panda.faults import Faults, FaultsError, updated
from service.sandbox.fake_panda.request import Request
from service.sandbox.fake_panda.responses import Response, control, empty, nginx_unavailable


class Control:
    """Faults, statistics and the seeded random source of one fake PANDA (one event loop)."""

    def __init__(self, seed: int, cost: Cost | None = None) -> None:
        self._seed = seed
        self._cost = cost
        self._busy_s = 0.0
        self.faults = Faults()
        self._random = random.Random(seed)
        self._release: asyncio.Event | None = None
        self._requests = 0
        self._writes = 0
        self._held = 0
        self._by_status: Counter[int] = Counter()

    def apply(self, faults: Faults) -> None:
        """Put `faults` in force; lifting `hang` (or going `down`) releases held requests."""
        self.faults = faults
        holding = faults.hang and not faults.down
        if holding and self._release is None:
            self._release = asyncio.Event()
        elif not holding and self._release is not None:
            self._release.set()
            self._release = None

    def reset(self) -> None:
        """No faults, zero statistics, and the random source back at its seed."""
        self.apply(Faults())
        self._random = random.Random(self._seed)
        self._requests = self._writes = 0
        self._busy_s = 0.0
        self._by_status.clear()

    @property
    def delaying(self) -> bool:
        """Whether `delay` would wait at all (the fast path skips it)."""
        return self._release is not None or self.faults.latency_s > 0

    async def delay(self) -> None:
        """Wait while `hang` holds requests, then for `latency_s`."""
        if self._release is not None:
            self._held += 1
            try:
                while self._release is not None:
                    await self._release.wait()
            finally:
                self._held -= 1
        if self.faults.latency_s:
            await asyncio.sleep(self.faults.latency_s)

    def outage(self) -> Response | None:
        """nginx's answer while `down` is set, else None."""
        if self.faults.down:
            return nginx_unavailable(self.faults.retry_after_s)
        return None

    def inject_error(self) -> bool:
        """Whether this row write gets an injected 500 (seeded draw at `error_rate`)."""
        rate = self.faults.error_rate
        return rate > 0 and self._random.random() < rate

    def is_locked(self, slug: str) -> bool:
        """Whether the `locked` fault holds this dataset's lock."""
        return slug in self.faults.locked

    def is_refused(self, external_id: str | None) -> bool:
        """Whether a row write naming this external_id is refused with a 400."""
        return external_id is not None and external_id in self.faults.refuse_ids

    def arrived(self) -> None:
        """Count one /api/ request as it arrives (so held requests show up)."""
        self._requests += 1

    def answered(self, status: int, *, wrote_rows: bool) -> None:
        """Count an /api/ answer by status, and as a write when it wrote or deleted rows."""
        self._by_status[status] += 1
        self._writes += wrote_rows

    def charged(self, seconds: float) -> None:
        """Count the time the cost model made one request take."""
        self._busy_s += seconds

    def stats(self) -> dict[str, object]:
        """`{"requests": n, "writes": n, "by_status": {"202": n, ...}, "held": n, ...}`.

        Counts run since the last reset; `held` is how many requests `hang` holds right now;
        `cost` is the cost model (null when off) and `busy_s` the seconds it has charged.
        """
        by_status = {str(status): count for status, count in sorted(self._by_status.items())}
        return {
            "requests": self._requests,
            "writes": self._writes,
            "by_status": by_status,
            "held": self._held,
            "cost": None if self._cost is None else self._cost.to_json(),
            "busy_s": round(self._busy_s, 6),
        }


def _put_faults(state: Control, request: Request) -> Response:
    try:
        changes = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        return control(400, {"error": "the body must be JSON"})
    try:
        state.apply(updated(state.faults, changes))
    except FaultsError as error:
        return control(400, {"error": str(error)})
    return control(200, state.faults.to_json())


def _clear_faults(state: Control) -> Response:
    state.apply(Faults())
    return control(200, state.faults.to_json())


def answer_control(state: Control, request: Request, reset: Callable[[], None]) -> Response:
    """Serve `GET|PUT|DELETE /_fake/faults`, `GET /_fake/stats` and `POST /_fake/reset`."""
    endpoint = (request.path.rstrip("/"), request.method)
    match endpoint:
        case ("/_fake/faults", "GET"):
            return control(200, state.faults.to_json())
        case ("/_fake/faults", "PUT"):
            return _put_faults(state, request)
        case ("/_fake/faults", "DELETE"):
            return _clear_faults(state)
        case ("/_fake/stats", "GET"):
            return control(200, state.stats())
        case ("/_fake/reset", "POST"):
            reset()
            return empty(204)
        case ("/_fake/faults" | "/_fake/stats" | "/_fake/reset", _):
            return control(405, {"error": f"{request.method} is not allowed here"})
    return control(404, {"error": "unknown control endpoint"})
