"""The poller: reads a CouchDB source's changes and commits them with their checkpoint.

Each page's changes go into the outbox in the same transaction as the seq after them, so a
crash never skips a change and a repeat is harmless. Knows nothing of FastAPI or PANDA.
"""

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import anyio
import httpx
from sqlmodel import Session

from service import backoff
from service.changes import Seq
from service.clock import Clock, utcnow
from service.config import Settings, SourceSettings
from service.ingress.shares import FeedShares
from service.metrics import Metrics
from service.sources import couchdb
from service.store import checkpoints, dead_letters, follows, outbox
from service.store.db import Database

log = logging.getLogger(__name__)

State = Literal["starting", "standby", "catching_up", "live", "retrying", "paused", "stopped"]
# How often a paused source looks whether the outbox has room again.
ROOM_POLL_S = 1.0
# A source that keeps failing says so in one warning line per this many seconds.
WARN_EVERY_S = 60.0
# A source catching up says how far it is in one line per this many seconds.
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class PollerStatus:
    """One source's progress for /status; never holds a credential or a document body.

    `state`: `starting`; `standby` (another replica follows the feed: this one takes over
    when that one's lease runs out or it gives the feed back); `catching_up` (a full page
    came: CouchDB has more, `couchdb_pending` says how many where CouchDB gives it); `live`
    (caught up, following new changes);
    `retrying` since `retrying_since` (CouchDB could not be read: `attempts` so far, the
    `last_error`, the next attempt at `next_attempt_at`; once the feed reads again
    `last_error` is cleared and kept as `previous_error`, with the time it last occurred,
    `previous_error_at`); `paused` (the outbox is at its
    high-water mark, or `held`: an operator paused it); `stopped` with a `reason` when
    CouchDB refused the source for good (the reason says what to fix), without one after
    `stop()`. `checkpoint` is the saved seq as
    JSON text; `changes_seen` counts feed rows read since start, `skipped` those that could
    not become a change (dead letters); `pending` is the source's outbox entries as of the
    last commit.
    """

    state: State
    reason: str | None
    checkpoint: str | None
    changes_seen: int
    skipped: int
    pending: int | None
    last_error: str | None
    couchdb_pending: int | None = None
    retrying_since: datetime | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    held: bool = False
    previous_error: str | None = None
    previous_error_at: datetime | None = None


class LeaseLostError(Exception):
    """The feed lease a page was read under is no longer this replica's: nothing of the page
    was committed."""


def commit(
    session: Session,
    source: str,
    page: couchdb.Page,
    *,
    now: datetime,
    token: int | None = None,
) -> tuple[outbox.Enqueued, int]:
    """Enqueue the page's changes, keep its unmapped documents as dead letters and save its
    seq as `source`'s checkpoint, in the caller's transaction (so all or nothing). Returns what
    the enqueue did and the source's pending outbox entries.

    With the feed lease `token` it was read under: raises `LeaseLostError` (writing nothing)
    unless that lease is still the source's at `now`.
    """
    if token is not None and not follows.holds(session, source, token, now):
        raise LeaseLostError(f"feed lease {token} of source {source} is no longer held")
    enqueued = outbox.enqueue(session, page.changes, now=now)
    dead_letters.keep_unmapped(session, source, page.unmapped, now=now)
    if page.seq is not None:
        checkpoints.save(session, source, page.seq, token=token)
    return enqueued, outbox.pending(session, source)


