"""Webhook bodies to `Change`s, in the source's format: pandasync's own, CouchDB documents, or
any JSON through a JMESPath mapping.

Pure: reads the raw bytes and maps records through `mapping`; never touches the store (the
webhook route commits what this returns) and never checks signatures
(`service.ingress.signatures` does).
"""

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import jmespath
import jmespath.exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.changes import Change, Op, SourceVersion
from service.config import SourceSettings, WebhookMapping, place
from service.sources import external_ids, mapping

DESIGN_PREFIX = "_design/"
# A CouchDB revision: its generation, a dash, its hash (`3-917fa2381192822767f010b95b45325b`).
_REVISION = re.compile(r"([0-9]{1,15})-[0-9A-Za-z]+")
# How many problems one answer lists at most.
MAX_PROBLEMS = 20
_BAD_ID = (
    "an id is a non-empty string or integer, of valid Unicode text without NUL, short enough"
    f" for PANDA's row URLs (its external_id at most {external_ids.MAX_LENGTH} characters)"
)
T = TypeVar("T")


class MalformedBodyError(ValueError):
    """The body is not JSON (or not UTF-8): answer 400. The message says where it breaks."""


@dataclass(frozen=True)
class FieldProblem:
    """What is wrong with one field of a body: `field` is its place (`changes[2].version`)."""

    field: str
    message: str


class BodyError(ValueError):
    """The body is JSON but not changes of this source's format: answer 422 with `problems`."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        self.problems = tuple(problems[:MAX_PROBLEMS])
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in self.problems))


@dataclass(frozen=True)
class Parsed:
    """The changes a body holds, in body order, and how many documents it ignored on purpose
    (CouchDB design documents)."""

    changes: tuple[Change, ...]
    ignored: int = 0


class WebhookChange(BaseModel):
    """One change in pandasync's webhook format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["upsert", "delete"] = Field(description="What the change does to its row.")
    id: str | int = Field(
        description="The document's id in the source (a non-empty string or an integer); it"
        " becomes the row's external_id, which must be at most"
        f" {external_ids.MAX_LENGTH} characters (ASCII letters and digits count one each,"
        " every other character three per UTF-8 byte)."
    )
    row: dict[str, Any] | list[Any] | None = Field(
        default=None,
        description="Upserts only: the document as an object, whose fields the source's"
        " columns read (dotted paths), or the values in the dataset's column order.",
    )
    version: int | float | str | None = Field(
        default=None,
        description="The document's version in the source: a number or an RFC 3339 time."
        " A change older than one already accepted for the document is skipped as stale.",
    )

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            raise ValueError("an id is a non-empty string or an integer")
        return value

    @field_validator("row", mode="before")
    @classmethod
    def _row(cls, value: object) -> object:
        if value is not None and not isinstance(value, dict | list):
            raise ValueError("a row is an object of fields or an array of column values")
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        if value is not None:
            SourceVersion.of(value)
        return value

    @model_validator(mode="after")
    def _row_matches_op(self) -> "WebhookChange":
        if self.op == "upsert" and self.row is None:
            raise ValueError("an upsert needs its row")
        if self.op == "delete" and self.row is not None:
            raise ValueError("a delete takes no row")
        return self


class WebhookBody(BaseModel):
    """pandasync's webhook format: changes in the order they happened (the last per id wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    changes: Annotated[list[WebhookChange], Field(description="The changes.")]


def body_schema() -> dict[str, Any]:
    """`WebhookBody`'s JSON schema with its definitions inlined (for an OpenAPI request body)."""
    schema = WebhookBody.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: object) -> object:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    inlined: dict[str, Any] = {key: inline(value) for key, value in schema.items()}
    return inlined


def parse(source: SourceSettings, body: bytes) -> Parsed:
    """The changes in a webhook body, read in the source's format.

    Raises `MalformedBodyError` when the body is not UTF-8 JSON, and `BodyError` naming each
    bad field when it does not hold changes of the source's format (or an object of it holds
    a key twice). All or nothing: one bad change refuses the whole body.
    """
    assert source.webhook is not None  # config: a webhook source has its webhook table
    document = _json(body)
    if source.webhook.format == "pandasync":
        return Parsed(tuple(_pandasync(source, document)))
    if source.webhook.format == "couchdb":
        return _couchdb(source, document)
    assert source.webhook.mapping is not None  # config: the jmespath format has one
    return Parsed(tuple(_jmespath(source, source.webhook.mapping, document)))


