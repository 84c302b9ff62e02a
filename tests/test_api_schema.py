"""The OpenAPI document against the running service: schemathesis sends what the document
allows to each webhook source's path, to the public routes of `pandasync serve` and to its admin
API (with the token): the whole document. No answer is a server error, and every answer is one
the document describes, its status included: the admin routes are also sent the names of the
configured sources (a webhook, a CouchDB and a snapshot source), so that their refusals (409,
502) are met. The in-process tests hold their answers to the document too
(`tests/documented.py`)."""

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation.case import Case
from schemathesis.schemas import BaseSchema

from tests.fixtures.panda import free_port, local_client
from tests.fixtures.service import serving, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ADMIN_TOKEN = "admin-t0ken"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CONFIG = """
database_url = "sqlite:///{store}"

[panda]
url = "http://127.0.0.1:9"
email = "sync@example.org"
api_key = "key-0123"

[server]
port = {port}
admin_token = "{admin_token}"

[[sources]]
name = "stories"
kind = "webhook"
dataset = {{ slug = "stories", name = "Stories" }}
columns = [{{ name = "Headline", field = "title" }}, {{ name = "Author", field = "author.name" }}]
webhook = {{ signature = "none" }}

[[sources]]
name = "pushes"
kind = "webhook"
dataset = {{ slug = "pushes", name = "Pushes" }}
columns = [{{ name = "Headline", field = "title" }}]
webhook = {{ signature = "none", format = "couchdb" }}

[[sources]]
name = "forms"
kind = "webhook"
dataset = {{ slug = "forms", name = "Forms" }}
columns = [{{ name = "Headline", field = "title" }}]
webhook = {{ signature = "none", format = "jmespath", mapping = {{ items = "submissions" }} }}

[[sources]]
name = "signed"
kind = "webhook"
dataset = {{ slug = "signed", name = "Signed" }}
columns = [{{ name = "Headline", field = "title" }}]
webhook = {{ signature = "standard-webhooks", secrets = ["{secret}"] }}

[[sources]]
name = "feed"
kind = "couchdb"
dataset = {{ slug = "feed", name = "Feed" }}
columns = [{{ name = "Headline", field = "title" }}]
couchdb = {{ url = "http://127.0.0.1:9", database = "news", retry_cap_s = 0.5 }}

[[sources]]
name = "tweets"
kind = "snapshot"
id_field = "id"
dataset = {{ slug = "tweets", name = "Tweets" }}
columns = [{{ name = "Headline", field = "title" }}]
snapshot = {{ url = "http://127.0.0.1:9/tweets" }}
"""
# The sources' names, sent to the admin routes beside the names schemathesis makes up; and the
# checkpoints a caller would set (the document allows any JSON value).
NAMES = ["stories", "feed", "tweets", "nowhere"]
CHECKPOINTS = ["now", "0"]