async def replay_unmapped(
    db: Database,
    http: httpx.AsyncClient,
    sources: Mapping[str, SourceSettings],
    letter_ids: Sequence[int],
    *,
    now: datetime,
) -> dead_letters.Replay:
    """Replay unmapped documents' dead letters from the documents as CouchDB holds them now,
    mapped with the current settings (`sources`, by name): each becomes its change in the
    outbox and its dead letter goes. One that still cannot become a change stays, with the
    reason in `still_unmapped`; one of a source no longer configured, or whose document
    cannot be read (not JSON, or over `couchdb.MAX_PAGE_BYTES`), too.

    Raises `couchdb.FeedBrokenError` or `couchdb.SourceStoppedError` when CouchDB cannot be
    read (the dead letters replayed before it stay replayed).
    """
    done = dead_letters.Replay()
    for letter_id in letter_ids:
        held = await db.run(dead_letters.unmapped_letter, letter_id)
        if held is None:
            done.missing.append(letter_id)
            continue
        name, doc_id = held
        if name not in sources or sources[name].kind != "couchdb":
            done.still_unmapped[letter_id] = f"source {name} is not a CouchDB source in the config"
            continue
        try:
            found = await couchdb.read_doc(http, sources[name], doc_id)
        except couchdb.UnreadableError as error:
            done.still_unmapped[letter_id] = str(error)
            continue
        row = couchdb.read_row(sources[name], found)
        if row.problem is not None:
            done.still_unmapped[letter_id] = row.problem.reason
        elif await db.run(dead_letters.settle_unmapped, letter_id, row.change, now=now):
            done.replayed.append(letter_id)
        else:
            done.missing.append(letter_id)
    return done


