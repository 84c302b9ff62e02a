"""Dead letters: list, show, replay (never over newer data) and discard; in the store and CLI."""

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from service import cli as cli_module
from service.changes import Change, Op
from service.cli import cli
from service.config import DeliverySettings
from service.delivery import panda
from service.delivery.engine import Delivery
from service.store import dead_letters, leases, outbox
from service.store.db import Database
from service.store.tables import DeadLetter
from tests.fixtures.configs import write_config
from tests.fixtures.panda import RunningPanda

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REFUSED = outbox.Answer(status=400, detail='{"data": {"external_id": ["bad"]}}')
TIMEOUT = outbox.Answer(status=None, detail="no answer from PANDA in time")
# Every source these tests queue changes for.
SOURCES = ("stories", "other")


def upsert(doc_id: str, headline: str, source: str = "stories") -> Change:
    return Change(source, doc_id, doc_id, Op.UPSERT, (headline, "1"))


def claim(database: Database, *, now: datetime = NOW, lease_s: float = 60) -> list[outbox.Claim]:
    """Claim every due entry, source by source, each under a lease ended at once (so the next
    claim may take the source again; the claims can still be settled)."""
    claims = []
    for source in SOURCES:
        taken = database.run_sync(
            outbox.claim_many, source=source, now=now, lease_s=lease_s, limit=100
        )
        if taken:
            database.run_sync(leases.end, source, taken[0].lease)
        claims += taken
    return claims


def refuse(database: Database, *changes: Change) -> list[int]:
    """Queue the changes and make each a dead letter after one timeout; returns their ids."""
    before = {letter.id for letter in database.run_sync(dead_letters.find, None)}
    database.run_sync(outbox.enqueue, changes, now=NOW)
    for held in claim(database):
        database.run_sync(outbox.retry_later, held, at=NOW, answer=TIMEOUT, now=NOW)
    for held in claim(database):
        database.run_sync(outbox.dead_letter, held, answer=REFUSED, now=NOW)
    letters = database.run_sync(dead_letters.find, None)
    return [letter.id for letter in letters if letter.id not in before]


def queued(database: Database) -> list[Change]:
    return [held.change for held in claim(database, now=NOW + timedelta(days=1), lease_s=1)]


def test_dead_letters_are_listed_oldest_first_with_pandas_last_answer(database: Database) -> None:
    refuse(database, upsert("a", "A"))
    refuse(database, upsert("b", "B", source="other"))
    letters = database.run_sync(dead_letters.find, None)
    assert [(letter.doc_id, letter.attempts, letter.last_answer) for letter in letters] == [
        ("a", 2, REFUSED),
        ("b", 2, REFUSED),
    ]
    assert [letter.doc_id for letter in database.run_sync(dead_letters.find, "other")] == ["b"]


def test_show_gives_the_change_and_every_answer(database: Database) -> None:
    (letter_id,) = refuse(database, upsert("a", "A"))
    letter = database.run_sync(dead_letters.show, letter_id)
    assert letter is not None
    assert (letter.change, letter.version, letter.answers) == (
        upsert("a", "A"),
        1,
        [(NOW, TIMEOUT), (NOW, REFUSED)],
    )


def test_show_of_an_unknown_id_gives_nothing(database: Database) -> None:
    assert database.run_sync(dead_letters.show, 404) is None


def test_a_letter_without_answers_has_no_last_answer() -> None:
    letter = dead_letters.Letter(1, "stories", "a", "upsert", upsert("a", "A"), 1, 0, NOW, [])
    assert letter.last_answer is None


def test_replaying_the_newest_change_queues_it_again_and_removes_the_letter(
    database: Database,
) -> None:
    (letter_id,) = refuse(database, upsert("a", "A"))
    done = database.run_sync(dead_letters.replay, [letter_id], now=NOW)
    assert (done.replayed, done.superseded, done.missing) == ([letter_id], [], [])
    assert (queued(database), database.run_sync(dead_letters.find, None)) == (
        [upsert("a", "A")],
        [],
    )
    assert database.run_sync(outbox.current_version, "stories", "a") == 2


