"""The running service's parts, built once by `service.app` and shared by its routes."""

from collections.abc import Mapping
from dataclasses import dataclass, field

from service.config import Settings
from service.delivery.engine import Delivery
from service.delivery.panda import PandaClient
from service.ingress.poller import Poller
from service.ingress.shares import FeedShares
from service.ingress.snapshots import Snapshotter
from service.metrics import Metrics
from service.runner import Runner
from service.store.db import Database
from service.throughput import Throughput


@dataclass(frozen=True)
class Service:
    """Everything the routes need: the settings, the store, delivery, the CouchDB feeds'
    pollers, the runner supervising their loops, the metrics they all count into, and the
    throughput sampled from them for the dashboard, and the snapshot sources' snapshotters."""

    settings: Settings
    db: Database
    delivery: Delivery
    # PANDA, for reading a dataset back (`resync`); delivery writes through its own.
    panda: PandaClient
    pollers: Mapping[str, Poller]
    # Which CouchDB feeds this replica follows, among the replicas sharing the store.
    shares: FeedShares
    runner: Runner
    metrics: Metrics
    throughput: Throughput
    snapshotters: Mapping[str, Snapshotter] = field(default_factory=dict)
