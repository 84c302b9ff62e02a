"""HTTP routes of the service: health, readiness and status (webhooks join in issue 4).

Routes read the shared `Service` and the store; they never call PANDA.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from sqlmodel import Session

from service import checkpoints, outbox
from service.config import Settings
from service.db import Database
from service.delivery import Delivery
from service.poller import Poller
from service.runner import Runner


@dataclass(frozen=True)
class Service:
    """Everything the routes need, built once by `service.app`."""

    settings: Settings
    db: Database
    delivery: Delivery
    pollers: Mapping[str, Poller]
    runner: Runner


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(_service)]

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: ServiceDep, response: Response) -> dict[str, Any]:
    """200 when every loop runs and delivery is not paused; 503 with the reasons otherwise."""
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
    return {"ready": not problems, "problems": problems}


@router.get("/status")
async def status(service: ServiceDep) -> dict[str, Any]:
    """Per-source progress and the delivery state; never a secret or a document body."""
    names = [source.name for source in service.settings.sources]
    sources = await service.db.run(_source_status, names)
    for name, poller in service.pollers.items():
        sources[name]["feed"] = asdict(poller.status())
    delivery = asdict(service.delivery.status())
    return {"delivery": delivery, "sources": sources, "loops": service.runner.health()}


def _source_status(session: Session, names: list[str]) -> dict[str, dict[str, Any]]:
    report: dict[str, dict[str, Any]] = {}
    for name in names:
        seq = checkpoints.load(session, name)
        report[name] = {
            "checkpoint": None if seq is None else seq.value(),
            "pending": outbox.pending(session, name),
            "dead_letters": len(outbox.dead_letters(session, name)),
        }
    return report
