"""Bad input to the pure parsers, found by hypothesis: whatever a CouchDB feed line, a
`_changes` page or a record holds, the parser gives its value or its own documented error
(`FeedBrokenError`, `MappingError`), never another exception; a row that is a change keeps its
document's id. The HTTP surface is covered by schemathesis over the whole OpenAPI document in
tests/test_api_schema.py (run once, not again here)."""

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from service.config import Column, DatasetSettings, SourceSettings
from service.sources import external_ids
from service.sources.couchdb import End, FeedBrokenError, Page, Row, page_of, parse_line
from service.sources.mapping import MappingError, field, upsert
from tests.strategies import any_texts, json_values

SOURCE = SourceSettings(
    name="stories",
    kind="couchdb",
    dataset=DatasetSettings(slug="stories", name="Stories"),
    columns=[
        Column(name="Title", field="title"),
        Column(name="Author", field="author.name"),
        Column(name="First tag", field="tags.0"),
    ],
    couchdb={"url": "http://127.0.0.1:5984", "database": "news"},
)
# What a `_changes` row could hold: CouchDB's own keys, with any value, among others.
row_values = st.fixed_dictionaries(
    {},
    optional={
        "seq": json_values,
        "id": json_values,
        "deleted": json_values,
        "doc": json_values
        | st.dictionaries(st.sampled_from(["_id", "title", "author"]), json_values),
        "changes": json_values,
        "last_seq": json_values,
        "error": json_values,
    },
)
lines = (
    st.binary(max_size=200) | any_texts | json_values.map(json.dumps) | row_values.map(json.dumps)
)


@given(lines)
def test_a_feed_line_is_a_row_the_feeds_end_or_a_broken_feed(line: str | bytes) -> None:
    try:
        parsed = parse_line(SOURCE, line)
    except FeedBrokenError:
        return
    assert isinstance(parsed, Row | End)
    if isinstance(parsed, Row) and parsed.change is not None:
        assert parsed.change.external_id == external_ids.encode(parsed.change.doc_id)


@given(
    json_values
    | st.fixed_dictionaries(
        {"results": st.lists(row_values | json_values, max_size=4)},
        optional={"last_seq": json_values, "pending": json_values},
    )
)
def test_a_changes_answer_is_a_page_or_a_broken_feed(body: Any) -> None:
    try:
        page = page_of(SOURCE, body)
    except FeedBrokenError:
        return
    assert isinstance(page, Page)
    assert page.rows == len(body["results"])
    assert len(page.changes) + page.skipped <= page.rows


@given(
    st.dictionaries(
        st.sampled_from(["_id", "title", "author", "tags"]) | any_texts, json_values, max_size=5
    )
)
def test_a_record_is_a_change_with_one_text_per_column_or_a_mapping_error(
    record: dict[str, Any],
) -> None:
    try:
        change = upsert(SOURCE, record)
    except MappingError:
        return
    assert change.row is not None
    assert len(change.row) == len(SOURCE.columns)
    assert all(isinstance(value, str) for value in change.row)


@given(json_values, any_texts)
def test_any_field_path_on_any_value_reads_a_value_or_none(record: Any, path: str) -> None:
    field(record, path)
