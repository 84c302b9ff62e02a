"""CouchDB `_changes` rows → changes, and reading the feed in both server dialects.

The CouchDB 3 answers are taken from couchdb-3.5.0-transcript.txt (string seqs, `pending`, a
continuous feed ended by `last_seq`, 400 on a bad `since`) and served by `httpx.MockTransport`;
silence and refused connections use real sockets.
"""

import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.changes import Change, Op, Seq, Unmapped
from service.config import Column, DatasetSettings, SourceSettings
from service.sources import external_ids
from service.sources.couchdb import (
    End,
    FeedBrokenError,
    Page,
    Row,
    SourceStoppedError,
    change_of,
    follow,
    page_of,
    parse_line,
    read_page,
    read_row,
    settings_of,
)
from tests.fixtures.couchdb import silent_couchdb
from tests.fixtures.panda import free_port

pytestmark = pytest.mark.anyio

# From couchdb-3.5.0-transcript.txt, "_changes?since=0&include_docs=true".
SEQ_C = (
    "2-g1AAAAB5eJzLYWBgYMpgTmEQTM4vTc5ISXIwNDLXMwBCwxyQVCJDUv3___"
    "-zMpgTmXKBAuwpKZapRmaG2DTgMSaPBUgyNACp_yDTEhmyAFrwIGY"
)
SEQ_A = (
    "4-g1AAAACbeJzLYWBgYMpgTmEQTM4vTc5ISXIwNDLXMwBCwxyQVCJDUv3___"
    "-zMpgTmXKBAuwpKZapRmaG2DTgMSaPBUgyNACp_yimmVpamhsbGWDTlwUAHjwn_A"
)
SEQ_B = (
    "5-g1AAAACbeJzLYWBgYMpgTmEQTM4vTc5ISXIwNDLXMwBCwxyQVCJDUv3___"
    "-zMpgTmXOBAuwpKZapRmaG2DTgMSaPBUgyNACp_1DTmMCmmVpamhsbGWDTlwUAHqwn_Q"
)
ROW_C = (
    '{"seq":"' + SEQ_C + '","id":"c","changes":[{"rev":"1-c7a7a74ea67a7e7b62067bb33379fc2b"}],'
    '"doc":{"_id":"c","_rev":"1-c7a7a74ea67a7e7b62067bb33379fc2b","v":3}}'
)
ROW_A = (
    '{"seq":"' + SEQ_A + '","id":"a","changes":[{"rev":"2-199d6f4cb0ab51aafccacee16486d6b3"}],'
    '"doc":{"_id":"a","_rev":"2-199d6f4cb0ab51aafccacee16486d6b3","v":11}}'
)
ROW_B = (
    '{"seq":"' + SEQ_B + '","id":"b","changes":[{"rev":"2-cc42f3106b98bc7ad82f91bf2382e1df"}],'
    '"deleted":true,"doc":{"_id":"b","_rev":"2-cc42f3106b98bc7ad82f91bf2382e1df",'
    '"_deleted":true}}'
)
NORMAL_PAGE = (
    '{"results":[\n' + ROW_C + ",\n" + ROW_A + ",\n" + ROW_B + '\n],\n"last_seq":"' + SEQ_B + '",'
    '"pending":0}\n'
)
# From "_changes?limit=2": a full page that says more is pending.
LIMITED_PAGE = (
    '{"results":[\n' + ROW_C + ",\n" + ROW_A + '\n],\n"last_seq":"' + SEQ_A + '","pending":1}\n'
)
# From "continuous with include_docs since=0 timeout=500".
CONTINUOUS_END = '{"last_seq":"' + SEQ_B + '","pending":0}'
BAD_SINCE = '{"error":"bad_request","reason":"Malformed sequence supplied in \'since\' parameter."}'
MISSING_DB = '{"error":"not_found","reason":"Database does not exist."}'
UNAUTHORIZED = '{"error":"unauthorized","reason":"Name or password is incorrect."}'


