"""Source ids to PANDA external_ids and back: one reversible, collision-free scheme.

PANDA's bulk PUT accepts only `[A-Za-z0-9_-]+` and `-` is best avoided (panda-api.md §3.3, §5),
so the encoding uses only `[A-Za-z0-9_]`. Pure functions, no I/O.
"""

import re

# Lucene operators: a bare `AND`, `OR` or `NOT` breaks PANDA's unescaped row queries (§3.3.3).
_OPERATORS = frozenset({"AND", "OR", "NOT"})
# Runs of characters other than ASCII letters and digits: each becomes its UTF-8 bytes.
_OTHER = re.compile(r"[^A-Za-z0-9]+")
_ENCODED = re.compile(r"(?:[A-Za-z0-9]|_[0-9A-F]{2})+")


# The longest external_id PANDA can be sent: its row URLs carry it, and a PANDA behind nginx
# (its deployment's) refuses a request line over 8 KiB; Solr refuses a term over 32,766 bytes.
MAX_LENGTH = 4096
# No id of at most this many characters has a longer external_id (a character is at most
# 4 UTF-8 bytes, each written in 3 characters): longer ones are encoded to be measured.
_SURELY_SHORT = MAX_LENGTH // 12


def too_long(doc_id: str) -> bool:
    """Whether the external_id of `doc_id` is over `MAX_LENGTH` (PANDA could not be sent it)."""
    return len(doc_id) > _SURELY_SHORT and len(encode(doc_id)) > MAX_LENGTH


class ExternalIdError(ValueError):
    """A value is not an external_id this scheme produces; it cannot be decoded."""


def encode(doc_id: str) -> str:
    """The external_id for a source id.

    ASCII letters and digits stand for themselves; every other character becomes its
    UTF-8 bytes, each written `_XX` (two upper-case hex digits). `_` itself is `_5F`,
    so an encoded id never has a literal `_` that is not an escape: decoding is
    unambiguous, the same id always gives the same external_id, two ids never share one,
    and case is kept. A bare `AND`/`OR`/`NOT` has its first letter escaped.
    Raises `ExternalIdError` for the empty id, which PANDA cannot address.
    """
    if not doc_id:
        raise ExternalIdError("an empty id cannot become a PANDA external_id")
    if doc_id in _OPERATORS:
        return f"_{ord(doc_id[0]):02X}{doc_id[1:]}"
    return _OTHER.sub(_escaped, doc_id)


def _escaped(run: re.Match[str]) -> str:
    return "".join(f"_{byte:02X}" for byte in run.group().encode(errors="surrogatepass"))


def decode(external_id: str) -> str:
    """The source id an external_id was made from; the inverse of `encode`.

    Raises `ExternalIdError` for a value `encode` never produces.
    """
    if not _ENCODED.fullmatch(external_id):
        raise ExternalIdError(f"{external_id!r} is not an encoded external_id")
    raw = bytearray()
    index = 0
    while index < len(external_id):
        if external_id[index] == "_":
            raw.append(int(external_id[index + 1 : index + 3], 16))
            index += 3
        else:
            raw += external_id[index].encode()
            index += 1
    try:
        doc_id = raw.decode(errors="surrogatepass")
    except UnicodeDecodeError as error:
        raise ExternalIdError(f"{external_id!r} does not decode to UTF-8 text") from error
    if encode(doc_id) != external_id:
        raise ExternalIdError(f"{external_id!r} is not the canonical encoding of {doc_id!r}")
    return doc_id