def _healthy(url: str) -> bool:
    try:
        with local_client(timeout=1) as http:
            return http.get(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def api(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseSchema]:
    """The document `pandasync serve` serves, for four webhook sources (one a format, and one
    signed), with the public routes and the admin API (on, with a token the requests carry)."""
    folder = tmp_path_factory.mktemp("api-schema")
    shutil.copyfile(sqlite_template, folder / "store.db")
    port = free_port()
    path = folder / "pandasync.toml"
    text = CONFIG.format(
        store=folder / "store.db", port=port, secret=SECRET, admin_token=ADMIN_TOKEN
    )
    path.write_text(text, encoding="utf-8")
    url = f"http://127.0.0.1:{port}"
    with serving(path, folder / "serve.log"):
        wait_until(lambda: _healthy(url), what="pandasync to answer", deadline_s=30)
        yield schemathesis.openapi.from_url(f"{url}/openapi.json", headers=ADMIN)


# Each operation's examples: the whole run stays well under a minute on a loaded 2-core machine.
EXAMPLES = 20


@pytest.mark.timeout(120)
def test_every_answer_is_described_by_the_openapi_document(api: BaseSchema) -> None:
    operations = []
    for result in api.get_all_operations():
        assert isinstance(result, Ok), f"the document is not valid OpenAPI: {result}"
        operations.append(result.ok())
    for operation in operations:

        @given(
            case=operation.as_strategy(),
            name=st.none() | st.sampled_from(NAMES),
            to=st.none() | st.sampled_from(CHECKPOINTS),
        )
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def answers_as_documented(case: Case[Any], name: str | None, to: str | None) -> None:
            if name is not None and "name" in (case.path_parameters or {}):
                case.path_parameters = {**(case.path_parameters or {}), "name": name}
            if to is not None and case.operation.label.endswith("/checkpoint"):
                case.body = {"to": to}
            # The default checks: documented statuses, content types, headers and bodies, and
            # a request the document allows is not refused (400 or 422). Not "no 5xx": a
            # documented 502 or 503 (a peer that cannot be read) is an answer like another,
            # and a 500 fails as a status no operation documents.
            case.call_and_validate(headers=ADMIN, excluded_checks=[not_a_server_error])

        answers_as_documented()
    assert sorted(operation.label for operation in operations) == [
        "GET /admin/dead-letters",
        "GET /admin/dead-letters/{letter_id}",
        "GET /admin/throughput",
        "GET /healthz",
        "GET /metrics",
        "GET /readyz",
        "GET /status",
        "POST /admin/dead-letters/discard",
        "POST /admin/dead-letters/replay",
        "POST /admin/sources/{name}/checkpoint",
        "POST /admin/sources/{name}/confirm-deletes",
        "POST /admin/sources/{name}/pause",
        "POST /admin/sources/{name}/resume",
        "POST /admin/sources/{name}/resync",
        "POST /admin/sources/{name}/snapshot",
        "POST /webhooks/forms",
        "POST /webhooks/pushes",
        "POST /webhooks/signed",
        "POST /webhooks/stories",
    ]


# What the checkpoint and resync routes answer: a late body (408), a body of no declared length
# (411) or declared too big (413), a conflict (409), a peer that could not be read (502), a feed
# that did not close in time (503).
ANSWERS_WITH_A_BODY = ["200", "401", "404", "408", "409", "411", "413", "422", "502", "503"]
BODY_ROUTE = ["200", "401", "404", "408", "411", "413", "422"]


def test_each_admin_route_lists_the_statuses_it_answers_and_a_refusal_says_why(
    api: BaseSchema,
) -> None:
    paths: dict[str, dict[str, Any]] = api.raw_schema["paths"]
    operations = {
        f"{method.upper()} {path}": operation["responses"]
        for path, methods in paths.items()
        if path.startswith("/admin/")
        for method, operation in methods.items()
    }
    listed = {label: sorted(responses) for label, responses in operations.items()}
    refusals = {
        (label, status): response["content"]["application/json"]["schema"]
        for label, responses in operations.items()
        for status, response in responses.items()
        if status not in ("200", "202", "422")
    }
    assert listed == {
        "GET /admin/dead-letters": ["200", "401", "404", "422"],
        "GET /admin/dead-letters/{letter_id}": ["200", "401", "404", "422"],
        "GET /admin/throughput": ["200", "401", "404"],
        "POST /admin/dead-letters/discard": BODY_ROUTE,
        "POST /admin/dead-letters/replay": BODY_ROUTE,
        "POST /admin/sources/{name}/checkpoint": ANSWERS_WITH_A_BODY,
        "POST /admin/sources/{name}/confirm-deletes": ["200", "401", "404", "409", "422"],
        "POST /admin/sources/{name}/pause": ["200", "401", "404", "422"],
        "POST /admin/sources/{name}/resume": ["200", "401", "404", "422"],
        "POST /admin/sources/{name}/resync": ANSWERS_WITH_A_BODY,
        "POST /admin/sources/{name}/snapshot": ["202", "401", "404", "409", "422"],
    }
    # The HTTP server's own 408 (it cuts the body off before the app) has the webhook
    # refusal's shape; every other refusal is the app's.
    late = {"$ref": "#/components/schemas/WebhookRefusal"}
    refusal = {"$ref": "#/components/schemas/Refusal"}
    assert {where: schema for where, schema in refusals.items() if schema != refusal} == {
        (label, "408"): late for label, responses in listed.items() if "408" in responses
    }
