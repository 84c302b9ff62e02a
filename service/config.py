"""Settings: one TOML file (`--config` or `PANDASYNC_CONFIG`) with `PANDASYNC_*` overrides.

Only models and loading; nothing here is built at import time. `load_settings` either
returns valid settings or raises `ConfigError` listing every problem with its place and fix.
"""

import binascii
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import jmespath
import jmespath.exceptions
from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

CONFIG_ENV = "PANDASYNC_CONFIG"
# Environment variables override the file: PANDASYNC_SERVER__PORT sets server.port.
ENV_PREFIX = "PANDASYNC_"
EXAMPLE = "pandasync.example.toml"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
# PANDA routes a slug with `[\w\d_-]+`; `schema` is taken by /dataset/schema/ (panda-api.md §3).
_SLUG = re.compile(r"[A-Za-z0-9_-]+")
_FIELD = re.compile(r"[^.\s]+(\.[^.\s]+)*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _without_credentials(url: AnyHttpUrl, fix: str) -> AnyHttpUrl:
    """`url`, refused when it holds credentials (which would end up in logs); `fix` says how
    to give them instead."""
    if url.username or url.password:
        raise ValueError(
            f"the URL holds credentials, which would end up in logs: remove them from it; {fix}"
        )
    return url


class PandaSettings(_Strict):
    """The PANDA instance rows are replicated to."""

    url: AnyHttpUrl
    email: str = Field(min_length=1)
    api_key: SecretStr
    timeout_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=10, ge=1)

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        return _without_credentials(value, "pandasync signs in to PANDA with email and api_key")

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("the api key is empty: copy it from your PANDA user page")
        return value


class Column(_Strict):
    """One PANDA column and the source field (a dotted path) that fills it."""

    name: str = Field(min_length=1)
    field: str

    @field_validator("name")
    @classmethod
    def _no_comma(cls, value: str) -> str:
        # PANDA splits ?columns= on commas with no escaping (panda-api.md §3.1).
        if "," in value:
            raise ValueError("PANDA cannot take a comma in a column name: remove it")
        return value

    @field_validator("field")
    @classmethod
    def _dotted_path(cls, value: str) -> str:
        if not _FIELD.fullmatch(value):
            raise ValueError("not a dotted path: write one such as `author.name` or `tags.0`")
        return value


class DatasetSettings(_Strict):
    """The PANDA dataset a source feeds; created with these columns when missing."""

    slug: str
    name: str = Field(min_length=1)

    @field_validator("slug")
    @classmethod
    def _valid_slug(cls, value: str) -> str:
        if not _SLUG.fullmatch(value) or value == "schema":
            raise ValueError(
                "PANDA cannot address this slug: use ASCII letters, digits, `_` and `-`"
                " (and not `schema`), e.g. `city-budget`"
            )
        return value


FilterValue = str | int | float | bool


class CouchDBFilter(_Strict):
    """Which documents a CouchDB source replicates: those whose `field` equals a listed value.

    `equals` is one value or a list of values; a value matches only its own JSON type
    (`1` is not `"1"`, `true` is not `1`). A document that does not match becomes a delete of
    its row, since an earlier revision may have matched.
    """

    field: str
    equals: FilterValue | list[FilterValue]

    @field_validator("field")
    @classmethod
    def _dotted_path(cls, value: str) -> str:
        if not _FIELD.fullmatch(value):
            raise ValueError("not a dotted path: write one such as `type` or `meta.kind`")
        return value

    def allowed(self) -> tuple[FilterValue, ...]:
        """The values a matching document holds at `field`."""
        return tuple(self.equals) if isinstance(self.equals, list) else (self.equals,)


def _from_environment(setting: str, name: str, instead: str) -> str:
    """The value of environment variable `name`, which `setting` names; `ValueError` (naming
    the variable, never a value) when it is unset or empty."""
    value = os.environ.get(name, "")
    if not value:
        raise ValueError(
            f"{setting} names the environment variable {name}, which is not set: export"
            f" {name} before starting pandasync, or set {instead} in the file"
        )
    return value


