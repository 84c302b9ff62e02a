"""The `pandasync` command: check the config, migrate, serve, push, sync, status, confirm-deletes,
fake-panda.

Each command loads settings, builds what it needs through `service.app`, and reports errors
as one clear message with a non-zero exit code. No logic lives here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Concatenate,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
)

import typer
from rich.console import Console
from rich.markup import escape

# The service's parts are imported by the commands that use them, so that `pandasync --help`
# and a mistyped command answer at once (tests/test_cli.py checks what `--help` loads).
if TYPE_CHECKING:
    from rich.progress import Progress
    from sqlmodel import Session

    from service.changes import Change
    from service.config import Settings, SourceSettings
    from service.delivery import reconcile
    from service.delivery.engine import DeliveryStatus
    from service.ingress.snapshots import SnapshotStatus
    from service.store import db, dead_letters, outbox

P = ParamSpec("P")
T = TypeVar("T")

# Plain help (click's): typer's rich panels show a `<bool>` placeholder on every flag.
cli = typer.Typer(
    help="Replicate changes from CouchDB feeds and webhooks into PANDA.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
err = Console(stderr=True)
out = Console()
# Named, not `__name__`: that is `__main__` under `python -m service.cli`.
log = logging.getLogger("service.cli")
# `sync --once` on a stderr that is no terminal: a progress line per this many seconds.
PLAIN_PROGRESS_S = 5.0


def _show_version(shown: bool) -> None:
    if shown:
        out.print(f"pandasync {version('pandasync')}", highlight=False)
        raise typer.Exit


@cli.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", help="Show the version and exit.", callback=_show_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Replicate changes from CouchDB feeds and webhooks into PANDA."""


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (default: $PANDASYNC_CONFIG, else ./pandasync.toml).",
        dir_okay=False,
    ),
]

ConfirmOption = Annotated[
    bool,
    typer.Option(
        "--confirm", help="Delete even when that is more than max_delete_fraction of the rows."
    ),
]


def _fail(message: str) -> NoReturn:
    # Not wrapped at the console's width: a path or URL in it stays whole, to copy.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _settings(config: Path | None) -> Settings:
    from service.config import ConfigError, config_path, load_settings

    try:
        return load_settings(config_path(config))
    except ConfigError as error:
        _fail(str(error))


def _open(settings: Settings) -> db.Database:
    from service.store import db

    database = db.Database.open(settings.database_url)
    try:
        database.check_schema()
    except (db.SchemaError, db.UnreachableError) as error:
        database.close()
        _fail(str(error))
    return database


