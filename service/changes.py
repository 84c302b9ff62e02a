"""The values that flow through pandasync: a `Change` to one row and an opaque `Seq`.

Pure values only: no I/O, no knowledge of where a change came from or goes to.
"""

import decimal
import enum
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime


class Op(enum.StrEnum):
    """What a change does to its row in PANDA."""

    UPSERT = "upsert"
    DELETE = "delete"


# RFC 3339 `date-time`: a full date and time with seconds and an offset (`Z` or `±hh:mm`).
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
# Enough digits for any JSON number Python reads (ints stop at 4300 digits), so
# normalising a number never rounds it.
_EXACT = decimal.Context(prec=5000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
_NUMBER, _TIME = "n:", "t:"
_ACCEPTED = "a version is a number or an RFC 3339 time such as 2026-01-02T03:04:05Z"


@dataclass(frozen=True)
class SourceVersion:
    """A source's own version of a document: a number, or an RFC 3339 time.

    Held as normalised text, so that equal versions have equal text (`1` and `1.0`; the same
    instant at two offsets): `n:<decimal>` or `t:<UTC time to the microsecond>Z`. Two numbers
    or two times compare; a number and a time do not.
    """

    text: str

    @classmethod
    def of(cls, value: object) -> "SourceVersion":
        """The version a JSON value gives: a finite number or an RFC 3339 time with offset.

        Raises `ValueError` for anything else (booleans, numeric strings, naive times, leap
        seconds); the message says what is accepted.
        """
        if isinstance(value, int | float) and not isinstance(value, bool):
            return cls(_NUMBER + _number_text(value))
        if isinstance(value, str) and _RFC3339.fullmatch(value):
            return cls(_TIME + _time_text(value))
        raise ValueError(_ACCEPTED)

    def older_than(self, other: "SourceVersion") -> bool:
        """Whether this version comes strictly before `other`; False when they do not compare."""
        if self.text[:2] != other.text[:2]:
            return False
        if self.text.startswith(_NUMBER):
            return decimal.Decimal(self.text[2:]) < decimal.Decimal(other.text[2:])
        # Fixed-width UTC text: text order is time order.
        return self.text[2:] < other.text[2:]


def _number_text(value: int | float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a version number must be finite")
    # repr() is the shortest text that reads back as the same float.
    number = decimal.Decimal(value if isinstance(value, int) else repr(value))
    if number.is_zero():
        return "0"
    return str(number.normalize(_EXACT))


def _time_text(value: str) -> str:
    try:
        moment = datetime.fromisoformat(value.upper()).astimezone(UTC)
    except (ValueError, OverflowError):
        # A leap second (`:60`), day 31 of a 30-day month, a year out of Python's range.
        raise ValueError(f"{_ACCEPTED}; this one is not a real UTC instant") from None
    # Fixed width (year 0001 to 9999), so text order is time order.
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True)
class Change:
    """The latest known state of one source document, as a PANDA row.

    `doc_id` is the source's own id; `external_id` is its PANDA-safe encoding
    (see `service.sources.external_ids`). `row` holds the column values in the dataset's
    column order for an upsert and is `None` for a delete. `source_version` is the source's
    own version of the document, when it sends one: a change older than one already
    accepted for the document is stale (see `service.store.outbox.enqueue`).
    """

    source: str
    doc_id: str
    external_id: str
    op: Op
    row: tuple[str, ...] | None = None
    source_version: SourceVersion | None = None

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


@dataclass(frozen=True)
class Unmapped:
    """A document that could not become a change: its id, the seq it came at, and why."""

    doc_id: str
    seq: Seq | None
    reason: str
