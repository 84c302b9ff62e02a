"""Wiring: settings → database, PANDA client, delivery, runner → the FastAPI app.

Holds no logic of its own; everything is built inside `create_app`, nothing at import time.
"""

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from service import access, admin, dashboard, status
from service.config import Settings
from service.container import Service
from service.delivery import panda
from service.delivery.engine import Delivery
from service.ingress import webhook_docs, webhooks
from service.ingress.api_bodies import BoundedBodies
from service.ingress.poller import build_pollers
from service.ingress.shares import FeedShares
from service.ingress.snapshots import build_snapshotters
from service.metrics import Metrics
from service.runner import Runner
from service.store.db import Database
from service.throughput import Throughput


def datasets(settings: Settings) -> dict[str, panda.Dataset]:
    """The PANDA dataset each configured source feeds, by source name."""
    return {
        source.name: panda.Dataset(
            slug=source.dataset.slug,
            name=source.dataset.name,
            columns=tuple(column.name for column in source.columns),
        )
        for source in settings.sources
    }


def build(
    settings: Settings, db: Database, http: httpx.AsyncClient, couchdb_http: httpx.AsyncClient
) -> Service:
    """The service's parts over an open database and HTTP clients (PANDA's, and one of its
    own for the CouchDB feeds, which each hold a connection open)."""
    client = panda.PandaClient(
        http, email=settings.panda.email, api_key=settings.panda.api_key.get_secret_value()
    )
    metrics = Metrics()
    delivery = Delivery(
        db,
        client,
        datasets(settings),
        settings.delivery,
        request_timeout_s=settings.panda.timeout_s,
        metrics=metrics,
    )
    # The sources one replica at a time reads: CouchDB feeds and snapshot sources.
    followed = [source.name for source in settings.sources if source.kind != "webhook"]
    shares = FeedShares(db, followed, lease_s=settings.delivery.lease_s)
    pollers = build_pollers(
        settings, db, couchdb_http, on_commit=delivery.notify, metrics=metrics, shares=shares
    )
    feeds = {f"couchdb:{name}": poller for name, poller in pollers.items()}
    throughput = Throughput(
        metrics, {source.name: source.dataset.slug for source in settings.sources}
    )
    snapshotters = build_snapshotters(
        settings, db, on_commit=delivery.notify, metrics=metrics, shares=shares
    )
    reads = {f"snapshot:{name}": snapshotter for name, snapshotter in snapshotters.items()}
    runner = Runner(
        {"delivery": delivery, "replicas": shares, **feeds, **reads, "throughput": throughput}
    )
    return Service(
        settings=settings,
        db=db,
        delivery=delivery,
        panda=client,
        pollers=pollers,
        shares=shares,
        runner=runner,
        metrics=metrics,
        throughput=throughput,
        snapshotters=snapshotters,
    )


class _App(FastAPI):
    """FastAPI with the webhook route (`webhooks.WebhookRoute`) in front: webhooks, the one
    route a busy source calls for every change, skip FastAPI's routing, middleware and
    telemetry checks, which cost as much again as the rest of a webhook
    (bench/webhook_ingest.py). Every other request's body is bounded (`BoundedBodies`)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._front = webhooks.WebhookRoute(BoundedBodies(super().__call__), self.state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._front(scope, receive, send)


def create_app(settings: Settings, *, start_runner: bool = True) -> FastAPI:
    """The service as an ASGI app; its lifespan opens the store and runs the loops.

    Raises `service.store.db.SchemaError` at startup when the database is not migrated.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.open(settings.database_url)
        try:
            db.check_schema()
            webhooks.warn_about_unsigned_sources(settings)
            http = panda.make_http(
                url=str(settings.panda.url),
                timeout_s=settings.panda.timeout_s,
                max_connections=settings.panda.max_connections,
            )
            couchdb_http = httpx.AsyncClient()
            async with http, couchdb_http, anyio.create_task_group() as group:
                service = build(settings, db, http, couchdb_http)
                app.state.service = service
                intake = webhooks.Intake.build(
                    settings, db, service.delivery.notify, service.metrics
                )
                app.state.intake = intake
                group.start_soon(intake.commits.run)
                if start_runner:
                    group.start_soon(service.runner.run)
                # What startup built lives as long as the process: keep it out of every
                # garbage collection (a full one walks the whole heap; webhooks trigger many).
                gc.freeze()
                yield
                # uvicorn has answered (or cut off) every request by now.
                intake.commits.close()
                await service.runner.stop(grace_s=settings.delivery.shutdown_grace_s)
                # The feeds this replica followed go to the others at once.
                await service.shares.leave()
        finally:
            db.close()

    token = settings.server.admin_token
    if token is None:
        app = _App(title="pandasync", lifespan=lifespan)
    else:  # the API docs want the admin token too
        app = _App(title="pandasync", lifespan=lifespan, docs_url=None, openapi_url=None)
        _docs_behind(app, token)
    app.include_router(status.router)
    app.include_router(admin.router)
    app.include_router(dashboard.router)

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with a webhook path for each configured source."""
        if app.openapi_schema is None:
            app.openapi_schema = webhook_docs.document_sources(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _docs_behind(app: FastAPI, token: SecretStr) -> None:
    """Serve /openapi.json and /docs to callers with `token` only."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        access.require(request, token)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        access.require(request, token)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="pandasync API")
