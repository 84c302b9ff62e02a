"""Webhook signatures: whether a request's raw body comes from a holder of the source's secret.

Pure functions over the headers and the raw body bytes, never the parsed JSON. A failure says
only "not authentic" to the sender; its message, for the log, never holds a secret.
"""

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from pydantic import SecretStr
from standardwebhooks import Webhook

from service.config import WebhookSettings

# The delivery id each scheme's senders put in a header, unless `id_header` names another.
_ID_HEADERS = {"standard-webhooks": "webhook-id", "github": "x-github-delivery"}


class SignatureError(Exception):
    """The request is not authentic (a bad or missing signature, or a timestamp outside the
    tolerance): answer 401 without detail and apply nothing."""


class NotTextError(ValueError):
    """The body cannot be checked because it is not UTF-8 text (Standard Webhooks signs text):
    answer 400 with the message, which says where it breaks."""


def verify(
    settings: WebhookSettings, headers: Mapping[str, str], body: bytes, *, now: datetime
) -> None:
    """Check the request's signature under the source's scheme, against each of its secrets.

    `headers` may be any mapping (names are compared case-insensitively); `body` is the raw
    body as received. Returns when one secret matches (or the scheme is `none`); raises
    `SignatureError` otherwise, or `NotTextError` for a Standard Webhooks body that is not
    UTF-8. Digests are compared in constant time.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    secrets = settings.secrets
    if settings.signature == "standard-webhooks":
        _standard(secrets, lowered, body, now=now, tolerance_s=settings.tolerance_s)
    elif settings.signature == "github":
        _github(secrets, lowered.get("x-hub-signature-256", ""), body)
    elif settings.signature == "hmac":
        assert settings.header is not None  # WebhookSettings requires it for hmac
        given = _digest(lowered.get(settings.header.lower(), ""), settings.encoding)
        _require(_matches(secrets, body, given))


def webhook_id(settings: WebhookSettings, headers: Mapping[str, str]) -> str | None:
    """The delivery id the request names itself by, or None (no such header, or it is empty).

    From `id_header` if set, else `webhook-id` (Standard Webhooks) or `X-GitHub-Delivery`
    (GitHub); a redelivery carries the same id.
    """
    name = settings.id_header or _ID_HEADERS.get(settings.signature)
    if name is None:
        return None
    lowered = {header.lower(): value for header, value in headers.items()}
    return lowered.get(name.lower()) or None


def _require(authentic: bool) -> None:
    if not authentic:
        raise SignatureError("no signature matches any of the source's secrets")


def _standard(
    secrets: Sequence[SecretStr],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: datetime,
    tolerance_s: float,
) -> None:
    """Standard Webhooks v1: HMAC-SHA256 of `id.timestamp.body`, signed by the package's signer.

    The package's own `verify` has a fixed five-minute tolerance against the wall clock and
    fails on a malformed signature list, so only its signer is used here.
    """
    webhook_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    # Seconds since 1970 in decimal; ten digits until the year 2286.
    if not (webhook_id and timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise SignatureError("missing or malformed Standard Webhooks headers")
    if abs(now.timestamp() - int(timestamp)) > tolerance_s:
        raise SignatureError("webhook-timestamp is outside the tolerance")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotTextError(f"the body is not UTF-8 (byte {error.start})") from None
    sent_at = datetime.fromtimestamp(int(timestamp), UTC)
    given = _standard_signatures(headers.get("webhook-signature", ""))
    for secret in secrets:
        signed = _signer(secret.get_secret_value()).sign(webhook_id, sent_at, text)
        expected = base64.b64decode(signed.partition(",")[2])
        if any(hmac.compare_digest(expected, signature) for signature in given):
            return
    _require(False)


@functools.lru_cache(maxsize=64)
def _signer(secret: str) -> Webhook:
    """The package's signer for `secret`, made once (it decodes the secret when made)."""
    return Webhook(secret)


def _standard_signatures(header: str) -> list[bytes]:
    """The `v1` signatures of a `webhook-signature` header (space-separated `v1,<base64>`)."""
    found = []
    for entry in header.split():
        version, _, signature = entry.partition(",")
        decoded = _decoded(signature, "base64") if version == "v1" else None
        if decoded is not None:
            found.append(decoded)
    return found


def _github(secrets: Sequence[SecretStr], header: str, body: bytes) -> None:
    """GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>` (GitHub's docs,
    "Validating webhook deliveries")."""
    prefix, _, digest = header.partition("=")
    _require(prefix == "sha256" and _matches(secrets, body, _decoded(digest, "hex")))


def _digest(header: str, encoding: str) -> bytes | None:
    # Many senders prefix the digest with its algorithm, as GitHub does.
    return _decoded(header.strip().removeprefix("sha256="), encoding)


def _decoded(text: str, encoding: str) -> bytes | None:
    try:
        if encoding == "hex":
            return bytes.fromhex(text)
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None


def _matches(secrets: Sequence[SecretStr], body: bytes, given: bytes | None) -> bool:
    if not given:
        return False
    return any(hmac.compare_digest(_hmac(secret, body), given) for secret in secrets)


def _hmac(secret: SecretStr, body: bytes) -> bytes:
    return hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).digest()
