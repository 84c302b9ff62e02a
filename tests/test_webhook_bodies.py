"""`service.sources.webhook`: bodies in each format become changes, or name their bad fields."""

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.changes import Change, Op, SourceVersion
from service.config import SourceSettings
from service.sources import mapping
from service.sources.webhook import (
    BodyError,
    FieldProblem,
    MalformedBodyError,
    Parsed,
    body_schema,
    parse,
)
from tests import strategies

COLUMNS = [{"name": "Headline", "field": "title"}, {"name": "Author", "field": "author.name"}]


def source(format: str = "pandasync", **webhook: Any) -> SourceSettings:
    return SourceSettings.model_validate(
        {
            "name": "stories",
            "kind": "webhook",
            "dataset": {"slug": "stories", "name": "Stories"},
            "columns": COLUMNS,
            "webhook": {"signature": "none", "format": format, **webhook},
        }
    )


PANDASYNC = source()
COUCHDB = source("couchdb")
BAD_ID = (
    "an id is a non-empty string or integer, of valid Unicode text without NUL, short enough"
    " for PANDA's row URLs (its external_id at most 4096 characters)"
)


def read(spec: SourceSettings, body: object) -> Parsed:
    return parse(spec, json.dumps(body).encode())


def changes(*items: dict[str, Any]) -> tuple[Change, ...]:
    return read(PANDASYNC, {"changes": list(items)}).changes


def problems(spec: SourceSettings, body: object) -> list[FieldProblem]:
    with pytest.raises(BodyError) as raised:
        read(spec, body)
    return list(raised.value.problems)


def upsert(doc_id: str, external_id: str, *row: str, version: object = None) -> Change:
    stamp = None if version is None else SourceVersion.of(version)
    return Change("stories", doc_id, external_id, Op.UPSERT, row, source_version=stamp)


def delete(doc_id: str, external_id: str, version: object = None) -> Change:
    stamp = None if version is None else SourceVersion.of(version)
    return Change("stories", doc_id, external_id, Op.DELETE, source_version=stamp)


def test_an_upserts_row_object_is_read_through_the_sources_columns() -> None:
    row = {"title": "Budget passes", "author": {"name": "Ana"}, "words": 812}
    assert changes({"op": "upsert", "id": "Budget/2027", "row": row, "version": 3}) == (
        upsert("Budget/2027", "Budget_2F2027", "Budget passes", "Ana", version=3),
    )


def test_a_row_array_is_taken_in_column_order_as_text() -> None:
    assert changes({"op": "upsert", "id": 7, "row": [12.5, None]}) == (
        upsert("7", "7", "12.5", ""),
    )


def test_a_delete_needs_only_its_id_and_keeps_its_time_version() -> None:
    when = "2026-01-02T03:04:05+01:00"
    assert changes({"op": "delete", "id": "café", "version": when}) == (
        delete("café", "caf_C3_A9", when),
    )


def test_a_null_version_is_no_version() -> None:
    assert changes({"op": "delete", "id": "a", "version": None}) == (delete("a", "a"),)


def test_changes_keep_their_body_order() -> None:
    found = changes({"op": "upsert", "id": "a", "row": ["1", "x"]}, {"op": "delete", "id": "a"})
    assert found == (upsert("a", "a", "1", "x"), delete("a", "a"))


def test_wrong_types_are_named_field_by_field() -> None:
    body = {
        "changes": [
            {"op": "upsert", "id": True, "row": "x", "version": "yesterday"},
            {"op": "move", "id": "a"},
            {"op": "delete", "id": "b", "row": {}},
            {"op": "upsert", "id": ""},
        ]
    }
    assert problems(PANDASYNC, body) == [
        FieldProblem("changes[0].id", "an id is a non-empty string or an integer"),
        FieldProblem("changes[0].row", "a row is an object of fields or an array of column values"),
        FieldProblem(
            "changes[0].version",
            "a version is a number or an RFC 3339 time such as 2026-01-02T03:04:05Z",
        ),
        FieldProblem("changes[1].op", "Input should be 'upsert' or 'delete'"),
        FieldProblem("changes[2]", "a delete takes no row"),
        FieldProblem("changes[3].id", "an id is a non-empty string or an integer"),
    ]


