"""`service.store.checkpoints`: seqs kept verbatim, per source, inside the caller's transaction."""

import pytest
from hypothesis import HealthCheck, given, settings
from sqlmodel import Session

from service.changes import Seq
from service.store import checkpoints
from service.store.db import Database
from tests import strategies


def _load_all(session: Session, sources: list[str]) -> list[Seq | None]:
    return [checkpoints.load(session, source) for source in sources]


def test_a_source_without_checkpoint_loads_none(database: Database) -> None:
    assert database.run_sync(checkpoints.load, "a") is None


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seq=strategies.seqs)
def test_a_saved_seq_loads_back_verbatim(database: Database, seq: Seq) -> None:
    database.run_sync(checkpoints.save, "a", seq)
    assert database.run_sync(checkpoints.load, "a") == seq


@pytest.mark.parametrize(
    "json_text",
    ['[1, "g1AAAA"]', '{"b": 1, "a": 2}', "1.50", '"\\u00e9"', '"12-g1AAAAFTeJzLYWBg4Mhg"'],
)
def test_a_seq_is_stored_as_its_json_text_without_reformatting(
    database: Database, json_text: str
) -> None:
    database.run_sync(checkpoints.save, "a", Seq(json_text))
    assert database.run_sync(checkpoints.load, "a") == Seq(json_text)


def test_save_replaces_the_previous_seq_even_if_it_looks_larger(database: Database) -> None:
    database.run_sync(checkpoints.save, "a", Seq.of(10))
    database.run_sync(checkpoints.save, "a", Seq.of(2))
    assert database.run_sync(checkpoints.load, "a") == Seq.of(2)


def test_checkpoints_are_kept_per_source(database: Database) -> None:
    database.run_sync(checkpoints.save, "a", Seq.of(1))
    database.run_sync(checkpoints.save, "b", Seq.of("2-x"))
    assert database.run_sync(_load_all, ["a", "b", "c"]) == [Seq.of(1), Seq.of("2-x"), None]


def test_a_save_is_undone_with_its_transaction(database: Database) -> None:
    def save_then_fail(session: Session) -> None:
        checkpoints.save(session, "a", Seq.of(2))
        raise RuntimeError("enqueue failed")

    database.run_sync(checkpoints.save, "a", Seq.of(1))
    with pytest.raises(RuntimeError, match="enqueue failed"):
        database.run_sync(save_then_fail)
    assert database.run_sync(checkpoints.load, "a") == Seq.of(1)