def test_a_letter_superseded_by_a_queued_change_is_not_replayed(database: Database) -> None:
    (letter_id,) = refuse(database, upsert("a", "old"))
    database.run_sync(outbox.enqueue, [upsert("a", "new")], now=NOW)
    done = database.run_sync(dead_letters.replay, [letter_id], now=NOW)
    assert (done.replayed, done.superseded) == ([], [letter_id])
    assert queued(database) == [upsert("a", "new")]
    assert len(database.run_sync(dead_letters.find, None)) == 1, "kept until discarded"


def test_a_letter_superseded_by_a_delivered_change_is_not_replayed(database: Database) -> None:
    (letter_id,) = refuse(database, upsert("a", "old"))
    database.run_sync(outbox.enqueue, [upsert("a", "new")], now=NOW)
    (held,) = database.run_sync(outbox.claim_many, source="stories", now=NOW, lease_s=60, limit=10)
    database.run_sync(outbox.ack_many, [held])
    done = database.run_sync(dead_letters.replay, [letter_id], now=NOW)
    assert (done.superseded, queued(database)) == ([letter_id], [])


def test_a_letter_is_never_replayed_over_a_queued_entry_of_its_document(
    database: Database,
) -> None:
    database.run_sync(outbox.enqueue, [upsert("a", "queued")], now=NOW)

    def forge_letter(session: Session) -> int:
        # A dead letter claiming the queued change's own version: replay must still not
        # replace what the outbox holds.
        letter = DeadLetter(
            source="stories",
            doc_id="a",
            external_id="a",
            op="upsert",
            row='["forged", "1"]',
            version=1,
            attempts=1,
            answers="[]",
            created_at=NOW,
        )
        session.add(letter)
        session.flush()
        assert letter.id is not None
        return letter.id

    letter_id = database.run_sync(forge_letter)
    done = database.run_sync(dead_letters.replay, [letter_id], now=NOW)
    assert (done.superseded, queued(database)) == ([letter_id], [upsert("a", "queued")])


def test_of_two_letters_of_one_document_only_the_newest_is_replayed(database: Database) -> None:
    older, newer = refuse(database, upsert("a", "old")) + refuse(database, upsert("a", "new"))
    done = database.run_sync(dead_letters.replay, [newer, older], now=NOW)
    assert (done.replayed, done.superseded) == ([newer], [older])
    assert queued(database) == [upsert("a", "new")]


def test_replaying_a_source_replays_all_its_letters_and_no_other(database: Database) -> None:
    refuse(database, upsert("a", "A"), upsert("b", "B"), upsert("c", "C", source="other"))
    done = database.run_sync(dead_letters.replay_source, "stories", now=NOW)
    assert len(done.replayed) == 2
    assert sorted(change.doc_id for change in queued(database)) == ["a", "b"]
    assert [letter.doc_id for letter in database.run_sync(dead_letters.find, None)] == ["c"]


def test_unknown_ids_are_reported_missing(database: Database) -> None:
    assert database.run_sync(dead_letters.replay, [404], now=NOW).missing == [404]


def test_discarding_removes_the_letters_that_exist(database: Database) -> None:
    first, second = refuse(database, upsert("a", "A"), upsert("b", "B"))
    assert database.run_sync(dead_letters.discard, [second, 404]) == [second]
    assert [letter.id for letter in database.run_sync(dead_letters.find, None)] == [first]


@pytest.mark.anyio
async def test_a_replayed_change_reaches_panda_once_it_accepts_the_row(
    panda: RunningPanda, database: Database
) -> None:
    dataset = panda_dataset()
    await database.run(outbox.enqueue, [upsert("a", "A")], now=NOW)
    panda.set_faults(refuse_ids=["a"])
    async with panda_delivery(panda, database, dataset) as delivery:
        await delivery.run_once()
        (letter,) = await database.run(dead_letters.find, None)
        panda.clear_faults()
        await database.run(dead_letters.replay, [letter.id], now=NOW)
        await delivery.run_once()
    assert panda.rows("stories") == {"a": ["A", "1"]}
    assert await database.run(dead_letters.find, None) == []


