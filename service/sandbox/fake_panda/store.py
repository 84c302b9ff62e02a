"""PANDA's datasets and rows as the fake keeps them: in memory, with PANDA's bookkeeping.

Pure state and PANDA's rules from `models/dataset.py` (row_count recounted after every write,
`last_modification` texts, the first five rows as `sample_data`, Solr `_docid_` order where a
rewritten row moves to the end). No HTTP and no validation here: handlers validate first.
"""

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import quote
from uuid import uuid4

from service.sandbox.fake_panda.schema import Column

Clock = Callable[[], str]
JsonRow = dict[str, object]

# Rows without an external_id are filed under a UUID in PANDA and cannot be addressed; the
# prefix keeps their keys apart from every external_id a URL can carry.
_ANONYMOUS = "\x00"
_URL_ID = re.compile(r"[\w\d_-]+")
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]+")


def utc_now() -> str:
    """The current UTC time in PANDA's format, `YYYY-MM-DDTHH:MM:SS`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")


class StoredRow(NamedTuple):
    """A row as PANDA answers it, and when it was written (for `?since=`)."""

    row: JsonRow
    written_at: str


@dataclass(eq=False, slots=True)
class Dataset:
    """One PANDA dataset and its rows, keyed by external_id in `_docid_` order."""

    id: int
    slug: str
    name: str
    description: str
    creation_date: str
    uri: str
    column_schema: list[Column] | None = None
    row_count: int | None = None
    sample_data: list[object] | None = None
    last_modified: str | None = None
    last_modification: str | None = None
    modified_by_user: bool = False
    locked_at: str | None = None
    copies: int = 1
    rows: dict[str, StoredRow] = field(default_factory=dict)


def row_uri(dataset: Dataset, external_id: str | None) -> str | None:
    """A row's `resource_uri`: None without an id, "" when the id cannot be put in a URL."""
    if not external_id:
        return None
    if _URL_ID.fullmatch(external_id) is None:
        return ""
    return f"{dataset.uri}data/{quote(external_id)}/"


def _row(dataset: Dataset, data: object, external_id: str | None) -> JsonRow:
    if external_id and _PLAIN_ID.fullmatch(external_id) is not None:
        resource_uri: str | None = f"{dataset.uri}data/{external_id}/"  # the bulk case, fast
    else:
        resource_uri = row_uri(dataset, external_id)
    return {
        "data": data,
        "dataset": dataset.uri,
        "external_id": external_id or None,
        "resource_uri": resource_uri,
    }


