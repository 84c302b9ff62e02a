"""Compare a PANDA dataset with what pandasync delivered to it, and queue what makes them equal.

`compare` reads the dataset page by page (panda-api.md §3.2) and sorts every row and every
document of the source into: in step, missing from PANDA, changed in PANDA (by hand),
unknown (PANDA holds a row no document of the source has: added by hand, or of a document
the source deleted) and not known yet (a change of it waits for delivery). `repair` forgets
what PANDA holds of the missing and changed rows, so that the source's next reading of them
sends them again, and with `delete_unknown` queues deletes of the unknown rows. Nothing
here writes to PANDA itself: the fixes go through the outbox like every change.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import Session

from service.changes import Change, Op
from service.delivery.panda import DatasetMissingError, PandaClient, PandaRow
from service.sources import external_ids
from service.store import delivered, outbox, snapshots
from service.store.db import Database

# How many ids of each kind a report keeps as examples.
EXAMPLES = 5
# A resync that would delete more than this share of a dataset's rows needs a confirmation:
# a source that looks empty by mistake must not empty PANDA.
MAX_DELETE_FRACTION = 0.2


@dataclass
class Kind:
    """How many rows are of one kind, with a few of their external_ids."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, external_id: str) -> None:
        """Count one more row, `external_id`."""
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(external_id)


@dataclass
class Comparison:
    """A dataset compared with what its source delivered (see the module's words)."""

    source: str
    slug: str
    panda_rows: int = 0
    in_step: int = 0
    missing: Kind = field(default_factory=Kind)
    changed: Kind = field(default_factory=Kind)
    unknown: Kind = field(default_factory=Kind)
    not_known: Kind = field(default_factory=Kind)
    # The documents behind `missing` and `changed`, and the external_ids of `unknown`.
    to_send: list[str] = field(default_factory=list)
    to_delete: list[str] = field(default_factory=list)

    def kinds(self) -> Iterator[tuple[str, Kind]]:
        """(name, kind) of each kind but the rows in step."""
        yield "missing from PANDA", self.missing
        yield "changed in PANDA", self.changed
        yield "unknown to the source", self.unknown
        yield "waiting for delivery", self.not_known

    @property
    def delete_fraction(self) -> float:
        """The share of PANDA's rows the unknown ones are."""
        return self.unknown.count / self.panda_rows if self.panda_rows else 0.0


async def compare(
    db: Database,
    panda: PandaClient,
    source: str,
    slug: str,
    *,
    progress: Callable[[int], None] | None = None,
) -> Comparison:
    """Compare dataset `slug` in PANDA with what `source` delivered to it. Read it while
    nothing else writes it: PANDA's pages are unstable under writes."""
    documents = {
        external_ids.encode(document.doc_id): document
        for document in await db.run(delivered.documents, source)
    }
    result = Comparison(source, slug)
    seen: set[str] = set()
    async for row in panda.rows(slug):
        if row.external_id in seen:
            continue  # a page moved under the listing: a row seen twice
        seen.add(row.external_id)
        result.panda_rows += 1
        if progress is not None:
            progress(result.panda_rows)
        _sort_row(result, documents.pop(row.external_id, None), row)
    for external_id, document in documents.items():
        _sort_absent(result, document, external_id)
    return result


def _sort_row(result: Comparison, document: delivered.Document | None, row: PandaRow) -> None:
    """Count a row PANDA holds, with the document of the source it belongs to, if any."""
    if document is None:
        _unknown(result, row.external_id)
    elif document.pending is not None or document.delivered is None:
        result.not_known.add(row.external_id)
    elif document.delivered == delivered.row_hash(result.slug, row.external_id, None):
        _unknown(result, row.external_id)  # deleted at the source, yet in PANDA
    elif document.delivered == delivered.row_hash(
        result.slug, row.external_id, outbox.row_text(row.data)
    ):
        result.in_step += 1
    else:
        result.changed.add(row.external_id)
        result.to_send.append(document.doc_id)