def panda_dataset() -> panda.Dataset:
    return panda.Dataset(slug="stories", name="Stories", columns=("Headline", "Words"))


@asynccontextmanager
async def panda_delivery(
    server: RunningPanda, database: Database, dataset: panda.Dataset
) -> AsyncIterator[Delivery]:
    async with panda.make_http(url=server.url, timeout_s=5) as http:
        client = panda.PandaClient(http, email=server.email, api_key=server.api_key)
        yield Delivery(
            database,
            client,
            {"stories": dataset},
            DeliverySettings(),
            request_timeout_s=5,
            clock=lambda: NOW,
        )


runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path, migrated_sqlite_url: str) -> Path:
    return write_config(tmp_path, url=migrated_sqlite_url)


@pytest.fixture
def sqlite_database(migrated_sqlite_url: str) -> Iterator[Database]:
    database = Database.open(migrated_sqlite_url)
    yield database
    database.close()


def invoke(config: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli, ["dead-letters", *args, "--config", str(config)])
    return result.exit_code, result.stdout, result.stderr


def test_the_cli_lists_dead_letters_with_pandas_answer(
    config: Path, sqlite_database: Database
) -> None:
    refuse(sqlite_database, upsert("a[b]", "A"))
    code, listed, _ = invoke(config, "list", "--source", "stories")
    assert code == 0
    assert "a[b]" in listed, "markup-like ids are shown as they are"
    assert "400" in listed


def test_the_cli_lists_one_line_a_dead_letter_within_80_columns(
    config: Path, sqlite_database: Database
) -> None:
    refuse(sqlite_database, upsert("a-very-long-document-id-" * 3, "A"))
    refuse(sqlite_database, upsert("short", "B"))
    result = runner.invoke(
        cli, ["dead-letters", "list", "--config", str(config)], env={"COLUMNS": "80"}
    )
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    rows = [line for line in lines if "upsert" in line]
    assert len(rows) == 2, result.stdout
    assert [row.split()[0] for row in rows] == ["1", "2"], "each line starts with its id"
    assert all("400: " in row for row in rows), result.stdout


def test_the_cli_lists_every_dead_letter_a_page_at_a_time(
    config: Path, sqlite_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_module, "DEAD_LETTERS_PAGE", 2)
    for number in range(5):
        refuse(sqlite_database, upsert(f"doc{number}", "A"))
    code, listed, _ = invoke(config, "list")
    lines = listed.splitlines()
    assert (code, lines[0].split()[:2]) == (0, ["id", "source"])
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3", "4", "5"]


def test_the_cli_shows_the_change_and_every_answer(config: Path, sqlite_database: Database) -> None:
    (letter_id,) = refuse(sqlite_database, upsert("a", "Flood"))
    code, shown, _ = invoke(config, "show", str(letter_id))
    assert code == 0
    assert '["Flood", "1"]' in shown
    assert "no answer from PANDA in time" in shown
    assert "external_id" in shown


def test_the_cli_says_when_a_dead_letter_does_not_exist(config: Path) -> None:
    code, _, error = invoke(config, "show", "404")
    assert (code, "no dead letter 404" in error) == (1, True)


def test_the_cli_replays_by_id_and_names_the_superseded(
    config: Path, sqlite_database: Database
) -> None:
    first, second = refuse(sqlite_database, upsert("a", "A"), upsert("b", "B"))
    sqlite_database.run_sync(outbox.enqueue, [upsert("b", "newer")], now=NOW)
    code, said, _ = invoke(config, "replay", str(first), str(second))
    assert code == 0
    assert f"replayed 1: {first}" in said
    assert f"superseded by a newer change, not replayed: {second}" in said


