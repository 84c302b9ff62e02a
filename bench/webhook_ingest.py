"""Webhook ingest benchmark: pandasync's webhook route against a bare FastAPI endpoint.

Not a test. Run it with `.venv/bin/python bench/webhook_ingest.py [--duration S]
[--connections N] [--repeats N] [--database sqlite|postgres|both] [--json PATH]` (after
`make install`; it needs `wrk`: `apt-get install wrk` on Debian/Ubuntu). It prints, all
measured in this run on this machine with the same load generator (`wrk`, one thread):

- a bare FastAPI endpoint on uvicorn that reads the body and answers 202, nothing else;
- `pandasync serve` on a fresh store (SQLite file, or a new schema on the PostgreSQL at
  `--postgres`), one webhook source signed with Standard Webhooks, PANDA unreachable (the
  changes stay in the outbox);

each as requests/s, p50 and p99 latency, and pandasync's ratio to the bare endpoint (target
0.6 or more, p99 under 50 ms). Every request is one change, signed, with a webhook id of its
own; the runs alternate (bare, then each store) `--repeats` times and the median run of each
is reported. After each pandasync run the outbox must hold a change for every 202 counted.
The processes log as `pandasync serve` does (INFO, uvicorn's access lines included) to a
file. The result is also written as JSON (`--json`, default `webhook_ingest.json`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
from psycopg import sql
from sqlalchemy import make_url
from standardwebhooks import Webhook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catchup import machine, say

from service.store import outbox
from service.store.db import Database, migrate
from tests.fixtures.panda import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SOURCE = "bench"
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TARGET_RATIO = 0.6
TARGET_P99_MS = 50.0
WARMUP_S = 2.0
START_TIMEOUT_S = 30.0
# Pre-signed requests a run may use, per second of it: more than either server can take.
REQUESTS_PER_S = 6_000

CONFIG = """
database_url = "{url}"

[server]
host = "127.0.0.1"
port = {port}

[panda]
url = "http://127.0.0.1:9"
email = "bench@example.org"
api_key = "bench-key"

[[sources]]
name = "{source}"
kind = "webhook"
dataset = {{ slug = "bench", name = "Bench" }}
columns = [{{ name = "Headline", field = "title" }}, {{ name = "Words", field = "words" }}]
webhook = {{ signature = "standard-webhooks", secrets = ["{secret}"] }}
"""

# wrk reads the pre-signed requests (one a line, tab-separated) and sends them in turn;
# `done` writes the summary as JSON for this script.
WRK_SCRIPT = r"""
local requests = {}
local index = 0

init = function(args)
  for line in io.lines(args[2]) do
    local id, timestamp, signature, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", args[1], {
      ["Content-Type"] = "application/json",
      ["webhook-id"] = id,
      ["webhook-timestamp"] = timestamp,
      ["webhook-signature"] = signature,
    }, body)
  end
end

request = function()
  index = index % #requests + 1
  return requests[index]
end

done = function(summary, latency, requests)
  local out = io.open(os.getenv("BENCH_WRK_RESULT"), "w")
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d,'
      .. ' "write": %d, "status": %d, "timeout": %d},'
      .. ' "latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d}}',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
  out:close()
end
"""


@dataclass(frozen=True)
class Run:
    """One wrk run: requests answered a second, latency percentiles (ms), failures."""

    name: str
    requests: int
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    failed: int
    # CPU time of the server process (every thread) per request answered, in µs.
    cpu_us: float


def bare_app() -> object:
    """The bare endpoint: reads the body, answers 202 with a small JSON body."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/webhooks/{source}", status_code=202)
    async def receive(source: str, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"accepted": 1}, status_code=202)

    return app


def serve_bare(port: int) -> None:
    """Run the bare endpoint as `pandasync serve` runs its app (same logging, uvicorn)."""
    import uvicorn

    from service import logs

    logs.configure("INFO")
    uvicorn.run(bare_app(), host="127.0.0.1", port=port, log_level="info", log_config=None)


