"""Snapshot sources: read a whole source every `interval_s` (or on demand) and commit what
changed since the last read as changes in the outbox.

A snapshot is read in chunks, each stamped and staged in one store transaction, without
keeping rows in memory; once read whole and judged normal (see `snapshot.held_reason`), it is
applied in chunks, each enqueuing its changes and recording their hashes in one transaction,
so a crash never loses a change nor marks a row sent whose change is not in the outbox. A read
that fails changes nothing. Knows nothing of FastAPI or PANDA.
"""

import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import anyio
import anyio.to_thread
import httpx
from sqlmodel import Session

from service.changes import Change, Op, SourceVersion
from service.clock import Clock, utcnow
from service.config import Settings, SourceSettings
from service.ingress import queries
from service.ingress.shares import FeedShares
from service.metrics import Metrics
from service.sources import external_ids, mapping, snapshot
from service.store import outbox, snapshots
from service.store.db import Database

log = logging.getLogger(__name__)

State = Literal["starting", "standby", "reading", "applying", "idle", "held", "failed", "stopped"]
# How often an apply waiting for room in the outbox looks again.
ROOM_POLL_S = 1.0
# How many records without an id are named in the log per snapshot.
NAMED_SKIPS = 5


@dataclass(frozen=True)
class SnapshotStatus:
    """A snapshot source's state for /status; never holds a credential or a row.

    `state`: `standby` (another replica takes this source's snapshots); `reading` or
    `applying` a snapshot; `idle` until `next_at`; `held`: the last
    snapshot changed nothing and waits for an operator's confirmation (`reason` says why;
    confirm with `pandasync confirm-deletes` or the admin API) or for a next snapshot that
    looks normal; `failed`: the last snapshot could not be read (`reason`), it changed
    nothing. `started_at` is when the latest snapshot began; `last` what the last snapshot
    read whole found (rows_read, new, changed, deleted, unchanged, duplicates, ...; while a
    snapshot is read, the one before's) and `finished_at` when the last one ended.
    """

    state: State
    reason: str | None
    generation: int | None
    started_at: datetime | None
    finished_at: datetime | None
    last: dict[str, int] | None
    next_at: datetime | None


class _StoppedError(Exception):
    """The snapshot was stopped while it was read: it changes nothing."""


class _SupersededError(Exception):
    """A newer snapshot started (another process's) while this one was read."""


@dataclass
class _Reading:
    """What a read counted as it went."""

    rows: int = 0
    duplicates: int = 0
    skipped: int = 0


def _stage(
    session: Session, source: str, generation: int, rows: list[snapshot.SnapshotRow]
) -> int | None:
    """Stamp and stage one chunk of snapshot `generation`; returns its duplicates, or None
    when a newer snapshot superseded it."""
    if not snapshots.is_current(session, source, generation, "reading"):
        return None
    known = snapshots.known(session, source, [row.doc_id for row in rows])
    chunk = snapshot.sort(rows, known, generation)
    snapshots.stamp(session, source, generation, unchanged=chunk.unchanged, staged=chunk.staged)
    return chunk.duplicates


def _judge(
    session: Session, source: SourceSettings, generation: int, reading: _Reading
) -> tuple[snapshot.Counts, str | None] | None:
    """Count what snapshot `generation` (read whole) changes and hold it or let it be applied;
    None when a newer snapshot superseded it."""
    if not snapshots.is_current(session, source.name, generation, "reading"):
        return None
    found = snapshots.count(session, source.name, generation)
    settings = snapshot.settings_of(source)
    counts = snapshot.Counts(
        rows_read=reading.rows,
        new=found.new,
        changed=found.changed,
        unchanged=found.seen - found.new - found.changed,
        gone=found.gone,
        deleted=found.gone if settings.deletes else 0,
        duplicates=reading.duplicates,
        skipped=reading.skipped,
        known=found.known,
    )
    held = snapshot.held_reason(counts, settings)
    snapshots.settle_reading(session, source.name, generation, counts=asdict(counts), held=held)
    return counts, held


# What applying a chunk did: the last id done (None: nothing was left) and the changes the
# outbox accepted; None when a newer snapshot superseded this one.
_Applied = tuple[str | None, int] | None


