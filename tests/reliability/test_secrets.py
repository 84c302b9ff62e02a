"""No secret ever leaves pandasync: every secret of the config holds a marker, every error path
a user or a peer can provoke is provoked (wrong signatures and tokens, PANDA refusing with 401
and failing with 500, CouchDB unreachable, bad configs, `check-config`, `status`, `sync`,
`/status`, `/metrics`, the admin API's errors), and no log line, command output, answer body
or header holds a marker, plain, in base64 or in hex."""

import base64
import binascii
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from math import floor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import make_url
from standardwebhooks import Webhook

from tests.fixtures.panda import RunningPanda, free_port, local_client, start_fake_panda
from tests.fixtures.service import ROOT, serving, wait_until

pytestmark = pytest.mark.postgres

PANDA_KEY = "panda-key-7f3c9e1a-marker"
WRONG_PANDA_KEY = "panda-key-wrong-2b8d4f6e-marker"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"webhook-secret-5e1a9c3b-marker").decode()
GITHUB_SECRET = "github-secret-9d2e7a4c-marker"
HMAC_SECRET = "hmac-secret-3c6f1b8d-marker"
ADMIN_TOKEN = "admin-token-8a4d2e6f-marker"
METRICS_TOKEN = "metrics-token-1e7b3d9a-marker"
DATABASE_PASSWORD = "db-password-6b9e2c4f-marker"
COUCHDB_PASSWORD = "couchdb-password-4d1a8e3b-marker"
BAD_SECRET = "not-a-standard-secret-2f5c8a1d-marker"
MARKERS = [
    PANDA_KEY,
    WRONG_PANDA_KEY,
    WEBHOOK_SECRET,
    WEBHOOK_SECRET.removeprefix("whsec_"),
    "webhook-secret-5e1a9c3b-marker",
    GITHUB_SECRET,
    HMAC_SECRET,
    ADMIN_TOKEN,
    METRICS_TOKEN,
    DATABASE_PASSWORD,
    COUCHDB_PASSWORD,
    BAD_SECRET,
]

CONFIG = """
database_url = "{database_url}"

[panda]
url = "{panda_url}"
email = "{email}"
api_key = "{api_key}"
timeout_s = 1

[server]
port = {port}
admin_token = "{admin_token}"
metrics_token = "{metrics_token}"

[delivery]
idle_poll_s = 0.05
retry_base_s = 0.05
retry_cap_s = 0.2
breaker_failures = 100

[[sources]]
name = "stories"
kind = "webhook"
dataset = {{ slug = "stories", name = "Stories" }}
columns = [{{ name = "Headline", field = "title" }}]
webhook = {{ signature = "standard-webhooks", secrets = ["{webhook_secret}"] }}

[[sources]]
name = "pushes"
kind = "webhook"
dataset = {{ slug = "pushes", name = "Pushes" }}
columns = [{{ name = "Headline", field = "title" }}]
webhook = {{ signature = "github", secrets = ["{github_secret}"], format = "couchdb" }}

[[sources]]
name = "forms"
kind = "webhook"
dataset = {{ slug = "forms", name = "Forms" }}
columns = [{{ name = "Headline", field = "title" }}]
webhook = {{ signature = "hmac", header = "X-Signature", secrets = ["{hmac_secret}"] }}

[[sources]]
name = "feed"
kind = "couchdb"
dataset = {{ slug = "feed", name = "Feed" }}
columns = [{{ name = "Headline", field = "title" }}]
couchdb = {{ url = "http://127.0.0.1:{couchdb_port}", database = "news", username = "sync",\
 password = "{couchdb_password}", retry_base_s = 0.05, retry_cap_s = 0.2 }}
"""


def forms_of(marker: str) -> list[str]:
    """The marker as it could leak: plain, in base64 and in hex (both cases)."""
    raw = marker.encode()
    encoded = binascii.hexlify(raw).decode()
    return [marker, base64.b64encode(raw).decode(), encoded, encoded.upper()]


def leaks(text: str) -> list[str]:
    """Each marker form found in `text`."""
    return [form for marker in MARKERS for form in forms_of(marker) if form in text]


