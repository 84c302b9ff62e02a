"""Answers held to the OpenAPI document: a route's answer with a status its operation does not
list fails the test that got it (an httpx response hook for the in-process clients)."""

import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

# A path parameter of the document's path templates (`/admin/sources/{name}/pause`).
PARAMETER = re.compile(r"\\\{[^/]+?\\\}")


def statuses(document: dict[str, Any], method: str, path: str) -> set[str] | None:
    """The statuses the document lists for `method` on `path`, or None for a route it does not
    describe (not in it, such as the dashboard's page, or a method the path has not)."""
    for template, operations in document["paths"].items():
        if re.fullmatch(PARAMETER.sub("[^/]+", re.escape(template)), path):
            operation = operations.get(method.lower())
            return None if operation is None else set(operation["responses"])
    return None


def hook(document: dict[str, Any]) -> Callable[[httpx.Response], Awaitable[None]]:
    """A response hook that fails on an answer with a status the document does not list."""

    async def check(response: httpx.Response) -> None:
        request = response.request
        listed = statuses(document, request.method, request.url.path)
        assert listed is None or str(response.status_code) in listed, (
            f"{request.method} {request.url.path} answered {response.status_code},"
            f" which the OpenAPI document does not list (only {sorted(listed)})"
        )

    return check