class CouchDBSettings(_Strict):
    """Where a CouchDB source reads its `_changes` feed, and how it follows it.

    The password is `password`, or read from the environment variable `password_env` names
    when the settings are loaded (so it need not be written in the file).
    """

    url: AnyHttpUrl
    database: str = Field(min_length=1)
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = Field(default=None, min_length=1)
    # Where a source with no checkpoint yet starts: "0" (every document) or "now".
    since: Literal["0", "now"] = "0"
    batch_size: int = Field(default=500, ge=1, le=10_000)
    batch_wait_s: float = Field(default=0.2, gt=0)
    heartbeat_s: float = Field(default=10.0, gt=0)
    # No byte (not even a heartbeat) for this long: the connection is dead, reconnect.
    timeout_s: float = Field(default=30.0, gt=0)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_cap_s: float = Field(default=60.0, gt=0)
    filter: CouchDBFilter | None = None

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        return _without_credentials(value, "set username and password instead")

    @model_validator(mode="before")
    @classmethod
    def _password_from_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("password_env"):
            return data
        if data.get("password") is not None:
            raise ValueError("password and password_env are both set: keep one of them")
        name = str(data["password_env"])
        return {**data, "password": _from_environment("password_env", name, "password")}

    @model_validator(mode="after")
    def _consistent(self) -> "CouchDBSettings":
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        if self.timeout_s <= self.heartbeat_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s:g} s) would end a healthy feed between two"
                f" heartbeats: make timeout_s more than heartbeat_s ({self.heartbeat_s:g} s)"
            )
        return self


def _jmespath(value: str) -> str:
    try:
        jmespath.compile(value)
    except jmespath.exceptions.ParseError as error:
        raise ValueError(
            f"not a JMESPath expression (it breaks at character {error.lex_position + 1}):"
            " correct it (see jmespath.org), e.g. `data.items` or `id`"
        ) from None
    return value


JMESPath = Annotated[str, Field(min_length=1), AfterValidator(_jmespath)]


class WebhookMapping(_Strict):
    """Where the changes are in any JSON body, as JMESPath expressions (jmespath.org).

    `items` is evaluated on the body and gives the list of items (one object is a list of
    one); the others are evaluated on each item. Without `id`, an item's id is read from the
    source's `id_field`; a column without an expression in `columns` is read from its
    `field`; without `op` every item is an upsert (else `op` gives "upsert" or "delete");
    without `version` items carry no version.
    """

    items: JMESPath = "@"
    id: JMESPath | None = None
    op: JMESPath | None = None
    version: JMESPath | None = None
    columns: dict[str, JMESPath] = {}


WebhookFormat = Literal["pandasync", "couchdb", "jmespath"]
SignatureScheme = Literal["standard-webhooks", "github", "hmac", "none"]


class WebhookSettings(_Strict):
    """How a webhook source's requests are authenticated, deduplicated and read.

    `signature` has no default: a source that takes unsigned webhooks says `"none"`. Several
    `secrets` are tried in turn, so a secret can be rotated without refusing webhooks. Each
    environment variable `secrets_env` names adds its value to them when the settings load.
    """

    format: WebhookFormat = "pandasync"
    signature: SignatureScheme
    secrets: list[SecretStr] = []
    secrets_env: list[Annotated[str, Field(min_length=1)]] = []
    # hmac: the header holding the HMAC-SHA256 of the raw body, in `encoding`.
    header: str | None = None
    encoding: Literal["hex", "base64"] = "hex"
    # The header naming a delivery, for redeliveries; default `webhook-id` (standard-webhooks)
    # or `X-GitHub-Delivery` (github), none for the others.
    id_header: str | None = None
    # standard-webhooks: how far `webhook-timestamp` may be from the time of arrival.
    tolerance_s: float = Field(default=300.0, gt=0)
    # How long a delivery id is remembered: at least the sender's retry span.
    dedup_retention_s: float = Field(default=72 * 3600.0, gt=0)
    mapping: WebhookMapping | None = None

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("secrets_env"):
            return data
        names = data["secrets_env"]
        if not isinstance(names, list):
            return data  # the field's own check names the problem
        found = [_from_environment("secrets_env", str(name), "secrets") for name in names]
        return {**data, "secrets": [*data.get("secrets", []), *found]}

    @model_validator(mode="after")
    def _consistent(self) -> "WebhookSettings":
        for problem in (self._secrets_problem(), self._header_problem(), self._format_problem()):
            if problem:
                raise ValueError(problem)
        return self

    def _secrets_problem(self) -> str | None:
        if self.signature == "none":
            if self.secrets:
                return "secrets are set but signature is none: choose a signature scheme"
            return None
        if not self.secrets:
            return f'a {self.signature} signature needs a secret: add secrets = ["..."]'
        if any(not secret.get_secret_value() for secret in self.secrets):
            return "a secret is empty: remove it or set its value"
        if self.signature == "standard-webhooks" and not all(
            _standard_secret(secret) for secret in self.secrets
        ):
            return "a secret is not a Standard Webhooks secret: use whsec_ and base64"
        return None

    def _header_problem(self) -> str | None:
        if self.signature == "hmac" and not self.header:
            return 'an hmac signature needs its header: set header, e.g. "X-Signature"'
        if self.signature != "hmac" and self.header:
            return "header is only for the hmac signature: remove it"
        return None

    def _format_problem(self) -> str | None:
        if self.format == "jmespath" and self.mapping is None:
            return "the jmespath format needs its mapping: add the source's webhook mapping table"
        if self.format != "jmespath" and self.mapping is not None:
            return "a mapping is only for the jmespath format: remove it or set that format"
        return None


