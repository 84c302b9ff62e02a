"""Snapshot benchmark: how fast a snapshot source tells what changed, and that its memory does
not grow with the rows.

Not a test. Run it with `.venv/bin/python bench/snapshot_diff.py [--rows 100000 1000000]`.
For each size, in a process of its own (so that its peak memory is its own): an HTTP server
process streams a snapshot in PANDA's tutorial shape (`{"keys": [...], "data": [...]}`,
generated as it is sent); pandasync takes it into a fresh SQLite store (every row new: read,
staged, then enqueued into the outbox), then takes it again with 1% of the rows changed (the
diff: read, compared by hash, the changes enqueued). It prints each rate in rows/s and the
process's peak resident memory, and the ratio of the peaks between the sizes.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KEYS = ["text", "id", "from_user"]


def body(rows: int, round_: int) -> Iterator[bytes]:
    """The snapshot, in parts: in round 2, every hundredth row's text changed."""
    yield b'{"keys": ' + json.dumps(KEYS).encode() + b', "data": ['
    part: list[str] = []
    for number in range(rows):
        text = "changed" if round_ > 1 and number % 100 == 0 else "hello"
        value = [f"{text} {number}", number, f"user{number % 97}"]
        part.append(("," if number else "") + json.dumps(value))
        if len(part) == 1000:
            yield "".join(part).encode()
            part = []
    yield "".join(part).encode() + b"]}"


def serve(rows: int) -> None:
    """Serve `/1` and `/2` (the two rounds) on a free port; print the port, then serve."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()  # no Content-Length: HTTP/1.0, the body ends with the connection
            for part in body(rows, int(self.path.strip("/"))):
                self.wfile.write(part)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sys.stdout.write(f"{server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


def measure(rows: int, port: int) -> None:
    """Take the two rounds into a fresh store; print one JSON line of rates and peak memory."""
    import anyio

    from service.config import SourceSettings
    from service.ingress.snapshots import Snapshotter
    from service.store.db import Database, migrate

    def source(round_: int) -> SourceSettings:
        return SourceSettings.model_validate(
            {
                "name": "tweets",
                "kind": "snapshot",
                "id_field": "id",
                "dataset": {"slug": "tweets", "name": "Tweets"},
                "columns": [{"name": key, "field": key} for key in KEYS],
                "snapshot": {
                    "url": f"http://127.0.0.1:{port}/{round_}",
                    "format": "keys-data",
                    "deletes": True,
                },
            }
        )

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/store.db"
        migrate(url)
        database = Database.open(url)
        rates = []
        for round_ in (1, 2):
            started = time.perf_counter()
            status = anyio.run(Snapshotter(source(round_), database).run_once)
            elapsed = time.perf_counter() - started
            assert status.state == "idle", status
            assert status.last is not None
            assert status.last["rows_read"] == rows, status.last
            rates.append(rows / elapsed)
        database.close()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.write(json.dumps({"first": rates[0], "diff": rates[1], "peak_kib": peak_kib}) + "\n")


def run(rows: int) -> dict[str, float]:
    """One size, in processes of its own: the server, and the measuring process."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(rows)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        measured = subprocess.run(
            [sys.executable, __file__, "--measure", str(rows), str(port)],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        server.terminate()
        server.wait()
    result: dict[str, float] = json.loads(measured.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=int, nargs=2, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        serve(arguments.serve)
        return
    if arguments.measure:
        measure(*arguments.measure)
        return
    from catchup import machine

    sys.stdout.write(f"snapshot diff on {machine()}; store: SQLite in {tempfile.gettempdir()}\n")
    peaks = []
    for rows in arguments.rows:
        result = run(rows)
        peaks.append(result["peak_kib"])
        sys.stdout.write(
            f"  {rows:>9,} rows: first snapshot {result['first']:>8,.0f} rows/s,"
            f" 1% changed {result['diff']:>8,.0f} rows/s,"
            f" peak memory {result['peak_kib'] / 1024:,.0f} MiB\n"
        )
    if len(peaks) > 1:
        sys.stdout.write(f"  peak memory, largest / smallest: {max(peaks) / min(peaks):.2f}x\n")


if __name__ == "__main__":
    main()
