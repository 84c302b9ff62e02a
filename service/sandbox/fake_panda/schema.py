"""PANDA's column schemas (`utils/column_schema.py`) and which of them accept writes.

Pure functions on lists of column dicts; no state.
"""

import re
import unicodedata

Column = dict[str, object]

TYPE_NAMES = frozenset({"unicode", "int", "bool", "float", "datetime", "date", "time"})


def _slugify(name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^\w\s-]", "", ascii_name).strip().lower()
    return re.sub(r"[-\s]+", "_", cleaned)


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    number = 2
    while f"{name}{number}" in taken:
        number += 1
    return f"{name}{number}"


def make_column_schema(
    columns: list[str],
    typed: list[bool] | None = None,
    types: list[str | None] | None = None,
) -> list[Column]:
    """One `{name, indexed, type, indexed_name, min, max}` per column, as PANDA makes them.

    Indexed columns with a type get `column_<type>_<slug>` names, deduplicated with 2, 3, ...
    """
    schema: list[Column] = [
        {
            "name": name,
            "indexed": typed[index] if typed else False,
            "type": types[index] if types else None,
            "indexed_name": None,
            "min": None,
            "max": None,
        }
        for index, name in enumerate(columns)
    ]
    taken: list[str] = []
    for column in schema:
        if column["indexed"] and column["type"]:
            indexed_name = _unique(
                f"column_{column['type']}_{_slugify(str(column['name']))}", taken
            )
            column["indexed_name"] = indexed_name
            taken.append(indexed_name)
    return schema


def accepts_upserts(schema: list[Column] | None) -> bool:
    """False where PANDA's `DataTyper` fails on every upsert, after validation (a 500).

    That is a dataset without columns (reachable with `{"objects": []}`), or one with an
    indexed column of a type PANDA does not know (accepted at creation, §3.1).
    """
    if schema is None:
        return False
    return all(
        not (column["indexed"] and column["type"]) or column["type"] in TYPE_NAMES
        for column in schema
    )
