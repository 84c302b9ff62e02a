"""Source records to `Change`s: field paths, text values and the external_id.

Pure functions with no I/O. Every source kind (CouchDB documents, webhook bodies) maps
records through here, so a record gives the same row whichever way it arrived.
"""

import json
import math
from collections.abc import Mapping, Sequence

from service.changes import Change, Op
from service.config import SourceSettings
from service.sources import external_ids

_MISSING = object()


class MappingError(ValueError):
    """A record cannot become a change (no usable id); the message names the field."""


def field(record: object, path: str) -> object:
    """The value at a dotted path (`author.name`, `tags.0`), or `None` when any step is missing.

    A step into a list takes a decimal index; a step into anything else is missing.
    """
    value = _walk(record, path)
    return None if value is _MISSING else value


def has_field(record: object, path: str) -> bool:
    """Whether every step of the dotted path is there (its value may be null)."""
    return _walk(record, path) is not _MISSING


def _walk(record: object, path: str) -> object:
    """The value at the dotted path, or `_MISSING` from the first step that is not there."""
    value: object = record
    for step in path.split("."):
        value = _step(value, step)
        if value is _MISSING:
            return _MISSING
    return value


def _step(value: object, step: str) -> object:
    if isinstance(value, Mapping):
        return value.get(step, _MISSING)
    # ASCII digits only: `isdigit` holds for "²", which `int` refuses.
    if isinstance(value, Sequence) and not isinstance(value, str) and _is_index(step):
        index = int(step)
        return value[index] if index < len(value) else _MISSING
    return _MISSING


def _is_index(step: str) -> bool:
    return step.isascii() and step.isdigit()


def text(value: object) -> str:
    """A value as PANDA column text, one way for every source.

    missing or null → ``""``; strings as they are; ``true``/``false``; integers in decimal;
    finite floats as JSON writes them (``1.5``, ``1e+100``), NaN/Infinity as ``""``;
    objects and lists as compact JSON with their keys in source order, non-ASCII kept.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if type(value) is int:
        return str(value)  # what json.dumps writes, without building an encoder
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def doc_id(source: SourceSettings, record: Mapping[str, object]) -> str:
    """The record's source id from the source's `id_field`, as text.

    Raises `MappingError` when the id is missing, empty, not a string or integer, not
    storable text (a NUL, or a lone surrogate that a JSON `\\ud800` escape can produce), or so
    long that PANDA could not be sent its external_id.
    """
    value = field(record, source.id_field)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise MappingError(
            f"source {source.name}: field `{source.id_field}` must hold a non-empty string"
            f" or integer id, got {type(value).__name__}"
        )
    identifier = str(value)
    if "\x00" in identifier or not is_unicode(identifier):
        raise MappingError(
            f"source {source.name}: field `{source.id_field}` holds a NUL or a lone surrogate;"
            " ids must be valid Unicode text"
        )
    if external_ids.too_long(identifier):
        raise MappingError(
            f"source {source.name}: field `{source.id_field}` holds an id of"
            f" {len(identifier)} characters, whose external_id is over the"
            f" {external_ids.MAX_LENGTH} PANDA's row URLs can carry: ids must be shorter"
        )
    return identifier


def is_unicode(value: str) -> bool:
    """Whether `value` encodes as UTF-8 (holds no lone surrogate)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def upsert(source: SourceSettings, record: Mapping[str, object]) -> Change:
    """The change that makes the record's row current in PANDA."""
    identifier = doc_id(source, record)
    row = tuple(_column_text(source, record, column.field) for column in source.columns)
    return Change(source.name, identifier, external_ids.encode(identifier), Op.UPSERT, row)


def _column_text(source: SourceSettings, record: Mapping[str, object], path: str) -> str:
    try:
        return text(field(record, path))
    except RecursionError:
        raise MappingError(
            f"source {source.name}: field `{path}` holds a value nested too deeply to write as"
            " column text: map a field inside it, or leave it out of the columns"
        ) from None


def delete(source: SourceSettings, identifier: str) -> Change:
    """The change that removes the row of the record with this source id."""
    return Change(source.name, identifier, external_ids.encode(identifier), Op.DELETE)