def _apply_staged(
    session: Session, source: str, generation: int, *, after: str | None, limit: int, now: datetime
) -> _Applied:
    """Enqueue the next chunk of rows snapshot `generation` staged and record their hashes:
    the last id done (None: none left) and the changes accepted; None when superseded."""
    if not snapshots.is_current(session, source, generation, "applying"):
        return None
    rows = snapshots.staged(session, source, generation, after=after, limit=limit)
    if not rows:
        return None, 0
    version = SourceVersion.of(generation)
    changes = [
        Change(
            source,
            row.doc_id,
            external_ids.encode(row.doc_id),
            Op.UPSERT,
            tuple(json.loads(row.row_json)),
            version,
        )
        for row in rows
    ]
    enqueued = outbox.enqueue(session, changes, now=now)
    snapshots.settle_staged(session, source, [row.doc_id for row in rows])
    return rows[-1].doc_id, enqueued.accepted


def _apply_absent(
    session: Session,
    source: str,
    generation: int,
    *,
    deletes: bool,
    after: str | None,
    limit: int,
    now: datetime,
) -> _Applied:
    """Enqueue the deletes of the next chunk of ids not in snapshot `generation` (when the
    source sends `deletes`, else keep their hashes) and forget them; as `_apply_staged`."""
    if not snapshots.is_current(session, source, generation, "applying"):
        return None
    absent = snapshots.absent(session, source, generation, after=after, limit=limit)
    if not absent:
        return None, 0
    version = SourceVersion.of(generation)
    sent = [doc_id for doc_id, was_sent in absent if was_sent]
    unsent = [doc_id for doc_id, was_sent in absent if not was_sent]
    accepted = 0
    if deletes:
        changes = [
            Change(source, doc_id, external_ids.encode(doc_id), Op.DELETE, None, version)
            for doc_id in sent
        ]
        accepted = outbox.enqueue(session, changes, now=now).accepted
        snapshots.forget(session, source, sent + unsent)
    else:
        snapshots.keep_absent(session, source, sent)
        snapshots.forget(session, source, unsent)
    return absent[-1][0], accepted


def _done(session: Session, source: str, generation: int, *, now: datetime) -> bool:
    if not snapshots.is_current(session, source, generation, "applying"):
        return False
    snapshots.done(session, source, generation, now=now)
    return True


def status_of(
    latest: snapshots.Snapshot | None, *, state: State, next_at: datetime | None
) -> SnapshotStatus:
    """A source's status from its latest snapshot in the store and its loop's `state`."""
    if latest is None:
        return SnapshotStatus(state, None, None, None, None, None, next_at)
    stored: dict[str, State] = {"held": "held", "failed": "failed"}
    shown = stored.get(latest.phase, state) if state in ("idle", "starting") else state
    return SnapshotStatus(
        state=shown,
        reason=latest.reason if latest.phase in stored else None,
        generation=latest.generation,
        started_at=latest.started_at,
        finished_at=latest.finished_at,
        last=latest.counts,
        next_at=next_at,
    )