class Poller:
    """Replicates one CouchDB source's `_changes` feed into the outbox.

    `step()` reads one bounded page after the checkpoint and commits it; `run_once()` repeats
    it until caught up; `run()` follows the continuous feed until `stop()`, reconnecting from
    the checkpoint with backoff. A source CouchDB refuses for good stops (see `status()`)
    while other sources go on.
    """

    def __init__(
        self,
        source: SourceSettings,
        db: Database,
        http: httpx.AsyncClient,
        *,
        on_commit: Callable[[], None] | None = None,
        high_water: int | None = None,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        shares: FeedShares | None = None,
    ) -> None:
        self._source = source
        # Shared with other replicas: `run()` follows the feed only under its feed lease.
        self._shares = shares
        self._token: int | None = None
        self._metrics = metrics or Metrics()
        self._high_water = high_water
        self._settings = couchdb.settings_of(source)
        self._db = db
        self._http = http
        self._on_commit = on_commit
        self._clock = clock
        self._rng = rng or random.Random()
        self._state: State = "starting"
        self._stopped: str | None = None
        self._checkpoint: str | None = None
        self._seen = 0
        self._skipped = 0
        self._pending: int | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._previous_error: tuple[str, datetime | None] | None = None
        self._failures = 0
        self._retrying_since: datetime | None = None
        self._next_attempt_at: datetime | None = None
        self._warned_at: float | None = None
        self._couchdb_pending: int | None = None
        self._caught_up = False
        self._stopping = False
        self._scope: anyio.CancelScope | None = None
        # Paused by an operator (`hold`), and the connection that `hold` cuts.
        self._held = False
        self._reading: anyio.CancelScope | None = None
        # Set while a held source waits with its feed closed (no read, no commit under way).
        self._parked = anyio.Event()
        # When the current catch-up began (monotonic) and the rows seen then; last progress line.
        self._catch_up = (0.0, 0)
        self._progress_at = 0.0

    @property
    def name(self) -> str:
        """The source's name."""
        return self._source.name

    def status(self) -> PollerStatus:
        """A snapshot of the source's progress."""
        return PollerStatus(
            state=self._state,
            reason=self._stopped,
            checkpoint=self._checkpoint,
            changes_seen=self._seen,
            skipped=self._skipped,
            pending=self._pending,
            last_error=self._last_error,
            couchdb_pending=self._couchdb_pending,
            retrying_since=self._retrying_since,
            attempts=self._failures,
            next_attempt_at=self._next_attempt_at,
            held=self._held,
            previous_error=None if self._previous_error is None else self._previous_error[0],
            previous_error_at=None if self._previous_error is None else self._previous_error[1],
        )

    def hold(self) -> None:
        """Pause reading: the feed is closed (a commit in progress finishes) and opened again
        from the checkpoint on `release`; nothing is skipped."""
        self._held = True
        if self._reading is not None:
            self._reading.cancel()
        log.info("source paused by an operator: source=%s", self.name)

    def release(self) -> None:
        """Resume reading after `hold`."""
        self._held = False
        self._parked = anyio.Event()
        log.info("source resumed by an operator: source=%s", self.name)

    async def set_checkpoint(self, to: object, *, running: bool) -> tuple[Seq | None, Seq]:
        """Set the checkpoint to `to`: "0" (read every change again), "now" (CouchDB's
        current seq: only changes from now on) or a seq CouchDB gave, verbatim. A `running`
        source is paused first, until its feed is closed, and resumed after (unless it was
        paused already). A stopped source (CouchDB refused it) reads nothing: its checkpoint is
        set at once, read from when the service restarts. Returns the checkpoint before and
        after."""
        was_held = self._held
        # Stopped, the feed is closed already and never parks: no waiting for it.
        running = running and self._stopped is None
        if running:
            self.hold()
            with anyio.fail_after(self._settings.timeout_s + ROOM_POLL_S):
                await self._parked.wait()
        try:
            if to == "now":
                now = await couchdb.read_page(self._http, self._source, Seq.of("now"), limit=1)
                assert now.seq is not None  # a `feed=normal` answer always has its last_seq
                seq = now.seq
            else:
                seq = Seq.of(to)
            old = await self._db.run(checkpoints.load, self.name)
            await self._db.run(checkpoints.save, self.name, seq)
        finally:
            if running and not was_held:
                self.release()
        self._checkpoint = seq.json_text
        log.warning(
            "checkpoint set by an operator: source=%s was=%s now=%s",
            self.name,
            None if old is None else old.json_text,
            seq.json_text,
        )
        return old, seq

    def stop(self) -> None:
        """Stop reading; a commit in progress finishes, then `run()` returns."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    async def step(self) -> int:
        """Read one page (at most `batch_size` rows) after the checkpoint and commit it.

        The changes and the new checkpoint are committed in one transaction. Returns the rows
        read (0 for a stopped source). A refusal stops the source and returns 0; raises
        `couchdb.FeedBrokenError` (also kept as `last_error`) when CouchDB cannot be read.
        """
        if self._stopped is not None:
            return 0
        with self._feed_errors():
            return await self._page()
        return 0  # the source was stopped

    async def run_once(self) -> int:
        """Commit pages until CouchDB has nothing more (or the source stops); returns rows read.

        Each page is read while the page before it commits. A page that cannot be parsed, or
        runs past `couchdb.MAX_PAGE_BYTES`, is read again in smaller pages as `run()` does.
        Raises `couchdb.FeedBrokenError` (also kept as `last_error`) when CouchDB cannot be
        read; the pages read before it are committed.
        """
        self._caught_up = False
        seen = self._seen
        with self._feed_errors():
            while self._stopped is None:
                try:
                    await self._read_to_the_end()
                except couchdb.UnreadableError as error:
                    await self._read_around(error)
                    continue
                self._caught_up = True
                break
        return self._seen - seen

    async def _read_to_the_end(self) -> None:
        page = await self._first_page()
        while not page.caught_up and page.seq is not None:
            reading = couchdb.read_page(self._http, self._source, page.seq)
            page = await self._commit_while(page, reading)
        await self._commit(page)

    async def run(self) -> None:
        """Follow the feed and commit each page until `stop()`.

        A broken or silent feed is reopened from the checkpoint after a backoff with jitter. A
        source CouchDB refuses for good waits, stopped, for `stop()`, so it is not restarted
        in a loop.
        """
        with anyio.CancelScope() as self._scope:
            if self._stopping:
                self._scope.cancel()
            while self._stopped is None:
                await self._wait_for_room()
                with anyio.CancelScope() as self._reading:
                    if not self._held:
                        await self._lease()
                        async with self._kept(self._reading):
                            await self._connection()
                self._reading = None
            await anyio.sleep_forever()
        self._scope = None
        self._state = "stopped"

    async def _lease(self) -> None:
        """Wait until this replica follows the feed (in `standby` meanwhile)."""
        if self._shares is None:
            return
        if self._token is None:
            self._state = "standby"
        self._token = await self._shares.acquire(self.name)

    @asynccontextmanager
    async def _kept(self, reading: anyio.CancelScope) -> AsyncIterator[None]:
        """Renew the feed lease while `reading`; it is cancelled once the lease is gone."""
        if self._shares is None or self._token is None:
            yield
            return
        async with anyio.create_task_group() as keeper:
            keeper.start_soon(self._shares.keep, self.name, self._token, reading)
            try:
                yield
            finally:
                keeper.cancel_scope.cancel()

    async def _connection(self) -> None:
        try:
            await self._follow()
        except LeaseLostError:
            log.warning(
                "feed lease lost before a commit, nothing of the page written: source=%s",
                self.name,
            )
            if self._shares is not None:
                self._shares.lost(self.name)
            self._token = None
        except couchdb.SourceStoppedError as error:
            self._stop_source(error)
        except couchdb.UnreadableError as error:
            await self._read_around(error)
        except couchdb.FeedBrokenError as error:
            await self._back_off(error)
        except Exception as error:
            self._failed(f"{type(error).__name__}: {error}")
            raise

    async def _follow(self) -> None:
        """One connection: commit its pages until CouchDB ends the feed."""
        since = await self._load()
        if since is None:
            # Pins the start ("now" included) as a checkpoint before following.
            await self._page()
            since = await self._load()
        async with couchdb.follow(self._http, self._source, since or self._first()) as feed:
            page = await feed.next_page()
            self._recovered()
            while not page.caught_up:
                following = await self._commit_while(page, feed.next_page())
                if self._full():
                    return  # `following` is not committed: it is read again after the pause
                page = following
            await self._commit(page)

    async def _read_around(self, error: couchdb.UnreadableError) -> None:
        """Read the stretch of the feed after the checkpoint that could not be parsed another
        way: as `feed=normal` pages, each parsed as one document, of half a page, then
        smaller, down to a single row, and commit the first that reads. If not even one row
        reads, the source stops with the error (nothing after it is checkpointed)."""
        since = await self._load() or self._first()
        limit = max(1, self._settings.batch_size // 2)
        log.warning(
            "CouchDB feed unreadable, reading it in smaller pages: source=%s checkpoint=%s"
            " reason=%s",
            self.name,
            since.json_text,
            error,
        )
        while True:
            try:
                page = await couchdb.read_page(self._http, self._source, since, limit=limit)
            except couchdb.UnreadableError as unreadable:
                if limit == 1:
                    self._stop_source(_unreadable(self.name, since, unreadable))
                    return
                limit = max(1, limit // 2)
                continue
            await self._commit(page)
            return

    def _full(self) -> bool:
        """True when the last commit left the source's outbox at its high-water mark."""
        return self._high_water is not None and (self._pending or 0) >= self._high_water

    async def _wait_for_room(self) -> None:
        """While the outbox is at the high-water mark, read nothing more (STYLE rule 5).

        The feed is closed meanwhile and reopened from the checkpoint, so nothing is skipped;
        CouchDB keeps the changes, the store does not grow without bound while PANDA is away.
        """
        while self._full() or self._held:
            if self._held:
                self._state = "paused"
                self._parked.set()
                await anyio.sleep(ROOM_POLL_S)
                continue
            if self._state != "paused":
                log.warning(
                    "outbox at its high-water mark, pausing the feed: source=%s pending=%s",
                    self.name,
                    self._pending,
                )
            self._state = "paused"
            await anyio.sleep(ROOM_POLL_S)
            self._pending = await self._db.run(outbox.pending, self.name)

    def _first(self) -> Seq:
        return Seq.of(self._settings.since)

    async def _load(self) -> Seq | None:
        seq = await self._db.run(checkpoints.load, self.name)
        if seq is not None:
            self._checkpoint = seq.json_text
        return seq

    @contextmanager
    def _feed_errors(self) -> Iterator[None]:
        """A refusal stops the source (and ends the block quietly); a broken feed is kept as
        `last_error` and raised."""
        try:
            yield
        except couchdb.SourceStoppedError as error:
            self._stop_source(error)
        except couchdb.FeedBrokenError as error:
            self._failed(str(error))
            raise

    async def _first_page(self) -> couchdb.Page:
        """The page after the saved checkpoint (or after `since`, without one)."""
        since = await self._load()
        return await couchdb.read_page(self._http, self._source, since or self._first())

    async def _page(self) -> int:
        page = await self._first_page()
        await self._commit(page)
        self._caught_up = page.caught_up
        return page.rows

    async def _commit_while(
        self, page: couchdb.Page, reading: Awaitable[couchdb.Page]
    ) -> couchdb.Page:
        """Commit `page` while `reading` reads the page after it; returns that page.

        The commit always finishes (it is shielded); a failed read raises once it has.
        """
        following: list[couchdb.Page] = []
        committed, quiet = anyio.Event(), anyio.CancelScope()

        async def commit() -> None:
            await self._commit(page)
            committed.set()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(commit)
                group.start_soon(self._live_when_quiet, committed, quiet)
                following.append(await reading)
                quiet.cancel()
        except BaseExceptionGroup as error:
            raise _sole(error) from None
        return following[0]

    async def _live_when_quiet(self, committed: anyio.Event, quiet: anyio.CancelScope) -> None:
        """A full page followed by no row for a heartbeat's time: the feed has caught up
        (the continuous feed gives no `pending` to tell), so the source is live."""
        with quiet:
            await committed.wait()
            await anyio.sleep(self._settings.heartbeat_s)
            if self._state == "catching_up":
                self._progress("live")

    async def _commit(self, page: couchdb.Page) -> None:
        # Shielded so that stop() never leaves a commit's bookkeeping half done.
        with anyio.CancelScope(shield=True):
            enqueued, self._pending = await self._db.run(
                commit, self.name, page, now=self._clock(), token=self._token
            )
        self._metrics.received.labels(self.name).inc(enqueued.accepted)
        self._metrics.stale.labels(self.name).inc(enqueued.stale)
        self._metrics.dead_lettered.labels(self.name, self._source.dataset.slug).inc(
            len(page.unmapped)
        )
        self._seen += page.rows
        self._skipped += page.skipped
        self._couchdb_pending = page.pending
        if page.seq is not None:
            self._checkpoint = page.seq.json_text
        if self._state != "stopped":
            self._recovered()
            full = page.rows >= self._settings.batch_size and page.pending != 0
            self._progress("catching_up" if full and not page.caught_up else "live")
        log.debug(
            "page committed: source=%s rows=%d changes=%d seq=%s",
            self.name,
            page.rows,
            len(page.changes),
            self._checkpoint,
        )
        if page.changes and self._on_commit is not None:
            self._on_commit()

    async def _back_off(self, error: couchdb.FeedBrokenError) -> None:
        self._failures += 1
        now = self._clock()
        if self._retrying_since is None:
            self._retrying_since = now
        self._state = "retrying"
        self._failed(str(error))
        wait_s = backoff.delay_s(
            self._failures,
            base_s=self._settings.retry_base_s,
            cap_s=self._settings.retry_cap_s,
            rng=self._rng,
        )
        self._next_attempt_at = now + timedelta(seconds=wait_s)
        # One warning line a minute, not one a retry: a source failing at the same checkpoint
        # would otherwise fill the log twice a second.
        moment = time.monotonic()
        warn = self._warned_at is None or moment - self._warned_at >= WARN_EVERY_S
        if warn:
            self._warned_at = moment
        log.log(
            logging.WARNING if warn else logging.DEBUG,
            "CouchDB feed lost, reopening it from the checkpoint: source=%s attempts=%d"
            " since=%s checkpoint=%s retry_in_s=%.1f reason=%s",
            self.name,
            self._failures,
            self._retrying_since.isoformat(timespec="seconds"),
            self._checkpoint,
            wait_s,
            error,
        )
        await anyio.sleep(wait_s)

    def _progress(self, state: State) -> None:
        """Enter `state` after a commit; log the start and end of a catch-up, and how far it
        is once every `PROGRESS_EVERY_S`, without a line per page."""
        was, self._state = self._state, state
        now = time.monotonic()
        if state == "catching_up":
            if was != "catching_up":
                self._catch_up = (now, self._seen)
                self._progress_at = now
                log.info("catching up: source=%s checkpoint=%s", self.name, self._checkpoint)
            elif now - self._progress_at >= PROGRESS_EVERY_S:
                self._progress_at = now
                about = self._couchdb_pending
                total = "" if about is None else f" of about {self._seen + about}"
                log.info("catching up: source=%s read=%d%s", self.name, self._seen, total)
        elif was == "catching_up":
            started, seen = self._catch_up
            log.info(
                "caught up: source=%s read=%d in %.1f s",
                self.name,
                self._seen - seen,
                now - started,
            )
        elif was != state:
            log.info("source %s: source=%s checkpoint=%s", state, self.name, self._checkpoint)

    def _failed(self, error: str) -> None:
        self._last_error, self._last_error_at = error, self._clock()

    def _recovered(self) -> None:
        """The feed reads again: forget the failures (and say so, if they were warned of); the
        last error becomes the previous one."""
        if self._failures and self._warned_at is not None:
            log.info("CouchDB feed reads again: source=%s attempts=%d", self.name, self._failures)
        self._failures, self._warned_at = 0, None
        self._retrying_since = self._next_attempt_at = None
        if self._last_error is not None:
            self._previous_error = (self._last_error, self._last_error_at)
            self._last_error = self._last_error_at = None

    def _stop_source(self, error: couchdb.SourceStoppedError) -> None:
        self._state, self._stopped = "stopped", str(error)
        # Its feed is closed for good: whoever waits for it to park (`set_checkpoint`) goes on.
        self._parked.set()
        self._failed(str(error))
        log.error("source stopped: source=%s reason=%s", self.name, error)