def _in_store(
    settings: Settings,
    fn: Callable[Concatenate[Session, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run one store function in its own transaction on a checked store, then close it."""
    database = _open(settings)
    try:
        return database.run_sync(fn, *args, **kwargs)
    finally:
        database.close()


def _source(settings: Settings, name: str) -> SourceSettings:
    for source in settings.sources:
        if source.name == name:
            return source
    known = ", ".join(source.name for source in settings.sources) or "none configured"
    _fail(f"no source named {name!r} (sources: {known})")


@cli.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Check the config.

    Prints every problem with its place and its fix.
    """
    settings = _settings(config)
    out.print(f"config ok: {len(settings.sources)} source(s), PANDA at {settings.panda.url}")


@cli.command()
def migrate(config: ConfigOption = None) -> None:
    """Create or upgrade the store's schema.

    Run it before `serve`, and after each upgrade of pandasync.
    """
    from service.store import db

    settings = _settings(config)
    try:
        db.migrate(settings.database_url)
    except db.UnreachableError as error:
        _fail(str(error))
    out.print("database migrated")


@cli.command()
def serve(
    config: ConfigOption = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the service until SIGTERM or Ctrl-C.

    Webhooks in, CouchDB feeds followed, delivery to PANDA, /status and /readyz.
    """
    import uvicorn

    from service import allocator, logs
    from service import app as wiring
    from service.ingress.connections import guarded_protocol

    # Before any thread starts (the store's worker threads, uvicorn's).
    allocator.share_arenas()
    settings = _settings(config)
    logs.configure(log_level, settings.logging.format)
    _open(settings).close()
    uvicorn.run(
        wiring.create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        http=guarded_protocol(
            max_connections=settings.server.max_connections,
            header_timeout_s=settings.server.header_timeout_s,
            body_timeout_s=settings.server.body_timeout_s,
        ),
        log_level=log_level.lower(),
        # uvicorn's own lines go through the same handler (and format) as pandasync's.
        log_config=None,
        timeout_graceful_shutdown=math.ceil(settings.delivery.shutdown_grace_s),
    )


@cli.command()
def push(
    source: Annotated[str, typer.Argument(help="The configured source the change belongs to.")],
    record: Annotated[
        str | None, typer.Argument(help="The source record as JSON (an upsert).")
    ] = None,
    delete: Annotated[str | None, typer.Option(help="Delete the row of this source id.")] = None,
    config: ConfigOption = None,
) -> None:
    """Queue one change by hand.

    The record is mapped like the source's own changes.
    """
    from service.clock import utcnow
    from service.sources import mapping
    from service.store import outbox

    settings = _settings(config)
    spec = _source(settings, source)
    if (record is None) == (delete is None):
        _fail("give either a RECORD (JSON) to upsert or --delete ID")
    try:
        change = mapping.delete(spec, delete) if delete is not None else _upsert(spec, record)
    except (mapping.MappingError, ValueError) as error:
        _fail(str(error))
    _in_store(settings, outbox.enqueue, [change], now=utcnow())
    out.print(f"queued {change.op} of {change.doc_id!r} as external_id {change.external_id}")


def _upsert(spec: SourceSettings, record: str | None) -> Change:
    from service.sources import mapping

    try:
        document = json.loads(record or "")
    except json.JSONDecodeError as error:
        raise ValueError(f"RECORD is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError("RECORD must be a JSON object")
    return mapping.upsert(spec, document)


@cli.command()
def sync(
    once: Annotated[bool, typer.Option("--once", help="Deliver what is due, then exit.")] = False,
    config: ConfigOption = None,
) -> None:
    """Read the feeds and deliver once, then exit.

    Reads CouchDB feeds up to now and delivers the outbox to PANDA (`--once`).
    """
    import anyio

    from service import logs

    if not once:
        _fail("only `pandasync sync --once` exists; use `pandasync serve` to run continuously")
    settings = _settings(config)
    logs.configure("INFO", settings.logging.format)
    database = _open(settings)
    try:
        status, unread = anyio.run(_drain, settings, database)
    finally:
        database.close()
    out.print(
        f"delivered {status.delivered}, unchanged {status.unchanged},"
        f" dead letters {status.dead_lettered}"
    )
    if status.paused or status.stopped_sources:
        _fail(status.paused or "; ".join(status.stopped_sources.values()))
    if unread:
        _fail("; ".join(unread) + " (what the other sources read was delivered)")


async def _drain(settings: Settings, database: db.Database) -> tuple[DeliveryStatus, list[str]]:
    """Read each CouchDB feed up to now, then deliver the outbox; returns delivery's status
    and why each feed that could not be read was not (the others are delivered all the same).
    """
    import anyio
    import httpx

    from service import app as wiring
    from service.delivery import panda
    from service.sources import couchdb
    from service.store import outbox

    unread: list[str] = []
    http = panda.make_http(
        url=str(settings.panda.url),
        timeout_s=settings.panda.timeout_s,
        max_connections=settings.panda.max_connections,
    )
    async with http, httpx.AsyncClient() as couchdb_http:
        service = wiring.build(settings, database, http, couchdb_http)
        pending: int | None = None
        with _shown() as show:

            def refresh(*, final: bool = False) -> None:
                read = sum(poller.status().changes_seen for poller in service.pollers.values())
                sent = service.delivery.status()
                show(
                    read, sent.delivered + sent.unchanged + sent.dead_lettered, pending, final=final
                )

            async with anyio.create_task_group() as group:
                group.start_soon(_every, 0.2, refresh)
                for poller in service.pollers.values():
                    try:
                        await poller.run_once()
                    except couchdb.FeedBrokenError as error:
                        unread.append(str(error))
                for snapshotter in service.snapshotters.values():
                    _snapshot_report(snapshotter.name, await snapshotter.run_once())
                refresh(final=True)
                pending = await database.run(outbox.pending, None)
                await service.delivery.run_once()
                refresh(final=True)
                group.cancel_scope.cancel()
        return service.delivery.status(), unread


class _Show(Protocol):
    def __call__(self, read: int, sent: int, pending: int | None, *, final: bool) -> None: ...


@contextmanager
def _shown() -> Iterator[_Show]:
    """How `sync --once` shows its progress (rows read from the feeds, then changes delivered
    of those pending): a bar on stderr when it is a terminal, gone when done; otherwise (a
    cron job, CI) a plain log line every `PLAIN_PROGRESS_S` and at the end of each phase."""
    if err.is_terminal:
        with _progress() as progress:
            reading = progress.add_task("reading CouchDB feeds", total=None)
            sending = progress.add_task("delivering to PANDA", total=None)

            def bar(read: int, sent: int, pending: int | None, *, final: bool) -> None:
                progress.update(reading, completed=read)
                progress.update(sending, completed=sent, total=pending)

            yield bar
        return
    said = -math.inf

    def line(read: int, sent: int, pending: int | None, *, final: bool) -> None:
        nonlocal said
        if not final and time.monotonic() - said < PLAIN_PROGRESS_S:
            return
        said = time.monotonic()
        if pending is None:
            log.info("sync: reading the feeds: read=%d", read)
        else:
            log.info("sync: delivering: sent=%d of=%d", sent, pending)

    yield line


def _snapshot_report(name: str, status: SnapshotStatus) -> None:
    """One line on what a snapshot did (on stderr: stdout says what was delivered)."""
    err.print(f"source {name}: {escape(_snapshot_text(status))}", highlight=False)


def _snapshot_text(status: SnapshotStatus | dict[str, Any]) -> str:
    """A snapshot source's state in a few words: the last snapshot's counts, or why it was
    held or failed."""
    shown = status if isinstance(status, dict) else asdict(status)
    state = str(shown.get("state"))
    if state in ("held", "failed"):
        return f"snapshot {state}, nothing changed: {shown.get('reason')}"
    last = shown.get("last")
    if not isinstance(last, dict):
        return f"snapshot {state}"
    counts = ", ".join(
        f"{last.get(key, 0)} {key.replace('_', ' ')}"
        for key in ("rows_read", "new", "changed", "deleted", "unchanged")
    )
    return f"snapshot {state}: {counts}"


def _progress() -> Progress:
    """A progress bar on stderr while `sync --once` works; gone when it ends."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


async def _every(interval_s: float, action: Callable[[], None]) -> None:
    """`action()` every `interval_s` until cancelled (a display's refresh)."""
    import anyio

    while True:
        action()
        await anyio.sleep(interval_s)


@cli.command("reset-checkpoint")
def reset_checkpoint(
    source: Annotated[str, typer.Argument(help="The CouchDB source to read again from its start.")],
    config: ConfigOption = None,
) -> None:
    """Forget a source's checkpoint.

    Its feed is read again from `since` (a repeat is harmless).

    For a database that was recreated or restored, when CouchDB refuses the stored checkpoint.
    """
    from service.store import checkpoints

    settings = _settings(config)
    _source(settings, source)
    old = _in_store(settings, checkpoints.reset, source)
    was = "no checkpoint" if old is None else f"checkpoint {old.json_text}"
    out.print(f"source {source}: {was} removed; restart pandasync to read the feed again")


@cli.command("confirm-deletes")
def confirm_deletes(
    source: Annotated[str, typer.Argument(help="The snapshot source whose snapshot is held.")],
    config: ConfigOption = None,
) -> None:
    """Apply a held snapshot, deletes included.

    A snapshot that is empty or would delete more than max_delete_fraction of the rows
    changes nothing until confirmed; this applies it as it was read.
    """
    import anyio

    from service.ingress.snapshots import Snapshotter
    from service.store import snapshots

    settings = _settings(config)
    spec = _source(settings, source)
    if spec.kind != "snapshot":
        _fail(f"source {source!r} is a {spec.kind} source: only snapshot sources are held")
    database = _open(settings)
    try:
        confirmed = database.run_sync(snapshots.confirm, source)
        if confirmed is None:
            latest = database.run_sync(snapshots.latest, source)
            phase = "no snapshot yet" if latest is None else f"its last snapshot is {latest.phase}"
            _fail(f"source {source!r} holds no snapshot waiting for confirmation ({phase})")
        status = anyio.run(Snapshotter(spec, database).run_once)
    finally:
        database.close()
    out.print(f"source {source}: {escape(_snapshot_text(status))}", highlight=False)


@cli.command()
def verify(
    source: Annotated[str, typer.Argument(help="The source whose dataset to check.")],
    repair: Annotated[
        bool, typer.Option("--repair", help="Queue the fixes (see `resync`).")
    ] = False,
    confirm: ConfirmOption = False,
    config: ConfigOption = None,
) -> None:
    """Compare the PANDA dataset with what pandasync delivered to it.

    Reports rows missing from PANDA, changed there by hand, unknown to the source (added by
    hand, or of a document the source deleted) and waiting for delivery; writes nothing.
    With --repair, does what `resync --delete-orphans` does.
    """
    _reconcile(config, source, write=repair, delete_unknown=repair, confirm=confirm)


@cli.command()
def resync(
    source: Annotated[str, typer.Argument(help="The source to read again from its start.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be done; change nothing.")
    ] = False,
    delete_orphans: Annotated[
        bool,
        typer.Option(
            "--delete-orphans", help="Delete the dataset's rows the source does not have."
        ),
    ] = False,
    confirm: ConfirmOption = False,
    config: ConfigOption = None,
) -> None:
    """Make the PANDA dataset equal to the source again.

    Compares the dataset with what pandasync delivered (reading it page by page), forgets
    what differs and reads the source again from its start (a CouchDB feed from 0), so
    every row missing or changed in PANDA is sent again and the others cost nothing. With
    --delete-orphans, rows the source does not have are deleted, unless they are more than
    max_delete_fraction of the dataset (then --confirm is needed).
    """
    _reconcile(config, source, write=not dry_run, delete_unknown=delete_orphans, confirm=confirm)


def _reconcile(
    config: Path | None, name: str, *, write: bool, delete_unknown: bool, confirm: bool
) -> None:
    import anyio

    from service import logs
    from service.changes import Seq
    from service.clock import utcnow
    from service.delivery import panda, reconcile
    from service.store import checkpoints

    settings = _settings(config)
    logs.configure("WARNING", settings.logging.format)
    spec = _source(settings, name)
    database = _open(settings)

    async def resynced() -> reconcile.Resync:
        http = panda.make_http(url=str(settings.panda.url), timeout_s=settings.panda.timeout_s)
        async with http, _reading_bar(spec.dataset.slug) as progress:
            client = panda.PandaClient(
                http,
                email=settings.panda.email,
                api_key=settings.panda.api_key.get_secret_value(),
            )
            return await reconcile.resync(
                database,
                client,
                name,
                spec.dataset.slug,
                dry_run=not write,
                delete_unknown=delete_unknown,
                confirm=confirm,
                now=utcnow(),
                progress=progress,
            )

    try:
        try:
            done = anyio.run(resynced)
        except (panda.RetryableError, panda.TargetError) as error:
            _fail(f"could not read dataset {spec.dataset.slug} from PANDA: {error}")
        except reconcile.TooManyDeletesError as error:
            _fail(f"{error} with --confirm")
        _print_comparison(done.comparison)
        if not done.written:
            deletes = done.comparison.unknown.count if delete_unknown else 0
            out.print(
                f"would send again {done.to_send} rows and delete {deletes}; nothing was changed"
            )
            return
        if spec.kind == "couchdb":
            database.run_sync(checkpoints.save, name, Seq.of("0"))
            reread = "its feed is read again from 0: restart pandasync (or POST"
            reread += f" /admin/sources/{name}/resync to a running one instead)"
        elif spec.kind == "snapshot":
            reread = "its next snapshot sends them (`pandasync sync --once`, or POST"
            reread += f" /admin/sources/{name}/snapshot to a running pandasync)"
        else:
            reread = "the rows missing or changed are sent again when the source sends them"
        out.print(
            f"source {name}: {done.to_send} rows to send again,"
            f" {done.deletes_queued} deletes queued; {reread}"
        )
    finally:
        database.close()


@asynccontextmanager
async def _reading_bar(slug: str) -> AsyncIterator[Callable[[int], None] | None]:
    """A bar of the rows read back from PANDA, on stderr when it is a terminal."""
    if not err.is_terminal:
        yield None
        return
    with _progress() as bar:
        task = bar.add_task(f"reading dataset {slug} from PANDA", total=None)
        yield lambda rows: bar.update(task, completed=rows)


def _print_comparison(comparison: reconcile.Comparison) -> None:
    out.print(
        f"dataset {comparison.slug}: {comparison.panda_rows} rows in PANDA,"
        f" {comparison.in_step} as delivered"
    )
    for kind_name, kind in comparison.kinds():
        more = f" (e.g. {escape(', '.join(kind.examples))})" if kind.count else ""
        out.print(f"  {kind.count} {kind_name}{more}")


@cli.command()
def status(config: ConfigOption = None) -> None:
    """Show each source's state and progress.

    Its state in the running service, checkpoint, pending outbox entries, dead letters and
    delivery lease.
    """
    from rich.table import Table

    from service.clock import utcnow
    from service.store import checkpoints, dead_letters, leases, outbox

    settings = _settings(config)
    database = _open(settings)
    states = _states(settings)
    table = Table(
        "source", "dataset", "state", "checkpoint", "pending", "dead letters", "delivery lease"
    )
    try:
        for source in settings.sources:
            seq = database.run_sync(checkpoints.load, source.name)
            until, holder = database.run_sync(leases.held_by, source.name, utcnow())
            table.add_row(
                source.name,
                source.dataset.slug,
                escape(states.get(source.name, "-")),
                "-" if seq is None else seq.json_text,
                str(database.run_sync(outbox.pending, source.name)),
                str(database.run_sync(dead_letters.count, source.name)),
                _lease_text(until, holder),
            )
    finally:
        database.close()
    out.print(table)


def _lease_text(until: datetime | None, holder: str | None) -> str:
    if until is None:
        return "free"
    by = "" if holder is None else f" by {escape(holder)}"
    return f"held{by} until {until:%Y-%m-%d %H:%M:%S} UTC"


def _states(settings: Settings) -> dict[str, str]:
    """Each CouchDB source's state as the running service shows it in `/status` (by name);
    "not running" for all when no service answers at the configured address."""
    import httpx

    host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host
    token = settings.server.admin_token
    headers = {} if token is None else {"authorization": f"Bearer {token.get_secret_value()}"}
    try:
        url = f"http://{host}:{settings.server.port}/status"
        answer = httpx.get(url, headers=headers, timeout=2).json()
        sources = answer["sources"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return {source.name: "not running" for source in settings.sources}
    return {
        name: _state_text(report.get("feed"), report.get("snapshot"))
        for name, report in sources.items()
    }


def _state_text(feed: object, snapshot: object = None) -> str:
    """A source's `/status` feed (or snapshot) state in a few words (webhook sources have
    neither)."""
    if isinstance(snapshot, dict):
        return _snapshot_text(snapshot)
    if not isinstance(feed, dict):
        return "accepting webhooks"
    state = str(feed.get("state"))
    if state == "retrying":
        return (
            f"retrying since {feed.get('retrying_since')}, {feed.get('attempts')} attempts,"
            f" next at {feed.get('next_attempt_at')}: {feed.get('last_error')}"
        )
    if state == "stopped" and feed.get("reason"):
        return f"stopped: {feed.get('reason')}"
    if state == "catching_up" and feed.get("couchdb_pending") is not None:
        return f"catching up, {feed.get('couchdb_pending')} changes pending in CouchDB"
    return state.replace("_", " ")


@cli.command("fake-panda")
def fake_panda(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8001,
    email: Annotated[str, typer.Option(help="The accepted PANDA user.")] = "panda@example.com",
    api_key: Annotated[
        str, typer.Option(help="The accepted api key.", envvar="FAKE_PANDA_API_KEY")
    ] = "pandasync-demo-key",
    accept_any_key: Annotated[
        bool, typer.Option(help="Real PANDA's quirk: accept any non-empty api key.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for injected random failures.")] = 0,
    cost: Annotated[
        str | None,
        typer.Option(help="Take as long as a real PANDA, one request at a time: panda-1.1."),
    ] = None,
) -> None:
    """Run a PANDA-compatible server to try against.

    Rows are kept in memory; `--cost panda-1.1` makes it as slow as PANDA 1.1.
    """
    from service.sandbox.fake_panda import PROFILES, FakePandaOptions, serve

    if cost is not None and cost not in PROFILES:
        _fail(f"unknown cost {cost!r}; known: {', '.join(PROFILES)}")
    log.info("fake PANDA listening: host=%s port=%d", host, port)
    options = FakePandaOptions(
        email=email,
        api_key=api_key,
        accept_any_key=accept_any_key,
        seed=seed,
        cost=None if cost is None else PROFILES[cost],
    )
    serve(options, host=host, port=port)


@cli.command()
def demo() -> None:
    """Run the demo end to end.

    In a scratch folder: changes from CouchDB and a webhook arriving in PANDA.
    """
    from service.sandbox import demo as scenario

    try:
        scenario.main()
    except (TimeoutError, RuntimeError) as error:
        _fail(f"the demo stopped: {error}")


dead_letters_cli = typer.Typer(
    help="Changes PANDA refused, and documents not mapped.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
cli.add_typer(dead_letters_cli, name="dead-letters")

LetterIds = Annotated[list[int] | None, typer.Argument(help="Dead letter ids (see `list`).")]


def _cut(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


def _plain_answer(answer: outbox.Answer | None) -> str:
    if answer is None:
        return "-"
    status = "no answer" if answer.status is None else str(answer.status)
    return f"{status}: {answer.detail}"


def _answer_text(answer: outbox.Answer | None) -> str:
    if answer is None:
        return "-"
    status = "no answer" if answer.status is None else str(answer.status)
    return escape(f"{status}: {answer.detail}")


@dead_letters_cli.command("list")
def list_dead_letters(
    source: Annotated[str | None, typer.Option(help="Only this source's dead letters.")] = None,
    config: ConfigOption = None,
) -> None:
    """List the dead letters, oldest first.

    Each with PANDA's last answer to it (or why its document could not be mapped).
    """
    from service.store import dead_letters

    settings = _settings(config)
    if source is not None:
        _source(settings, source)
    header = ("id", "source", "doc id", "op", "tries", "since UTC", "last answer")
    widths: list[int] | None = None
    database = _open(settings)
    try:
        # A page at a time, so that memory does not grow with the dead letters; the columns
        # are as wide as the first page needs.
        after: int | None = None
        while page := database.run_sync(
            dead_letters.find, source, limit=DEAD_LETTERS_PAGE, after=after
        ):
            rows = [_letter_row(letter) for letter in page]
            if widths is None:
                widths = _widths([header, *rows])
                rows.insert(0, header)
            for row in rows:
                cells = [
                    _cut(value, width).ljust(width)
                    for value, width in zip(row, widths, strict=True)
                ]
                out.print(escape(_cut("  ".join(cells).rstrip(), out.width)), highlight=False)
            after = page[-1].id
    finally:
        database.close()
    if widths is None:
        out.print("  ".join(header), highlight=False)


# Dead letters `dead-letters list` reads from the store at a time.
DEAD_LETTERS_PAGE = 1000
# How wide each column of `dead-letters list` may grow (the last answer: the rest of the line).
_LETTER_CAPS = (8, 12, 24, 8, 5, 11, None)


def _letter_row(letter: dead_letters.Letter) -> tuple[str, ...]:
    """One line of `dead-letters list`, cut to the terminal's width when printed (`show`
    gives a letter whole)."""
    return (
        str(letter.id),
        letter.source,
        letter.doc_id,
        letter.op,
        str(letter.attempts),
        f"{letter.created_at:%m-%d %H:%M}",
        _plain_answer(letter.last_answer),
    )


def _widths(rows: list[tuple[str, ...]]) -> list[int]:
    return [
        min(cap or 10**6, max(len(row[index]) for row in rows))
        for index, cap in enumerate(_LETTER_CAPS)
    ]


@dead_letters_cli.command("show")
def show_dead_letter(
    letter_id: Annotated[int, typer.Argument(help="The dead letter's id (see `list`).")],
    config: ConfigOption = None,
) -> None:
    """Show one dead letter.

    The change, and every answer PANDA gave to it.
    """
    from rich.table import Table

    from service.store import dead_letters

    settings = _settings(config)
    letter = _in_store(settings, dead_letters.show, letter_id)
    if letter is None:
        _fail(f"no dead letter {letter_id} (see `pandasync dead-letters list`)")
    change = letter.change
    row = (
        "-"
        if change is None or change.row is None
        else json.dumps(list(change.row), ensure_ascii=False)
    )
    out.print(f"dead letter {letter.id}", highlight=False)
    for name, value in (
        ("source", letter.source),
        ("doc id", letter.doc_id),
        ("external id", "-" if change is None else change.external_id),
        ("op", letter.op),
        ("row", row),
        ("version", str(letter.version)),
        ("attempts", str(letter.attempts)),
        ("since", letter.created_at.isoformat(timespec="seconds")),
    ):
        out.print(f"  {name}: {escape(value)}", highlight=False)
    answers = Table("at", "status", "PANDA's answer")
    for at, answer in letter.answers:
        status = "-" if answer.status is None else str(answer.status)
        answers.add_row(at.isoformat(timespec="seconds"), status, escape(answer.detail))
    out.print(answers)


@dead_letters_cli.command("replay")
def replay_dead_letters(
    letter_ids: LetterIds = None,
    source: Annotated[str | None, typer.Option(help="With --all: this source's.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every dead letter of --source.")] = False,
    config: ConfigOption = None,
) -> None:
    """Send dead letters again: give ids, or --source S --all.

    A dead letter goes back into the outbox only while it is its document's newest change;
    one superseded by a newer change is left alone (discard it). A document that could not
    become a row is read again from CouchDB and mapped with the config as it is now.
    """
    import anyio

    from service.clock import utcnow
    from service.sources import couchdb
    from service.store import dead_letters

    by_ids = bool(letter_ids) and source is None and not every
    by_source = not letter_ids and source is not None and every
    if not (by_ids or by_source):
        _fail("give dead letter ids, or --source SOURCE --all")
    settings = _settings(config)
    database = _open(settings)
    try:
        if source is not None:
            _source(settings, source)
            done = _replay_source(database, source)
        else:
            done = database.run_sync(dead_letters.replay, letter_ids or [], now=utcnow())
        if done.unmapped:
            done = _merged(done, anyio.run(_replay_unmapped, settings, database, done.unmapped))
    except (couchdb.FeedBrokenError, couchdb.SourceStoppedError) as error:
        _fail(f"could not read the unmapped documents again from CouchDB: {error}")
    finally:
        database.close()
    out.print(f"replayed {len(done.replayed)}: {_ids(done.replayed)}", highlight=False)
    for letter_id, reason in done.still_unmapped.items():
        out.print(
            f"dead letter {letter_id} still cannot become a row, kept: {escape(reason)}"
            " (correct the source's settings or the document, then replay it again)",
            highlight=False,
        )
    if done.superseded:
        out.print(
            f"superseded by a newer change, not replayed: {_ids(done.superseded)}"
            " (discard them with `pandasync dead-letters discard`)",
            highlight=False,
        )
    if done.missing:
        _fail(f"no dead letter {_ids(done.missing)}")


@dead_letters_cli.command("discard")
def discard_dead_letters(
    letter_ids: Annotated[list[int], typer.Argument(help="Dead letter ids (see `list`).")],
    config: ConfigOption = None,
) -> None:
    """Delete dead letters for good; their changes are not sent."""
    from service.store import dead_letters

    settings = _settings(config)
    discarded = _in_store(settings, dead_letters.discard, letter_ids)
    out.print(f"discarded {len(discarded)}: {_ids(discarded)}", highlight=False)
    missing = sorted(set(letter_ids) - set(discarded))
    if missing:
        _fail(f"no dead letter {_ids(missing)}")


def _replay_source(database: db.Database, source: str) -> dead_letters.Replay:
    """Every dead letter of `source` replayed, `DEAD_LETTERS_PAGE` to a transaction: the
    store's write lock is never held for all of them, and what was replayed stays replayed
    if the command stops."""
    from service.clock import utcnow
    from service.store import dead_letters

    done = dead_letters.Replay()
    after: int | None = None
    while True:
        page = database.run_sync(
            dead_letters.replay_source,
            source,
            now=utcnow(),
            after=after,
            limit=DEAD_LETTERS_PAGE,
        )
        handled = page.replayed + page.superseded + page.unmapped
        if not handled:
            return done
        done.replayed.extend(page.replayed)
        done.superseded.extend(page.superseded)
        done.unmapped.extend(page.unmapped)
        after = max(handled)


async def _replay_unmapped(
    settings: Settings, database: db.Database, letter_ids: list[int]
) -> dead_letters.Replay:
    import httpx

    from service.clock import utcnow
    from service.ingress import poller

    sources = {source.name: source for source in settings.sources}
    async with httpx.AsyncClient() as http:
        return await poller.replay_unmapped(database, http, sources, letter_ids, now=utcnow())


def _merged(done: dead_letters.Replay, unmapped: dead_letters.Replay) -> dead_letters.Replay:
    """The replay of the store's dead letters with that of the unmapped documents."""
    from service.store import dead_letters

    return dead_letters.Replay(
        replayed=sorted(done.replayed + unmapped.replayed),
        superseded=done.superseded,
        missing=sorted(done.missing + unmapped.missing),
        still_unmapped=unmapped.still_unmapped,
    )


def _ids(letter_ids: list[int]) -> str:
    return ", ".join(str(letter_id) for letter_id in letter_ids) or "none"


def main() -> None:
    """Entry point of the `pandasync` script."""
    cli()


if __name__ == "__main__":
    main()