def source(**couchdb: Any) -> SourceSettings:
    return SourceSettings.model_validate(
        {
            "name": "stories",
            "kind": "couchdb",
            "dataset": DatasetSettings(slug="stories", name="Stories"),
            "columns": [Column(name="V", field="v"), Column(name="Type", field="type")],
            "couchdb": {"url": "http://couch.test:5984", "database": "chk"} | couchdb,
        }
    )


SOURCE = source()


def upsert(doc_id: str, *row: str) -> Change:
    return Change("stories", doc_id, external_ids.encode(doc_id), Op.UPSERT, row)


def delete(doc_id: str) -> Change:
    return Change("stories", doc_id, external_ids.encode(doc_id), Op.DELETE)


def test_a_document_becomes_an_upsert_of_its_row() -> None:
    row = {"seq": 3, "id": "a b", "doc": {"_id": "a b", "_rev": "1-x", "v": 3, "type": "story"}}
    assert change_of(SOURCE, row) == upsert("a b", "3", "story")


def test_a_deleted_document_becomes_a_delete_of_its_row() -> None:
    assert change_of(SOURCE, json.loads(ROW_B)) == delete("b")


def test_design_documents_are_not_rows() -> None:
    row = {"seq": 9, "id": "_design/f", "doc": {"_id": "_design/f", "filters": {}}}
    assert change_of(SOURCE, row) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("story", upsert("s", "1", "story")),
        ("brief", upsert("s", "1", "brief")),
        ("ad", delete("s")),
        (None, delete("s")),
        ("Story", delete("s")),
    ],
)
def test_a_document_outside_the_filter_becomes_a_delete_of_its_row(
    value: object, expected: Change
) -> None:
    filtered = source(filter={"field": "type", "equals": ["story", "brief"]})
    row = {"seq": 1, "id": "s", "doc": {"_id": "s", "v": 1, "type": value}}
    assert change_of(filtered, row) == expected


@pytest.mark.parametrize(
    ("equals", "value", "kept"),
    [(1, 1, True), (1, 1.0, True), (1, "1", False), (1, True, False), (True, True, True)],
)
def test_a_filter_value_matches_only_its_own_json_type(
    equals: object, value: object, kept: bool
) -> None:
    filtered = source(filter={"field": "meta.kind", "equals": equals})
    change = change_of(filtered, {"id": "s", "doc": {"_id": "s", "meta": {"kind": value}}})
    assert change is not None
    assert (change.op is Op.UPSERT) == kept


def test_a_document_without_a_usable_id_is_kept_with_its_seq_and_reason_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    by_slug = SOURCE.model_copy(update={"id_field": "slug"})
    with caplog.at_level(logging.WARNING):
        row = read_row(by_slug, {"seq": 7, "id": "x1", "doc": {"_id": "x1", "v": 1}})
    reason = "source stories: field `slug` must hold a non-empty string or integer id, got NoneType"
    assert row == Row(None, Seq.of(7), problem=Unmapped("x1", Seq.of(7), reason))
    assert "source=stories dataset=stories doc_id='x1' seq=7" in caplog.text


def test_a_mapped_field_nested_too_deep_to_write_is_a_problem_naming_the_field() -> None:
    deep: object = "bottom"
    for _ in range(5000):
        deep = [deep]
    row = read_row(SOURCE, {"seq": 3, "id": "d", "doc": {"_id": "d", "v": deep}})
    assert row.change is None
    assert row.problem is not None
    assert "field `v` holds a value nested too deeply" in row.problem.reason


def test_whatever_a_documents_mapping_raises_is_the_documents_problem() -> None:
    class Hostile(dict[str, object]):
        def get(self, key: str, default: object = None) -> object:
            raise MemoryError("no room")

    row = read_row(SOURCE, {"seq": 4, "id": "h", "doc": Hostile(_id="h")})
    assert row == Row(None, Seq.of(4), problem=Unmapped("h", Seq.of(4), "MemoryError: no room"))