def _json(body: bytes) -> object:
    # The standard parser, not orjson: orjson reads an integer past 64 bits as a float (so a
    # row would not hold the number sent) and refuses a lone surrogate escape JSON allows.
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedBodyError(f"the body is not UTF-8 (byte {error.start})") from None
    try:
        return json.loads(
            text,
            parse_constant=_no_constant,
            parse_float=_finite,
            object_pairs_hook=_unique_keys,
        )
    except (_DuplicateKeyError, _OutOfRangeError) as error:
        raise BodyError([FieldProblem("(body)", str(error))]) from None
    except json.JSONDecodeError as error:
        raise MalformedBodyError(
            f"the body is not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except (ValueError, RecursionError) as error:
        raise MalformedBodyError(f"the body is not JSON: {error}") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


class _OutOfRangeError(ValueError):
    """A number of the body is beyond what a double holds."""


def _finite(literal: str) -> float:
    # Python reads `1e999` as infinity, which a column would hold as "": the sender's value
    # would be lost without a word.
    value = float(literal)
    if math.isinf(value):
        raise _OutOfRangeError(
            f"the number {literal[:40]} is beyond what a double holds: send it as a string"
        )
    return value


class _DuplicateKeyError(Exception):
    """An object of the body holds one key twice."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # JSON leaves a repeated key to the reader (RFC 8259 section 4) and Python keeps the last:
    # `{"op": "delete", "op": "upsert"}` would be an upsert. Which one the sender meant is
    # unknown, so the body is refused.
    found = dict(pairs)
    if len(found) < len(pairs):
        counts = Counter(key for key, _ in pairs)
        twice = next(key for key, count in counts.items() if count > 1)
        raise _DuplicateKeyError(
            f"an object holds the key {json.dumps(twice[:40])} more than once, so which value"
            " is meant is unknown: send each key once"
        )
    return found


def _collect(items: Sequence[T], convert: Callable[[int, T], Change]) -> list[Change]:
    """Each item converted, or a `BodyError` with the problems of every item that failed."""
    changes: list[Change] = []
    problems: list[FieldProblem] = []
    for index, item in enumerate(items):
        try:
            changes.append(convert(index, item))
        except BodyError as error:
            problems += error.problems
    if problems:
        raise BodyError(problems)
    return changes


def _pandasync(source: SourceSettings, document: object) -> list[Change]:
    try:
        body = WebhookBody.model_validate(document)
    except ValidationError as error:
        raise BodyError(
            [
                FieldProblem(
                    place(detail["loc"]) or "(body)",
                    detail["msg"].removeprefix("Value error, "),
                )
                for detail in error.errors()
            ]
        ) from None
    return _collect(
        body.changes, lambda index, item: _own_change(source, f"changes[{index}]", item)
    )


def _own_change(source: SourceSettings, where: str, item: WebhookChange) -> Change:
    identifier = _identifier(source, item.id, f"{where}.id")
    version = None if item.version is None else SourceVersion.of(item.version)
    if item.row is None:
        return _change(source, identifier, None, version, where)
    if isinstance(item.row, dict):
        _some_column(source, item.row, f"{where}.row", [column.field for column in source.columns])
        return _change(source, identifier, _row_of(source, item.row), version, f"{where}.row")
    if len(item.row) != len(source.columns):
        raise BodyError(
            [
                FieldProblem(
                    f"{where}.row",
                    f"holds {len(item.row)} values; the dataset has {len(source.columns)} columns",
                )
            ]
        )
    row = tuple(mapping.text(value) for value in item.row)
    return _change(source, identifier, row, version, f"{where}.row")


# How many of a record's field names a refusal lists.
_NAMES_SHOWN = 10


def _some_column(source: SourceSettings, record: object, where: str, fields: Sequence[str]) -> None:
    """Refuse a record that holds none of the fields the source's columns read: it would
    become a row of empty text (a partial match is fine)."""
    if any(mapping.has_field(record, path) for path in fields):
        return
    names = list(record) if isinstance(record, dict) else []
    shown = ", ".join(f"`{str(name)[:40]}`" for name in names[:_NAMES_SHOWN]) or "no fields"
    more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    expected = ", ".join(f"`{path}`" for path in fields)
    raise BodyError(
        [
            FieldProblem(
                where,
                f"holds none of the columns' fields: it has {shown}{more}; the columns of"
                f" source {source.name} read {expected}",
            )
        ]
    )


def _row_of(source: SourceSettings, record: Mapping[str, object]) -> tuple[str, ...]:
    return tuple(mapping.text(mapping.field(record, column.field)) for column in source.columns)


def _change(
    source: SourceSettings,
    identifier: str,
    row: tuple[str, ...] | None,
    version: SourceVersion | None,
    where: str,
) -> Change:
    """The change, refused when a row value could never be written (a lone surrogate, from a
    JSON `\\ud800` escape with no pair: no database column takes it)."""
    if row is not None and not all(map(mapping.is_unicode, row)):
        raise BodyError(
            [
                FieldProblem(
                    where or "(body)",
                    "a value holds a lone surrogate (an unpaired \\ud800-style escape), which"
                    " PANDA cannot store: send valid Unicode",
                )
            ]
        )
    op = Op.DELETE if row is None else Op.UPSERT
    encoded = external_ids.encode(identifier)
    return Change(source.name, identifier, encoded, op, row, source_version=version)


def _identifier(source: SourceSettings, value: object, where: str) -> str:
    """The id as text, checked the one way every source's ids are (`mapping.doc_id`)."""
    record: object = value
    for step in reversed(source.id_field.split(".")):
        record = {step: record}
    assert isinstance(record, dict)
    try:
        return mapping.doc_id(source, record)
    except mapping.MappingError:
        raise BodyError([FieldProblem(where, _BAD_ID)]) from None


def _couchdb(source: SourceSettings, document: object) -> Parsed:
    """One document, a list of them, or a `_bulk_docs` body (`{"docs": [...]}`)."""
    if isinstance(document, list):
        documents, prefix = document, ""
    elif isinstance(document, dict) and "_id" not in document and "docs" in document:
        documents, prefix = document["docs"], "docs"
        if not isinstance(documents, list):
            raise BodyError([FieldProblem("docs", "a _bulk_docs body holds a list of documents")])
    elif _is_design(document):
        return Parsed((), ignored=1)  # a design document alone, ignored as in a list
    else:
        return Parsed(tuple(_collect([document], lambda _, doc: _document(source, "", doc))))
    designs = [_is_design(doc) for doc in documents]
    kept = [doc for doc, design in zip(documents, designs, strict=True) if not design]
    places = [f"{prefix}[{index}]" for index, design in enumerate(designs) if not design]
    changes = _collect(kept, lambda index, doc: _document(source, places[index], doc))
    return Parsed(tuple(changes), ignored=sum(designs))


def _is_design(doc: object) -> bool:
    return isinstance(doc, dict) and str(doc.get("_id", "")).startswith(DESIGN_PREFIX)


def _document(source: SourceSettings, where: str, doc: object) -> Change:
    """A CouchDB document as a change: `_deleted: true` deletes; `_rev`'s generation orders."""
    if not isinstance(doc, dict):
        raise BodyError([FieldProblem(where or "(body)", "a CouchDB document is a JSON object")])
    inside = f"{where}." if where else ""
    try:
        identifier = mapping.doc_id(source, doc)
    except mapping.MappingError:
        raise BodyError([FieldProblem(inside + source.id_field, _BAD_ID)]) from None
    version = _revision(doc.get("_rev"), inside + "_rev")
    row = None if doc.get("_deleted") is True else _row_of(source, doc)
    return _change(source, identifier, row, version, where)


def _revision(rev: object, where: str) -> SourceVersion | None:
    # CouchDB numbers each document's revisions 1, 2, 3...: the generation before the dash
    # (CouchDB docs, "Document Revisions"). Revisions of one generation do not order.
    if rev is None:
        return None
    found = _REVISION.fullmatch(rev) if isinstance(rev, str) else None
    if found is None:
        raise BodyError([FieldProblem(where, "a CouchDB revision looks like 3-917fa238...")])
    return SourceVersion.of(int(found.group(1)))


def _jmespath(source: SourceSettings, rules: WebhookMapping, document: object) -> list[Change]:
    items = _search(rules.items, document, "mapping.items")
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise BodyError(
            [FieldProblem("mapping.items", f"`{rules.items}` gives {_kind(items)}, not a list")]
        )
    return _collect(items, lambda index, item: _item(source, rules, f"items[{index}]", item))


def _item(source: SourceSettings, rules: WebhookMapping, where: str, item: object) -> Change:
    op = Op.UPSERT if rules.op is None else _op(rules.op, item, f"{where}.op")
    record = item if isinstance(item, dict) else {}
    raw_id = (
        mapping.field(record, source.id_field)
        if rules.id is None
        else _search(rules.id, item, f"{where}.id")
    )
    identifier = _identifier(source, raw_id, f"{where}.id")
    version = None if rules.version is None else _version(rules.version, item, where)
    if op is Op.DELETE:
        return _change(source, identifier, None, version, where)
    if not any(column.name in rules.columns for column in source.columns):
        _some_column(source, record, where, [column.field for column in source.columns])
    row = tuple(
        mapping.text(
            _search(rules.columns[column.name], item, f"{where}.columns.{column.name}")
            if column.name in rules.columns
            else mapping.field(record, column.field)
        )
        for column in source.columns
    )
    return _change(source, identifier, row, version, where)


def _op(expression: str, item: object, where: str) -> Op:
    value = _search(expression, item, where)
    if value not in ("upsert", "delete"):
        message = f'`{expression}` gives {_kind(value)}; it must give "upsert" or "delete"'
        raise BodyError([FieldProblem(where, message)])
    return Op(value)


def _version(expression: str, item: object, where: str) -> SourceVersion | None:
    value = _search(expression, item, f"{where}.version")
    if value is None:
        return None
    try:
        return SourceVersion.of(value)
    except ValueError as error:
        raise BodyError([FieldProblem(f"{where}.version", str(error))]) from None


def _search(expression: str, value: object, where: str) -> object:
    try:
        return jmespath.search(expression, value)
    except jmespath.exceptions.JMESPathError as error:
        message = f"`{expression}` fails on this item ({type(error).__name__})"
        raise BodyError([FieldProblem(where, message)]) from None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "a list"