def test_the_cli_says_when_nothing_was_replayed(config: Path, sqlite_database: Database) -> None:
    (letter_id,) = refuse(sqlite_database, upsert("a", "A"))
    sqlite_database.run_sync(outbox.enqueue, [upsert("a", "newer")], now=NOW)
    code, said, _ = invoke(config, "replay", str(letter_id))
    assert (code, "replayed 0: none" in said) == (0, True)


def test_the_cli_replays_every_dead_letter_of_a_source(
    config: Path, sqlite_database: Database
) -> None:
    refuse(sqlite_database, upsert("a", "A"), upsert("b", "B"))
    code, said, _ = invoke(config, "replay", "--source", "stories", "--all")
    assert (code, "replayed 2" in said) == (0, True)


def test_the_cli_replays_every_dead_letter_of_a_source_a_page_at_a_time(
    config: Path, sqlite_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_module, "DEAD_LETTERS_PAGE", 2)
    letters = refuse(sqlite_database, *(upsert(f"doc{number}", "A") for number in range(5)))
    # The second stays (a newer change of its document is queued): the pages go past it.
    sqlite_database.run_sync(outbox.enqueue, [upsert("doc1", "newer")], now=NOW)
    code, said, _ = invoke(config, "replay", "--source", "stories", "--all")
    replayed = [letters[0], *letters[2:]]
    assert code == 0
    assert f"replayed 4: {', '.join(map(str, replayed))}" in said
    assert f"superseded by a newer change, not replayed: {letters[1]}" in said
    assert [letter.id for letter in sqlite_database.run_sync(dead_letters.find, None)] == [
        letters[1]
    ]


def test_a_replay_of_a_source_that_stops_midway_keeps_the_pages_it_replayed(
    config: Path, sqlite_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_module, "DEAD_LETTERS_PAGE", 2)
    letters = refuse(sqlite_database, *(upsert(f"doc{number}", "A") for number in range(5)))
    pages = 0
    replay_source = dead_letters.replay_source

    def stopping_after_one_page(*args: Any, **kwargs: Any) -> dead_letters.Replay:
        nonlocal pages
        pages += 1
        if pages > 1:
            raise OSError("the store went away")
        return replay_source(*args, **kwargs)

    monkeypatch.setattr(dead_letters, "replay_source", stopping_after_one_page)
    code, _, _ = invoke(config, "replay", "--source", "stories", "--all")
    assert code != 0
    left = [letter.id for letter in sqlite_database.run_sync(dead_letters.find, None)]
    assert left == letters[2:]
    assert sqlite_database.run_sync(outbox.pending, "stories") == 2


@pytest.mark.parametrize(
    "args",
    [["replay"], ["replay", "1", "--source", "stories", "--all"], ["replay", "--all"]],
)
def test_the_cli_wants_ids_or_a_source_and_all(config: Path, args: list[str]) -> None:
    code, _, error = invoke(config, *args)
    assert (code, "give dead letter ids, or --source SOURCE --all" in error) == (1, True)


def test_the_cli_fails_on_unknown_ids_after_replaying_the_others(
    config: Path, sqlite_database: Database
) -> None:
    (letter_id,) = refuse(sqlite_database, upsert("a", "A"))
    code, said, error = invoke(config, "replay", str(letter_id), "404")
    assert (code, f"replayed 1: {letter_id}" in said, "no dead letter 404" in error) == (
        1,
        True,
        True,
    )


def test_the_cli_discards_dead_letters(config: Path, sqlite_database: Database) -> None:
    first, second = refuse(sqlite_database, upsert("a", "A"), upsert("b", "B"))
    code, said, _ = invoke(config, "discard", str(first))
    assert (code, said.strip()) == (0, f"discarded 1: {first}")
    code, _, error = invoke(config, "discard", str(first))
    assert (code, f"no dead letter {first}" in error) == (1, True)
    assert [letter.id for letter in sqlite_database.run_sync(dead_letters.find, None)] == [second]
