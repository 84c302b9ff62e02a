"""Fixtures only: the real peers (PANDA-compatible server, databases) live in tests/fixtures/."""

import os

import pytest

pytest_plugins = [
    "tests.fixtures.panda",
    "tests.fixtures.store",
    "tests.fixtures.couchdb",
    "tests.fixtures.snapshots",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `PANDASYNC_*` variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("PANDASYNC_"):
            monkeypatch.delenv(name)
