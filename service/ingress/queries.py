"""Snapshot queries: a snapshot source's SQL, run through SQLAlchemy against its database.

Streams the result through a server-side cursor, so memory does not grow with the rows; each
row becomes an object of its columns. Reads only: never writes to that database or the store.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from service.config import SourceSettings
from service.sources import snapshot

# How much of a database's error a reason quotes.
_DETAIL_CHARS = 300


def _plain(value: object) -> object:
    """A database value as a JSON-like one (times in ISO 8601, exact decimals as text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Decimal):
        return str(value)
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)


def _database_url(url: str) -> sqlalchemy.URL:
    parsed = sqlalchemy.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


@contextmanager
def read_sql(source: SourceSettings) -> Iterator[Iterator[Mapping[str, Any]]]:
    """The rows of the source's query, each an object of its columns, streamed through a
    server-side cursor (a chunk at a time). Raises `snapshot.SnapshotReadError` when the
    database cannot be reached or the query fails (the message never holds the URL)."""
    settings = snapshot.settings_of(source)
    assert settings.database_url is not None  # config: a reader without a url has one
    assert settings.query is not None
    where = f"source {source.name}: the snapshot query"
    try:
        engine = sqlalchemy.create_engine(
            _database_url(settings.database_url.get_secret_value()), poolclass=NullPool
        )
    except (SQLAlchemyError, ValueError, ImportError) as error:
        raise snapshot.SnapshotReadError(
            f"source {source.name}: database_url is not a database URL pandasync can open"
            f" ({type(error).__name__}): write one like postgresql://user@host/database"
        ) from None
    try:
        with engine.connect() as connection:
            try:
                result = connection.execution_options(
                    stream_results=True, yield_per=settings.chunk_rows
                ).execute(sqlalchemy.text(settings.query))
            except SQLAlchemyError as error:
                raise _query_error(where, error) from None
            yield _rows(where, result)
    except SQLAlchemyError as error:
        raise _query_error(where, error) from None
    finally:
        engine.dispose()


def _rows(where: str, result: sqlalchemy.CursorResult[Any]) -> Iterator[Mapping[str, Any]]:
    rows = iter(result.mappings())
    while True:
        try:
            row = next(rows, None)
        except SQLAlchemyError as error:
            raise _query_error(where, error) from None
        if row is None:
            return
        yield {key: _plain(value) for key, value in row.items()}


def _query_error(where: str, error: SQLAlchemyError) -> snapshot.SnapshotReadError:
    orig = getattr(error, "orig", None)
    detail = " ".join(str(orig if orig is not None else error).split())[:_DETAIL_CHARS]
    return snapshot.SnapshotReadError(f"{where} failed: {type(error).__name__}: {detail}")
