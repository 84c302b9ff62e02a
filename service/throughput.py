"""Throughput over the last minutes: each source's delivered changes, sampled every few seconds.

A ring of a fixed number of samples taken from the service's metrics (so its memory is bounded
whatever the traffic), read by the dashboard's sparklines. Holds counts only, never a document.
"""

from collections import deque
from collections.abc import Mapping
from itertools import pairwise

import anyio

from service.metrics import Metrics

# One sample per this many seconds, this many kept: the last six minutes.
SAMPLE_EVERY_S = 5.0
SAMPLES = 72
_DELIVERED = "pandasync_changes_delivered_total"


def deltas(totals: list[int]) -> list[int]:
    """What each interval added to a running total (a counter that never goes down)."""
    return [later - earlier for earlier, later in pairwise(totals)]


class Throughput:
    """Samples each source's delivered total every `every_s`; keeps the last `keep` intervals.

    `run()` samples until `stop()` (a loop for the runner); `step()` takes one sample.
    """

    def __init__(
        self,
        metrics: Metrics,
        datasets: Mapping[str, str],
        *,
        every_s: float = SAMPLE_EVERY_S,
        keep: int = SAMPLES,
    ) -> None:
        self.every_s = every_s
        self.intervals = keep
        self._metrics = metrics
        self._datasets = dict(datasets)
        # One more total than intervals: `keep` intervals lie between `keep + 1` samples.
        self._totals: deque[dict[str, int]] = deque(maxlen=keep + 1)
        self._stopping = anyio.Event()

    def step(self) -> None:
        """Take one sample of every source's delivered total."""
        registry = self._metrics.registry
        self._totals.append(
            {
                source: int(
                    registry.get_sample_value(_DELIVERED, {"source": source, "dataset": slug}) or 0
                )
                for source, slug in self._datasets.items()
            }
        )

    def recent(self) -> dict[str, list[int]]:
        """Per source, the changes delivered in each sampled interval, oldest first."""
        return {
            source: deltas([sample[source] for sample in self._totals]) for source in self._datasets
        }

    async def run(self) -> None:
        """Sample every `every_s` until `stop()`."""
        while not self._stopping.is_set():
            self.step()
            with anyio.move_on_after(self.every_s):
                await self._stopping.wait()

    def stop(self) -> None:
        """End `run()` at once."""
        self._stopping.set()
