"""The dashboard as an operator uses it: a real `pandasync serve`, a real PANDA-compatible
server, and Debian's chromium driven by playwright (never a browser playwright downloads)."""

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from service.changes import Change, Op
from service.clock import utcnow
from service.metrics import Metrics
from service.sources import external_ids
from service.store import dead_letters, outbox
from service.store.db import Database
from service.throughput import Throughput
from tests import test_webhooks
from tests.fixtures.panda import RunningPanda, free_port, local_client
from tests.fixtures.service import serving, wait_until
from tests.test_admin import BEARER, with_token

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-token-for-tests"
# A document id that is markup: shown as text, it runs nothing.
HOSTILE = "<img src=x onerror=\"document.title='owned'\">"

CONFIG = """
database_url = "{url}"

[panda]
url = "{panda_url}"
email = "{email}"
api_key = "{api_key}"
timeout_s = 2

[server]
port = {port}
admin_token = "{token}"

[delivery]
idle_poll_s = 0.05
retry_base_s = 0.05
retry_cap_s = 0.2

[[sources]]
name = "stories"
kind = "webhook"
dataset = {{ slug = "stories", name = "Stories" }}
columns = [{{ name = "Headline", field = "title" }}]
webhook = {{ signature = "none" }}
"""


def answers(url: str) -> bool:
    try:
        with local_client(timeout=1) as http:
            return http.get(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"no {CHROMIUM}: run scripts/install as root,"
            " or apt-get install --no-install-recommends chromium"
        )
    # A slow page on a busy machine gets longer than playwright's 5 s.
    expect.set_options(timeout=20_000)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def dashboard(
    tmp_path: Path, panda: RunningPanda, migrated_sqlite_url: str
) -> Iterator[tuple[str, Path]]:
    """`pandasync serve` with an admin token: its address and its log file."""
    port = free_port()
    config = tmp_path / "pandasync.toml"
    text = CONFIG.format(
        url=migrated_sqlite_url,
        panda_url=panda.url,
        email=panda.email,
        api_key=panda.api_key,
        port=port,
        token=TOKEN,
    )
    config.write_text(text, encoding="utf-8")
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with serving(config, log):
        wait_until(lambda: answers(url), what="pandasync serve to answer")
        yield url, log


def sign_in(page: Page, token: str) -> None:
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Open the dashboard").click()


@pytest.mark.timeout(120)
def test_an_operator_signs_in_sees_a_dead_letter_and_replays_it_once_panda_takes_it(
    browser: Browser,
    dashboard: tuple[str, Path],
    panda: RunningPanda,
    migrated_sqlite_url: str,
    tmp_path: Path,
) -> None:
    url, log = dashboard
    refused = external_ids.encode(HOSTILE)
    panda.set_faults(refuse_ids=[refused])
    changes = [
        {"op": "upsert", "id": doc_id, "row": {"title": doc_id}} for doc_id in ("s1", HOSTILE)
    ]
    body = json.dumps({"changes": changes})
    with local_client() as http:
        taken = http.post(
            f"{url}/webhooks/stories", content=body, headers={"Content-Type": "application/json"}
        )
    assert taken.status_code == 202
    database = Database.open(migrated_sqlite_url)
    try:
        wait_until(
            lambda: len(database.run_sync(dead_letters.stored, None)) == 1,
            what="PANDA's refusal to become a dead letter",
        )
    finally:
        database.close()

    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.goto(url)
    sign_in(page, "not-the-token")
    expect(page.locator("#login-error")).to_have_text("That is not the admin token.")
    sign_in(page, TOKEN)

    source = page.locator("#sources tr[data-source='stories']")
    expect(source.locator("td.state")).to_have_text("accepting webhooks")
    expect(source.locator("td.lag")).to_have_text("0 queued")
    letter = page.locator("#letters tbody tr")
    expect(letter).to_have_count(1)
    expect(letter.locator("td.doc-id")).to_have_text(HOSTILE)
    expect(letter.locator("td.answer")).to_contain_text("400: ")
    assert page.locator("#letters img").count() == 0
    assert page.title() == "pandasync"
    assert TOKEN not in page.content()
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    panda.clear_faults()  # the cause fixed: PANDA takes the row now
    letter.get_by_role("button", name="Replay").click()
    expect(page.locator("#notice")).to_contain_text("replayed: it is back in the outbox")
    expect(letter).to_have_count(0)
    expect(page.locator("#letters-count")).to_have_text("No dead letters.")
    wait_until(lambda: refused in panda.rows("stories"), what="the replayed row in PANDA")
    page.screenshot(path=str(tmp_path / "dashboard-replayed.png"), full_page=True)
    assert TOKEN not in log.read_text()