class Snapshotter:
    """Takes one snapshot source's snapshots and commits what changed into the outbox.

    `step()` takes one snapshot (or finishes applying one that a restart or a confirmation
    left `applying`); `run()` repeats it every `interval_s`, and at once after
    `snapshot_now()`; `run_once()` is one `step()`. Reading runs in a worker thread.
    """

    def __init__(
        self,
        source: SourceSettings,
        db: Database,
        *,
        http: Callable[[], httpx.Client] = httpx.Client,
        on_commit: Callable[[], None] | None = None,
        high_water: int | None = None,
        clock: Clock = utcnow,
        metrics: Metrics | None = None,
        shares: FeedShares | None = None,
    ) -> None:
        self._source = source
        # Shared with other replicas: `run()` takes snapshots only under the source's lease.
        self._shares = shares
        self._settings = snapshot.settings_of(source)
        self._db = db
        self._http = http
        self._on_commit = on_commit
        self._high_water = high_water
        self._clock = clock
        self._metrics = metrics or Metrics()
        self._state: State = "starting"
        self._next_at: datetime | None = None
        self._stopping = False
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._scope: anyio.CancelScope | None = None

    @property
    def name(self) -> str:
        """The source's name."""
        return self._source.name

    async def status(self) -> SnapshotStatus:
        """The source's state, from the store and this loop."""
        latest = await self._db.run(snapshots.latest, self.name)
        return status_of(latest, state=self._state, next_at=self._next_at)

    def snapshot_now(self) -> None:
        """Take the next snapshot now (after the one under way, if any)."""
        self._wake.set()

    async def confirm(self) -> snapshots.Snapshot | None:
        """Confirm the held snapshot: it is applied as it was read (by `run()`, woken now).
        Returns it, or None when the source holds no snapshot."""
        confirmed = await self._db.run(snapshots.confirm, self.name)
        if confirmed is not None:
            log.warning(
                "held snapshot confirmed by an operator: source=%s generation=%d",
                self.name,
                confirmed.generation,
            )
            self._wake.set()
        return confirmed

    def stop(self) -> None:
        """Stop: a chunk being committed finishes; a snapshot being read changes nothing."""
        self._stopping = True
        self._wake.set()
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Take a snapshot every `interval_s` (or on `snapshot_now()`) until `stop()`; beside
        other replicas, only while this one holds the source's lease (`FeedShares`)."""
        while not self._stopping:
            if self._shares is None:
                await self._follow()
                continue
            self._state = "standby"
            with anyio.CancelScope() as following:
                self._scope = following
                token = await self._shares.acquire(self.name)
                async with anyio.create_task_group() as keeper:
                    keeper.start_soon(self._shares.keep, self.name, token, following)
                    await self._follow()
                    keeper.cancel_scope.cancel()
            self._scope = None
        self._state = "stopped"

    async def _follow(self) -> None:
        """Snapshots every `interval_s` (or on `snapshot_now()`) until `stop()`."""
        while not self._stopping:
            await self.step()
            if self._stopping:
                return
            self._next_at = self._clock() + timedelta(seconds=self._settings.interval_s)
            with anyio.move_on_after(self._settings.interval_s):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def run_once(self) -> SnapshotStatus:
        """Take one snapshot (`step`) and return the source's status after it."""
        await self.step()
        return await self.status()

    async def step(self) -> None:
        """Finish applying a snapshot left `applying`, else take a new one: read it whole,
        judge it, apply it. A read that fails changes nothing and is kept as the reason."""
        async with self._lock:
            latest = await self._db.run(snapshots.latest, self.name)
            if latest is not None and latest.phase == "applying":
                await self._apply(latest.generation)
                return
            await self._take()

    async def _take(self) -> None:
        generation = await self._db.run(snapshots.begin, self.name, now=self._clock())
        self._state = "reading"
        log.info("snapshot started: source=%s generation=%d", self.name, generation)
        try:
            reading = await anyio.to_thread.run_sync(self._read, generation)
        except snapshot.SnapshotReadError as error:
            await self._failed(generation, str(error))
            return
        except _StoppedError:
            self._state = "stopped"
            return
        except _SupersededError:
            log.info("snapshot superseded by a newer one: source=%s", self.name)
            self._state = "idle"
            return
        judged = await self._db.run(_judge, self._source, generation, reading)
        if judged is None:
            self._state = "idle"
            return
        counts, held = judged
        if held is not None:
            self._state = "held"
            log.warning(
                "snapshot held, nothing changed: source=%s generation=%d reason=%s fix=confirm"
                " with `pandasync confirm-deletes %s` if the source really lost those rows",
                self.name,
                generation,
                held,
                self.name,
            )
            return
        log.info(
            "snapshot read: source=%s generation=%d rows=%d new=%d changed=%d deleted=%d"
            " unchanged=%d duplicates=%d",
            self.name,
            generation,
            counts.rows_read,
            counts.new,
            counts.changed,
            counts.deleted,
            counts.unchanged,
            counts.duplicates,
        )
        await self._apply(generation)

    async def _failed(self, generation: int, reason: str) -> None:
        self._state = "failed"
        await self._db.run(snapshots.fail, self.name, generation, reason, now=self._clock())
        log.warning(
            "snapshot failed, nothing changed: source=%s generation=%d reason=%s",
            self.name,
            generation,
            reason,
        )

    def _reader(self) -> AbstractContextManager[Iterator[Mapping[str, Any]]]:
        if self._settings.url is None:
            return queries.read_sql(self._source)
        return self._http_reader()

    @contextmanager
    def _http_reader(self) -> Iterator[Iterator[Mapping[str, Any]]]:
        with self._http() as http, snapshot.read_http(http, self._source) as records:
            yield records

    def _read(self, generation: int) -> _Reading:
        """Read the whole snapshot in the worker thread, staging it chunk by chunk."""
        reading = _Reading()
        with self._reader() as records:
            for chunk in snapshot.chunks(records, self._settings.chunk_rows):
                if self._stopping:
                    raise _StoppedError
                reading.rows += len(chunk)
                rows = self._rows(chunk, reading)
                duplicates = self._db.run_sync(_stage, self.name, generation, rows)
                if duplicates is None:
                    raise _SupersededError
                reading.duplicates += duplicates
        if reading.duplicates:
            log.warning(
                "snapshot gave ids more than once, the last row of each wins: source=%s"
                " duplicates=%d",
                self.name,
                reading.duplicates,
            )
        return reading

    def _rows(
        self, chunk: list[Mapping[str, Any]], reading: _Reading
    ) -> list[snapshot.SnapshotRow]:
        rows: list[snapshot.SnapshotRow] = []
        for record in chunk:
            try:
                rows.append(snapshot.row_of(self._source, record))
            except mapping.MappingError as error:
                reading.skipped += 1
                if reading.skipped <= NAMED_SKIPS:
                    log.warning("snapshot record skipped: source=%s reason=%s", self.name, error)
        return rows

    async def _apply(self, generation: int) -> None:
        """Apply snapshot `generation` chunk by chunk: its staged rows, then its absent ids."""
        self._state = "applying"
        absent = functools.partial(_apply_absent, deletes=self._settings.deletes)
        for apply in (_apply_staged, absent):
            if not await self._each_chunk(apply, generation):
                self._state = "stopped" if self._stopping else "idle"
                return
        await self._db.run(_done, self.name, generation, now=self._clock())
        self._state = "idle"
        log.info("snapshot applied: source=%s generation=%d", self.name, generation)

    async def _each_chunk(self, apply: Callable[..., _Applied], generation: int) -> bool:
        """Commit `apply` chunk after chunk until none is left (True), or until stopped or
        superseded by a newer snapshot (False; what is committed stays committed)."""
        after: str | None = None
        while not self._stopping:
            await self._wait_for_room()
            done = await self._db.run(
                apply,
                self.name,
                generation,
                after=after,
                limit=self._settings.chunk_rows,
                now=self._clock(),
            )
            if done is None:
                log.info("snapshot superseded by a newer one: source=%s", self.name)
                return False
            after, accepted = done
            if after is None:
                return True
            self._metrics.received.labels(self.name).inc(accepted)
            if accepted and self._on_commit is not None:
                self._on_commit()
        return False

    async def _wait_for_room(self) -> None:
        """While the source's outbox is at its high-water mark, enqueue nothing more."""
        if self._high_water is None:
            return
        while not self._stopping:
            pending = await self._db.run(outbox.pending, self.name)
            if pending < self._high_water:
                return
            await anyio.sleep(ROOM_POLL_S)


def build_snapshotters(
    settings: Settings,
    db: Database,
    *,
    on_commit: Callable[[], None] | None = None,
    metrics: Metrics | None = None,
    shares: FeedShares | None = None,
) -> dict[str, Snapshotter]:
    """A snapshotter for every snapshot source, by source name. Each waits while its outbox
    holds `ingress.outbox_high_water` entries."""
    return {
        source.name: Snapshotter(
            source,
            db,
            on_commit=on_commit,
            high_water=settings.ingress.outbox_high_water,
            metrics=metrics,
            shares=shares,
        )
        for source in settings.sources
        if source.kind == "snapshot"
    }