def test_a_document_nested_deeper_than_pythons_recursion_limit_is_read() -> None:
    deep = "[" * 3000 + "]" * 3000
    line = (
        '{"seq":"9-g1A","id":"n\u2028x","doc":{"_id":"n\u2028x","v":1.5,'
        '"big":123456789012345678901234567890,"skip":' + deep + "}}"
    )
    assert parse_line(SOURCE, line.encode()) == Row(upsert("n\u2028x", "1.5", ""), Seq.of("9-g1A"))


def test_a_deleted_document_is_a_delete_by_its_id_field_when_the_stub_keeps_it() -> None:
    by_slug = SOURCE.model_copy(update={"id_field": "slug"})
    row = {"id": "x1", "deleted": True, "doc": {"_id": "x1", "_deleted": True, "slug": "flood"}}
    assert change_of(by_slug, row) == delete("flood")


def test_a_row_without_its_document_breaks_the_feed() -> None:
    with pytest.raises(FeedBrokenError, match="without its document"):
        change_of(SOURCE, {"seq": 1, "id": "a", "changes": []})


@pytest.mark.parametrize("row", [{"seq": 1, "doc": {}}, {"seq": 1, "id": ""}, ["a"]])
def test_a_row_that_is_not_a_changes_row_breaks_the_feed(row: object) -> None:
    with pytest.raises(FeedBrokenError, match="_changes row"):
        read_row(SOURCE, row)


@pytest.mark.parametrize("body", [[], {"results": 1}, {"results": []}])
def test_an_answer_that_is_not_a_changes_page_breaks_the_feed(body: object) -> None:
    with pytest.raises(FeedBrokenError, match="CouchDB"):
        page_of(SOURCE, body)


def test_a_webhook_source_has_no_couchdb_settings() -> None:
    webhook = SOURCE.model_copy(update={"kind": "webhook", "couchdb": None})
    with pytest.raises(ValueError, match=r"no \[sources\.couchdb\] settings"):
        settings_of(webhook)


# Any text, NUL and lone surrogates included (a JSON `\u0000` or `\ud800` decodes to them).
doc_ids = st.text(st.characters(exclude_categories=()), min_size=1).filter(
    lambda doc_id: not doc_id.startswith("_design/")
)


def storable(text: str) -> bool:
    valid = "\x00" not in text and not any(0xD800 <= ord(char) <= 0xDFFF for char in text)
    return valid and len(external_ids.encode(text)) <= 4096


@given(doc_ids, st.booleans(), st.integers() | st.text())
def test_every_row_becomes_a_change_of_its_own_id_or_is_skipped(
    doc_id: str, deleted: bool, value: int | str
) -> None:
    doc: dict[str, object] = (
        {"_id": doc_id, "_deleted": True} if deleted else {"_id": doc_id, "v": value}
    )
    row = read_row(SOURCE, {"seq": 1, "id": doc_id, "deleted": deleted, "doc": doc})
    if not storable(doc_id):
        assert row.change is None
        assert row.problem is not None
        assert storable(row.problem.doc_id)
        return
    assert row.change is not None
    assert (row.change.doc_id, row.change.external_id) == (doc_id, external_ids.encode(doc_id))
    assert row.change.op is (Op.DELETE if deleted else Op.UPSERT)


def test_a_document_whose_id_panda_could_not_be_sent_is_kept_with_the_reason() -> None:
    doc_id = "a" * 4097
    row = read_row(SOURCE, {"seq": 1, "id": doc_id, "doc": {"_id": doc_id, "v": 1}})
    assert row.change is None
    assert row.problem is not None
    assert (row.problem.doc_id, "external_id is over the 4096" in row.problem.reason) == (
        doc_id,
        True,
    )


def test_a_continuous_line_is_a_row_or_the_feeds_end() -> None:
    assert parse_line(SOURCE, ROW_C) == Row(upsert("c", "3", ""), Seq.of(SEQ_C))
    assert parse_line(SOURCE, CONTINUOUS_END) == End(Seq.of(SEQ_B))


