"""Fixtures only: the real peers (PANDA-compatible server, databases) live in tests/fixtures/."""

import compileall
import os
from pathlib import Path

import pytest

# The terminal size of whoever runs the tests (pytest-xdist's workers set COLUMNS=80) must not
# change what the CLI prints: its consoles read it once, when `service.cli` is imported.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

pytest_plugins = [
    "tests.fixtures.panda",
    "tests.fixtures.store",
    "tests.fixtures.couchdb",
    "tests.fixtures.snapshots",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    # Read here, before `_clean_environment` removes every `PANDASYNC_*` variable.
    parser.addoption(
        "--reliability-scale",
        type=int,
        default=int(os.environ.get("PANDASYNC_RELIABILITY_SCALE", "1")),
        help="size of the tests/reliability suites (1 in CI; more for a soak)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A reliability suite run bigger gets its timeout multiplied by the scale as well."""
    scale: int = config.getoption("--reliability-scale")
    if scale <= 1:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if "tests/reliability/" in item.nodeid and marker is not None:
            item.add_marker(pytest.mark.timeout(marker.args[0] * scale), append=False)


@pytest.fixture
def reliability_scale(request: pytest.FixtureRequest) -> int:
    """How big the reliability suites run: 1 in CI, more for a soak."""
    scale: int = request.config.getoption("--reliability-scale")
    return scale


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def _compiled_service() -> None:
    """The service's bytecode, written once for the processes the tests start (`pandasync
    serve`, the CLI, the PANDA-compatible server): where PYTHONDONTWRITEBYTECODE is set, no
    import writes it, and each of them would compile the service's source again (about 0.25 s
    of CPU a start on a 2-core machine). Only files changed since are compiled again."""
    compileall.compile_dir(Path(__file__).parents[1] / "service", quiet=1)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `PANDASYNC_*` variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("PANDASYNC_"):
            monkeypatch.delenv(name)
