"""Records to changes: field paths, text values, ids."""

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.changes import Change, Op
from service.config import Column, DatasetSettings, SourceSettings
from service.sources import external_ids
from service.sources.mapping import MappingError, delete, field, text, upsert

SOURCE = SourceSettings(
    name="stories",
    kind="webhook",
    dataset=DatasetSettings(slug="stories", name="Stories"),
    columns=[
        Column(name="Headline", field="title"),
        Column(name="Author", field="author.name"),
        Column(name="First tag", field="tags.0"),
    ],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


def test_a_record_becomes_a_row_in_column_order() -> None:
    record = {"_id": "s 1", "title": "Flood", "author": {"name": "Ana"}, "tags": ["news"]}
    assert upsert(SOURCE, record) == Change(
        "stories", "s 1", "s_201", Op.UPSERT, ("Flood", "Ana", "news")
    )


def test_missing_fields_become_empty_values() -> None:
    assert upsert(SOURCE, {"_id": "x", "author": "not an object", "tags": []}).row == (
        "",
        "",
        "",
    )


def test_a_delete_carries_the_encoded_id_and_no_row() -> None:
    assert delete(SOURCE, "a/b") == Change("stories", "a/b", "a_2Fb", Op.DELETE)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        ("text", "text"),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (1.5, "1.5"),
        (float("inf"), ""),
        ({"b": 1, "a": "é"}, '{"b":1,"a":"é"}'),
        ([1, None], "[1,null]"),
    ],
)
def test_values_become_text_one_documented_way(value: object, expected: str) -> None:
    assert text(value) == expected


@given(json_values)
def test_every_json_value_becomes_text(value: Any) -> None:
    assert isinstance(text(value), str)


@pytest.mark.parametrize("record", [{}, {"_id": ""}, {"_id": None}, {"_id": True}, {"_id": [1]}])
def test_a_record_without_a_usable_id_is_refused_naming_the_field(
    record: dict[str, object],
) -> None:
    with pytest.raises(MappingError, match="`_id`"):
        upsert(SOURCE, record)


@pytest.mark.parametrize("doc_id", ["a\x00b", "a\ud800b"])
def test_an_id_that_is_not_valid_unicode_text_is_refused(doc_id: str) -> None:
    with pytest.raises(MappingError, match="valid Unicode text"):
        upsert(SOURCE, {"_id": doc_id})


@pytest.mark.parametrize(
    ("doc_id", "refused"),
    [("a" * 4096, False), ("a" * 4097, True), ("é" * 682, False), ("é" * 683, True)],
)
def test_an_id_whose_external_id_panda_could_not_be_sent_is_refused(
    doc_id: str, refused: bool
) -> None:
    # "é" is two UTF-8 bytes, each written in three characters: 682 of them take 4092.
    if not refused:
        assert len(upsert(SOURCE, {"_id": doc_id}).external_id) <= 4096
        return
    with pytest.raises(MappingError, match="whose external_id is over the 4096"):
        upsert(SOURCE, {"_id": doc_id})


def test_an_integer_id_is_used_as_its_decimal_text() -> None:
    assert upsert(SOURCE, {"_id": 7}).external_id == "7"


def test_a_nested_id_field_is_followed() -> None:
    source = SOURCE.model_copy(update={"id_field": "meta.uid"})
    assert upsert(source, {"meta": {"uid": "Ü"}}).external_id == external_ids.encode("Ü")


def test_list_steps_take_decimal_indexes_only() -> None:
    paths = ["a.1", "a.2", "a.x", "a.\u00b2", "a.\u0661"]  # superscript two, Arabic-Indic one
    assert [field({"a": [1, 2]}, path) for path in paths] == [2, None, None, None, None]
