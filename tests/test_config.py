"""Loading the TOML config with environment overrides, and naming every problem."""

import shutil
from pathlib import Path

import pytest

from service.config import ConfigError, Problem, load_settings, place

EXAMPLE = Path(__file__).parent.parent / "pandasync.example.toml"

MINIMAL = """
[panda]
url = "http://panda.example.org"
email = "sync@example.org"
api_key = "k"
"""

SOURCE = """
[[sources]]
name = "{name}"
kind = "webhook"
dataset = {{ slug = "{slug}", name = "Some data" }}
columns = [{{ name = "A", field = "a" }}]
webhook = {{ signature = "none" }}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pandasync.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path | None) -> list[Problem]:
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    return list(raised.value.problems)


def test_the_shipped_example_is_valid(tmp_path: Path) -> None:
    settings = load_settings(Path(shutil.copy(EXAMPLE, tmp_path / "example.toml")))
    assert [source.name for source in settings.sources] == ["stories"]
    assert [column.name for column in settings.sources[0].columns] == [
        "Headline",
        "Author",
        "Words",
    ]


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert (settings.database_url, settings.sources, settings.server.port) == (
        "sqlite:///pandasync.db",
        [],
        8080,
    )


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANDASYNC_PANDA__API_KEY", "from-env")
    monkeypatch.setenv("PANDASYNC_DATABASE_URL", "sqlite:///elsewhere.db")
    settings = load_settings(write(tmp_path, MINIMAL))
    assert (settings.panda.api_key.get_secret_value(), settings.database_url) == (
        "from-env",
        "sqlite:///elsewhere.db",
    )


def test_the_api_key_never_shows_in_the_settings_repr(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL.replace('"k"', '"s3cr3t-key"')))
    assert "s3cr3t-key" not in repr(settings)
    assert "s3cr3t-key" not in str(settings.model_dump())


def test_a_bad_column_is_named_by_its_place_with_a_fix(tmp_path: Path) -> None:
    second = SOURCE.format(name="b", slug="b").replace(
        '{ name = "A", field = "a" }]',
        '{ name = "A", field = "a" }, { name = "B,C", field = "b" }]',
    )
    text = MINIMAL + SOURCE.format(name="a", slug="a") + second
    assert problems(write(tmp_path, text)) == [
        Problem(
            "sources[1].columns[1].name",
            "PANDA cannot take a comma in a column name",
            "remove it",
        )
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://panda.example.org", "panda") + SOURCE.format(
        name="Bad Name", slug="schema"
    )
    text += "unknown_setting = 1\n"
    wheres = [problem.where for problem in problems(write(tmp_path, text))]
    assert wheres == [
        "panda.url",
        "sources[0].name",
        "sources[0].dataset.slug",
        "sources[0].unknown_setting",
    ]


def test_duplicate_names_and_datasets_are_refused(tmp_path: Path) -> None:
    text = MINIMAL + SOURCE.format(name="a", slug="same") + SOURCE.format(name="a", slug="same")
    assert [problem.where for problem in problems(write(tmp_path, text))] == [
        "sources[1].name",
        "sources[1].dataset.slug",
    ]


def test_a_couchdb_source_without_its_server_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + SOURCE.format(name="a", slug="a").replace('"webhook"', '"couchdb"')
    assert problems(write(tmp_path, text)) == [
        Problem(
            "sources[0].couchdb",
            "a couchdb source needs its server",
            "add a [sources.couchdb] table with url and database",
        )
    ]


def test_a_lease_too_short_to_renew_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + "[delivery]\nlease_s = 0.5\n"
    (problem,) = problems(write(tmp_path, text))
    assert (problem.where, "1" in problem.what) == ("delivery.lease_s", True)


def test_a_lease_shorter_than_a_request_is_fine_since_it_is_renewed(tmp_path: Path) -> None:
    text = MINIMAL + "timeout_s = 30\n[delivery]\nlease_s = 6\n"
    settings = load_settings(write(tmp_path, text))
    assert (settings.panda.timeout_s, settings.delivery.lease_s) == (30, 6)


def test_a_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path / "nope.toml")
    assert (problem.what, "--config" in problem.fix) == ("no such file", True)


def test_broken_toml_says_where(tmp_path: Path) -> None:
    (problem,) = problems(write(tmp_path, "[panda\n"))
    assert "line 1" in problem.what


def test_missing_panda_settings_say_what_to_add() -> None:
    (problem,) = problems(None)
    assert (problem.where, problem.what) == ("panda", "Field required")


def test_places_are_written_as_paths() -> None:
    assert place(("sources", 2, "columns", 1, "name")) == "sources[2].columns[1].name"


def test_a_couchdb_source_must_key_rows_by_document_id(tmp_path: Path) -> None:
    text = MINIMAL + SOURCE.format(name="a", slug="a").replace('"webhook"', '"couchdb"')
    text += 'id_field = "uid"\ncouchdb = { url = "http://127.0.0.1:5984", database = "d" }\n'
    assert [problem.where for problem in problems(write(tmp_path, text))] == ["sources[0].id_field"]


def test_the_examples_webhook_source_is_valid_once_uncommented(tmp_path: Path) -> None:
    head, _, tail = EXAMPLE.read_text(encoding="utf-8").partition("# A webhook source")
    lines = tail.splitlines()[1:]
    uncommented = "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines)
    text = head + uncommented.replace('format = "pandasync"', 'format = "jmespath"')
    settings = load_settings(write(tmp_path, text))
    webhook = settings.sources[1].webhook
    assert webhook is not None
    assert (webhook.signature, webhook.mapping is not None, settings.ingress.retry_after_s) == (
        "standard-webhooks",
        True,
        30,
    )


def webhook_source(webhook: str, columns: str = '{ name = "A", field = "a" }') -> str:
    return f"""
