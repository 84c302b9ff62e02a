"""The PANDA client: scripted edge cases over `httpx.MockTransport`, then the real peer."""

import gzip
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.changes import Change, Op
from service.delivery.panda import (
    BULK_LIMIT,
    DETAIL_LIMIT,
    MAX_ANSWER_BYTES,
    Dataset,
    DatasetMismatchError,
    DatasetMissingError,
    PandaClient,
    PermanentError,
    RetryableError,
    TargetError,
    UnauthorizedError,
    make_http,
)
from tests.fixtures.panda import RunningPanda

pytestmark = pytest.mark.anyio

BASE = "http://panda.test"
EMAIL = "panda@example.com"
KEY = "k3y-THAT-must-never-leak-0123456789"
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
DS = Dataset(slug="ds", name="DS", columns=("a", "b", "c"))
LAZY_REPR = b"<django.utils.functional.__proxy__ object at 0x7f3b2c1d9e50>"

Answer = httpx.Response | Exception


@dataclass
class Script:
    """Answers requests with `answers`, in order, and records every request."""

    answers: list[Answer]
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sent(self) -> list[tuple[str, str, bytes]]:
        """Each request as (method, URL as sent, body)."""
        return [(r.method, str(r.url), r.content) for r in self.requests]


@asynccontextmanager
async def scripted(
    *answers: Answer, url: str = BASE, email: str = EMAIL
) -> AsyncIterator[tuple[PandaClient, Script]]:
    script = Script(list(answers))
    async with make_http(url=url, transport=httpx.MockTransport(script)) as http:
        yield PandaClient(http, email=email, api_key=KEY, clock=lambda: NOW), script


def dataset_body(columns: list[str] | None) -> bytes:
    schema = None if columns is None else [{"name": name, "type": "unicode"} for name in columns]
    return orjson.dumps({"slug": "ds", "name": "DS", "column_schema": schema})


