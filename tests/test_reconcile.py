"""`pandasync verify` and `pandasync resync` against the PANDA-compatible server: a dataset
edited by hand is found out, and made equal to the source again, touching no other dataset."""

import random
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from service.changes import Change, Op, Seq
from service.cli import cli
from service.clock import utcnow
from service.config import DeliverySettings
from service.delivery import panda
from service.delivery.engine import Delivery
from service.store import checkpoints, outbox
from service.store.db import Database
from tests.fixtures.panda import RunningPanda

runner = CliRunner()
DATASET = panda.Dataset(slug="stories", name="Stories", columns=("Title", "Words"))
ROWS = {f"s{index}": (f"title {index}", str(index)) for index in range(1, 6)}
CONFIG = """
database_url = "{url}"

[panda]
url = "{panda_url}"
email = "{email}"
api_key = "{api_key}"

[[sources]]
name = "stories"
kind = "couchdb"
dataset = {{ slug = "stories", name = "Stories" }}
columns = [{{ name = "Title", field = "title" }}, {{ name = "Words", field = "words" }}]

[sources.couchdb]
url = "http://127.0.0.1:9"
database = "stories"
"""


def read_again(database: Database) -> None:
    """What reading the feed from its start gives: every document as it is now."""
    changes = [Change("stories", doc_id, doc_id, Op.UPSERT, row) for doc_id, row in ROWS.items()]
    database.run_sync(outbox.enqueue, changes, now=utcnow())


def deliver(server: RunningPanda, database: Database) -> tuple[int, int]:
    """Deliver everything due; returns (changes sent, changes settled as unchanged)."""

    async def once() -> tuple[int, int]:
        async with panda.make_http(url=server.url, timeout_s=5) as http:
            client = panda.PandaClient(http, email=server.email, api_key=server.api_key)
            delivery = Delivery(
                database,
                client,
                {"stories": DATASET},
                DeliverySettings(),
                request_timeout_s=5,
                rng=random.Random(0),
            )
            await delivery.run_once()
            status = delivery.status()
            return status.delivered, status.unchanged

    return anyio.run(once)


@pytest.fixture
def edited(panda: RunningPanda, database: Database, tmp_path: Path) -> Path:
    """The source's five rows delivered, then PANDA edited by hand: s2 changed, s3 deleted,
    a row `hand-1` added; and a dataset of another source beside it."""
    read_again(database)
    deliver(panda, database)
    panda.by_hand("PUT", "stories/data/s2/", {"data": ["edited by hand", "2"]})
    panda.by_hand("DELETE", "stories/data/s3/")
    panda.by_hand("PUT", "stories/data/hand-1/", {"data": ["and a row added by hand", "0"]})
    panda.by_hand("PUT", "other/?columns=Title,Words", {"name": "Other"})
    panda.by_hand("PUT", "other/data/o1/", {"data": ["and another dataset", "1"]})
    path = tmp_path / "pandasync.toml"
    url = database.engine.url.render_as_string(hide_password=False)
    path.write_text(
        CONFIG.format(url=url, panda_url=panda.url, email=panda.email, api_key=panda.api_key)
    )
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli, list(args))
    return result.exit_code, result.stdout + result.stderr


def test_verify_reports_rows_missing_changed_and_unknown_and_writes_nothing(
    panda: RunningPanda, database: Database, edited: Path
) -> None:
    before = panda.rows("stories")
    code, output = invoke("verify", "stories", "--config", str(edited))
    assert code == 0, output
    assert "dataset stories: 5 rows in PANDA, 3 as delivered" in output
    assert "1 missing from PANDA (e.g. s3)" in output
    assert "1 changed in PANDA (e.g. s2)" in output
    assert "1 unknown to the source (e.g. hand-1)" in output
    assert "0 waiting for delivery" in output
    assert panda.rows("stories") == before
    assert database.run_sync(outbox.pending, None) == 0
    assert database.run_sync(checkpoints.load, "stories") is None


def test_resync_dry_run_says_what_it_would_do_and_changes_nothing(
    panda: RunningPanda, database: Database, edited: Path
) -> None:
    before = panda.rows("stories")
    code, output = invoke("resync", "stories", "--dry-run", "--delete-orphans", "-c", str(edited))
    assert code == 0, output
    assert "would send again 2 rows and delete 1; nothing was changed" in output
    assert panda.rows("stories") == before
    assert database.run_sync(outbox.pending, None) == 0
    assert database.run_sync(checkpoints.load, "stories") is None


def test_resync_deleting_orphans_makes_the_dataset_equal_to_the_source_again(
    panda: RunningPanda, database: Database, edited: Path
) -> None:
    code, output = invoke("resync", "stories", "--delete-orphans", "--config", str(edited))
    assert code == 0, output
    assert "2 rows to send again, 1 deletes queued" in output
    assert database.run_sync(checkpoints.load, "stories") == Seq.of("0")
    read_again(database)  # the feed read again from 0, as the restarted service does
    sent = deliver(panda, database)
    assert panda.rows("stories") == {doc_id: list(row) for doc_id, row in ROWS.items()}
    assert panda.rows("other") == {"o1": ["and another dataset", "1"]}
    # s2 and s3 written again, hand-1 deleted; s1, s4 and s5 cost nothing.
    assert sent == (3, 3)
    code, output = invoke("verify", "stories", "--config", str(edited))
    assert "dataset stories: 5 rows in PANDA, 5 as delivered" in output


def test_resync_refuses_to_delete_most_of_a_dataset_without_confirm(
    panda: RunningPanda, database: Database, edited: Path
) -> None:
    for index in range(2, 6):
        panda.by_hand("PUT", f"stories/data/hand{index}/", {"data": ["by hand", "0"]})
    code, output = invoke("resync", "stories", "--delete-orphans", "--config", str(edited))
    assert code == 1
    assert "this would delete 5 of 9 rows of stories (56%, more than 20%)" in output
    assert "--confirm" in output
    assert database.run_sync(outbox.pending, None) == 0
    code, output = invoke(
        "resync", "stories", "--delete-orphans", "--confirm", "--config", str(edited)
    )
    assert (code, "5 deletes queued" in output) == (0, True), output
