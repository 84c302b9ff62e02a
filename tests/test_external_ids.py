"""The external_id scheme: PANDA-safe, reversible, collision-free, case-preserving."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.sources.external_ids import ExternalIdError, decode, encode

# What PANDA's bulk PUT accepts, without `-` (panda-api.md §3.3.3 and §5).
PANDA_SAFE = re.compile(r"[A-Za-z0-9_]+")
ids = st.text(min_size=1)


@given(ids)
def test_every_id_encodes_to_what_panda_accepts(doc_id: str) -> None:
    assert PANDA_SAFE.fullmatch(encode(doc_id))


@given(ids)
def test_decoding_gives_back_the_source_id(doc_id: str) -> None:
    assert decode(encode(doc_id)) == doc_id


@given(ids, ids)
def test_two_different_ids_never_share_an_external_id(first: str, second: str) -> None:
    assert (encode(first) == encode(second)) == (first == second)


@given(st.text(alphabet=st.characters(categories=["Lu", "Ll"]), min_size=1))
def test_ids_that_differ_only_in_case_stay_distinct(doc_id: str) -> None:
    for other in {doc_id.upper(), doc_id.lower(), doc_id.swapcase()} - {doc_id}:
        assert encode(other) != encode(doc_id)


@given(ids)
def test_the_same_id_always_gives_the_same_external_id(doc_id: str) -> None:
    assert encode(doc_id) == encode(str(doc_id))


def test_plain_ascii_ids_are_kept_as_they_are() -> None:
    assert [encode(doc_id) for doc_id in ["story42", "ABCdef", "2024"]] == [
        "story42",
        "ABCdef",
        "2024",
    ]


def test_other_characters_become_escaped_utf8_bytes() -> None:
    assert [encode(doc_id) for doc_id in ["a_b", "a-b", "a b/c", "café", "_design/x"]] == [
        "a_5Fb",
        "a_2Db",
        "a_20b_2Fc",
        "caf_C3_A9",
        "_5Fdesign_2Fx",
    ]


def test_bare_lucene_operators_are_escaped() -> None:
    assert [encode(doc_id) for doc_id in ["AND", "OR", "NOT", "ANDY", "and"]] == [
        "_41ND",
        "_4FR",
        "_4EOT",
        "ANDY",
        "and",
    ]


def test_lone_surrogates_from_json_round_trip() -> None:
    assert decode(encode("a\ud800b")) == "a\ud800b"


def test_the_empty_id_is_refused_with_a_reason() -> None:
    with pytest.raises(ExternalIdError, match="empty id"):
        encode("")


@pytest.mark.parametrize("value", ["", "a-b", "a_5", "a_5f", "_C3", "AND", "a_41"])
def test_values_the_scheme_never_produces_do_not_decode(value: str) -> None:
    with pytest.raises(ExternalIdError):
        decode(value)