def _standard_secret(secret: SecretStr) -> bool:
    try:
        Webhook(secret.get_secret_value())
    except (binascii.Error, ValueError, EmptyWebhookSecretError):
        return False
    return True


SnapshotFormat = Literal["json", "keys-data", "jsonl", "csv"]


class SnapshotSettings(_Strict):
    """Where a snapshot source reads its whole dataset, and how often.

    Either `url` (an HTTP GET answering `format`: `json`, a list of objects; `keys-data`,
    PANDA's tutorial shape `{"keys": [...], "data": [[...], ...]}`; `jsonl`, an object a line;
    `csv`, a header line then rows) or `database_url` and `query` (SQL run through SQLAlchemy,
    each result row an object of its columns). `headers` are sent with the GET; each entry of
    `headers_env` names the environment variable holding a header's value (a token). A
    snapshot that would delete more than `max_delete_fraction` of the dataset's rows, or that
    is empty, changes nothing until an operator confirms it.
    """

    url: AnyHttpUrl | None = None
    format: SnapshotFormat = "json"
    headers: dict[str, SecretStr] = {}
    headers_env: dict[str, Annotated[str, Field(min_length=1)]] = {}
    database_url: SecretStr | None = None
    database_url_env: str | None = Field(default=None, min_length=1)
    query: str | None = Field(default=None, min_length=1)
    interval_s: float = Field(default=3600.0, gt=0)
    deletes: bool = False
    max_delete_fraction: float = Field(default=0.2, ge=0, le=1)
    timeout_s: float = Field(default=60.0, gt=0)
    # Rows read and compared per store transaction.
    chunk_rows: int = Field(default=2000, ge=1, le=100_000)

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if value is None:
            return None
        return _without_credentials(value, "send a token in headers_env instead")

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("database_url_env"):
            if data.get("database_url") is not None:
                raise ValueError("database_url and database_url_env are both set: keep one of them")
            name = str(data["database_url_env"])
            url = _from_environment("database_url_env", name, "database_url")
            data = {**data, "database_url": url}
        names = data.get("headers_env")
        if isinstance(names, dict) and names:
            found = {
                str(header): _from_environment("headers_env", str(name), "headers")
                for header, name in names.items()
            }
            data = {**data, "headers": {**data.get("headers", {}), **found}}
        return data

    @model_validator(mode="after")
    def _one_reader(self) -> "SnapshotSettings":
        if (self.url is None) == (self.database_url is None):
            raise ValueError(
                "a snapshot source reads either an HTTP url or a database: set url (and format)"
                " or database_url and query"
            )
        if (self.database_url is None) != (self.query is None):
            raise ValueError("database_url and query go together: set both")
        return self


class SourceSettings(_Strict):
    """A source of changes and how its records become rows of one dataset."""

    name: str
    kind: Literal["couchdb", "webhook", "snapshot"]
    dataset: DatasetSettings
    columns: Annotated[list[Column], Field(min_length=1)]
    id_field: str = "_id"
    couchdb: CouchDBSettings | None = None
    webhook: WebhookSettings | None = None
    snapshot: SnapshotSettings | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                "not a valid source name: use lower-case letters, digits, `_` and `-`,"
                " e.g. `stories`"
            )
        return value


class DeliverySettings(_Strict):
    """How outbox entries are delivered to PANDA (see the `[delivery]` section of the example).

    A batch is up to the batch size of entries claimed in one store transaction and settled
    in another; its upserts go in one bulk PUT, its deletes one by one. The batch size starts
    at `batch_size` and adapts within `min_batch_size` and `max_batch_size` (PANDA's examples
    send at most 1000 rows per bulk PUT).
    """

    batch_size: int = Field(default=100, ge=1, le=1000)
    min_batch_size: int = Field(default=1, ge=1, le=1000)
    max_batch_size: int = Field(default=1000, ge=1, le=1000)
    slow_batch_s: float = Field(default=5.0, gt=0)
    row_by_row: bool = False
    # A change that would write what PANDA acknowledged last for its row (or delete a row
    # PANDA no longer has) is settled without a request.
    skip_unchanged: bool = True
    parallel_datasets: int = Field(default=4, ge=1)
    # A source's lease: renewed every third of it while a delivery holds it, so a replica
    # that dies or freezes is taken over once it runs out.
    lease_s: float = Field(default=6.0, ge=1.0)
    idle_poll_s: float = Field(default=1.0, gt=0)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_cap_s: float = Field(default=300.0, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    shutdown_grace_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _batch_bounds(self) -> "DeliverySettings":
        if not self.min_batch_size <= self.batch_size <= self.max_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is outside min_batch_size {self.min_batch_size}"
                f" .. max_batch_size {self.max_batch_size}: make min_batch_size <= batch_size"
                " <= max_batch_size"
            )
        return self