def _sort_absent(result: Comparison, document: delivered.Document, external_id: str) -> None:
    """Count a document of the source whose row PANDA does not hold."""
    if document.pending is not None or document.delivered is None:
        result.not_known.add(external_id)
    elif document.delivered == delivered.row_hash(result.slug, external_id, None):
        result.in_step += 1  # deleted at the source, and not in PANDA
    else:
        result.missing.add(external_id)
        result.to_send.append(document.doc_id)


class TooManyDeletesError(Exception):
    """A resync would delete more than `MAX_DELETE_FRACTION` of the dataset's rows."""


@dataclass(frozen=True)
class Resync:
    """What `resync` found and did."""

    comparison: Comparison
    # Whether anything was written (False: a dry run).
    written: bool
    deletes_queued: int = 0

    @property
    def to_send(self) -> int:
        """Rows missing or changed in PANDA, which the source's next reading sends again."""
        return len(self.comparison.to_send)


async def resync(
    db: Database,
    panda: PandaClient,
    source: str,
    slug: str,
    *,
    dry_run: bool,
    delete_unknown: bool,
    confirm: bool,
    now: datetime,
    progress: Callable[[int], None] | None = None,
) -> Resync:
    """Compare the dataset with what `source` delivered and, unless `dry_run`, `repair` it.

    The caller then has the source read again from its start. Raises `TooManyDeletesError`
    when `delete_unknown` would delete more than `MAX_DELETE_FRACTION` of the rows and not
    `confirm`; errors of PANDA's as `PandaClient.rows` raises them. A missing dataset
    compares as empty. `progress` is told the rows read from PANDA so far, row by row.
    """
    try:
        comparison = await compare(db, panda, source, slug, progress=progress)
    except DatasetMissingError:
        comparison = Comparison(source, slug)
    if dry_run:
        return Resync(comparison, written=False)
    fraction = comparison.delete_fraction if delete_unknown else 0.0
    if fraction > MAX_DELETE_FRACTION and not confirm:
        raise TooManyDeletesError(
            f"this would delete {comparison.unknown.count} of {comparison.panda_rows} rows of"
            f" {slug} ({fraction:.0%}, more than {MAX_DELETE_FRACTION:.0%}): check the source"
            " is complete, then confirm"
        )
    queued = await repair(db, comparison, delete_unknown=delete_unknown, now=now)
    return Resync(comparison, written=True, deletes_queued=queued)


def _unknown(result: Comparison, external_id: str) -> None:
    result.unknown.add(external_id)
    result.to_delete.append(external_id)


async def repair(
    db: Database, comparison: Comparison, *, delete_unknown: bool, now: datetime
) -> int:
    """Forget what PANDA holds of the rows missing or changed there (the source's next
    reading of them sends them again) and, with `delete_unknown`, queue deletes of the
    unknown rows; returns how many deletes were queued."""
    await db.run(_forget, comparison.source, comparison.to_send)
    if not delete_unknown or not comparison.to_delete:
        return 0
    orphans = [
        Change(comparison.source, _doc_id(external_id), external_id, Op.DELETE)
        for external_id in comparison.to_delete
    ]
    return await db.run(delivered.delete_orphans, comparison.slug, orphans, now=now)


def _forget(session: Session, source: str, doc_ids: Sequence[str]) -> None:
    """What PANDA holds of these documents, and for a snapshot source what it last saw of
    them: its next snapshot sends them again."""
    delivered.forget_documents(session, source, doc_ids)
    snapshots.forget(session, source, doc_ids)


# The document id of a delete for a row whose external_id no source id encodes to (added by
# hand, such as `row-1`): CouchDB refuses ids that start with `_` (but `_design/`, `_local/`).
ORPHAN_PREFIX = "_pandasync/orphan/"


def _doc_id(external_id: str) -> str:
    """The document whose delete removes row `external_id`."""
    try:
        return external_ids.decode(external_id)
    except external_ids.ExternalIdError:
        return ORPHAN_PREFIX + external_id
