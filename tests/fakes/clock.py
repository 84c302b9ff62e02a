"""A clock tests move by hand, so retry delays pass without waiting."""

from datetime import UTC, datetime, timedelta


class FakeClock:
    """Callable like `service.delivery.utcnow`; starts at a fixed instant."""

    def __init__(self, start: datetime = datetime(2026, 1, 1, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
