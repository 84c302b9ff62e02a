"""`service.ingress.signatures`: Standard Webhooks, GitHub and generic HMAC on the raw body."""

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from math import floor
from typing import Any

import pytest
from standardwebhooks import Webhook

from service.config import WebhookSettings
from service.ingress.signatures import NotTextError, SignatureError, verify, webhook_id

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
BODY = b'{"changes": [{"op": "delete", "id": "caf\xc3\xa9"}]}'
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_" + base64.b64encode(b"the secret before the rotation").decode()
RETIRED_SECRET = "whsec_" + base64.b64encode(b"a secret retired long ago").decode()


def standard(*secrets: str, **settings: Any) -> WebhookSettings:
    return WebhookSettings.model_validate(
        {"signature": "standard-webhooks", "secrets": list(secrets), **settings}
    )


def standard_headers(
    body: bytes = BODY, secret: str = SECRET, *, at: datetime = NOW, msg_id: str = "msg_1"
) -> dict[str, str]:
    """Headers as a Standard Webhooks sender makes them, with the package's own signer."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(floor(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }


def github_signature(body: bytes, secret: str) -> str:
    """Exactly as GitHub documents it ("Validating webhook deliveries")."""
    digest = hmac.new(secret.encode("utf-8"), msg=body, digestmod=hashlib.sha256).hexdigest()
    return "sha256=" + digest


def refused(settings: WebhookSettings, headers: dict[str, str], body: bytes = BODY) -> bool:
    try:
        verify(settings, headers, body, now=NOW)
    except SignatureError:
        return True
    return False


def test_a_standard_webhook_signed_by_the_package_passes() -> None:
    verify(standard(SECRET), standard_headers(), BODY, now=NOW)


def test_header_names_are_matched_whatever_their_case() -> None:
    headers = {name.title(): value for name, value in standard_headers().items()}
    verify(standard(SECRET), headers, BODY, now=NOW)


def test_a_standard_webhook_signed_with_another_secret_is_refused() -> None:
    assert refused(standard(SECRET), standard_headers(secret=RETIRED_SECRET))


def test_a_tampered_body_is_refused() -> None:
    assert refused(standard(SECRET), standard_headers(), BODY.replace(b"delete", b"upsert"))


def test_a_changed_webhook_id_is_refused() -> None:
    headers = {**standard_headers(), "webhook-id": "msg_2"}
    assert refused(standard(SECRET), headers)


@pytest.mark.parametrize("offset_s", [-301, 301])
def test_a_timestamp_outside_the_tolerance_is_refused(offset_s: int) -> None:
    headers = standard_headers(at=NOW + timedelta(seconds=offset_s))
    assert refused(standard(SECRET), headers)


def test_a_timestamp_at_the_edge_of_the_tolerance_passes() -> None:
    verify(standard(SECRET), standard_headers(at=NOW - timedelta(seconds=300)), BODY, now=NOW)


def test_the_tolerance_is_configurable() -> None:
    headers = standard_headers(at=NOW - timedelta(hours=1))
    verify(standard(SECRET, tolerance_s=3600), headers, BODY, now=NOW)
    assert refused(standard(SECRET, tolerance_s=3599), headers)


def test_during_a_rotation_both_secrets_pass_and_a_retired_one_does_not() -> None:
    settings = standard(SECRET, OLD_SECRET)
    verify(settings, standard_headers(secret=SECRET), BODY, now=NOW)
    verify(settings, standard_headers(secret=OLD_SECRET), BODY, now=NOW)
    assert refused(settings, standard_headers(secret=RETIRED_SECRET))


def test_a_signature_list_with_one_good_signature_passes() -> None:
    good = standard_headers()
    bad = standard_headers(secret=RETIRED_SECRET)["webhook-signature"]
    headers = {**good, "webhook-signature": f"v2,abc {bad} garbage {good['webhook-signature']}"}
    verify(standard(SECRET), headers, BODY, now=NOW)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("webhook-id", ""),
        ("webhook-timestamp", ""),
        ("webhook-timestamp", "12.5"),
        ("webhook-timestamp", "9" * 5000),
        ("webhook-timestamp", "١٢٣"),
        ("webhook-signature", ""),
        ("webhook-signature", "v1"),
        ("webhook-signature", "v1,not base64!"),
    ],
)
def test_missing_or_malformed_standard_headers_are_refused(name: str, value: str) -> None:
    assert refused(standard(SECRET), {**standard_headers(), name: value})


def test_a_body_that_is_not_utf8_is_named_as_such_by_the_standard_scheme() -> None:
    body = b'{"a": "\xff"}'
    headers = standard_headers(body.decode("latin-1").encode())
    with pytest.raises(NotTextError, match=r"^the body is not UTF-8 \(byte 7\)$"):
        verify(standard(SECRET), headers, body, now=NOW)


def test_a_github_signature_made_as_github_documents_passes() -> None:
    settings = WebhookSettings(signature="github", secrets=["It's a Secret to Everybody"])
    header = github_signature(BODY, "It's a Secret to Everybody")
    verify(settings, {"X-Hub-Signature-256": header}, BODY, now=NOW)


def test_githubs_documented_example_passes() -> None:
    # GitHub's docs: secret "It's a Secret to Everybody", payload "Hello, World!".
    settings = WebhookSettings(signature="github", secrets=["It's a Secret to Everybody"])
    signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    verify(settings, {"x-hub-signature-256": signature}, b"Hello, World!", now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        github_signature(BODY, "another secret"),
        github_signature(BODY + b" ", "s3"),
        github_signature(BODY, "s3").replace("sha256=", "sha1="),
        github_signature(BODY, "s3").removeprefix("sha256="),
        "sha256=zz",
        "sha256=",
        "sha256=é",
        "",
    ],
)
def test_a_bad_github_signature_is_refused(header: str) -> None:
    settings = WebhookSettings(signature="github", secrets=["s3"])
    assert refused(settings, {"X-Hub-Signature-256": header})


def test_github_rotation_takes_either_secret() -> None:
    settings = WebhookSettings(signature="github", secrets=["new", "old"])
    for secret in ("new", "old"):
        verify(settings, {"X-Hub-Signature-256": github_signature(BODY, secret)}, BODY, now=NOW)


@pytest.mark.parametrize(
    ("encoding", "signature"),
    [
        ("hex", hmac.new(b"k", BODY, hashlib.sha256).hexdigest()),
        ("hex", hmac.new(b"k", BODY, hashlib.sha256).hexdigest().upper()),
        ("hex", "sha256=" + hmac.new(b"k", BODY, hashlib.sha256).hexdigest()),
        ("base64", base64.b64encode(hmac.new(b"k", BODY, hashlib.sha256).digest()).decode()),
    ],
)
def test_a_generic_hmac_header_passes_in_its_encoding(encoding: str, signature: str) -> None:
    settings = WebhookSettings.model_validate(
        {"signature": "hmac", "header": "X-Signature", "encoding": encoding, "secrets": ["k"]}
    )
    verify(settings, {"x-signature": signature}, BODY, now=NOW)


def test_a_generic_hmac_header_with_a_wrong_secret_or_missing_is_refused() -> None:
    settings = WebhookSettings(signature="hmac", header="X-Signature", secrets=["k"])
    wrong = hmac.new(b"not k", BODY, hashlib.sha256).hexdigest()
    assert (refused(settings, {"X-Signature": wrong}), refused(settings, {})) == (True, True)


def test_an_unsigned_source_takes_anything() -> None:
    verify(WebhookSettings(signature="none"), {}, b"anything", now=NOW)


def test_webhook_ids_come_from_the_schemes_header_or_the_configured_one() -> None:
    headers = {"Webhook-Id": "msg_1", "X-GitHub-Delivery": "gh-1", "X-Request-Id": "r-1"}
    assert [
        webhook_id(standard(SECRET), headers),
        webhook_id(WebhookSettings(signature="github", secrets=["s"]), headers),
        webhook_id(WebhookSettings(signature="none"), headers),
        webhook_id(WebhookSettings(signature="none", id_header="x-request-id"), headers),
        webhook_id(WebhookSettings(signature="none", id_header="X-Missing"), headers),
    ] == ["msg_1", "gh-1", None, "r-1", None]