[[sources]]
name = "hooks"
kind = "webhook"
dataset = {{ slug = "hooks", name = "Hooks" }}
columns = [{columns}]
webhook = {webhook}
"""


def test_a_webhook_source_without_its_webhook_table_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + SOURCE.format(name="a", slug="a").replace(
        'webhook = { signature = "none" }', ""
    )
    assert problems(write(tmp_path, text)) == [
        Problem(
            "sources[0].webhook",
            "a webhook source needs its webhook settings",
            'add its webhook table: a signature and its secrets, or signature = "none"',
        )
    ]


@pytest.mark.parametrize(
    ("webhook", "what"),
    [
        ('{ format = "pandasync" }', "Field required"),
        ('{ signature = "github" }', "a github signature needs a secret"),
        ('{ signature = "none", secrets = ["s"] }', "secrets are set but signature is none"),
        ('{ signature = "github", secrets = [""] }', "a secret is empty"),
        (
            '{ signature = "standard-webhooks", secrets = ["whsec_"] }',
            "a secret is not a Standard Webhooks secret",
        ),
        ('{ signature = "hmac", secrets = ["s"] }', "an hmac signature needs its header"),
        (
            '{ signature = "github", secrets = ["s"], header = "X" }',
            "header is only for the hmac signature",
        ),
        ('{ signature = "none", format = "jmespath" }', "the jmespath format needs its mapping"),
        (
            '{ signature = "none", mapping = { id = "a" } }',
            "a mapping is only for the jmespath format",
        ),
        (
            '{ signature = "none", format = "jmespath", mapping = { items = "a..b" } }',
            "not a JMESPath expression (it breaks at character 3)",
        ),
    ],
)
def test_webhook_settings_are_checked_and_never_quote_a_secret(
    tmp_path: Path, webhook: str, what: str
) -> None:
    [problem] = problems(write(tmp_path, MINIMAL + webhook_source(webhook)))
    assert (problem.what, '"s"' in str(problem)) == (what, False)


def test_a_mapped_column_must_be_one_of_the_sources_columns(tmp_path: Path) -> None:
    webhook = '{ signature = "none", format = "jmespath", mapping = { columns = { B = "b" } } }'
    [problem] = problems(write(tmp_path, MINIMAL + webhook_source(webhook)))
    assert (problem.where, problem.what) == (
        "sources[0].webhook.mapping.columns.B",
        "`B` is not one of the source's columns",
    )


def couchdb_source(couchdb: str) -> str:
    server = f'url = "http://127.0.0.1:5984", database = "d", {couchdb}'
    source = SOURCE.format(name="a", slug="a").replace('"webhook"', '"couchdb"')
    return source.replace(
        'webhook = { signature = "none" }', f'id_field = "_id"\ncouchdb = {{ {server} }}'
    )


def test_a_couchdb_password_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COUCH_PASSWORD", "s3cret")
    text = MINIMAL + couchdb_source('username = "sync", password_env = "COUCH_PASSWORD"')
    (source,) = load_settings(write(tmp_path, text)).sources
    assert source.couchdb is not None
    assert source.couchdb.password is not None
    assert source.couchdb.password.get_secret_value() == "s3cret"


@pytest.mark.parametrize(
    ("couchdb", "what", "fix"),
    [
        (
            'username = "sync", password_env = "COUCH_PASSWORD"',
            "password_env names the environment variable COUCH_PASSWORD, which is not set",
            "export COUCH_PASSWORD before starting pandasync, or set password in the file",
        ),
        (
            'username = "sync", password = "s3cret", password_env = "COUCH_PASSWORD"',
            "password and password_env are both set",
            "keep one of them",
        ),
    ],
)
def test_a_couchdb_password_from_the_environment_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, couchdb: str, what: str, fix: str
) -> None:
    monkeypatch.delenv("COUCH_PASSWORD", raising=False)
    [problem] = problems(write(tmp_path, MINIMAL + couchdb_source(couchdb)))
    assert (problem.where, problem.what, problem.fix) == ("sources[0].couchdb", what, fix)
    assert "s3cret" not in str(problem)


def test_webhook_secrets_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET_NEW", "new-secret")
    webhook = (
        '{ signature = "github", secrets = ["old-secret"], secrets_env = ["HOOK_SECRET_NEW"] }'
    )
    (source,) = load_settings(write(tmp_path, MINIMAL + webhook_source(webhook))).sources
    assert source.webhook is not None
    assert [secret.get_secret_value() for secret in source.webhook.secrets] == [
        "old-secret",
        "new-secret",
    ]


def test_a_webhook_secret_named_but_not_in_the_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    webhook = '{ signature = "github", secrets_env = ["HOOK_SECRET"] }'
    [problem] = problems(write(tmp_path, MINIMAL + webhook_source(webhook)))
    assert (problem.where, problem.what) == (
        "sources[0].webhook",
        "secrets_env names the environment variable HOOK_SECRET, which is not set",
    )


def test_a_bad_couchdb_url_gets_a_couchdb_example(tmp_path: Path) -> None:
    text = MINIMAL + SOURCE.format(name="s", slug="s").replace(
        'kind = "webhook"', 'kind = "couchdb"'
    )
    text += '[sources.couchdb]\nurl = "not a url"\ndatabase = "d"\n'
    (problem,) = problems(write(tmp_path, text))
    assert (problem.where, problem.fix) == (
        "sources[0].couchdb.url",
        "write a full URL such as http://couchdb.example.org:5984",
    )


def test_a_bad_environment_override_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PANDASYNC_SERVER__PORT", "abc")
    (problem,) = problems(write(tmp_path, MINIMAL))
    assert problem.where == "server.port (from the environment, PANDASYNC_SERVER__PORT)"


def test_credentials_in_the_panda_url_are_refused_and_never_printed(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://panda.example.org", "http://panda:s3cr3t@panda.example.org")
    (problem,) = problems(write(tmp_path, text))
    assert (problem.where, "credentials" in problem.what) == ("panda.url", True)
    assert "s3cr3t" not in str(problem)


SNAPSHOT = """
[[sources]]
name = "tweets"
kind = "snapshot"
id_field = "id"
dataset = { slug = "tweets", name = "Tweets" }
columns = [{ name = "text", field = "text" }]
"""


def test_a_snapshot_source_without_what_to_read_is_refused(tmp_path: Path) -> None:
    assert problems(write(tmp_path, MINIMAL + SNAPSHOT)) == [
        Problem(
            "sources[0].snapshot",
            "a snapshot source needs to know what to read",
            "add a [sources.snapshot] table with url (and format), or database_url and query",
        )
    ]


@pytest.mark.parametrize(
    ("table", "what", "at"),
    [
        (
            'url = "http://x.org/t.json"\ndatabase_url = "postgresql://h/d"\nquery = "SELECT 1"',
            "a snapshot source reads either an HTTP url or a database",
            "",
        ),
        ('database_url = "postgresql://h/d"', "database_url and query go together", ""),
        (
            'url = "http://me:pw@example.org/t.json"',
            "the URL holds credentials, which would end up in logs",
            ".url",
        ),
        (
            'url = "http://example.org/t.json"\nheaders_env = { Authorization = "NO_SUCH_TOKEN" }',
            "headers_env names the environment variable NO_SUCH_TOKEN, which is not set",
            "",
        ),
    ],
)
def test_a_snapshot_table_that_cannot_be_read_is_refused_with_its_fix(
    tmp_path: Path, table: str, what: str, at: str
) -> None:
    found = problems(write(tmp_path, f"{MINIMAL}{SNAPSHOT}\n[sources.snapshot]\n{table}\n"))
    where = f"sources[0].snapshot{at}"
    assert [(problem.where, problem.what) for problem in found] == [(where, what)]
    assert "pw" not in str(found)


def test_a_header_token_from_the_environment_never_shows_in_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWEETS_TOKEN", "Bearer s3cr3t")
    table = 'url = "http://example.org/t.json"\nheaders_env = { Authorization = "TWEETS_TOKEN" }'
    settings = load_settings(write(tmp_path, f"{MINIMAL}{SNAPSHOT}\n[sources.snapshot]\n{table}\n"))
    snapshot = settings.sources[0].snapshot
    assert snapshot is not None
    assert snapshot.headers["Authorization"].get_secret_value() == "Bearer s3cr3t"
    assert "s3cr3t" not in repr(settings)
