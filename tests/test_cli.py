"""The `pandasync` command as a user runs it: config problems, migrations, pushing changes."""

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import cli
from service.store import holders, outbox
from service.store.db import Database
from tests.fixtures.configs import write_config

runner = CliRunner()
# Commands that read the configured database_url.
COMMANDS = ["check-config", "status", "migrate"]


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    result = runner.invoke(cli, ["check-config", "--config", str(write_config(tmp_path))])
    assert (result.exit_code, "config ok: 1 source(s)" in result.stdout) == (0, True)


def test_check_config_names_each_broken_field_and_its_fix(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(
        path.read_text().replace('field = "words"', 'field = ""').replace("stories", "Bad!"),
        encoding="utf-8",
    )
    result = runner.invoke(cli, ["check-config", "--config", str(path)])
    assert result.exit_code == 1
    assert "sources[0].name: not a valid source name. Fix:" in result.stderr
    assert "sources[0].dataset.slug: PANDA cannot address this slug. Fix:" in result.stderr
    assert "sources[0].columns[1].field: not a dotted path. Fix:" in result.stderr


def test_check_config_refuses_a_database_the_store_cannot_use_and_says_which_to_use(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, url="mysql://sync:hunter2@db.example.org/sync")
    results = [runner.invoke(cli, [command, "--config", str(path)]) for command in COMMANDS]
    assert [(result.exit_code, result.stdout) for result in results] == [(1, "")] * len(COMMANDS)
    assert [" ".join(result.stderr.split()) for result in results] == [
        f"error: {path} has 1 problem(s): database_url: uses 'mysql', which pandasync does not"
        " support. Fix: use sqlite:///path/to/pandasync.db or postgresql://user@host/database"
    ] * len(COMMANDS)


def test_status_and_migrate_say_when_the_database_cannot_be_reached_without_a_traceback(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, url="postgresql://sync:hunter2@127.0.0.1:1/sync")
    results = [runner.invoke(cli, [command, "--config", str(path)]) for command in COMMANDS[1:]]
    assert [result.exit_code for result in results] == [1, 1]
    assert [" ".join(result.stderr.split()) for result in results] == [
        "error: database postgresql+psycopg://sync:***@127.0.0.1:1/sync cannot be reached"
        ' (connection failed: connection to server at "127.0.0.1", port 1 failed: Connection'
        " refused): check database_url and that the database server is running"
    ] * 2


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    env = {"PANDASYNC_CONFIG": str(write_config(tmp_path))}
    result = runner.invoke(cli, ["check-config"], env=env)
    assert result.exit_code == 0


def test_the_config_file_is_found_in_the_current_folder_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path).rename(tmp_path / "pandasync.toml")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["check-config"])
    assert (result.exit_code, "config ok: 1 source(s)" in result.stdout) == (0, True)


# What the service's commands need, and `--help` must not load.
HEAVY = ("fastapi", "starlette", "sqlalchemy", "sqlmodel", "alembic", "httpx", "uvicorn", "anyio")


def test_help_and_version_load_none_of_the_services_heavy_packages() -> None:
    probe = (
        "import sys\n"
        "from service.cli import main\n"
        "sys.argv = ['pandasync', sys.argv[1]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('loaded:', sorted(set({HEAVY!r}) & {{m.partition('.')[0] for m in sys.modules}}))\n"
    )
    for flag in ("--help", "--version"):
        done = subprocess.run(
            [sys.executable, "-c", probe, flag], capture_output=True, text=True, check=True
        )
        assert "loaded: []" in done.stdout, (flag, done.stdout)
    version = subprocess.run(
        [sys.executable, "-m", "service.cli", "--version"], capture_output=True, text=True
    )
    assert version.stdout.startswith("pandasync 0."), version.stdout


def test_commands_refuse_an_unmigrated_store_and_say_what_to_run(tmp_path: Path) -> None:
    result = runner.invoke(cli, ["status", "--config", str(write_config(tmp_path))])
    assert result.exit_code == 1
    assert "pandasync migrate" in result.stderr


def test_migrate_then_push_puts_the_mapped_change_in_the_outbox(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    assert runner.invoke(cli, ["migrate", "--config", config]).exit_code == 0
    record = '{"_id": "a/b", "title": "Flood", "words": 12}'
    result = runner.invoke(cli, ["push", "stories", record, "--config", config])
    assert (result.exit_code, "external_id a_2Fb" in result.stdout) == (0, True)
    database = Database.open(f"sqlite:///{tmp_path}/store.db")
    try:
        assert database.run_sync(outbox.pending, "stories") == 1
    finally:
        database.close()


def test_push_refuses_bad_json_without_touching_the_store(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    runner.invoke(cli, ["migrate", "--config", config])
    result = runner.invoke(cli, ["push", "stories", "{not json", "--config", config])
    assert (result.exit_code, "RECORD is not valid JSON" in result.stderr) == (1, True)
    database = Database.open(f"sqlite:///{tmp_path}/store.db")
    try:
        assert database.run_sync(outbox.pending, None) == 0
    finally:
        database.close()


def test_push_to_an_unknown_source_lists_the_known_ones(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    result = runner.invoke(cli, ["push", "nope", "{}", "--config", config])
    assert (result.exit_code, "sources: stories" in result.stderr) == (1, True)


def test_fake_panda_refuses_an_unknown_cost_and_lists_the_known_ones() -> None:
    result = runner.invoke(cli, ["fake-panda", "--cost", "panda-9"])
    assert (result.exit_code, "known: panda-1.1" in result.stderr) == (1, True)


def test_no_command_prints_the_api_key(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, key="s3cret-api-key"))
    runner.invoke(cli, ["migrate", "--config", config])
    for args in (["check-config"], ["status"], ["push", "stories", "--delete", "x"]):
        result = runner.invoke(cli, [*args, "--config", config])
        assert "s3cret-api-key" not in result.stdout + result.stderr


def test_status_shows_a_delivery_lease_a_stopped_delivery_left(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    runner.invoke(cli, ["migrate", "--config", config])
    runner.invoke(cli, ["push", "stories", '{"_id": "a", "title": "Flood"}', "--config", config])
    wide = {"COLUMNS": "200"}  # one line per source
    before = runner.invoke(cli, ["status", "--config", config], env=wide)
    database = Database.open(f"sqlite:///{tmp_path}/store.db")
    try:
        # A delivery that claimed and then died without ending its lease.
        taken = database.run_sync(
            outbox.claim_many, source="stories", now=datetime.now(UTC), lease_s=3600, limit=10
        )
    finally:
        database.close()
    after = runner.invoke(cli, ["status", "--config", config], env=wide)
    assert len(taken) == 1
    assert "free" in before.stdout
    assert f"held by {holders.me().describe()} until" in after.stdout
