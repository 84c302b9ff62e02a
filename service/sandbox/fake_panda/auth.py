"""PANDA's API-key authentication (`PandaAuthentication.try_api_keys`, panda-api.md §1).

Pure: reads the request's headers and query; knows one user, the one in the options.
"""

from urllib.parse import unquote

from service.sandbox.fake_panda.options import FakePandaOptions
from service.sandbox.fake_panda.request import Request


def _credential(request: Request, *, underscored: bytes, dashed: bytes, parameter: str) -> str:
    # WSGI maps `PANDA_EMAIL` and `PANDA-EMAIL` to one META key, so both forms count; a header
    # wins over the query parameter, and an empty one falls through to it (`a or b`).
    return (
        request.header(underscored) or request.header(dashed) or request.query.get(parameter) or ""
    )


def authenticated(request: Request, options: FakePandaOptions) -> bool:
    """Whether the request carries the user's email and key.

    The email is URL-unquoted and compared lower-cased. The key must match unless
    `accept_any_key` reproduces real PANDA, which accepts any non-empty key.
    """
    email = _credential(
        request, underscored=b"panda_email", dashed=b"panda-email", parameter="email"
    )
    api_key = _credential(
        request, underscored=b"panda_api_key", dashed=b"panda-api-key", parameter="api_key"
    )
    if not email or not api_key:
        return False
    if unquote(email).lower() != options.email.lower():
        return False
    return options.accept_any_key or api_key == options.api_key
