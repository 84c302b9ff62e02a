"""Hypothesis strategies for pandasync's values: JSON, seqs, changes."""

import string

from hypothesis import strategies as st

from service.changes import Change, Op, Seq

# Text a database column can hold as is: PostgreSQL refuses NUL, and neither database takes
# a lone surrogate (Hypothesis leaves those out by default).
stored_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)

# Any Python string, lone surrogates and NUL included (as a JSON `\ud800` or `\u0000` decodes).
any_texts = st.text(st.characters(exclude_categories=()), max_size=20)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)

json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)

# CouchDB 3 seqs: `<number>-<long opaque base64url blob>`.
opaque_seq_strings = st.builds(
    lambda number, blob: f"{number}-{blob}",
    st.integers(min_value=0),
    st.text(string.ascii_letters + string.digits + "-_", min_size=50, max_size=3000),
)

seqs = st.builds(Seq.of, st.integers(min_value=0) | opaque_seq_strings | json_values)

rows = st.lists(any_texts, max_size=4).map(tuple)


def changes(
    sources: st.SearchStrategy[str] = stored_texts,
    doc_ids: st.SearchStrategy[str] = stored_texts,
) -> st.SearchStrategy[Change]:
    """Upserts and deletes for documents drawn from `doc_ids` in `sources`."""
    external_ids = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=20)
    upserts = st.builds(
        Change,
        source=sources,
        doc_id=doc_ids,
        external_id=external_ids,
        op=st.just(Op.UPSERT),
        row=rows,
    )
    deletes = st.builds(
        Change, source=sources, doc_id=doc_ids, external_id=external_ids, op=st.just(Op.DELETE)
    )
    return upserts | deletes
