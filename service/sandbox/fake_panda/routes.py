"""PANDA's URL patterns (`DatasetResource.override_urls`) and the methods each one allows.

Pure: a path in, a `Route` out. Patterns are matched in PANDA's order, Unicode-aware as Django
compiles them, so `/dataset/schema/` is the schema and never a dataset (panda-api.md §3).
"""

import enum
import re
from dataclasses import dataclass


class Kind(enum.Enum):
    """Which PANDA view a path reaches."""

    DATASETS = "datasets"
    SCHEMA = "schema"
    DATASET = "dataset"
    TASK = "task"
    ROWS = "rows"
    ROW = "row"
    SEARCH = "search"


_ALL = ("GET", "POST", "PUT", "DELETE")
_GET_ONLY = ("GET",)


@dataclass(frozen=True, slots=True)
class Route:
    """A resolved path: its view, dataset slug and row external_id (both URL-decoded)."""

    kind: Kind
    slug: str = ""
    external_id: str = ""

    @property
    def allowed(self) -> tuple[str, ...]:
        """Methods tastypie's `method_check` lets through; the rest get 405."""
        if self.kind in (Kind.SCHEMA, Kind.TASK, Kind.SEARCH):
            return _GET_ONLY
        return _ALL

    @property
    def rows(self) -> bool:
        """Whether this is a data (row) endpoint."""
        return self.kind in (Kind.ROWS, Kind.ROW)


_SLUG = r"(?P<slug>[\w\d_-]+)"
_PATTERNS = (
    (re.compile(r"^/api/1\.0/dataset/$"), Kind.DATASETS),
    (re.compile(r"^/api/1\.0/dataset/schema/$"), Kind.SCHEMA),
    (re.compile(rf"^/api/1\.0/dataset/{_SLUG}/$"), Kind.DATASET),
    (re.compile(rf"^/api/1\.0/dataset/{_SLUG}/(?:import/\d+|export|reindex)/$"), Kind.TASK),
    (re.compile(rf"^/api/1\.0/dataset/{_SLUG}/data/$"), Kind.ROWS),
    (re.compile(rf"^/api/1\.0/dataset/{_SLUG}/data/(?P<external_id>[\w\d_-]+)/$"), Kind.ROW),
    (re.compile(r"^/api/1\.0/data/"), Kind.SEARCH),  # no `$` in PANDA's pattern either
)

DATASET_URI = re.compile(rf"^/api/1\.0/dataset/{_SLUG}/$")


def resolve(path: str) -> Route | None:
    """The route for a decoded URL path, or None when PANDA has no view there."""
    for pattern, kind in _PATTERNS:
        match = pattern.match(path)
        if match is not None:
            found = match.groupdict()
            return Route(kind, found.get("slug") or "", found.get("external_id") or "")
    return None
