"""Who may read or act: bearer tokens from the config, compared in constant time.

With `server.admin_token` set, the admin API answers, and `/status`, `/metrics` and the API
docs want a token too (`/metrics` also takes `server.metrics_token`); without it the admin API
is off and the rest stays open, as before. A token is never logged or echoed.
"""

import secrets
from typing import Any

from fastapi import HTTPException, Request
from pydantic import BaseModel, SecretStr

UNAUTHORIZED = "a valid token is needed: send Authorization: Bearer <server.admin_token>"


class Refusal(BaseModel):
    """Why a request was refused or could not be done; it changed nothing (the body of
    FastAPI's HTTPException)."""

    detail: str


def refusals(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of refusals: each status with what it means."""
    return {
        status: {"model": Refusal, "description": description}
        for status, description in described.items()
    }


# The answer of a route that wants a token when one is configured (`require`).
TOKEN_WANTED = refusals({401: "A token is configured, and the request has none or a wrong one."})


def presented(request: Request, *tokens: SecretStr | None) -> bool:
    """Whether the request's bearer token is one of `tokens` (those configured)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    offered = given.strip().encode()
    matches = [
        secrets.compare_digest(offered, token.get_secret_value().encode())
        for token in tokens
        if token is not None
    ]
    return any(matches)


def require(request: Request, *tokens: SecretStr | None) -> None:
    """Refuse (401) unless no token is configured or the request presents one of them."""
    if any(token is not None for token in tokens) and not presented(request, *tokens):
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
