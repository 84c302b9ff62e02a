"""The OpenAPI document against the running service: schemathesis sends what the document
allows to each webhook source's path, to the public routes of `pandasync serve` and to its admin
API (with the token): the whole document. No answer is a server error, and every answer is one
the document describes."""

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
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
"""


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

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def answers_as_documented(case: Case[Any]) -> None:
            # The default checks: no 5xx, documented statuses, content types, headers and
            # bodies, and a request the document allows is not refused (400 or 422).
            case.call_and_validate(headers=ADMIN)

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
