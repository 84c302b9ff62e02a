"""The `pandasync` command as a user runs it: config problems, migrations, pushing changes."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.changes import Change, Op
from service.cli import cli
from service.clock import utcnow
from service.store import holders, outbox
from service.store.db import Database
from tests.fixtures.configs import write_config
from tests.fixtures.panda import RunningPanda

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


BACKLOG = 3000


def backlog(tmp_path: Path, panda: RunningPanda) -> Path:
    """A migrated store holding `BACKLOG` changes for PANDA, and its config."""
    config = write_config(tmp_path, panda=panda)
    assert runner.invoke(cli, ["migrate", "--config", str(config)]).exit_code == 0
    changes = [
        Change("stories", f"s{n:05}", f"s{n:05}", Op.UPSERT, (f"title {n}", str(n)))
        for n in range(BACKLOG)
    ]
    database = Database.open(f"sqlite:///{tmp_path}/store.db")
    try:
        database.run_sync(outbox.enqueue, changes, now=utcnow())
    finally:
        database.close()
    return config


def test_sync_once_into_a_log_file_says_its_progress_in_plain_lines(
    tmp_path: Path, panda: RunningPanda
) -> None:
    config = backlog(tmp_path, panda)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "sync", "--once", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (
        0,
        f"delivered {BACKLOG}, unchanged 0, dead letters 0",
    )
    lines = [line.partition(" service.cli: ")[2] for line in done.stderr.splitlines()]
    assert "sync: reading the feeds: read=0" in lines
    assert f"sync: delivering: sent={BACKLOG} of={BACKLOG}" in lines
    assert "\x1b" not in done.stderr, "no terminal codes in a log file"


def in_terminal(args: list[str], *, deadline_s: float = 60) -> bytes:
    """What `args` writes on a terminal (a pty 100 columns wide) until it exits."""
    ours, theirs = pty.openpty()
    fcntl.ioctl(theirs, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    child = subprocess.Popen(args, stdin=theirs, stdout=theirs, stderr=theirs, env=env)
    os.close(theirs)
    shown = bytearray()
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([ours], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(ours, 65536)
            except OSError:  # EIO: the child's side of the terminal is closed
                break
            if not chunk:
                break
            shown += chunk
        assert child.wait(timeout=10) == 0, shown.decode(errors="replace")
    finally:
        os.close(ours)
        if child.poll() is None:
            child.kill()
            child.wait()
    return bytes(shown)


def test_sync_once_on_a_terminal_draws_a_progress_bar_up_to_the_whole_backlog(
    tmp_path: Path, panda: RunningPanda
) -> None:
    config = backlog(tmp_path, panda)
    shown = in_terminal(
        [sys.executable, "-m", "service.cli", "sync", "--once", "--config", str(config)]
    ).decode()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)  # the terminal's colours and moves
    assert "delivering to PANDA" in shown
    assert "━" in shown
    assert f"{BACKLOG}/{BACKLOG}" in shown
    assert f"delivered {BACKLOG}, unchanged 0, dead letters 0" in shown
    assert "sync: delivering:" not in shown, "the bar instead of log lines"


def test_resync_on_a_terminal_shows_the_rows_it_reads_back_from_panda(
    tmp_path: Path, panda: RunningPanda
) -> None:
    config = backlog(tmp_path, panda)
    synced = subprocess.run(
        [sys.executable, "-m", "service.cli", "sync", "--once", "--config", str(config)],
        capture_output=True,
        check=True,
    )
    assert synced.returncode == 0
    shown = in_terminal(
        [sys.executable, "-m", "service.cli", "verify", "stories", "--config", str(config)]
    ).decode()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    assert "reading dataset stories from PANDA" in shown
    assert f"{BACKLOG}" in shown.split("reading dataset stories from PANDA")[-1]
    assert f"dataset stories: {BACKLOG} rows in PANDA, {BACKLOG} as delivered" in shown