@pytest.mark.parametrize("line", ['{"error":"unknown","reason":"x"}', '{"results":', "[1]"])
def test_a_line_that_is_neither_breaks_the_feed(line: str) -> None:
    with pytest.raises(FeedBrokenError):
        parse_line(SOURCE, line)


def test_a_couchdb3_page_keeps_its_string_seq_and_pending_zero_means_caught_up() -> None:
    assert page_of(SOURCE, json.loads(NORMAL_PAGE)) == Page(
        changes=(upsert("c", "3", ""), upsert("a", "11", ""), delete("b")),
        seq=Seq.of(SEQ_B),
        rows=3,
        skipped=0,
        caught_up=True,
        pending=0,
    )


def test_a_couchdb3_page_with_changes_pending_is_not_caught_up() -> None:
    page = page_of(SOURCE, json.loads(LIMITED_PAGE))
    assert (page.seq, page.rows, page.caught_up) == (Seq.of(SEQ_A), 2, False)


def test_an_empty_pouchdb_page_is_caught_up() -> None:
    page = page_of(SOURCE, {"results": [], "last_seq": 7})
    assert (page.seq, page.rows, page.caught_up) == (Seq.of(7), 0, True)


class Script(httpx.AsyncByteStream):
    """A response body sent part by part: bytes, a wait for an event, or an error."""

    def __init__(self, *parts: bytes | anyio.Event | Exception) -> None:
        self.parts = parts
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, anyio.Event):
                await part.wait()
            elif isinstance(part, Exception):
                raise part
            else:
                self.sent += 1
                yield part


def lines(*texts: str) -> list[bytes]:
    return [f"{text}\n".encode() for text in texts]


Handler = Callable[[httpx.Request], httpx.Response]


@asynccontextmanager
async def client(handler: Handler) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        yield http


def answering(status: int, body: str | Script, seen: list[httpx.Request] | None = None) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if isinstance(body, Script):
            return httpx.Response(status, stream=body)
        return httpx.Response(status, text=body)

    return handle


async def test_a_page_asks_for_the_documents_after_the_checkpoint_in_bounded_pages() -> None:
    seen: list[httpx.Request] = []
    async with client(answering(200, NORMAL_PAGE, seen)) as http:
        page = await read_page(http, source(batch_size=3), Seq.of(SEQ_A))
    assert page.rows == 3
    (request,) = seen
    assert (request.url.path, dict(request.url.params)) == (
        "/chk/_changes",
        {"since": SEQ_A, "include_docs": "true", "feed": "normal", "limit": "3"},
    )


@pytest.mark.parametrize(
    ("seq", "param"),
    [(Seq.of(SEQ_B), SEQ_B), (Seq.of(42), "42"), (Seq.of("0"), "0"), (Seq.of("now"), "now")],
)
async def test_the_checkpoint_goes_back_as_since_verbatim(seq: Seq, param: str) -> None:
    seen: list[httpx.Request] = []
    async with client(answering(200, NORMAL_PAGE, seen)) as http:
        await read_page(http, SOURCE, seq)
    assert seen[0].url.params["since"] == param


async def test_a_database_name_with_a_slash_is_escaped_in_the_path() -> None:
    seen: list[httpx.Request] = []
    async with client(answering(200, NORMAL_PAGE, seen)) as http:
        await read_page(http, source(database="news/2026"), Seq.of("0"))
    assert seen[0].url.raw_path.startswith(b"/news%2F2026/_changes?")


async def test_credentials_go_as_basic_auth() -> None:
    seen: list[httpx.Request] = []
    async with client(answering(200, NORMAL_PAGE, seen)) as http:
        await read_page(http, source(username="reader", password="pw"), Seq.of("0"))
    assert seen[0].headers["authorization"] == "Basic " + base64.b64encode(b"reader:pw").decode()


async def pages(http: httpx.AsyncClient, settings: SourceSettings, count: int) -> list[Page]:
    found = []
    async with follow(http, settings, Seq.of("0")) as feed:
        for _ in range(count):
            found.append(await feed.next_page())
    return found