def _unreadable(
    name: str, since: Seq, error: couchdb.UnreadableError
) -> couchdb.SourceStoppedError:
    return couchdb.SourceStoppedError(
        f"{error}; the change after checkpoint {since.json_text} cannot be read even alone"
        f" (`_changes?since=...&limit=1&include_docs=true`): look at that document in"
        f" CouchDB and correct or delete it, then restart; source {name} stays where it is"
    )


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a task group raised, or the group when there were several."""
    return group.exceptions[0] if len(group.exceptions) == 1 else group


def build_pollers(
    settings: Settings,
    db: Database,
    http: httpx.AsyncClient,
    *,
    on_commit: Callable[[], None] | None = None,
    metrics: Metrics | None = None,
    shares: FeedShares | None = None,
) -> dict[str, Poller]:
    """A poller for every CouchDB source, by source name (webhook sources have none).

    `http` should be a client of its own (no base URL): every followed feed holds one of its
    connections open. Each pauses while its outbox holds `ingress.outbox_high_water` entries.
    """
    high_water = settings.ingress.outbox_high_water
    return {
        source.name: Poller(
            source,
            db,
            http,
            on_commit=on_commit,
            high_water=high_water,
            metrics=metrics,
            shares=shares,
        )
        for source in settings.sources
        if source.kind == "couchdb"
    }
