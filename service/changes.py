"""The values that flow through pandasync: a `Change` to one row and an opaque `Seq`.

Pure values only: no I/O, no knowledge of where a change came from or goes to.
"""

import enum
import json
from dataclasses import dataclass


class Op(enum.StrEnum):
    """What a change does to its row in PANDA."""

    UPSERT = "upsert"
    DELETE = "delete"


@dataclass(frozen=True)
class Change:
    """The latest known state of one source document, as a PANDA row.

    `doc_id` is the source's own id; `external_id` is its PANDA-safe encoding
    (see `service.external_ids`). `row` holds the column values in the dataset's
    column order for an upsert and is `None` for a delete.
    """

    source: str
    doc_id: str
    external_id: str
    op: Op
    row: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.op is Op.UPSERT) != (self.row is not None):
            raise ValueError(
                f"an {self.op} change {'needs' if self.op is Op.UPSERT else 'takes no'} row"
            )


@dataclass(frozen=True)
class Seq:
    """A position in a source's change feed, kept verbatim as JSON text.

    CouchDB seqs are opaque (integers on pouchdb-server, strings on CouchDB 3):
    never parse, compare or do arithmetic on them; store and send back as they came.
    """

    json_text: str

    @classmethod
    def of(cls, value: object) -> "Seq":
        """Wrap a seq value as it appeared in a decoded `_changes` response."""
        return cls(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def value(self) -> object:
        """The seq as the feed gave it (for sending back)."""
        return json.loads(self.json_text)

    def param(self) -> str:
        """The seq as the `since=` query parameter: strings verbatim, other values as JSON."""
        value = self.value()
        return value if isinstance(value, str) else self.json_text