async def test_a_couchdb3_continuous_feed_that_ends_with_last_seq_is_caught_up() -> None:
    body = Script(*lines(ROW_C, ROW_A, ROW_B, CONTINUOUS_END))
    seen: list[httpx.Request] = []
    async with client(answering(200, body, seen)) as http:
        (page,) = await pages(http, SOURCE, 1)
    assert page == Page(
        changes=(upsert("c", "3", ""), upsert("a", "11", ""), delete("b")),
        seq=Seq.of(SEQ_B),
        rows=3,
        skipped=0,
        caught_up=True,
    )
    assert {key: seen[0].url.params[key] for key in ("feed", "heartbeat", "include_docs")} == {
        "feed": "continuous",
        "heartbeat": "10000",
        "include_docs": "true",
    }


async def test_heartbeats_between_rows_are_skipped() -> None:
    body = Script(*lines(ROW_C, "", "", ROW_A, "", CONTINUOUS_END))
    async with client(answering(200, body)) as http:
        (page,) = await pages(http, SOURCE, 1)
    assert (page.rows, page.seq) == (2, Seq.of(SEQ_B))


async def test_a_batch_is_cut_at_batch_size_with_the_seq_of_its_last_row() -> None:
    body = Script(*lines(ROW_C, ROW_A, ROW_B, CONTINUOUS_END))
    async with client(answering(200, body)) as http:
        found = await pages(http, source(batch_size=2), 2)
    assert [(page.rows, page.seq, page.caught_up) for page in found] == [
        (2, Seq.of(SEQ_A), False),
        (1, Seq.of(SEQ_B), True),
    ]


async def test_a_batch_is_cut_batch_wait_s_after_its_first_change() -> None:
    more = anyio.Event()
    body = Script(*lines(ROW_C), more, *lines(ROW_A, CONTINUOUS_END))
    async with (
        client(answering(200, body)) as http,
        follow(http, source(batch_wait_s=0.05), Seq.of("0")) as feed,
    ):
        first = await feed.next_page()
        more.set()
        second = await feed.next_page()
    assert [(page.rows, page.seq) for page in (first, second)] == [
        (1, Seq.of(SEQ_C)),
        (1, Seq.of(SEQ_B)),
    ]


async def test_a_batch_checkpoint_is_the_seq_of_its_last_row_that_has_one() -> None:
    # CouchDB 3 with `seq_interval` sends `"seq": null` on most rows.
    row = '{"seq":%s,"id":"d%d","doc":{"_id":"d%d"}}'
    body = Script(*lines(row % (json.dumps(SEQ_C), 1, 1), row % ("null", 2, 2)), anyio.Event())
    async with (
        client(answering(200, body)) as http,
        follow(http, source(batch_wait_s=0.05), Seq.of("0")) as feed,
    ):
        page = await feed.next_page()
    assert (page.rows, page.seq) == (2, Seq.of(SEQ_C))


async def test_the_feed_reads_at_most_batch_size_rows_ahead() -> None:
    row = '{"seq":%d,"id":"d%d","doc":{"_id":"d%d","v":1}}'
    body = Script(*lines(*(row % (n, n, n) for n in range(1000))))
    async with (
        client(answering(200, body)) as http,
        follow(http, source(batch_size=10), Seq.of("0")) as feed,
    ):
        await feed.next_page()
        await anyio.wait_all_tasks_blocked()
        assert body.sent <= 10 + 10 + 2


async def test_a_connection_reset_mid_feed_ends_the_batch_and_the_next_one_raises() -> None:
    body = Script(*lines(ROW_C), httpx.ReadError("connection reset by peer"))
    async with client(answering(200, body)) as http, follow(http, SOURCE, Seq.of("0")) as feed:
        page = await feed.next_page()
        with pytest.raises(FeedBrokenError, match="connection reset"):
            await feed.next_page()
    assert (page.rows, page.seq, page.caught_up) == (1, Seq.of(SEQ_C), False)


