"""The running service's parts, built once by `service.app` and shared by its routes."""

from collections.abc import Mapping
from dataclasses import dataclass, field

from service.config import Settings
from service.delivery.engine import Delivery
from service.ingress.poller import Poller
from service.ingress.snapshots import Snapshotter
from service.metrics import Metrics
from service.runner import Runner
from service.store.db import Database


@dataclass(frozen=True)
class Service:
    """Everything the routes need: the settings, the store, delivery, the CouchDB feeds'
    pollers, the runner supervising their loops, the metrics they all count into, and the
    snapshot sources' snapshotters."""

    settings: Settings
    db: Database
    delivery: Delivery
    pollers: Mapping[str, Poller]
    runner: Runner
    metrics: Metrics
    snapshotters: Mapping[str, Snapshotter] = field(default_factory=dict)