@pytest.mark.timeout(120)
def test_a_wrong_token_in_the_tab_sends_the_operator_back_to_sign_in(
    browser: Browser, dashboard: tuple[str, Path]
) -> None:
    url, _ = dashboard
    page = browser.new_page()
    page.goto(url)
    page.evaluate("sessionStorage.setItem('pandasync.admin_token', 'stale')")
    page.reload()
    expect(page.locator("#login-error")).to_have_text("The admin token was refused: sign in again.")
    expect(page.locator("#board")).to_be_hidden()


# What the dashboard's script fetches, every few seconds.
DATA = ["/status", "/admin/dead-letters?limit=200", "/admin/throughput"]


@pytest.mark.anyio
async def test_the_page_holds_no_data_and_its_data_wants_the_admin_token(
    database: Database,
) -> None:
    settings = with_token(test_webhooks.settings_for(database))
    async with test_webhooks.serving(settings) as (client, _):
        page = await client.get("/")
        script = await client.get("/dashboard.js")
        anonymous = [(await client.get(path)).status_code for path in DATA]
        wrong = {"authorization": "Bearer nope"}
        guessed = [(await client.get(path, headers=wrong)).status_code for path in DATA]
        admin = [(await client.get(path, headers=BEARER)).status_code for path in DATA]
    assert (page.status_code, script.status_code) == (200, 200)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert (anonymous, guessed, admin) == ([401] * 3, [401] * 3, [200] * 3)


@pytest.mark.anyio
async def test_without_an_admin_token_the_dashboard_is_off_and_says_how_to_turn_it_on(
    database: Database,
) -> None:
    async with test_webhooks.serving(test_webhooks.settings_for(database)) as (client, _):
        page = await client.get("/")
        script = await client.get("/dashboard.js")
        data = await client.get("/admin/throughput")
    assert [page.status_code, script.status_code, data.status_code] == [404, 404, 404]
    assert "The dashboard is off" in page.text
    assert "server.admin_token" in page.text


@pytest.mark.anyio
async def test_status_tells_how_long_the_oldest_change_of_a_source_has_waited(
    database: Database,
) -> None:
    change = Change("stories", "s1", "s1", Op.UPSERT, ("Flood",))
    await database.run(outbox.enqueue, [change], now=utcnow() - timedelta(seconds=90))
    async with test_webhooks.serving(with_token(test_webhooks.settings_for(database))) as (
        client,
        _,
    ):
        report = (await client.get("/status", headers=BEARER)).json()["sources"]["stories"]
    assert report["pending"] == 1
    assert 90 <= report["lag_s"] < 120


def test_throughput_keeps_each_intervals_deliveries_and_only_the_last_minutes() -> None:
    metrics = Metrics()
    sampled = Throughput(metrics, {"stories": "stories", "tips": "tip-line"}, keep=3)
    sampled.step()
    for delivered in (5, 0, 7, 2):
        metrics.delivered.labels("stories", "stories").inc(delivered)
        metrics.delivered.labels("tips", "tip-line").inc(1)
        sampled.step()
    assert sampled.recent() == {"stories": [0, 7, 2], "tips": [1, 1, 1]}