async def test_a_feed_closed_without_last_seq_ends_the_batch_and_the_next_one_raises() -> None:
    # pouchdb-server never ends a feed: a closed one means the server went away.
    async with (
        client(answering(200, Script(*lines(ROW_C)))) as http,
        follow(http, SOURCE, Seq.of("0")) as feed,
    ):
        page = await feed.next_page()
        with pytest.raises(FeedBrokenError, match="CouchDB closed the feed"):
            await feed.next_page()
    assert page.rows == 1


async def test_a_garbled_line_breaks_the_feed() -> None:
    body = Script(*lines('{"seq":"2-g1A","id":"c","doc":{"_id":'))
    async with client(answering(200, body)) as http, follow(http, SOURCE, Seq.of("0")) as feed:
        with pytest.raises(FeedBrokenError, match="not JSON"):
            await feed.next_page()


async def test_a_page_cut_off_mid_body_breaks_the_feed() -> None:
    body = Script(b'{"results":[', httpx.ReadError("connection reset by peer"))
    async with client(answering(200, body)) as http:
        with pytest.raises(FeedBrokenError, match="connection reset"):
            await read_page(http, SOURCE, Seq.of("0"))


async def test_a_feed_ended_without_a_change_is_broken() -> None:
    # "continuous since=now timeout=1500": a heartbeat, then only last_seq.
    body = Script(*lines("", CONTINUOUS_END))
    async with client(answering(200, body)) as http, follow(http, SOURCE, Seq.of("0")) as feed:
        with pytest.raises(FeedBrokenError, match="without a change"):
            await feed.next_page()


async def test_a_bad_since_stops_the_source_with_how_to_reset_the_checkpoint() -> None:
    async with client(answering(400, BAD_SINCE)) as http:
        with pytest.raises(SourceStoppedError) as raised:
            await read_page(http, SOURCE, Seq.of(SEQ_A))
    message = str(raised.value)
    assert "Malformed sequence supplied in 'since' parameter" in message
    assert json.dumps(SEQ_A) in message
    assert "`pandasync reset-checkpoint stories`" in message


async def test_wrong_credentials_stop_the_source_without_showing_them() -> None:
    async with client(answering(401, UNAUTHORIZED)) as http:
        with pytest.raises(SourceStoppedError) as raised:
            async with follow(http, source(username="reader", password="s3cret"), Seq.of("0")):
                pass
    assert "401 unauthorized, Name or password is incorrect." in str(raised.value)
    assert "username and password" in str(raised.value)
    assert "s3cret" not in str(raised.value)


async def test_a_missing_database_stops_the_source() -> None:
    async with client(answering(404, MISSING_DB)) as http:
        with pytest.raises(SourceStoppedError, match=r"Database does not exist\..*create it"):
            await read_page(http, SOURCE, Seq.of("0"))


async def test_another_bad_request_stops_the_source_without_a_reset_hint() -> None:
    body = '{"error":"bad_request","reason":"Invalid heartbeat value."}'
    async with client(answering(400, body)) as http:
        with pytest.raises(SourceStoppedError) as raised:
            await read_page(http, SOURCE, Seq.of("0"))
    assert "refused the request (400 bad_request, Invalid heartbeat value.)" in str(raised.value)
    assert "reset-checkpoint" not in str(raised.value)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (Script(b"<html>Bad Gateway</html>"), "502 <html>Bad Gateway</html>"),
        (Script(b'["busy"]'), '502 ["busy"]'),
        (Script(b"<html>", httpx.ReadError("reset")), "502"),
    ],
)
async def test_a_proxy_error_page_is_quoted_in_the_error(body: Script, detail: str) -> None:
    async with client(answering(502, body)) as http:
        with pytest.raises(FeedBrokenError) as raised:
            await read_page(http, SOURCE, Seq.of("0"))
    assert str(raised.value).endswith(f"answered {detail}")


