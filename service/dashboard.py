"""The operator's dashboard at `/`: a page, its script and style, and the throughput it draws.

The page holds no data and no token: its script asks for the admin token once (kept in the
tab's sessionStorage), then polls `/status`, `/admin/dead-letters` and `/admin/throughput`
with it as a bearer header, so the data stays behind the admin token. Without a configured
token the dashboard is off, like the admin API (404, and the page says how to turn it on).
"""

from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from service.admin import REFUSED, AdminDep
from service.container import Service

router = APIRouter()

# The page runs only its own script and style: a value from outside that slipped into the
# markup could not run, and nothing is fetched from another origin.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_OFF = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pandasync: dashboard off</title></head>
<body><h1>The dashboard is off</h1>
<p>Set <code>server.admin_token</code> in the config (or <code>PANDASYNC_SERVER__ADMIN_TOKEN</code>)
and restart pandasync: the dashboard and the admin API answer to that token.</p></body></html>
"""


def _asset(name: str) -> str:
    return files("service").joinpath("static", name).read_text(encoding="utf-8")


def _served(request: Request, name: str, media_type: str) -> Response:
    service: Service = request.app.state.service
    if service.settings.server.admin_token is None:
        return HTMLResponse(_OFF, status_code=404, headers=_HEADERS)
    return Response(_asset(name), media_type=media_type, headers=_HEADERS)


@router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    """The dashboard's page (it asks for the admin token before it shows anything)."""
    return _served(request, "dashboard.html", "text/html; charset=utf-8")


@router.get("/dashboard.js", include_in_schema=False)
async def script(request: Request) -> Response:
    return _served(request, "dashboard.js", "text/javascript; charset=utf-8")


@router.get("/dashboard.css", include_in_schema=False)
async def style(request: Request) -> Response:
    return _served(request, "dashboard.css", "text/css; charset=utf-8")


class ThroughputAnswer(BaseModel):
    """Each source's delivered changes per sampled interval over the last minutes."""

    every_s: Annotated[float, Field(description="The length of one interval, in seconds.")]
    intervals: Annotated[int, Field(description="How many intervals are kept, at most.")]
    sources: Annotated[
        dict[str, list[int]],
        Field(description="Per source, changes PANDA acknowledged in each interval, oldest first."),
    ]


@router.get("/admin/throughput", tags=["admin"], responses=REFUSED)
async def throughput(service: AdminDep) -> ThroughputAnswer:
    """Changes delivered per source in each interval of the last minutes (the sparklines)."""
    sampled = service.throughput
    return ThroughputAnswer(
        every_s=sampled.every_s, intervals=sampled.intervals, sources=sampled.recent()
    )