class IngressSettings(_Strict):
    """Limits on webhooks taken in (all sources)."""

    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # Above this many outbox entries, webhooks get 503 with Retry-After (nothing is taken in),
    # and a CouchDB source with this many entries waiting pauses its feed.
    outbox_high_water: int = Field(default=100_000, ge=1)
    retry_after_s: int = Field(default=30, ge=1)


class LoggingSettings(_Strict):
    """How the service logs: `text` lines, or one JSON object a line for log shippers."""

    format: Literal["text", "json"] = "text"


class ServerSettings(_Strict):
    """Where the HTTP service listens."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # Turns the admin API on, and puts /status, /metrics and the API docs behind it.
    admin_token: SecretStr | None = None
    # Lets a scraper read /metrics with a token of its own (the admin token works too).
    metrics_token: SecretStr | None = None
    # Slow or idle clients: a connection beyond max_connections is answered 503 and closed;
    # one that sends no request's headers within header_timeout_s is closed; a body not
    # received whole within body_timeout_s of its headers is answered 408.
    max_connections: int = Field(default=1000, ge=1)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)


# The stores pandasync can use: SQLite (pysqlite) and PostgreSQL (psycopg).
_DATABASE_SCHEMES = ("sqlite", "sqlite+pysqlite", "postgresql", "postgres", "postgresql+psycopg")
_DATABASE_URLS = "sqlite:///path/to/pandasync.db or postgresql://user@host/database"


class Settings(BaseSettings):
    """Everything pandasync needs to run; see pandasync.example.toml."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    panda: PandaSettings
    database_url: str = "sqlite:///pandasync.db"
    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    delivery: DeliverySettings = DeliverySettings()
    ingress: IngressSettings = IngressSettings()
    sources: list[SourceSettings] = []

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        # The store parses the URL (`service.store.db.database_url`); this names a kind it
        # cannot use before any command tries to.
        scheme, found, _ = value.partition("://")
        if not found:
            raise ValueError(f"is not a database URL: write one like {_DATABASE_URLS}")
        if scheme not in _DATABASE_SCHEMES:
            raise ValueError(
                f"uses {scheme[:40]!r}, which pandasync does not support: use {_DATABASE_URLS}"
            )
        return value


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration: where, what, and how to fix it."""

    where: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}. Fix: {self.fix}"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason. Fix them and retry."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


_FIXES = {
    "missing": "add it (see pandasync.example.toml)",
    "extra_forbidden": "remove it or correct its spelling (see pandasync.example.toml)",
    "literal_error": "use one of the values named",
    "url_parsing": "write a full URL such as http://host.example.org",
    "url_scheme": "use an http:// or https:// URL",
    "too_short": "give at least one",
    "greater_than": "use a larger number",
    "greater_than_equal": "use a larger number",
    "less_than_equal": "use a smaller number",
}


# The config file read when neither --config nor $PANDASYNC_CONFIG names one.
DEFAULT_CONFIG = Path("pandasync.toml")


def config_path(explicit: Path | None) -> Path | None:
    """The config file to read: `--config`, else `$PANDASYNC_CONFIG`, else `./pandasync.toml`
    when it exists, else none (the environment alone)."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(path: Path | None = None) -> Settings:
    """Read the TOML file (if any), apply `PANDASYNC_*` overrides, validate everything.

    Raises `ConfigError` naming each problem's place (`sources[2].columns[1].name`) and fix.
    """
    where = str(path) if path else "the configuration (no file; environment only)"
    if path is not None:
        _check_toml(path)
    try:
        settings: Settings = _settings_class(path)()
    except ValidationError as error:
        raise ConfigError(where, [_problem(detail) for detail in error.errors()]) from None
    problems = list(_cross_checks(settings))
    if problems:
        raise ConfigError(where, problems)
    return settings