def slugify(text: str) -> str:
    """Django 1.4's `slugify`: ASCII-folded, lower case, dashes."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^\w\s-]", "", ascii_text).strip().lower()
    return re.sub(r"[-\s]+", "-", cleaned)


def _many_message(added: int, updated: int) -> str:
    # PANDA's own wording, "1 rows added" included (models/dataset.py:add_many_rows).
    if added and updated:
        return f"{added} rows added and {updated} updated"
    if added:
        return f"{added} rows added"
    return f"{updated} rows updated"


class Store:
    """Every dataset of one fake PANDA. Not thread-safe; the app runs on one event loop.

    `rows_written` counts the rows every write has written or deleted since the store was made
    (a delete all counts one), which is what a costed request pays for.
    """

    def __init__(self, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._datasets: dict[str, Dataset] = {}
        self._next_id = 1
        self.rows_written = 0

    def now(self) -> str:
        """The store's current time, in PANDA's format."""
        return self._clock()

    def get(self, slug: str) -> Dataset | None:
        """The dataset with this slug, or None."""
        return self._datasets.get(slug)

    def newest_first(self) -> list[Dataset]:
        """All datasets, most recently created first (PANDA sorts by `creation_date desc`)."""
        return list(reversed(self._datasets.values()))

    def create(self, slug: str, *, name: str, description: str) -> Dataset:
        """A new dataset under `slug`.

        Creating a slug that exists makes it ambiguous, as in PANDA (which has no uniqueness
        check): the new dataset is returned but not kept, and the slug's `copies` goes up.
        """
        now = self._clock()
        dataset = Dataset(
            id=self._next_id,
            slug=slug,
            name=name,
            description=description,
            creation_date=now,
            uri=f"/api/1.0/dataset/{quote(slug)}/",
        )
        self._next_id += 1
        existing = self._datasets.get(slug)
        if existing is None:
            self._datasets[slug] = dataset
        else:
            existing.copies += 1
        return dataset

    def unique_slug(self, name: str) -> str:
        """The slug PANDA derives from a name: slugified, then `-2`, `-3`... on a clash."""
        base = slugify(name)
        if base not in self._datasets:
            return base
        number = 2
        while f"{base}-{number}" in self._datasets:
            number += 1
        return f"{base}-{number}"

    def delete(self, slug: str) -> None:
        """Remove a dataset and its rows at once (PANDA purges the rows later, in a task)."""
        del self._datasets[slug]

    def clear(self) -> None:
        """Forget every dataset."""
        self._datasets.clear()
        self._next_id = 1

    def lock(self, dataset: Dataset) -> None:
        """Record the lock PANDA takes around each row write (it leaves `locked_at` set)."""
        dataset.locked_at = self._clock()

    def upsert_many(
        self, dataset: Dataset, entries: list[tuple[object, str | None]]
    ) -> list[JsonRow]:
        """Write validated `(data, external_id)` pairs in order; return each as PANDA echoes it.

        Idempotent per external_id: a rewrite replaces the row and moves it to the end; within
        one call the last duplicate wins. Sets `N rows added/updated` from the recount.
        """
        now = self._clock()
        rows = dataset.rows
        written: list[JsonRow] = []
        for data, external_id in entries:
            row = _row(dataset, data, external_id)
            key = external_id or _ANONYMOUS + str(uuid4())
            rows.pop(key, None)
            rows[key] = StoredRow(row, now)
            written.append(row)
        self._keep_samples(dataset, [data for data, _ in entries[:5]])
        added = self._recount(dataset, now)
        dataset.last_modification = _many_message(added, len(entries) - added)
        self.rows_written += len(entries)
        return written

    def upsert_one(self, dataset: Dataset, data: object, external_id: str | None) -> JsonRow:
        """Write one row (single-row PUT or POST); sets `1 row added` or `1 row updated`."""
        now = self._clock()
        row = _row(dataset, data, external_id)
        key = external_id or _ANONYMOUS + str(uuid4())
        dataset.rows.pop(key, None)
        dataset.rows[key] = StoredRow(row, now)
        self._keep_samples(dataset, [data])
        added = self._recount(dataset, now)
        dataset.last_modification = "1 row added" if added else "1 row updated"
        self.rows_written += 1
        return row

    def delete_row(self, dataset: Dataset, external_id: str) -> None:
        """Delete one row if present; either way PANDA recounts and says `1 row deleted`."""
        now = self._clock()
        dataset.rows.pop(external_id, None)
        self._recount(dataset, now)
        dataset.last_modification = "1 row deleted"
        self.rows_written += 1

    def delete_all(self, dataset: Dataset) -> bool:
        """Delete every row; False where PANDA then fails (a 500) but keeps `row_count` 0.

        On a dataset never written (`row_count` null) PANDA's message formatting raises after
        the delete, and the unlock's save still stores `row_count` 0 and `last_modified`.
        """
        old_count = dataset.row_count
        dataset.rows.clear()
        dataset.row_count = 0
        self.rows_written += 1
        dataset.last_modified = self._clock()
        if old_count is None:
            return False
        dataset.last_modification = f"All {old_count} rows deleted"
        return True

    def _keep_samples(self, dataset: Dataset, first: list[object]) -> None:
        samples = dataset.sample_data if dataset.sample_data else []
        samples.extend(first[: 5 - len(samples)])
        dataset.sample_data = samples

    def _recount(self, dataset: Dataset, now: str) -> int:
        old_count = dataset.row_count
        dataset.row_count = len(dataset.rows)
        dataset.last_modified = now
        dataset.modified_by_user = True
        return dataset.row_count - (old_count or 0)