def error_chain(error: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def assert_no_key(error: BaseException) -> None:
    """Nothing a log line could show of `error` (message, repr, traceback, causes) has the key."""
    shown = "".join(traceback.format_exception(error))
    shown += "".join(f"{cause!s}{cause!r}{vars(cause)}" for cause in error_chain(error))
    assert KEY not in shown


# Requests as PANDA wants them (panda-api.md §1, §2, §5).


async def test_put_row_sends_the_row_to_the_row_url_with_a_trailing_slash() -> None:
    async with scripted(httpx.Response(202)) as (panda, script):
        await panda.put_row("ds", "r1", ("1", "two", ""))
    assert script.sent() == [
        ("PUT", f"{BASE}/api/1.0/dataset/ds/data/r1/", b'{"data":["1","two",""]}')
    ]


async def test_credentials_go_in_dash_form_headers_and_never_into_the_url() -> None:
    async with scripted(httpx.Response(202)) as (panda, script):
        await panda.put_row("ds", "r1", ("1", "2", "3"))
    (request,) = script.requests
    assert (request.headers["PANDA-EMAIL"], request.headers["PANDA-API-KEY"]) == (EMAIL, KEY)
    assert "PANDA_EMAIL" not in request.headers
    assert "PANDA_API_KEY" not in request.headers
    assert request.url.query == b""


async def test_bodies_are_json_and_answers_are_asked_for_as_json() -> None:
    async with scripted(httpx.Response(202), httpx.Response(204)) as (panda, script):
        await panda.put_row("ds", "r1", ("1", "2", "3"))
        await panda.delete_row("ds", "r1")
    put, delete = script.requests
    assert put.headers["Content-Type"] == "application/json"
    assert put.headers["Accept"] == "application/json"
    assert "Content-Type" not in delete.headers
    assert delete.content == b""


async def test_a_non_ascii_email_is_url_quoted_as_panda_unquotes_it() -> None:
    async with scripted(httpx.Response(204), email="josé+news@example.com") as (panda, script):
        await panda.delete_row("ds", "r1")
    assert script.requests[0].headers["PANDA-EMAIL"] == "jos%C3%A9+news@example.com"


async def test_the_configured_url_may_carry_a_path_prefix() -> None:
    async with scripted(httpx.Response(204), url="https://example.org/panda") as (panda, script):
        await panda.delete_row("ds", "r1")
    assert str(script.requests[0].url) == "https://example.org/panda/api/1.0/dataset/ds/data/r1/"


async def test_a_unicode_external_id_is_percent_encoded_in_the_url() -> None:
    async with scripted(httpx.Response(202)) as (panda, script):
        await panda.put_row("ds", "café_1-x", ("1", "2", "3"))
    assert str(script.requests[0].url) == f"{BASE}/api/1.0/dataset/ds/data/caf%C3%A9_1-x/"


@pytest.mark.parametrize("external_id", ["", "a/b", "a b", "a.b", "..", "a?b", "a%2Fb", "\ud800"])
async def test_an_external_id_panda_cannot_route_is_refused_without_a_request(
    external_id: str,
) -> None:
    async with scripted() as (panda, script):
        with pytest.raises(PermanentError) as refused:
            await panda.put_row("ds", external_id, ("1", "2", "3"))
        with pytest.raises(PermanentError):
            await panda.delete_row("ds", external_id)
    assert (refused.value.status, refused.value.external_ids) == (None, (external_id,))
    assert script.requests == []


async def test_a_row_that_is_not_utf8_text_is_refused_without_a_request() -> None:
    async with scripted() as (panda, script):
        with pytest.raises(PermanentError) as refused:
            await panda.put_row("ds", "r1", ("ok", "bad \ud800", "ok"))
    assert (refused.value.status, refused.value.external_ids) == (None, ("r1",))
    assert "bad" not in refused.value.detail
    assert script.requests == []


async def test_put_rows_sends_one_bulk_put_with_every_external_id() -> None:
    async with scripted(httpx.Response(202)) as (panda, script):
        await panda.put_rows("ds", [("r1", ("1", "2", "3")), ("r2", ("4", "5", "6"))])
    body = {
        "objects": [
            {"data": ["1", "2", "3"], "external_id": "r1"},
            {"data": ["4", "5", "6"], "external_id": "r2"},
        ]
    }
    assert script.sent() == [("PUT", f"{BASE}/api/1.0/dataset/ds/data/", orjson.dumps(body))]


async def test_put_rows_with_no_rows_sends_nothing() -> None:
    async with scripted() as (panda, script):
        await panda.put_rows("ds", [])
    assert script.requests == []


async def test_put_rows_refuses_more_than_the_bulk_limit() -> None:
    rows = [(f"r{index}", ("1", "2", "3")) for index in range(BULK_LIMIT + 1)]
    async with scripted() as (panda, script):
        with pytest.raises(ValueError, match="at most 1000"):
            await panda.put_rows("ds", rows)
    assert script.requests == []


async def test_put_rows_names_the_ids_the_bulk_path_would_refuse_and_sends_nothing() -> None:
    rows = [
        ("ok", ("1",)),
        ("café", ("1",)),
        ("", ("1",)),
        ("empty", ()),
        ("two\nlines", ("1",)),
        ("fine", ("2",)),
    ]
    async with scripted() as (panda, script):
        with pytest.raises(PermanentError) as refused:
            await panda.put_rows("ds", rows)
    assert (refused.value.status, refused.value.external_ids) == (
        None,
        ("café", "", "empty", "two\nlines"),
    )
    assert script.requests == []


@pytest.mark.parametrize("bad", ["two\nlines", "trailing\n", "\nleading", "a b", "", "é"])
async def test_put_rows_json_refuses_a_lone_bad_id_among_good_ones(bad: str) -> None:
    rows = [("r1", '["1"]'), (bad, '["2"]'), ("r3", '["3"]')]
    async with scripted() as (panda, script):
        with pytest.raises(PermanentError) as refused:
            await panda.put_rows_json("ds", [eid for eid, _ in rows], [row for _, row in rows])
    assert refused.value.external_ids == (bad,)
    assert script.requests == []


async def test_put_rows_names_the_rows_that_are_not_utf8_text() -> None:
    rows = [("r1", ("\udcff",)), ("r2", ("ok",)), ("r3", ("\U0001f600 fine",))]
    async with scripted() as (panda, script):
        with pytest.raises(PermanentError) as refused:
            await panda.put_rows("ds", rows)
    assert refused.value.external_ids == ("r1",)
    assert script.requests == []


async def test_put_rows_json_refuses_ids_and_rows_that_do_not_pair_up() -> None:
    async with scripted() as (panda, script):
        with pytest.raises(ValueError, match="2 external_ids for 1 rows"):
            await panda.put_rows_json("ds", ["r1", "r2"], ['["1"]'])
    assert script.requests == []


async def test_put_rows_json_sends_the_rows_text_as_stored() -> None:
    rows = [("r1", '["\\ud83d\\ude00","2"]'), ("r2", '["caf\\u00e9","x"]')]
    async with scripted(httpx.Response(202)) as (panda, script):
        await panda.put_rows_json("ds", [eid for eid, _ in rows], [row for _, row in rows])
    [(_, _, content)] = script.sent()
    assert orjson.loads(content) == {
        "objects": [
            {"data": ["\U0001f600", "2"], "external_id": "r1"},
            {"data": ["café", "x"], "external_id": "r2"},
        ]
    }


@pytest.mark.parametrize("odd", ['["\\udcff"]', '["\udcff"]'], ids=["escaped", "raw"])
async def test_put_rows_json_names_rows_holding_a_lone_surrogate(odd: str) -> None:
    rows = [("r1", '["ok"]'), ("r2", odd), ("r3", '["\\ud83d\\ude00", "caf\u00e9"]')]
    async with scripted() as (panda, script):
        with pytest.raises(PermanentError) as refused:
            await panda.put_rows_json("ds", [eid for eid, _ in rows], [row for _, row in rows])
    assert (refused.value.status, refused.value.external_ids) == (None, ("r2",))
    assert "ud" not in refused.value.detail.replace("r2", "")
    assert script.requests == []


async def test_apply_puts_an_upsert_and_deletes_a_delete() -> None:
    upsert = Change("src", "doc 1", "doc_201", Op.UPSERT, ("1", "2", "3"))
    delete = Change("src", "doc 2", "doc_202", Op.DELETE)
    async with scripted(httpx.Response(202), httpx.Response(204)) as (panda, script):
        await panda.apply("ds", upsert)
        await panda.apply("ds", delete)
    assert script.sent() == [
        ("PUT", f"{BASE}/api/1.0/dataset/ds/data/doc_201/", b'{"data":["1","2","3"]}'),
        ("DELETE", f"{BASE}/api/1.0/dataset/ds/data/doc_202/", b""),
    ]


# ensure_dataset (§3.1, §5.3).


async def test_ensure_dataset_accepts_an_existing_dataset_with_the_same_columns() -> None:
    async with scripted(httpx.Response(200, content=dataset_body(["a", "b", "c"]))) as (
        panda,
        script,
    ):
        await panda.ensure_dataset(DS)
    assert script.sent() == [("GET", f"{BASE}/api/1.0/dataset/ds/", b"")]


async def test_ensure_dataset_creates_a_missing_dataset_with_its_columns_and_name() -> None:
    answers = (httpx.Response(404), httpx.Response(201, content=dataset_body(["a", "b", "c"])))
    async with scripted(*answers) as (panda, script):
        await panda.ensure_dataset(Dataset(slug="ds", name="Düsseldorf", columns=DS.columns))
    assert script.sent() == [
        ("GET", f"{BASE}/api/1.0/dataset/ds/", b""),
        ("PUT", f"{BASE}/api/1.0/dataset/ds/?columns=a%2Cb%2Cc", '{"name":"Düsseldorf"}'.encode()),
    ]
    assert script.requests[1].headers["Content-Type"] == "application/json"


async def test_ensure_dataset_sends_column_names_with_spaces_and_unicode_intact() -> None:
    columns = ("First Name", "Straße", "a&b=c")
    answers = (httpx.Response(404), httpx.Response(201, content=dataset_body(list(columns))))
    async with scripted(*answers) as (panda, script):
        await panda.ensure_dataset(Dataset(slug="ds", name="DS", columns=columns))
    assert script.requests[1].url.params["columns"] == "First Name,Straße,a&b=c"


async def test_ensure_dataset_reports_other_columns_with_both_lists_and_the_fix() -> None:
    async with scripted(httpx.Response(200, content=dataset_body(["a", "c", "b"]))) as (panda, _):
        with pytest.raises(DatasetMismatchError) as mismatch:
            await panda.ensure_dataset(DS)
    assert mismatch.value.slug == "ds"
    assert "['a', 'c', 'b']" in str(mismatch.value)
    assert "['a', 'b', 'c']" in str(mismatch.value)
    assert "delete the dataset in PANDA" in str(mismatch.value)


async def test_ensure_dataset_reports_a_dataset_created_without_columns() -> None:
    async with scripted(httpx.Response(200, content=dataset_body(None))) as (panda, _):
        with pytest.raises(DatasetMismatchError, match="has no columns"):
            await panda.ensure_dataset(DS)


async def test_ensure_dataset_checks_columns_when_another_writer_created_it_first() -> None:
    answers = (httpx.Response(404), httpx.Response(202, content=dataset_body(["x"])))
    async with scripted(*answers) as (panda, _):
        with pytest.raises(DatasetMismatchError, match=r"\['x'\]"):
            await panda.ensure_dataset(DS)


async def test_ensure_dataset_reports_panda_refusing_the_dataset_as_permanent() -> None:
    body = b'{"dataset": {"name": ["This field is required."]}}'
    async with scripted(httpx.Response(404), httpx.Response(400, content=body)) as (panda, _):
        with pytest.raises(PermanentError, match="This field is required") as refused:
            await panda.ensure_dataset(DS)
    assert refused.value.status == 400


async def test_ensure_dataset_pauses_the_target_when_the_put_finds_no_panda() -> None:
    async with scripted(httpx.Response(404), httpx.Response(404)) as (panda, _):
        with pytest.raises(TargetError, match=r"panda\.url") as paused:
            await panda.ensure_dataset(DS)
    assert paused.value.status == 404


@pytest.mark.parametrize(
    "body", [b"<html>PANDA login</html>", b"[]", b'{"name": "DS"}', b'{"column_schema": [{}]}']
)
async def test_ensure_dataset_pauses_the_target_when_the_answer_is_not_a_dataset(
    body: bytes,
) -> None:
    async with scripted(httpx.Response(200, content=body)) as (panda, _):
        with pytest.raises(TargetError, match="not a PANDA dataset"):
            await panda.ensure_dataset(DS)


async def test_a_column_name_that_is_not_text_is_not_a_dataset() -> None:
    body = b'{"column_schema": [{"name": 1}]}'
    async with scripted(httpx.Response(200, content=body)) as (panda, _):
        with pytest.raises(TargetError, match="not a PANDA dataset"):
            await panda.ensure_dataset(DS)


async def test_two_datasets_sharing_the_slug_stop_the_source() -> None:
    async with scripted(httpx.Response(300)) as (panda, _):
        with pytest.raises(DatasetMismatchError, match="two datasets with slug ds"):
            await panda.ensure_dataset(DS)


@pytest.mark.parametrize(
    ("slug", "name", "columns", "problem"),
    [
        ("a,b", "DS", ("a",), "cannot address"),
        ("schema", "DS", ("a",), "cannot address"),
        ("", "DS", ("a",), "cannot address"),
        ("ds", " ", ("a",), "non-empty name"),
        ("ds", "DS", (), "at least one column"),
        ("ds", "DS", ("a", "b,c"), "comma"),
    ],
)
def test_a_dataset_panda_cannot_express_is_refused_when_it_is_made(
    slug: str, name: str, columns: tuple[str, ...], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        Dataset(slug=slug, name=name, columns=columns)


# How every answer is classified (§2, §3.3.7, §5.7).


async def test_2xx_answers_are_done() -> None:
    answers = (httpx.Response(200), httpx.Response(201), httpx.Response(202), httpx.Response(204))
    async with scripted(*answers) as (panda, script):
        for _ in answers:
            await panda.put_row("ds", "r1", ("1",))
    assert len(script.requests) == 4


async def test_401_is_unauthorized_and_names_the_settings_but_not_the_key() -> None:
    async with scripted(httpx.Response(401)) as (panda, _):
        with pytest.raises(UnauthorizedError) as refused:
            await panda.put_row("ds", "r1", ("1",))
    assert refused.value.status == 401
    assert "panda.email" in str(refused.value)
    assert "panda.api_key" in str(refused.value)
    assert_no_key(refused.value)


async def test_400_is_permanent_with_pandas_json_message() -> None:
    body = b'{"data": ["Got 2 data fields. Expected 3."]}'
    async with scripted(httpx.Response(400, content=body)) as (panda, _):
        with pytest.raises(PermanentError) as refused:
            await panda.put_row("ds", "r1", ("1", "2"))
    assert refused.value.status == 400
    assert refused.value.detail == (
        'PANDA refused PUT /api/1.0/dataset/ds/data/r1/ (400): {"data": ["Got 2 data fields.'
        ' Expected 3."]}'
    )


async def test_400_with_pandas_unreadable_plain_text_is_permanent_and_says_so() -> None:
    answer = httpx.Response(400, content=LAZY_REPR, headers={"Content-Type": "text/html"})
    async with scripted(answer) as (panda, _):
        with pytest.raises(PermanentError) as refused:
            await panda.put_rows("ds", [("r1", ("1",))])
    assert "no readable reason" in refused.value.detail
    assert "__proxy__" not in refused.value.detail
    assert refused.value.external_ids == ()


async def test_a_long_400_message_is_cut_to_the_detail_limit() -> None:
    async with scripted(httpx.Response(400, content=b"x" * 10_000)) as (panda, _):
        with pytest.raises(PermanentError) as refused:
            await panda.put_row("ds", "r1", ("1",))
    assert refused.value.detail.endswith("x…")
    assert len(refused.value.detail) < DETAIL_LIMIT + 100


@pytest.mark.parametrize(
    "message",
    [
        b'{"dataset": ["Can not create or modify data for a dataset without columns."]}',
        b'{"dataset": ["Can not create or modify data for a dataset which has initial_upload,'
        b' but has not completed the import process."]}',
    ],
)
async def test_a_400_about_the_dataset_stops_the_source_instead_of_refusing_the_row(
    message: bytes,
) -> None:
    async with scripted(httpx.Response(400, content=message)) as (panda, _):
        with pytest.raises(DatasetMismatchError) as stopped:
            await panda.put_row("ds", "r1", ("1",))
    assert stopped.value.slug == "ds"
    assert "Can not create or modify data" in stopped.value.detail


async def test_403_is_retryable_because_the_dataset_is_locked() -> None:
    answer = httpx.Response(403, content=LAZY_REPR, headers={"Content-Type": "text/html"})
    async with scripted(answer) as (panda, _):
        with pytest.raises(RetryableError, match="locked") as locked:
            await panda.delete_row("ds", "r1")
    assert (locked.value.status, locked.value.retry_after_s) == (403, None)


RowCall = Callable[[PandaClient], Awaitable[None]]
ROW_CALLS: dict[str, RowCall] = {
    "put_row": lambda panda: panda.put_row("ds", "r1", ("1",)),
    "put_rows": lambda panda: panda.put_rows("ds", [("r1", ("1",))]),
    "delete_row": lambda panda: panda.delete_row("ds", "r1"),
}


@pytest.mark.parametrize("call", ROW_CALLS.values(), ids=ROW_CALLS.keys())
async def test_404_on_a_row_call_means_the_dataset_is_missing(call: RowCall) -> None:
    async with scripted(httpx.Response(404)) as (panda, _):
        with pytest.raises(DatasetMissingError) as missing:
            await call(panda)
    assert isinstance(missing.value, RetryableError)
    assert missing.value.status == 404


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_server_errors_and_timeouts_by_status_are_retryable(status: int) -> None:
    body = b'{"error_message": "Sorry, this request could not be processed."}'
    async with scripted(httpx.Response(status, content=body)) as (panda, _):
        with pytest.raises(RetryableError) as retry:
            await panda.put_row("ds", "r1", ("1",))
    assert (retry.value.status, retry.value.retry_after_s) == (status, None)
    assert "Sorry, this request could not be processed." in retry.value.detail


@pytest.mark.parametrize(
    ("headers", "retry_after_s"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"Retry-After": " 0 "}, 0.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "Tue, 14 Nov 2023 22:15:20 GMT"}, 120.0),
        ({"Retry-After": "Tue, 14 Nov 2023 22:15:20 -0000"}, 120.0),
        (
            {
                "Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT",
                "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
            },
            30.0,
        ),
        ({"Retry-After": "Tue, 14 Nov 2023 22:00:00 GMT"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
    ],
)
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_read_as_seconds_or_as_an_http_date(
    status: int, headers: dict[str, str], retry_after_s: float | None
) -> None:
    async with scripted(httpx.Response(status, headers=headers)) as (panda, _):
        with pytest.raises(RetryableError) as retry:
            await panda.put_rows("ds", [("r1", ("1",))])
    assert (retry.value.status, retry.value.retry_after_s) == (status, retry_after_s)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_never_followed_and_pauses_the_target_naming_panda_url(
    status: int,
) -> None:
    location = "https://panda.test/api/1.0/dataset/ds/data/r1/"
    async with scripted(httpx.Response(status, headers={"Location": location})) as (panda, script):
        with pytest.raises(TargetError) as paused:
            await panda.put_row("ds", "r1", ("1",))
    assert len(script.requests) == 1
    assert paused.value.status == status
    assert "panda.url" in str(paused.value)
    assert location in str(paused.value)


async def test_an_answer_running_past_the_bound_pauses_the_target_having_read_no_more() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"<html>" + b"x" * 65530
        while True:  # a file server at panda.url, say: it would send gigabytes
            sent += len(chunk)
            yield chunk

    answer = httpx.Response(200, content=endless())
    async with scripted(answer) as (panda, _):
        with pytest.raises(TargetError, match=r"runs past 67108864 bytes.*panda\.url") as paused:
            await panda.ensure_dataset(DS)
    assert paused.value.status == 200
    assert sent <= MAX_ANSWER_BYTES + 65536


async def test_an_answer_is_read_decoded_whatever_its_content_encoding() -> None:
    body = gzip.compress(dataset_body(["Title", "Words"]))
    answer = httpx.Response(200, content=body, headers={"Content-Encoding": "gzip"})
    async with scripted(answer) as (panda, _):
        await panda.ensure_dataset(Dataset(slug="ds", name="DS", columns=("Title", "Words")))


@pytest.mark.parametrize("status", [405, 501, 409, 413, 418, 304])
async def test_an_answer_panda_never_gives_pauses_the_target(status: int) -> None:
    async with scripted(httpx.Response(status)) as (panda, _):
        with pytest.raises(TargetError, match=r"panda\.url") as paused:
            await panda.put_row("ds", "r1", ("1",))
    assert paused.value.status == status


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectTimeout("timed out"),
        httpx.ReadTimeout("timed out"),
        httpx.WriteTimeout("timed out"),
        httpx.PoolTimeout("timed out"),
    ],
)
async def test_a_timeout_is_retryable_and_names_the_kind_of_timeout(failure: Exception) -> None:
    async with scripted(failure) as (panda, _):
        with pytest.raises(RetryableError) as retry:
            await panda.put_row("ds", "r1", ("1",))
    assert (retry.value.status, retry.value.retry_after_s) == (None, None)
    assert retry.value.detail == (
        f"PUT /api/1.0/dataset/ds/data/r1/: no answer from PANDA in time ({type(failure).__name__})"
    )


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
async def test_a_connection_failure_is_retryable(failure: Exception) -> None:
    async with scripted(failure) as (panda, _):
        with pytest.raises(RetryableError) as retry:
            await panda.delete_row("ds", "r1")
    assert retry.value.status is None
    assert type(failure).__name__ in retry.value.detail