def test_a_number_beyond_a_double_is_refused_not_written_as_empty_text() -> None:
    body = b'{"changes": [{"op": "upsert", "id": "a", "row": {"title": 1e999}}]}'
    with pytest.raises(BodyError) as refused:
        parse(PANDASYNC, body)
    assert refused.value.problems == (
        FieldProblem(
            "(body)", "the number 1e999 is beyond what a double holds: send it as a string"
        ),
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            [],
            FieldProblem("(body)", "Input should be a valid dictionary or instance of WebhookBody"),
        ),
        ({}, FieldProblem("changes", "Field required")),
        ({"changes": {}}, FieldProblem("changes", "Input should be a valid list")),
        (
            {"changes": [{"op": "delete", "id": "a", "colour": "red"}]},
            FieldProblem("changes[0].colour", "Extra inputs are not permitted"),
        ),
        (
            {"changes": [{"op": "upsert", "id": "a"}]},
            FieldProblem("changes[0]", "an upsert needs its row"),
        ),
        (
            {"changes": [{"op": "upsert", "id": "a", "row": ["only one"]}]},
            FieldProblem("changes[0].row", "holds 1 values; the dataset has 2 columns"),
        ),
        (
            {"changes": [{"op": "delete", "id": "a\u0000b"}]},
            FieldProblem("changes[0].id", BAD_ID),
        ),
        (
            {"changes": [{"op": "delete", "id": "a" * 4097}]},
            FieldProblem("changes[0].id", BAD_ID),
        ),
    ],
)
def test_a_body_of_the_wrong_shape_names_the_field(body: object, expected: FieldProblem) -> None:
    assert problems(PANDASYNC, body) == [expected]


@given(st.lists(strategies.json_values, min_size=2, max_size=2))
def test_any_json_values_in_a_row_array_become_their_text(values: list[object]) -> None:
    [change] = changes({"op": "upsert", "id": "a", "row": values})
    assert change.row == tuple(mapping.text(value) for value in values)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"changes": [', "the body is not JSON: Expecting value at line 1 column 14"),
        (b'{"changes": NaN}', "the body is not JSON: NaN is not a JSON value"),
        (b'{"changes": []}\xff', "the body is not UTF-8 (byte 15)"),
        (b"", "the body is not JSON: Expecting value at line 1 column 1"),
        (b"[" * 100_000, "the body is not JSON: maximum recursion depth exceeded"),
    ],
)
def test_a_body_that_is_not_json_says_where_it_breaks(body: bytes, message: str) -> None:
    with pytest.raises(MalformedBodyError) as raised:
        parse(PANDASYNC, body)
    assert str(raised.value).startswith(message)


DUPLICATE_OP = FieldProblem(
    "(body)",
    'an object holds the key "op" more than once, so which value is meant is unknown:'
    " send each key once",
)


@pytest.mark.parametrize(
    ("spec", "body"),
    [
        (
            PANDASYNC,
            b'{"changes": [{"op": "delete", "id": "a", "op": "upsert", "row": ["x", "y"]}]}',
        ),
        (COUCHDB, b'{"_id": "a", "title": "x", "op": 1, "op": 2}'),
        (
            source("jmespath", mapping={"op": "op"}),
            b'[{"_id": "a", "title": "x", "op": "delete", "op": "upsert"}]',
        ),
    ],
    ids=["pandasync", "couchdb", "jmespath"],
)
def test_a_key_given_twice_in_one_object_is_refused_in_every_format(
    spec: SourceSettings, body: bytes
) -> None:
    with pytest.raises(BodyError) as raised:
        parse(spec, body)
    assert raised.value.problems == (DUPLICATE_OP,)


