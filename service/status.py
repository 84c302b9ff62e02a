"""The service's own HTTP routes: health, readiness and status, over the running `Service`.

They read the service's parts and the store; they never call PANDA. Webhooks come in through
`service.ingress.webhooks`.
"""

import logging
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from sqlmodel import Session

from service import access
from service.clock import utcnow
from service.container import Service
from service.delivery.engine import DeliveryStatus
from service.ingress.poller import PollerStatus, State
from service.ingress.snapshots import SnapshotStatus
from service.runner import LoopHealth
from service.store import checkpoints, dead_letters, follows, leases, outbox

log = logging.getLogger(__name__)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(_service)]


def _reader(request: Request) -> Service:
    """The service, for a caller with the admin token when one is configured."""
    service = _service(request)
    access.require(request, service.settings.server.admin_token)
    return service


def _scraper(request: Request) -> Service:
    """The service, for a caller with the metrics or admin token when one is configured."""
    service = _service(request)
    server = service.settings.server
    access.require(request, server.metrics_token, server.admin_token)
    return service


ReaderDep = Annotated[Service, Depends(_reader)]
ScraperDep = Annotated[Service, Depends(_scraper)]

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        503: {
            "description": "Not ready: a loop is not running, a source stopped, or delivery"
            " is paused (the reasons only for a caller with the admin token, when one is"
            " configured).",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def readyz(service: ServiceDep, request: Request, response: Response) -> dict[str, Any]:
    """200 when every loop runs and delivery is not paused; 503 with the reasons otherwise
    (the reasons only for a caller with the admin token, when one is configured)."""
    problems = [
        f"loop {name} is not running: {health.last_crash or 'stopped'}"
        for name, health in service.runner.health().items()
        if not health.running
    ]
    problems += [
        f"source {name} stopped: {poller.status().reason}"
        for name, poller in service.pollers.items()
        if poller.status().reason
    ]
    paused = service.delivery.status().paused
    if paused:
        problems.append(paused)
    if problems:
        response.status_code = 503
    token = service.settings.server.admin_token
    if token is not None and not access.presented(request, token):
        return {"ready": not problems}
    return {"ready": not problems, "problems": problems}


class SourceStatus(BaseModel):
    """One source: what the store holds for it, and for a CouchDB source its feed's state."""

    checkpoint: Any = Field(
        description="The saved seq, the JSON value CouchDB gave, verbatim; null before one."
    )
    pending: int = Field(description="Outbox entries waiting for delivery.")
    lag_s: float = Field(
        default=0.0,
        description="Age in seconds of the oldest of them: how far PANDA is behind the source;"
        " 0 when none waits.",
    )
    dead_letters: int = Field(description="Changes PANDA refused, or documents not mapped.")
    lease_until: str | None = Field(
        description="When the source's delivery lease runs out unrenewed (ISO 8601, UTC);"
        " null when no delivery holds it."
    )
    lease_holder: str | None = Field(description="Who holds the lease: `host pid N`.")
    follower: str | None = Field(
        default=None,
        description="The replica following a CouchDB source's feed (`host pid N`); null when"
        " none does.",
    )
    following_since: str | None = Field(
        default=None, description="Since when it follows the feed (ISO 8601, UTC)."
    )
    feed: PollerStatus | None = Field(
        default=None,
        description="A CouchDB source's feed: `state` is one of starting, catching_up, live,"
        " retrying, paused, stopped (see PollerStatus).",
    )
    snapshot: SnapshotStatus | None = Field(
        default=None,
        description="A snapshot source's last snapshot (when, rows read, new, changed, deleted,"
        " unchanged) and the next one: `state` is one of starting, reading, applying, idle,"
        " held (waiting for confirmation), failed, stopped (see SnapshotStatus).",
    )


class ReplicaStatus(BaseModel):
    """A pandasync process sharing the store."""

    replica: str | None = Field(description="`host pid N`.")
    started_at: str = Field(description="ISO 8601, UTC.")
    following: list[str] = Field(description="The CouchDB feeds it follows.")


class StatusAnswer(BaseModel):
    """Per-source progress, the delivery state, the replicas and the service's loops."""

    delivery: DeliveryStatus
    sources: dict[str, SourceStatus]
    replicas: list[ReplicaStatus] = Field(description="The replicas alive, oldest first.")
    loops: dict[str, LoopHealth]


@router.get("/status", responses=access.TOKEN_WANTED)
async def status(service: ReaderDep) -> StatusAnswer:
    """Per-source progress and the delivery state; never a secret or a document body."""
    names = [source.name for source in service.settings.sources]
    sources, replicas = await service.db.run(_source_status, names)
    for name, poller in service.pollers.items():
        sources[name].feed = poller.status()
    for name, snapshotter in service.snapshotters.items():
        sources[name].snapshot = await snapshotter.status()
    return StatusAnswer(
        delivery=service.delivery.status(),
        sources=sources,
        replicas=replicas,
        loops=service.runner.health(),
    )


@router.get("/metrics", response_class=Response, responses=access.TOKEN_WANTED)
async def metrics(service: ScraperDep) -> Response:
    """Prometheus metrics (text format): changes in and out, freshness, PANDA's answer times,
    webhook answers, the outbox and each source's state."""
    depth = await service.db.run(outbox.depth)
    now = utcnow()
    gauges = service.metrics
    for source in service.settings.sources:
        count, oldest = depth.get(source.name, (0, now))
        gauges.outbox_entries.labels(source.name).set(count)
        gauges.outbox_oldest.labels(source.name).set(max(0.0, (now - oldest).total_seconds()))
    for name, poller in service.pollers.items():
        state = poller.status().state
        for each in get_args(State):
            gauges.source_state.labels(name, each).set(1 if each == state else 0)
    return Response(gauges.text(), media_type=CONTENT_TYPE_LATEST)


def _source_status(
    session: Session, names: list[str]
) -> tuple[dict[str, SourceStatus], list[ReplicaStatus]]:
    now = utcnow()
    feeds = follows.held(session, now)
    report: dict[str, SourceStatus] = {}
    depth = outbox.depth(session)
    for name in names:
        seq = checkpoints.load(session, name)
        until, holder = leases.held_by(session, name, now)
        feed = feeds.get(name)
        count, oldest = depth.get(name, (0, now))
        report[name] = SourceStatus(
            checkpoint=None if seq is None else seq.value(),
            pending=count,
            lag_s=max(0.0, (now - oldest).total_seconds()),
            dead_letters=dead_letters.count(session, name),
            lease_until=None if until is None else until.isoformat(),
            lease_holder=holder,
            follower=None if feed is None else feed.holder,
            following_since=None if feed is None or feed.since is None else feed.since.isoformat(),
        )
    replicas = [
        ReplicaStatus(
            replica=replica,
            started_at=started.isoformat(),
            following=sorted(name for name, feed in feeds.items() if feed.holder == replica),
        )
        for replica, started in follows.replicas(session, now)
    ]
    return report, replicas