class CutOff(httpx.AsyncByteStream):
    """A body the peer resets after its first bytes."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"objects": [{"data": ['
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


async def test_a_connection_reset_in_the_middle_of_the_answer_is_retryable() -> None:
    answer = httpx.Response(202, headers={"Content-Length": "4000"}, stream=CutOff())
    async with scripted(answer) as (panda, _):
        with pytest.raises(RetryableError, match="RemoteProtocolError") as retry:
            await panda.put_rows("ds", [("r1", ("1",))])
    assert retry.value.status is None


async def test_an_unsupported_url_scheme_pauses_the_target() -> None:
    async with httpx.AsyncClient(base_url="ftp://panda.test") as http:
        panda = PandaClient(http, email=EMAIL, api_key=KEY)
        with pytest.raises(TargetError, match=r"panda\.url"):
            await panda.delete_row("ds", "r1")


# The key stays secret (§5.1; STYLE: never log secrets).

leaky_answers: list[Answer] = [
    httpx.Response(401),
    httpx.Response(400, content=b'{"data": {"external_id": ["bad"]}}'),
    httpx.Response(403),
    httpx.Response(404),
    httpx.Response(301, headers={"Location": "/elsewhere/"}),
    httpx.Response(503, headers={"Retry-After": "3"}),
    httpx.ReadTimeout("timed out"),
    httpx.ConnectError("refused"),
    httpx.Response(202, stream=CutOff()),
]


@pytest.mark.parametrize("answer", leaky_answers)
async def test_no_error_shows_the_api_key(answer: Answer) -> None:
    async with scripted(answer) as (panda, _):
        with pytest.raises(Exception) as failed:  # noqa: PT011 - any error at all
            await panda.put_row("ds", "r1", ("1",))
    assert_no_key(failed.value)


async def test_the_client_repr_shows_the_url_and_email_but_not_the_key() -> None:
    async with scripted() as (panda, _):
        assert repr(panda) == f"PandaClient(url='{BASE}', email='{EMAIL}')"


@pytest.mark.parametrize("api_key", ["", "ké", "a key", "key\n"])
async def test_an_unusable_api_key_is_refused_without_showing_it(api_key: str) -> None:
    async with make_http(url=BASE) as http:
        with pytest.raises(ValueError, match=r"panda\.api_key") as refused:
            PandaClient(http, email=EMAIL, api_key=api_key)
    assert str(refused.value) == (
        "panda.api_key is not an API key (empty, or not printable ASCII):"
        " copy it from your PANDA user page"
    )


async def test_an_empty_email_is_refused() -> None:
    async with make_http(url=BASE) as http:
        with pytest.raises(ValueError, match=r"panda\.email"):
            PandaClient(http, email="", api_key=KEY)


@pytest.mark.parametrize("url", ["panda.test", "ftp://panda.test/", "http://", "/api/1.0/"])
def test_make_http_refuses_a_url_that_is_not_an_absolute_http_url(url: str) -> None:
    with pytest.raises(ValueError, match=r"panda\.url"):
        make_http(url=url)


async def test_make_http_never_follows_redirects_and_has_no_credentials() -> None:
    async with make_http(url=BASE, timeout_s=7.5) as http:
        assert http.follow_redirects is False
        assert http.timeout == httpx.Timeout(7.5)
        assert "PANDA-API-KEY" not in http.headers
        assert http.auth is None


@given(
    status=st.integers(min_value=100, max_value=599),
    body=st.binary(max_size=64),
    retry_after=st.none() | st.text(max_size=40),
)
async def test_every_answer_is_done_or_one_of_the_documented_errors_without_the_key(
    status: int, body: bytes, retry_after: str | None
) -> None:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    try:
        answer = httpx.Response(status, content=body, headers=headers)
    except (UnicodeEncodeError, httpx.LocalProtocolError):
        return  # a header httpx itself cannot carry
    async with scripted(answer) as (panda, _):
        try:
            await panda.put_row("ds", "r1", ("1",))
        except (RetryableError, PermanentError, TargetError, DatasetMismatchError) as error:
            assert_no_key(error)
            assert not (200 <= status < 300)
        else:
            assert 200 <= status < 300


# Against the PANDA-compatible server, over real sockets.

STORIES = Dataset(slug="stories", name="Stories", columns=("Headline", "Words"))


@asynccontextmanager
async def client_of(
    panda: RunningPanda, *, api_key: str | None = None, timeout_s: float = 5.0
) -> AsyncIterator[PandaClient]:
    async with make_http(url=panda.url, timeout_s=timeout_s) as http:
        yield PandaClient(http, email=panda.email, api_key=api_key or panda.api_key)


def column_names(panda: RunningPanda, slug: str) -> list[str]:
    dataset = panda.dataset(slug)
    assert dataset is not None
    schema = dataset["column_schema"]
    assert isinstance(schema, list)
    return [column["name"] for column in schema]


async def test_ensure_dataset_creates_the_dataset_once_and_then_finds_it(
    panda: RunningPanda,
) -> None:
    async with client_of(panda) as client:
        await client.ensure_dataset(STORIES)
        await client.ensure_dataset(STORIES)
    assert panda.stats()["by_status"] == {"404": 1, "201": 1, "200": 1}
    assert column_names(panda, "stories") == ["Headline", "Words"]


async def test_ensure_dataset_finds_a_dataset_with_other_columns(panda: RunningPanda) -> None:
    async with client_of(panda) as client:
        await client.ensure_dataset(STORIES)
        with pytest.raises(DatasetMismatchError, match=r"\['Headline', 'Words'\]"):
            await client.ensure_dataset(Dataset(slug="stories", name="S", columns=("Headline",)))
    assert column_names(panda, "stories") == ["Headline", "Words"]


async def test_rows_put_one_by_one_and_in_bulk_and_deleted_show_in_panda(
    panda: RunningPanda,
) -> None:
    async with client_of(panda) as client:
        await client.ensure_dataset(STORIES)
        await client.put_row("stories", "s1", ("Flood", "12"))
        await client.put_rows("stories", [("s2", ("Fire", "7")), ("s3", ("Storm", "9"))])
        await client.put_row("stories", "s2", ("Fire out", "8"))
        await client.delete_row("stories", "s3")
        await client.delete_row("stories", "never-written")
    assert panda.rows("stories") == {"s1": ["Flood", "12"], "s2": ["Fire out", "8"]}


async def test_apply_and_a_unicode_external_id_reach_panda(panda: RunningPanda) -> None:
    async with client_of(panda) as client:
        await client.ensure_dataset(STORIES)
        await client.apply("stories", Change("src", "x", "café", Op.UPSERT, ("Ünï", "1")))
        await client.apply("stories", Change("src", "y", "s9", Op.UPSERT, ("gone", "2")))
        await client.apply("stories", Change("src", "y", "s9", Op.DELETE))
    assert panda.rows("stories") == {"café": ["Ünï", "1"]}


async def test_a_row_call_on_a_missing_dataset_asks_for_ensure_dataset(
    panda: RunningPanda,
) -> None:
    async with client_of(panda) as client:
        with pytest.raises(DatasetMissingError):
            await client.put_row("stories", "s1", ("Flood", "12"))
        with pytest.raises(DatasetMissingError):
            await client.put_rows("stories", [("s1", ("Flood", "12"))])
        with pytest.raises(DatasetMissingError):
            await client.delete_row("stories", "s1")


async def test_a_wrong_api_key_is_unauthorized_without_showing_either_key(
    panda: RunningPanda,
) -> None:
    async with client_of(panda, api_key=KEY) as client:
        with pytest.raises(UnauthorizedError) as refused:
            await client.ensure_dataset(STORIES)
    assert_no_key(refused.value)
    assert panda.api_key not in str(refused.value)
    assert panda.dataset("stories") is None


async def test_a_locked_dataset_is_retryable_and_keeps_its_rows(panda: RunningPanda) -> None:
    async with client_of(panda) as client:
        await client.ensure_dataset(STORIES)
        await client.put_row("stories", "s1", ("Flood", "12"))
        panda.set_faults(locked=["stories"])
        with pytest.raises(RetryableError, match="locked") as locked:
            await client.put_row("stories", "s1", ("Changed", "0"))
        with pytest.raises(RetryableError, match="locked"):
            await client.delete_row("stories", "s1")
    assert (locked.value.status, locked.value.retry_after_s) == (403, None)
    assert panda.rows("stories") == {"s1": ["Flood", "12"]}


async def test_a_refused_id_is_permanent_with_pandas_message(panda: RunningPanda) -> None:
    panda.set_faults(refuse_ids=["bad"])
    async with client_of(panda) as client:
        await client.ensure_dataset(STORIES)
        with pytest.raises(PermanentError, match="external_id can only contain") as refused:
            await client.put_row("stories", "bad", ("x", "1"))
        with pytest.raises(PermanentError) as bulk_refused:
            await client.put_rows("stories", [("good", ("y", "2")), ("bad", ("x", "1"))])
    assert (refused.value.status, bulk_refused.value.status) == (400, 400)
    assert bulk_refused.value.external_ids == ()
    assert panda.rows("stories") == {}


async def test_a_row_of_the_wrong_width_is_permanent_with_pandas_message(
    panda: RunningPanda,
) -> None:
    async with client_of(panda) as client:
        await client.ensure_dataset(STORIES)
        with pytest.raises(PermanentError, match=r"Got 3 data fields\. Expected 2\."):
            await client.put_row("stories", "s1", ("a", "b", "c"))


async def test_a_panda_that_is_down_is_retryable(panda: RunningPanda) -> None:
    async with client_of(panda) as client:
        panda.set_faults(down=True)
        with pytest.raises(RetryableError) as bad_gateway:
            await client.ensure_dataset(STORIES)
        panda.set_faults(retry_after_s=30)
        with pytest.raises(RetryableError) as unavailable:
            await client.put_row("stories", "s1", ("Flood", "12"))
    assert (bad_gateway.value.status, bad_gateway.value.retry_after_s) == (502, None)
    assert (unavailable.value.status, unavailable.value.retry_after_s) == (503, 30.0)


async def test_a_server_error_is_retryable_and_writes_nothing(panda: RunningPanda) -> None:
    async with client_of(panda) as client:
        await client.ensure_dataset(STORIES)
        panda.set_faults(error_rate=1.0)
        with pytest.raises(RetryableError) as failed:
            await client.put_rows("stories", [("s1", ("Flood", "12"))])
    assert failed.value.status == 500
    assert panda.rows("stories") == {}


async def test_a_hung_panda_times_out_as_retryable(panda: RunningPanda) -> None:
    async with client_of(panda, timeout_s=0.3) as client:
        await client.ensure_dataset(STORIES)
        panda.set_faults(hang=True)
        with pytest.raises(RetryableError, match="ReadTimeout") as timed_out:
            await client.put_row("stories", "s1", ("Flood", "12"))
    panda.clear_faults()
    assert timed_out.value.status is None