def test_integers_past_64_bits_are_read_exactly() -> None:
    row = b'["\\u00e9", 123456789012345678901234567890]'
    body = b'{"changes": [{"op": "upsert", "id": "a", "row": ' + row + b"}]}"
    assert parse(PANDASYNC, body).changes == (
        upsert("a", "a", "\u00e9", "123456789012345678901234567890"),
    )


def test_the_schema_for_openapi_has_every_definition_inlined() -> None:
    schema = body_schema()
    item = schema["properties"]["changes"]["items"]
    assert ("$ref" in json.dumps(schema), sorted(item["properties"]), item["required"]) == (
        False,
        ["id", "op", "row", "version"],
        ["op", "id"],
    )


def test_a_couchdb_document_is_an_upsert_ordered_by_its_revision() -> None:
    document = {"_id": "s1", "_rev": "3-917fa2381192822767f010b95b45325b", "title": "Flood"}
    assert read(COUCHDB, document) == Parsed((upsert("s1", "s1", "Flood", "", version=3),))


def test_a_list_of_couchdb_documents_deletes_the_deleted_and_ignores_design_documents() -> None:
    documents = [
        {"_id": "s1", "title": "Flood", "author": {"name": "Ana"}},
        {"_id": "s2", "_rev": "4-ab", "_deleted": True},
        {"_id": "_design/views", "views": {}},
    ]
    assert read(COUCHDB, documents) == Parsed(
        (upsert("s1", "s1", "Flood", "Ana"), delete("s2", "s2", 4)), ignored=1
    )


def test_a_design_document_alone_is_ignored_as_in_a_list() -> None:
    assert read(COUCHDB, {"_id": "_design/x", "views": {}}) == Parsed((), ignored=1)


def test_a_bulk_docs_body_is_read_like_a_list() -> None:
    body = {"docs": [{"_id": "s1", "title": "Flood"}], "new_edits": False}
    assert read(COUCHDB, body) == Parsed((upsert("s1", "s1", "Flood", ""),))


def test_a_bulk_docs_body_without_a_list_of_documents_is_named() -> None:
    assert problems(COUCHDB, {"docs": {"_id": "s1"}}) == [
        FieldProblem("docs", "a _bulk_docs body holds a list of documents")
    ]


def test_a_single_couchdb_document_without_an_id_is_named() -> None:
    assert problems(COUCHDB, {"title": "no id"}) == [FieldProblem("_id", BAD_ID)]


def test_bad_couchdb_documents_are_named_by_their_place() -> None:
    documents = [{"title": "no id"}, {"_id": "s2", "_rev": "three"}, "not a document"]
    assert problems(COUCHDB, {"docs": documents}) == [
        FieldProblem(
            "docs[0]._id",
            BAD_ID,
        ),
        FieldProblem("docs[1]._rev", "a CouchDB revision looks like 3-917fa238..."),
        FieldProblem("docs[2]", "a CouchDB document is a JSON object"),
    ]


CMS = source(
    "jmespath",
    mapping={
        "items": "entries",
        "id": "sys.id",
        "op": "sys.type == 'DeletedEntry' && 'delete' || 'upsert'",
        "version": "sys.updatedAt",
        "columns": {"Headline": 'fields.title."en-US"'},
    },
)


def test_any_json_is_read_through_the_sources_jmespath_mapping() -> None:
    body = {
        "entries": [
            {
                "sys": {"id": "e1", "type": "Entry", "updatedAt": "2026-01-02T03:04:05Z"},
                "fields": {"title": {"en-US": "Flood"}},
                "author": {"name": "Ana"},
            },
            {"sys": {"id": 2, "type": "DeletedEntry", "updatedAt": "2026-01-02T03:04:06Z"}},
        ]
    }
    assert read(CMS, body).changes == (
        upsert("e1", "e1", "Flood", "Ana", version="2026-01-02T03:04:05Z"),
        delete("2", "2", "2026-01-02T03:04:06Z"),
    )


def test_without_expressions_the_sources_id_field_and_column_fields_are_read() -> None:
    plain = source("jmespath", mapping={"items": "data"})
    body = {"data": {"_id": "s1", "title": "Flood"}}
    assert read(plain, body).changes == (upsert("s1", "s1", "Flood", ""),)


