"""Slow and idle clients against `pandasync serve` over real sockets: a body that comes too
slowly is answered 408 and its connection closed, connections beyond the cap are answered 503,
a connection that sends no request is closed, headers past the bound are answered 431, and
normal requests go on being answered."""

import json
import os
import selectors
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.ingress.connections import MAX_HEAD_BYTES
from tests.fixtures.configs import write_config
from tests.fixtures.panda import free_port, local_client
from tests.fixtures.service import serving, wait_until

MAX_CONNECTIONS = 40
BODY_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 1.0
# What the server may take beyond a deadline to close (a loaded 2-core machine).
SLACK_S = 3.0
SLOW_BODY = (
    b"POST /webhooks/stories HTTP/1.1\r\nHost: pandasync\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000000\r\n\r\n{"
)


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    pid: int

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@pytest.fixture(scope="module")
def server(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `pandasync serve` with small limits for the module's tests."""
    folder = tmp_path_factory.mktemp("slow-clients")
    shutil.copyfile(sqlite_template, folder / "store.db")
    port = free_port()
    path = write_config(folder, url=f"sqlite:///{folder / 'store.db'}")
    limits = (
        f"\n[server]\nport = {port}\nmax_connections = {MAX_CONNECTIONS}\n"
        f"header_timeout_s = {HEADER_TIMEOUT_S}\nbody_timeout_s = {BODY_TIMEOUT_S}\n"
    )
    path.write_text(path.read_text() + limits, encoding="utf-8")
    url = f"http://127.0.0.1:{port}"
    with serving(path, folder / "serve.log") as child:
        wait_until(lambda: _healthy(url), what="pandasync to answer", deadline_s=30)
        yield Server(url, port, child.pid)


def _healthy(url: str) -> bool:
    try:
        with local_client(timeout=1) as http:
            return http.get(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _connect(server: Server, first_bytes: bytes) -> socket.socket:
    peer = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    peer.sendall(first_bytes)
    return peer


def _until_closed(peers: list[socket.socket], *, deadline_s: float) -> dict[int, bytes]:
    """What each socket received until the server closed it (by index); fails the test if one
    is still open after `deadline_s`."""
    received = dict.fromkeys(range(len(peers)), b"")
    with selectors.DefaultSelector() as selector:
        for index, peer in enumerate(peers):
            peer.setblocking(False)
            selector.register(peer, selectors.EVENT_READ, index)
        deadline = time.monotonic() + deadline_s
        while selector.get_map():
            left_s = deadline - time.monotonic()
            assert left_s > 0, f"{len(selector.get_map())} connections still open"
            for key, _ in selector.select(timeout=left_s):
                try:
                    chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except ConnectionResetError:
                    chunk = b""
                received[key.data] += chunk
                if not chunk:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
    return received


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_slow_bodies_get_408_and_are_closed_within_the_deadline_and_connections_are_capped(
    server: Server,
) -> None:
    before = server.open_files()
    started = time.monotonic()
    peers = [_connect(server, SLOW_BODY) for _ in range(3 * MAX_CONNECTIONS)]
    # A refused connection's file closes once its 503 is written, a moment after: while the
    # others are held (until the 408s, a second on), the files settle at the cap.
    wait_until(
        lambda: server.open_files() - before <= MAX_CONNECTIONS + 2,
        what="open files no more than the cap",
        deadline_s=BODY_TIMEOUT_S / 2,
    )
    answers = _until_closed(peers, deadline_s=BODY_TIMEOUT_S + SLACK_S)
    closed_s = time.monotonic() - started
    statuses = Counter(_status(answer) for answer in answers.values())
    assert sorted(statuses) == [408, 503]
    assert statuses[408] <= MAX_CONNECTIONS
    assert closed_s < BODY_TIMEOUT_S + SLACK_S
    late = next(answer for answer in answers.values() if _status(answer) == 408)
    assert late.endswith(
        b'{"error": "the body did not arrive within 1 s: send it at once", "problems": []}'
    )
    with local_client(base_url=server.url) as http:
        answer = http.post(
            "/webhooks/stories", json={"changes": [{"op": "delete", "id": "s1"}]}, timeout=5
        )
    assert (answer.status_code, answer.json()["accepted"]) == (202, 1)
    wait_until(lambda: server.open_files() <= before, what="the connections' files closed")


def test_connections_that_send_no_request_are_closed_within_the_header_deadline(
    server: Server,
) -> None:
    peers = [
        _connect(server, b""),
        _connect(server, b"POST /webhooks/stories HTTP/1.1\r\nHost: pandasync\r\n"),
        # An answered request, then a stray byte: uvicorn's own keep-alive timer stops at it.
        _connect(server, b"GET /healthz HTTP/1.1\r\nHost: pandasync\r\n\r\nG"),
    ]
    started = time.monotonic()
    answers = _until_closed(peers, deadline_s=HEADER_TIMEOUT_S + SLACK_S)
    assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S
    assert [answer[:15] for answer in answers.values()] == [b"", b"", b"HTTP/1.1 200 OK"]


def test_a_refusal_sent_before_the_body_closes_the_connection_at_once(server: Server) -> None:
    refused = SLOW_BODY.replace(b"application/json", b"text/plain")
    started = time.monotonic()
    (answer,) = _until_closed([_connect(server, refused)], deadline_s=BODY_TIMEOUT_S).values()
    assert (_status(answer), time.monotonic() - started < BODY_TIMEOUT_S) == (415, True)


def test_a_request_without_a_body_keeps_its_connection_for_the_next_one(server: Server) -> None:
    with local_client(base_url=server.url) as http:
        first = http.get("/healthz")
        second = http.get("/healthz")
    assert (first.status_code, second.status_code) == (200, 200)
    assert "close" not in first.headers.get("connection", "")


def _send_until_refused(server: Server, head: bytes, padding: int) -> bytes:
    """Send `head` and then `padding` bytes of one header value in pieces, until the server
    stops taking them; what it answered before closing."""
    peer = _connect(server, head)
    piece = b"a" * 16384
    try:
        for _ in range(padding // len(piece)):
            peer.sendall(piece)
    except OSError:  # the server closed the connection: it answers before it does
        pass
    (answer,) = _until_closed([peer], deadline_s=HEADER_TIMEOUT_S + SLACK_S).values()
    return answer


def test_a_request_line_or_header_past_the_bound_is_answered_431_and_closed(
    server: Server,
) -> None:
    header = b"POST /webhooks/stories HTTP/1.1\r\nHost: pandasync\r\nX-Padding: "
    line = b"POST /webhooks/stories?padding="
    for head in (header, line):
        answer = _send_until_refused(server, head, padding=4 * 1024 * 1024)
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer
        assert answer.endswith(b"the request line and headers are over 65536 bytes\n")
    with local_client(base_url=server.url) as http:
        assert http.get("/healthz").status_code == 200


def test_headers_under_the_bound_and_a_body_sent_with_them_are_taken_as_usual(
    server: Server,
) -> None:
    # About 300 KB of body in the same writes as the headers: the body never counts as head.
    changes = [{"op": "delete", "id": f"gone-{n:06}"} for n in range(8000)]
    body = json.dumps({"changes": changes}).encode()
    padding = b"a" * (MAX_HEAD_BYTES - 4096)
    head = (
        b"POST /webhooks/stories HTTP/1.1\r\nHost: pandasync\r\n"
        b"Content-Type: application/json\r\nX-Padding: %s\r\nContent-Length: %d\r\n\r\n"
    ) % (padding, len(body))
    peer = _connect(server, head + body)
    peer.shutdown(socket.SHUT_WR)
    (answer,) = _until_closed([peer], deadline_s=BODY_TIMEOUT_S + SLACK_S).values()
    assert _status(answer) == 202, answer[:200]
    assert answer.endswith(b'"accepted":8000,"duplicates":0,"stale":0,"ignored":0}')


def test_an_api_body_declared_too_big_or_of_no_length_is_refused_before_it_is_read(
    server: Server,
) -> None:
    huge = (
        b"POST /admin/sources/stories/checkpoint HTTP/1.1\r\nHost: pandasync\r\n"
        b"Content-Type: application/json\r\nContent-Length: 400000000\r\n\r\n"
    )
    chunked = huge.replace(b"Content-Length: 400000000", b"Transfer-Encoding: chunked")
    started = time.monotonic()
    answers = _until_closed([_connect(server, huge), _connect(server, chunked)], deadline_s=2)
    assert time.monotonic() - started < BODY_TIMEOUT_S, "answered without waiting for a body"
    assert [(_status(answer), answer.rsplit(b"\r\n", 1)[1]) for answer in answers.values()] == [
        (413, b'{"detail": "the body is over 1048576 bytes"}'),
        (411, b'{"detail": "send the body with a Content-Length"}'),
    ]