class Captured:
    """Everything pandasync said: answers (status, headers, body) and command outputs."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def answer(self, response: httpx.Response) -> httpx.Response:
        headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
        self.texts.append(f"{response.request.url} {response.status_code}\n{headers}\n")
        self.texts.append(response.text)
        return response

    def command(self, *args: str, config: Path) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", *args, "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.texts += [done.stdout, done.stderr]
        return done


@pytest.fixture
def panda() -> Iterator[RunningPanda]:
    """A PANDA of the test's own that knows only PANDA_KEY."""
    with start_fake_panda(api_key=PANDA_KEY) as running:
        yield running


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.timeout(180)
def test_no_secret_reaches_a_log_an_output_or_an_answer_on_any_error_path(
    panda: RunningPanda, migrated_postgres_url: str, tmp_path: Path
) -> None:
    database_url = make_url(migrated_postgres_url).set(password=DATABASE_PASSWORD)
    port = free_port()
    values = {
        "database_url": database_url.render_as_string(hide_password=False),
        "panda_url": panda.url,
        "email": panda.email,
        "api_key": PANDA_KEY,
        "port": port,
        "admin_token": ADMIN_TOKEN,
        "metrics_token": METRICS_TOKEN,
        "webhook_secret": WEBHOOK_SECRET,
        "github_secret": GITHUB_SECRET,
        "hmac_secret": HMAC_SECRET,
        "couchdb_port": free_port(),
        "couchdb_password": COUCHDB_PASSWORD,
    }
    config = write(tmp_path / "pandasync.toml", CONFIG.format(**values))
    captured = Captured()
    assert captured.command("migrate", config=config).returncode == 0
    panda.set_faults(error_rate=1.0)
    log = tmp_path / "serve.log"
    with serving(config, log):
        wait_until(lambda: _ready(port), what="pandasync to answer", deadline_s=30)
        _provoke(captured, f"http://127.0.0.1:{port}")
        wait_until(lambda: _answered(panda, "500"), what="PANDA's 500 to a row write")
        captured.command("status", config=config)
    # PANDA refusing the key: `sync --once` with a wrong one, on the change still pending.
    wrong = write(tmp_path / "wrong.toml", config.read_text().replace(PANDA_KEY, WRONG_PANDA_KEY))
    panda.clear_faults()
    synced = captured.command("sync", "--once", config=wrong)
    assert (synced.returncode, _answered(panda, "401")) == (1, True), synced.stderr[-3000:]
    _bad_configs(captured, config, tmp_path)
    captured.texts.append(log.read_text(encoding="utf-8", errors="replace"))
    assert "PANDA" in captured.texts[-1], "the service's log was captured"
    assert [leak for text in captured.texts for leak in leaks(text)] == []


def _ready(port: int) -> bool:
    try:
        with local_client(timeout=1) as http:
            return http.get(f"http://127.0.0.1:{port}/readyz").status_code in (200, 503)
    except httpx.TransportError:
        return False


def _answered(panda: RunningPanda, status: str) -> bool:
    by_status = panda.stats()["by_status"]
    return isinstance(by_status, dict) and by_status.get(status, 0) > 0


def _provoke(captured: Captured, url: str) -> None:
    """Every error answer the running service gives, and a webhook that reaches PANDA."""
    body = b'{"changes": [{"op": "upsert", "id": "s1", "row": {"title": "Flood"}}]}'
    now = datetime.now(UTC)
    signed = {
        "content-type": "application/json",
        "webhook-id": "msg_1",
        "webhook-timestamp": str(floor(now.timestamp())),
        "webhook-signature": Webhook(WEBHOOK_SECRET).sign("msg_1", now, body.decode()),
    }
    wrong = {**signed, "webhook-signature": "v1,c2lnbmF0dXJl"}
    json = {"content-type": "application/json"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    bad_token = {"Authorization": f"Bearer {ADMIN_TOKEN}x"}
    with local_client(base_url=url) as http:
        assert captured.answer(
            http.post("/webhooks/stories", content=body, headers=signed)
        ).is_success
        for request in (
            http.build_request("POST", "/webhooks/stories", content=body, headers=wrong),
            http.build_request("POST", "/webhooks/stories", content=b"\xff", headers=signed),
            http.build_request(
                "POST",
                "/webhooks/pushes",
                content=body,
                headers={**json, "X-Hub-Signature-256": "sha256=00"},
            ),
            http.build_request(
                "POST", "/webhooks/forms", content=body, headers={**json, "X-Signature": "00"}
            ),
            http.build_request("POST", "/webhooks/nowhere", content=body, headers=json),
            http.build_request("GET", "/status"),
            http.build_request("GET", "/status", headers=bad_token),
            http.build_request("GET", "/status", headers=admin),
            http.build_request(
                "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            ),
            http.build_request("GET", "/metrics", headers=bad_token),
            http.build_request("GET", "/readyz"),
            http.build_request("GET", "/openapi.json", headers=admin),
            http.build_request("GET", "/admin/dead-letters", headers=bad_token),
            http.build_request("GET", "/admin/dead-letters/999", headers=admin),
            http.build_request("POST", "/admin/sources/nowhere/pause", headers=admin),
            http.build_request(
                "POST", "/admin/sources/feed/checkpoint", json={"to": "now"}, headers=admin
            ),
            http.build_request(
                "POST", "/admin/dead-letters/replay", json={"ids": "x"}, headers=admin
            ),
        ):
            captured.answer(http.send(request))


def _bad_configs(captured: Captured, config: Path, folder: Path) -> None:
    """`check-config` and `status` on configs that are wrong in ways that sit next to secrets."""
    text = config.read_text()
    for name, broken in {
        "not-standard.toml": text.replace(WEBHOOK_SECRET, BAD_SECRET),
        "panda-url.toml": text.replace("http://127.0.0.1", f"http://sync:{PANDA_KEY}@127.0.0.1", 1),
        "mysql.toml": text.replace("postgresql+psycopg://", "mysql://"),
        "no-database.toml": text.replace("127.0.0.1:5432", f"127.0.0.1:{free_port()}"),
        "wrong-type.toml": text.replace('api_key = "', 'api_key = 12\nx = "'),
    }.items():
        path = write(folder / name, broken)
        # `status` loads the config as `check-config` does; it goes further only with a
        # database it cannot reach.
        captured.command("status" if name == "no-database.toml" else "check-config", config=path)