def _check_toml(path: Path) -> None:
    try:
        tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fix = f"pass an existing file with --config or ${CONFIG_ENV} (start from {EXAMPLE})"
        raise ConfigError(str(path), [Problem(str(path), "no such file", fix)]) from None
    except tomllib.TOMLDecodeError as error:
        problem = Problem(str(path), f"not valid TOML ({error})", "correct the TOML syntax")
        raise ConfigError(str(path), [problem]) from None


def _settings_class(path: Path | None) -> type[Settings]:
    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
            return (init_settings, env_settings, toml)

    return FileSettings


# A URL setting's example, by the section it is in.
_URL_EXAMPLES = {"couchdb": "http://couchdb.example.org:5984", "panda": "http://panda.example.org"}


def _problem(detail: Any) -> Problem:
    where = place(detail["loc"])
    message = str(detail["msg"]).removeprefix("Value error, ")
    fix = _FIXES.get(detail["type"], "correct the value (see pandasync.example.toml)")
    if detail["type"] == "url_parsing":
        section = next((part for part in detail["loc"] if part in _URL_EXAMPLES), None)
        example = _URL_EXAMPLES.get(str(section), "http://host.example.org")
        fix = f"write a full URL such as {example}"
    variable = _variable_of(detail["loc"])
    if variable is not None:
        where = f"{where} (from the environment, {variable})"
    if detail["type"] == "value_error":
        message, _, fix = message.partition(": ")
        fix = fix or "correct the value"
    return Problem(where or "(top level)", message, fix)


def _variable_of(loc: Sequence[int | str]) -> str | None:
    """The `PANDASYNC_*` variable that set the value at `loc`, if one is set."""
    if not loc or not all(isinstance(part, str) for part in loc):
        return None
    name = ENV_PREFIX + "__".join(str(part) for part in loc).upper()
    return name if name in os.environ else None


def place(loc: Iterable[int | str]) -> str:
    """`('sources', 2, 'columns', 1, 'name')` → `sources[2].columns[1].name`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _cross_checks(settings: Settings) -> Iterable[Problem]:
    yield from _source_list_checks(settings.sources)


def _source_list_checks(sources: Sequence[SourceSettings]) -> Iterable[Problem]:
    seen_names: dict[str, int] = {}
    seen_slugs: dict[str, int] = {}
    for index, source in enumerate(sources):
        where = f"sources[{index}]"
        if source.name in seen_names:
            yield Problem(
                f"{where}.name",
                f"`{source.name}` is also the name of sources[{seen_names[source.name]}]",
                "give every source its own name",
            )
        seen_names.setdefault(source.name, index)
        if source.dataset.slug in seen_slugs:
            yield Problem(
                f"{where}.dataset.slug",
                f"sources[{seen_slugs[source.dataset.slug]}] feeds dataset "
                f"`{source.dataset.slug}` already",
                "give each source its own dataset",
            )
        seen_slugs.setdefault(source.dataset.slug, index)
        yield from _source_checks(where, source)


def _source_checks(where: str, source: SourceSettings) -> Iterable[Problem]:
    names: set[str] = set()
    for index, column in enumerate(source.columns):
        if column.name in names:
            yield Problem(
                f"{where}.columns[{index}].name",
                f"column `{column.name}` appears twice",
                "give every column its own name",
            )
        names.add(column.name)
    yield from _webhook_checks(where, source)
    if source.kind == "couchdb" and source.id_field != "_id":
        # A deleted document's stub in `_changes` holds only `_id` and `_rev`.
        yield Problem(
            f"{where}.id_field",
            "a couchdb source's rows are keyed by the document `_id`: deletes carry no other field",
            "remove id_field (or set it to `_id`)",
        )
    if source.kind == "couchdb" and source.couchdb is None:
        yield Problem(
            f"{where}.couchdb",
            "a couchdb source needs its server",
            "add a [sources.couchdb] table with url and database",
        )
    if source.kind == "snapshot" and source.snapshot is None:
        yield Problem(
            f"{where}.snapshot",
            "a snapshot source needs to know what to read",
            "add a [sources.snapshot] table with url (and format), or database_url and query",
        )


def _webhook_checks(where: str, source: SourceSettings) -> Iterable[Problem]:
    if source.kind != "webhook":
        return
    if source.webhook is None:
        yield Problem(
            f"{where}.webhook",
            "a webhook source needs its webhook settings",
            'add its webhook table: a signature and its secrets, or signature = "none"',
        )
        return
    names = {column.name for column in source.columns}
    for name in source.webhook.mapping.columns if source.webhook.mapping else {}:
        if name not in names:
            yield Problem(
                f"{where}.webhook.mapping.columns.{name}",
                f"`{name}` is not one of the source's columns",
                "name a column of the source's columns list",
            )
