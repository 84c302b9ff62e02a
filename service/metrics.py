"""Prometheus metrics of one running service: what came in, what went out, how fresh, how fast.

One `Metrics` per service, with its own registry (served at `/metrics`). Labels are source
names and dataset slugs from the config, webhook answer statuses, request kinds and source
states: never a document id, a seq, a URL or a secret.
"""

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The `source` label of a webhook to a name no source has: names from outside never become
# label values, so they cannot grow the metrics without bound.
UNKNOWN_SOURCE = "(unknown)"
_FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, math.inf)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, math.inf)


class Metrics:
    """The service's counters, histograms and gauges, registered in `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.received = Counter(
            "pandasync_changes_received",
            "Changes taken into the outbox.",
            ["source"],
            registry=registry,
        )
        self.stale = Counter(
            "pandasync_changes_stale",
            "Changes skipped: older than one already accepted for their document.",
            ["source"],
            registry=registry,
        )
        self.delivered = Counter(
            "pandasync_changes_delivered",
            "Changes PANDA acknowledged.",
            ["source", "dataset"],
            registry=registry,
        )
        self.unchanged = Counter(
            "pandasync_changes_unchanged",
            "Changes settled without a request: PANDA held the row already.",
            ["source", "dataset"],
            registry=registry,
        )
        self.retried = Counter(
            "pandasync_changes_retried",
            "Changes PANDA asked to send again later.",
            ["source", "dataset"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "pandasync_changes_dead_lettered",
            "Changes kept as dead letters: refused by PANDA, or documents that cannot be rows.",
            ["source", "dataset"],
            registry=registry,
        )
        self.freshness = Histogram(
            "pandasync_freshness_seconds",
            "From a change taken in to PANDA acknowledging it.",
            ["source"],
            buckets=_FRESHNESS_BUCKETS,
            registry=registry,
        )
        self.panda_requests = Histogram(
            "pandasync_panda_request_seconds",
            "PANDA requests by kind (bulk, row, dataset) and outcome (ok, refused, retry).",
            ["dataset", "kind", "outcome"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.webhooks = Counter(
            "pandasync_webhook_answers",
            "Webhook requests answered, by HTTP status.",
            ["source", "status"],
            registry=registry,
        )
        self.outbox_entries = Gauge(
            "pandasync_outbox_entries",
            "Outbox entries waiting for delivery.",
            ["source"],
            registry=registry,
        )
        self.outbox_oldest = Gauge(
            "pandasync_outbox_oldest_entry_age_seconds",
            "Age of the source's oldest outbox entry; 0 when it has none.",
            ["source"],
            registry=registry,
        )
        self.source_state = Gauge(
            "pandasync_source_state",
            "1 for the state a CouchDB source is in, 0 for the others.",
            ["source", "state"],
            registry=registry,
        )

    def text(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