def signed_requests(path: Path, count: int, run: str) -> None:
    """`count` one-change webhooks, each with its own id, signed now, one a line for wrk."""
    signer = Webhook(SECRET)
    now = datetime.now(UTC)
    timestamp = str(int(now.timestamp()))
    lines = []
    for index in range(count):
        msg_id = f"msg_{run}_{index}"
        change = {"op": "upsert", "id": f"{run}-{index}", "row": {"title": f"T {index}"}}
        body = json.dumps({"changes": [change]}, separators=(",", ":"))
        signature = signer.sign(msg_id, now, body)
        lines.append(f"{msg_id}\t{timestamp}\t{signature}\t{body}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system, every thread) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    url: str, folder: Path, server: int, *, duration_s: float, connections: int, name: str
) -> Run:
    """Load `url` with wrk (one thread) for `duration_s` with fresh signed requests; `server`
    is the PID of the process answering, whose CPU time is measured."""
    run = uuid.uuid4().hex[:8]
    requests = folder / f"requests-{run}.txt"
    signed_requests(requests, int(REQUESTS_PER_S * duration_s), run)
    script = folder / "webhooks.lua"
    script.write_text(WRK_SCRIPT, encoding="utf-8")
    result = folder / f"wrk-{run}.json"
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        f"/webhooks/{SOURCE}",
        str(requests),
    ]
    env = {**os.environ, "BENCH_WRK_RESULT": str(result)}
    cpu_before = cpu_s(server)
    subprocess.run(command, check=True, env=env, capture_output=True)
    cpu_used = cpu_s(server) - cpu_before
    summary = json.loads(result.read_text(encoding="utf-8"))
    requests.unlink()
    errors = summary["errors"]
    latency = summary["latency_us"]
    return Run(
        name=name,
        requests=summary["requests"],
        rate=summary["requests"] / (summary["duration_us"] / 1e6),
        p50_ms=latency["p50"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
        failed=sum(errors.values()),
        cpu_us=cpu_used / max(summary["requests"], 1) * 1e6,
    )


@contextmanager
def started(command: list[str], url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` until the block ends (SIGTERM by PID), once `url` answers."""
    with log.open("ab") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not start: see {log}")
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.post(url, content=b"{}", timeout=1).status_code > 0
    except httpx.TransportError:
        return False


@contextmanager
def postgres_store(server_url: str) -> Iterator[str]:
    """A URL whose tables live in a new schema of `server_url` (dropped on exit), with the
    server's own durability settings (no `synchronous_commit=off` as the tests use)."""
    name = f"pandasync_bench_{uuid.uuid4().hex[:12]}"
    conninfo = make_url(server_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        url = make_url(server_url).update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@contextmanager
def store(kind: str, folder: Path, postgres: str) -> Iterator[str]:
    """A fresh, migrated store of `kind`: its URL."""
    if kind == "sqlite":
        path = folder / f"store-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite:///{path}"
        migrate(url)
        yield url
        for leftover in folder.glob(path.name + "*"):
            leftover.unlink()
        return
    with postgres_store(postgres) as url:
        migrate(url)
        yield url


def measure_bare(folder: Path, *, duration_s: float, connections: int) -> Run:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, __file__, "--serve-bare", str(port)]
    with started(command, f"{url}/webhooks/{SOURCE}", folder / "bare.log") as server:
        load = {"connections": connections}
        wrk(url, folder, server.pid, duration_s=WARMUP_S, **load, name="warm-up")
        return wrk(url, folder, server.pid, duration_s=duration_s, **load, name="bare")


def measure_pandasync(
    kind: str, folder: Path, postgres: str, *, duration_s: float, connections: int
) -> Run:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with store(kind, folder, postgres) as database_url:
        config = folder / "pandasync.toml"
        config.write_text(
            CONFIG.format(url=database_url, port=port, source=SOURCE, secret=SECRET),
            encoding="utf-8",
        )
        command = [sys.executable, "-m", "service.cli", "serve", "--config", str(config)]
        log = folder / f"pandasync-{kind}.log"
        with started(command, f"{url}/webhooks/{SOURCE}", log) as server:
            load = {"connections": connections}
            warm = wrk(url, folder, server.pid, duration_s=WARMUP_S, **load, name="warm-up")
            run = wrk(url, folder, server.pid, duration_s=duration_s, **load, name=kind)
        check_durable(database_url, warm.requests + run.requests - warm.failed - run.failed)
    return run


def check_durable(url: str, answered: int) -> None:
    """Every change answered 202 is in the outbox (requests cut off by wrk's end may be too)."""
    database = Database.open(url)
    try:
        stored = database.run_sync(outbox.pending, SOURCE)
    finally:
        database.close()
    if stored < answered:
        raise RuntimeError(f"{answered} webhooks answered 202 but only {stored} in the outbox")


def median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda run: run.rate)[len(runs) // 2]


def report(bare: Run, ours: dict[str, Run], runs: dict[str, list[Run]]) -> dict[str, object]:
    """Print the table; the same as JSON."""
    say(
        f"  {'server':<28} {'requests/s':>10} {'p50 ms':>8} {'p99 ms':>8}  ratio"
        f"  {'CPU µs/req':>10}  runs (req/s)"
    )
    for label, run in [("bare FastAPI endpoint", bare), *ours.items()]:
        name = label if run is bare else f"pandasync, {label}"
        ratio = run.rate / bare.rate
        each = ", ".join(f"{other.rate:,.0f}" for other in runs[run.name])
        say(
            f"  {name:<28} {run.rate:>10,.0f} {run.p50_ms:>8.1f} {run.p99_ms:>8.1f}"
            f"  {ratio:.2f}  {run.cpu_us:>10,.0f}  {each}"
        )
    verdicts = {}
    for kind, run in ours.items():
        ratio = run.rate / bare.rate
        met = ratio >= TARGET_RATIO and run.p99_ms < TARGET_P99_MS
        verdicts[kind] = {"ratio": round(ratio, 3), "met": met, **asdict(run)}
        say(
            f"{kind}: ratio {ratio:.2f} (target {TARGET_RATIO} or more), p99 {run.p99_ms:.1f} ms"
            f" (target under {TARGET_P99_MS:.0f} ms): {'met' if met else 'NOT met'}"
        )
    return {"bare": asdict(bare), "pandasync": verdicts}


def main(arguments: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        say("wrk is not installed: `apt-get install wrk` (Debian/Ubuntu) or `brew install wrk`")
        return 2
    kinds = ["sqlite", "postgres"] if arguments.database == "both" else [arguments.database]
    options = {"duration_s": arguments.duration, "connections": arguments.connections}
    say("webhook ingest: one signed change a request, a webhook id of its own each")
    say(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
    say(
        f"wrk -t1 -c{arguments.connections}, {arguments.duration:g} s a run after"
        f" {WARMUP_S:g} s of warm-up, median of {arguments.repeats} runs each, alternating"
    )
    runs: dict[str, list[Run]] = {"bare": [], **{kind: [] for kind in kinds}}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for _ in range(arguments.repeats):
            runs["bare"].append(measure_bare(folder, **options))
            for kind in kinds:
                runs[kind].append(measure_pandasync(kind, folder, arguments.postgres, **options))
        failed = sum(run.failed for each in runs.values() for run in each)
        if failed:
            say(f"{failed} requests failed (not 2xx, or cut off): see the logs")
            for log in folder.glob("*.log"):
                say(f"--- {log.name}\n{log.read_text()[-3000:]}")
    result = report(median(runs["bare"]), {kind: median(runs[kind]) for kind in kinds}, runs)
    load = os.getloadavg()[0]
    say(f"load average {load:.1f} at the end (other work on the machine skews every rate)")
    result["machine"] = machine()
    result["load_average_at_end"] = load
    result["failed_requests"] = failed
    Path(arguments.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    say(f"written to {arguments.json}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds a run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each server (odd)")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--postgres", default=POSTGRES_URL, help="PostgreSQL server URL")
    parser.add_argument("--json", default="webhook_ingest.json", help="the result as JSON")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_bare:
        serve_bare(arguments.serve_bare)
        sys.exit(0)
    sys.exit(main(arguments))
