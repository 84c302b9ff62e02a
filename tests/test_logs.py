"""Log lines as a log shipper reads them: one JSON object a line, values from outside inside."""

import json
import subprocess
import sys
from pathlib import Path

from service.sources import external_ids
from tests.fixtures.couchdb import CouchDatabase
from tests.fixtures.panda import RunningPanda


def test_json_logs_are_one_object_a_line_with_time_level_logger_message_and_its_fields() -> None:
    probe = (
        "import logging\n"
        "from service import logs\n"
        "logs.configure('INFO', 'json')\n"
        "logging.getLogger('service.ingress.poller').warning("
        "'webhook refused: source=%r', 'evil\\nname\\u2028x')\n"
        "logging.getLogger('service.ingress.poller').debug('not shown')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert sorted(record) == ["level", "logger", "message", "source", "time"]
    assert (record["level"], record["logger"]) == ("WARNING", "service.ingress.poller")
    assert record["message"] == "webhook refused: source='evil\\nname\\u2028x'"
    assert record["source"] == "evil\nname\u2028x"


def test_text_logs_stay_as_they_were() -> None:
    probe = (
        "import logging\n"
        "from service import logs\n"
        "logs.configure('INFO')\n"
        "logging.getLogger('service.x').info('hello: source=%s', 'a')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stderr.rstrip().endswith(" INFO service.x: hello: source=a")


SYNC_CONFIG = """
database_url = "{database_url}"

[logging]
format = "json"

[panda]
url = "{panda_url}"
email = "{email}"
api_key = "{api_key}"

[[sources]]
name = "feed"
kind = "couchdb"
dataset = {{ slug = "stories", name = "Stories" }}
columns = [{{ name = "Title", field = "title" }}]

[sources.couchdb]
url = "{couchdb_url}"
database = "{database}"
"""
# A title nested deeper than a row can hold: the document cannot become a row.
DEEP = "[" * 2000 + '"bottom"' + "]" * 2000


def test_json_log_lines_of_a_sync_carry_source_dataset_doc_id_and_seq_as_fields(
    tmp_path: Path, panda: RunningPanda, couchdb: CouchDatabase, migrated_sqlite_url: str
) -> None:
    config = tmp_path / "pandasync.toml"
    text = SYNC_CONFIG.format(
        database_url=migrated_sqlite_url,
        panda_url=panda.url,
        email=panda.email,
        api_key=panda.api_key,
        couchdb_url=couchdb.server_url,
        database=couchdb.name,
    )
    config.write_text(text, encoding="utf-8")
    docs = [
        {"_id": "refused/1", "title": "secret scoop"},
        {"_id": "deep", "title": "DEEP"},
        {"_id": "fine", "title": "a title"},
    ]
    couchdb.bulk_text(json.dumps(docs).replace('"DEEP"', DEEP))
    panda.set_faults(refuse_ids=[external_ids.encode("refused/1")])
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "sync", "--once", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == "delivered 1, unchanged 0, dead letters 1", done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    by_phrase = {record["message"].partition(":")[0]: record for record in records}
    refused = by_phrase["PANDA refused a change, kept as a dead letter"]
    unmapped = by_phrase["document kept as a dead letter, it cannot become a row"]
    assert (refused["source"], refused["dataset"], refused["doc_id"]) == (
        "feed",
        "stories",
        "refused/1",
    )
    assert refused["status"] == 400
    assert (unmapped["source"], unmapped["dataset"], unmapped["doc_id"]) == (
        "feed",
        "stories",
        "deep",
    )
    assert unmapped["seq"] == "2"  # pouchdb-server's seq of the second document, as JSON text
    assert "secret scoop" not in done.stderr, "a document's content is never logged"
    assert panda.api_key not in done.stderr


# A document id as a hostile sender would write it: a forged second line, a carriage return,
# a NUL, an ANSI colour escape and a Unicode line separator.
HOSTILE_ID = "a\n2026-01-01 00:00:00,000 INFO service.x: forged\r\x00\x1b[31mred\u2028b"
ESCAPED_ID = "a\\n2026-01-01 00:00:00,000 INFO service.x: forged\\r\\x00\\x1b[31mred\\u2028b"


def _logged(format: str) -> str:
    probe = (
        "import logging, sys\n"
        "from service import logs\n"
        f"logs.configure('INFO', {format!r})\n"
        "logging.getLogger('service.ingress.poller').warning("
        "'document refused: source=%s doc_id=%s', 'feed', sys.stdin.read())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], input=HOSTILE_ID.encode(), capture_output=True, check=True
    )
    return done.stderr.decode()


def test_an_id_from_outside_stays_on_its_text_line_with_its_controls_escaped() -> None:
    (line,) = _logged("text").splitlines()
    assert line.endswith(
        f" WARNING service.ingress.poller: document refused: source=feed doc_id={ESCAPED_ID}"
    )


def test_an_id_from_outside_stays_on_its_json_line_escaped_as_in_the_text_format() -> None:
    (line,) = _logged("json").splitlines()
    assert json.loads(line)["message"] == f"document refused: source=feed doc_id={ESCAPED_ID}"
