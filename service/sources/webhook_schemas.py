"""The JSON schema of one webhook source's bodies, in its format, for the OpenAPI document.

Pure: built from the source's settings. The rules are those `service.sources.webhook` reads
bodies by (ids, versions, rows and their columns' fields); what a schema cannot say (a lone
surrogate in a value, a key given twice) is said in the descriptions.
"""

import re
from typing import Any

from service.config import SourceSettings, WebhookMapping

Schema = dict[str, Any]

# JSON leaves these to the reader; `webhook.parse` refuses them (422).
_UNSAID = (
    " An object holding a key twice, or a value holding a lone surrogate (an unpaired"
    " `\\ud800`-style escape), is refused (422)."
)
_EXTERNAL_ID = (
    " It becomes the row's PANDA external_id: ASCII letters and digits as they are, every"
    " other character as its UTF-8 bytes, each written `_XX` (`a b` is `a_20b`)."
)
ID: Schema = {
    "description": "A non-empty string (valid Unicode, no NUL) or an integer." + _EXTERNAL_ID,
    "anyOf": [{"type": "string", "minLength": 1, "pattern": "^[^\\x00]+$"}, {"type": "integer"}],
}
VERSION: Schema = {
    "description": "A number, or an RFC 3339 time with its offset (`2026-01-02T03:04:05Z`);"
    " a change older than one already accepted for its id is skipped as stale.",
    "anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}, {"type": "null"}],
}
# A CouchDB revision: its generation, a dash, its hash (`3-917fa2381192822767f010b95b45325b`).
REVISION: Schema = {"type": "string", "pattern": "^[0-9]{1,15}-[0-9A-Za-z]+$"}
# A JMESPath expression that is a plain path of identifiers (or `@`, the body itself).
_PLAIN = re.compile(r"@|[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def body_schema(source: SourceSettings) -> Schema:
    """The schema of `source`'s webhook bodies, in its `webhook.format`."""
    assert source.webhook is not None  # config: a webhook source has its webhook table
    if source.webhook.format == "pandasync":
        return _pandasync(source)
    if source.webhook.format == "couchdb":
        return _couchdb(source)
    assert source.webhook.mapping is not None  # config: the jmespath format has one
    return _jmespath(source, source.webhook.mapping)


def _jmespath(source: SourceSettings, rules: WebhookMapping) -> Schema:
    """A schema where the mapping's expressions are plain paths (`data.items`, `uuid`); any
    JSON, described, where one is more (a JMESPath schema cannot follow)."""
    described = (
        "Read through the source's mapping (JMESPath): its items are at"
        f" `{rules.items}`, and each item's id, op, version and columns are read from it; an"
        " item the mapping cannot read is refused (422), naming it." + _UNSAID
    )
    paths = [rules.items, rules.id, rules.version, *rules.columns.values()]
    if rules.op is not None or not all(p is None or _PLAIN.fullmatch(p) for p in paths):
        return {"description": described}
    parts = [_path(rules.id or source.id_field, ID)]
    if rules.version is not None:
        parts.append(_path(rules.version, VERSION, required=False))
    if not any(column.name in rules.columns for column in source.columns):
        parts.append({"anyOf": [_path(column.field, {}) for column in source.columns]})
    item: Schema = {"type": "object", "allOf": parts}
    items: Schema = {"anyOf": [item, {"type": "array", "items": item}]}
    body = items if rules.items == "@" else _path(rules.items, items)
    return {**body, "description": described}


def _path(path: str, leaf: Schema, *, required: bool = True) -> Schema:
    """An object holding `leaf` at the dotted `path` (`author.name`), or, not `required`,
    holding it there if it holds anything there."""
    first, _, rest = path.partition(".")
    inner = _path(rest, leaf, required=required) if rest else leaf
    schema: Schema = {"type": "object", "properties": {first: inner}}
    return {**schema, "required": [first]} if required else schema


def _row(source: SourceSettings) -> Schema:
    fields = [column.field for column in source.columns]
    columns = ", ".join(f"`{column.name}` from `{column.field}`" for column in source.columns)
    return {
        "description": f"The document as an object holding at least one of the columns'"
        f" fields ({columns}), or its {len(fields)} values in the columns' order.",
        "anyOf": [
            {"type": "object", "anyOf": [_path(field, {}) for field in fields]},
            {"type": "array", "minItems": len(fields), "maxItems": len(fields)},
        ],
    }


def _pandasync(source: SourceSettings) -> Schema:
    common: Schema = {"id": ID, "version": VERSION}
    upsert: Schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["op", "id", "row"],
        "properties": {"op": {"const": "upsert"}, "row": _row(source), **common},
    }
    delete: Schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["op", "id"],
        "properties": {"op": {"const": "delete"}, "row": {"type": "null"}, **common},
    }
    return {
        "description": "pandasync's format: changes in the order they happened (the last per"
        " id wins); an upsert carries its row, a delete none." + _UNSAID,
        "type": "object",
        "additionalProperties": False,
        "required": ["changes"],
        "properties": {"changes": {"type": "array", "items": {"oneOf": [upsert, delete]}}},
    }


def _couchdb(source: SourceSettings) -> Schema:
    document = _path(source.id_field, ID)
    document["properties"] |= {
        "_rev": {**REVISION, "description": "Its generation orders the document's changes."},
        "_deleted": {"type": "boolean", "description": "`true` deletes the row."},
    }
    document["description"] = (
        "A CouchDB document; a design document (`_design/...`) is ignored. The columns read"
        " " + ", ".join(f"`{column.field}`" for column in source.columns) + "."
    )
    documents = {"type": "array", "items": document}
    return {
        "description": "CouchDB documents: one, a list of them, or a `_bulk_docs` body." + _UNSAID,
        "anyOf": [
            document,
            documents,
            {"type": "object", "required": ["docs"], "properties": {"docs": documents}},
        ],
    }