async def test_a_long_error_page_is_read_no_further_than_its_bound() -> None:
    # A proxy that streams its error page on and on: a megabyte at a time, 200 MB in all.
    endless = Script(*[b"<html>" + b"x" * 1024 * 1024] * 200)
    async with client(answering(502, endless)) as http:
        with pytest.raises(FeedBrokenError, match="answered 502 <html>xxx"):
            await read_page(http, SOURCE, Seq.of("0"))
    assert endless.sent == 1


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_a_server_error_breaks_the_feed_for_a_retry(status: int) -> None:
    async with client(answering(status, '{"error":"unknown"}')) as http:
        with pytest.raises(FeedBrokenError, match=str(status)):
            await read_page(http, SOURCE, Seq.of("0"))


async def test_an_unreachable_server_breaks_the_feed() -> None:
    unreachable = source(url=f"http://127.0.0.1:{free_port()}")
    async with httpx.AsyncClient() as http:
        with pytest.raises(FeedBrokenError, match="lost CouchDB"):
            await read_page(http, unreachable, Seq.of("0"))


async def test_a_silent_feed_is_detected_by_the_read_timeout() -> None:
    requests: list[bytes] = []
    async with silent_couchdb(requests) as url, httpx.AsyncClient() as http:
        quiet = source(url=url, heartbeat_s=0.05, timeout_s=0.2)
        with anyio.fail_after(5):
            async with follow(http, quiet, Seq.of(5)) as feed:
                with pytest.raises(FeedBrokenError, match=r"no byte for 0\.2 s"):
                    await feed.next_page()
    assert len(requests) == 1


def test_large_integers_in_a_document_keep_every_digit() -> None:
    digits = "123456789012345678901234567890"
    line = f'{{"seq":1,"id":"a","changes":[],"doc":{{"_id":"a","v":{digits}}}}}'
    row = parse_line(SOURCE, line)
    assert isinstance(row, Row)
    assert row.change == upsert("a", digits, "")


# Raw bytes recorded from Apache CouchDB 3.5.0 (a copy of ../shared's file): documents and an
# id holding raw U+2028, U+2029 and U+0085, in a `feed=normal` page and a continuous feed.
LINE_SEPARATORS = (
    Path(__file__).parent / "data" / "couchdb-3.5.0-line-separators.txt"
).read_bytes()
RECORDED_IDS = ["ls", "nel", "plain", "ps", "u2028\u2028id"]


def recorded(feed: str) -> bytes:
    """The recorded answer body of one feed kind (`normal` or `continuous`)."""
    sections = LINE_SEPARATORS.split(b"### feed=")
    (section,) = [part for part in sections if part.startswith(feed.encode())]
    return section.split(b"\n", 1)[1].rstrip(b"\n") + b"\n"


def recorded_source() -> SourceSettings:
    return source(database="linesep").model_copy(
        update={"columns": [Column(name="Title", field="title"), Column(name="N", field="n")]}
    )


async def test_couchdb3_raw_line_separators_are_read_from_a_normal_page() -> None:
    body = recorded("normal")
    assert "\u2028".encode() in body
    assert "\u0085".encode() in body
    async with client(answering(200, Script(body))) as http:
        page = await read_page(http, recorded_source(), Seq.of("0"))
    assert [change.doc_id for change in page.changes] == RECORDED_IDS
    assert page.changes[0].row == ("line\u2028separator", "")
    assert page.changes[2].row == ("nothing odd", "12345678901234567890123")
    assert (page.caught_up, page.skipped) == (True, 0)


async def test_couchdb3_raw_line_separators_are_read_from_a_continuous_feed() -> None:
    # Sent in small pieces, so that lines also arrive split across reads.
    body = recorded("continuous")
    pieces = [body[start : start + 7] for start in range(0, len(body), 7)]
    async with (
        client(answering(200, Script(*pieces))) as http,
        follow(http, recorded_source(), Seq.of("0")) as feed,
    ):
        page = await feed.next_page()
    assert [change.doc_id for change in page.changes] == RECORDED_IDS
    assert [change.row for change in page.changes][1::2] == [
        ("next\u0085line", ""),
        ("para\u2029graph", ""),
    ]
    assert page.caught_up