def test_bad_mapped_fields_are_named_by_item_and_mapping_key() -> None:
    body = {
        "entries": [
            {"sys": {"type": "Entry"}},
            {"sys": {"id": "e2", "type": "Entry", "updatedAt": 1.5e300}},
            {"sys": {"id": "e3", "type": "Entry", "updatedAt": "noon"}},
        ]
    }
    assert problems(CMS, body) == [
        FieldProblem(
            "items[0].id",
            BAD_ID,
        ),
        FieldProblem(
            "items[2].version",
            "a version is a number or an RFC 3339 time such as 2026-01-02T03:04:05Z",
        ),
    ]


def test_items_that_are_not_a_list_are_named() -> None:
    odd = source("jmespath", mapping={"items": "count"})
    assert problems(odd, {"count": 3}) == [
        FieldProblem("mapping.items", "`count` gives a number, not a list")
    ]


@pytest.mark.parametrize(
    ("kind", "described"),
    [
        ("remove", "a string"),
        (None, "null"),
        (True, "a boolean"),
        ({"op": "delete"}, "an object"),
        (["delete"], "a list"),
    ],
)
def test_an_op_that_is_not_upsert_or_delete_is_named(kind: object, described: str) -> None:
    odd = source("jmespath", mapping={"items": "items", "op": "kind"})
    assert problems(odd, {"items": [{"_id": "a", "kind": kind}]}) == [
        FieldProblem("items[0].op", f'`kind` gives {described}; it must give "upsert" or "delete"')
    ]


def test_a_mapped_version_that_is_null_means_no_version() -> None:
    versioned = source("jmespath", mapping={"version": "updated"})
    item = {"_id": "a", "title": "t", "updated": None}
    assert read(versioned, [item]).changes == (upsert("a", "a", "t", ""),)


def test_an_expression_that_fails_on_an_item_is_named() -> None:
    failing = source("jmespath", mapping={"columns": {"Headline": "length(title)"}})
    assert problems(failing, [{"_id": "a", "title": 5}]) == [
        FieldProblem(
            "items[0].columns.Headline", "`length(title)` fails on this item (JMESPathTypeError)"
        )
    ]


def test_a_row_with_none_of_the_columns_fields_is_refused_naming_what_it_has() -> None:
    body = {"changes": [{"op": "upsert", "id": "a", "row": {"headline": "x", "words": 3}}]}
    assert problems(PANDASYNC, body) == [
        FieldProblem(
            "changes[0].row",
            "holds none of the columns' fields: it has `headline`, `words`; the columns of"
            " source stories read `title`, `author.name`",
        )
    ]


def test_a_row_with_some_of_the_columns_fields_is_taken_with_the_others_empty() -> None:
    item = {"op": "upsert", "id": "a", "row": {"title": "x", "words": 3}}
    assert changes(item) == (upsert("a", "a", "x", ""),)


def test_a_mapped_item_with_none_of_the_columns_fields_is_refused() -> None:
    mapped = source("jmespath", mapping={})
    (problem,) = problems(mapped, [{"_id": "a", "headline": "x"}])
    assert (problem.field, "it has `_id`, `headline`" in problem.message) == ("items[0]", True)


def test_a_row_value_with_a_lone_surrogate_is_refused_at_the_door() -> None:
    body = '{"changes": [{"op": "upsert", "id": "a", "row": {"title": "x\\ud800y"}}]}'
    with pytest.raises(BodyError) as raised:
        parse(PANDASYNC, body.encode())
    (problem,) = raised.value.problems
    assert (problem.field, "lone surrogate" in problem.message) == ("changes[0].row", True)


def test_a_couchdb_document_with_a_lone_surrogate_is_refused_at_the_door() -> None:
    body = '{"_id": "a", "title": "x\\udfffy"}'
    with pytest.raises(BodyError) as raised:
        parse(COUCHDB, body.encode())
    (problem,) = raised.value.problems
    assert (problem.field, "lone surrogate" in problem.message) == ("(body)", True)
