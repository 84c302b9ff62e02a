"""Peak memory of `pandasync serve` while it catches up a CouchDB database, at two sizes.

Not a test. Run it with `.venv/bin/python bench/catchup_rss.py [--docs 100000 1000000]
[--json PATH]` (after `make install`). For each size it loads that many documents into a new
database of the project's pouchdb-server (on disk, LevelDB; `_bulk_docs` in chunks of
`CHUNK`, timed but not part of the catch-up), then starts `pandasync serve` on a fresh SQLite
store with one CouchDB source on that database and the default settings, and lets it catch up
into the PANDA-compatible server (free: no cost) until PANDA's dataset holds every row. It
prints, all measured in this run on this machine:

- for each size, the catch-up's time and rate, and the peak resident memory of the `serve`
  process (VmHWM of /proc/<pid>/status when the last row is in), and ru_maxrss from wait4
  once it has exited: an upper bound only, since Linux counts in a child's ru_maxrss the peak
  of the memory its exec replaced, which is this process's own peak when it started `serve`
  (after loading the documents);
- the ratio of the largest peak to the smallest (goal: within 1.2x).

Each size runs in a `serve` process of its own. The result is also written as JSON (`--json`,
default `bench/catchup_rss.json`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catchup import machine, say

from service.store.db import migrate
from tests.fixtures.couchdb import CouchDatabase, start_pouchdb
from tests.fixtures.panda import RunningPanda, free_port, start_fake_panda

ROOT = Path(__file__).resolve().parents[1]
SLUG = "stories"
CHUNK = 10_000  # documents in one `_bulk_docs` while loading
GOAL_RATIO = 1.2
CATCH_UP_TIMEOUT_S = 1800.0
START_TIMEOUT_S = 30.0

CONFIG = """
database_url = "{url}"

[server]
host = "127.0.0.1"
port = {port}

[panda]
url = "{panda}"
email = "{email}"
api_key = "{api_key}"

[[sources]]
name = "stories"
kind = "couchdb"
dataset = {{ slug = "{slug}", name = "Stories" }}
columns = [
    {{ name = "Headline", field = "title" }},
    {{ name = "Author", field = "author" }},
    {{ name = "Words", field = "words" }},
]
couchdb = {{ url = "{couchdb}", database = "{database}" }}
"""


def load(couchdb: CouchDatabase, count: int) -> float:
    """Put `count` new documents into `couchdb`, `CHUNK` a request; the seconds it took."""
    started = time.perf_counter()
    for start in range(0, count, CHUNK):
        couchdb.bulk(
            [
                {
                    "_id": f"story{index:07}",
                    "title": f"Headline number {index}",
                    "author": f"Author {index % 97}",
                    "words": 100 + index % 900,
                }
                for index in range(start, min(count, start + CHUNK))
            ]
        )
    return time.perf_counter() - started


def row_count(panda: RunningPanda) -> int:
    try:
        answer = httpx.get(f"{panda.url}/api/1.0/dataset/{SLUG}/", headers=panda.auth, timeout=10)
    except httpx.TransportError:
        return 0
    if answer.status_code == 404:
        return 0
    answer.raise_for_status()
    # PANDA's row_count is null until the dataset's first write.
    count: int | None = answer.json()["row_count"]
    return count or 0


def peak_kib(pid: int) -> int:
    """VmHWM of process `pid`: its peak resident set so far, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def catch_up(
    panda: RunningPanda, couchdb: CouchDatabase, folder: Path, count: int
) -> dict[str, Any]:
    """Run `pandasync serve` from a fresh store until PANDA holds `count` rows."""
    panda.reset()
    url = f"sqlite:///{folder / f'store-{count}.db'}"
    migrate(url)
    config = folder / f"pandasync-{count}.toml"
    port = free_port()
    config.write_text(
        CONFIG.format(
            url=url,
            port=port,
            panda=panda.url,
            email=panda.email,
            api_key=panda.api_key,
            slug=SLUG,
            couchdb=couchdb.server_url,
            database=couchdb.name,
        ),
        encoding="utf-8",
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("PANDASYNC")}
    log = folder / f"pandasync-{count}.log"
    command = [sys.executable, "-m", "service.cli", "serve", "--config", str(config)]
    with log.open("ab") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=output, env=env)
    started = time.perf_counter()
    try:
        deadline = started + CATCH_UP_TIMEOUT_S
        while (rows := row_count(panda)) < count:
            if process.poll() is not None or time.perf_counter() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the catch-up of {count:,} stopped at {rows:,} rows:\n{tail}")
            time.sleep(0.25)  # paces the row count; the catch-up takes tens of seconds
        elapsed = time.perf_counter() - started
        hwm_kib = peak_kib(process.pid)
    finally:
        if process.poll() is None:
            process.terminate()
    _, _, usage = os.wait4(process.pid, 0)
    return {
        "documents": count,
        "catch_up_s": round(elapsed, 1),
        "rows_per_s": round(count / elapsed),
        "peak_rss_mib": round(hwm_kib / 1024, 1),
        "ru_maxrss_mib": round(usage.ru_maxrss / 1024, 1),
    }


def main(arguments: argparse.Namespace) -> int:
    say("peak memory of `pandasync serve` catching up a CouchDB database (free PANDA)")
    say(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
    results = []
    with (
        tempfile.TemporaryDirectory() as scratch,
        start_pouchdb(Path(scratch) / "couch", on_disk=True) as couch,
        start_fake_panda() as panda,
    ):
        folder = Path(scratch)
        for count in arguments.docs:
            couchdb = couch.create(f"stories{count}")
            loaded_s = load(couchdb, count)
            say(f"  {count:>9,} documents loaded into pouchdb-server in {loaded_s:.0f} s")
            result = catch_up(panda, couchdb, folder, count)
            result["load_s"] = round(loaded_s, 1)
            results.append(result)
            say(
                f"  {count:>9,} documents: caught up in {result['catch_up_s']:.1f} s"
                f" ({result['rows_per_s']:,} rows/s), peak RSS {result['peak_rss_mib']:.0f} MiB"
                f" (ru_maxrss {result['ru_maxrss_mib']:.0f} MiB)"
            )
    peaks = [result["peak_rss_mib"] for result in results]
    ratio = max(peaks) / min(peaks)
    met = ratio <= GOAL_RATIO
    say(
        f"peak RSS, largest / smallest: {ratio:.2f}x (goal within {GOAL_RATIO}x):"
        f" {'met' if met else 'NOT met'}"
    )
    load_end = os.getloadavg()[0]
    say(f"load average {load_end:.1f} at the end (other work on the machine skews the rates)")
    document = {
        "machine": machine(),
        "load_average_at_end": load_end,
        "runs": results,
        "peak_ratio": round(ratio, 3),
        "met": met,
    }
    Path(arguments.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    say(f"written to {arguments.json}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--json", default=str(ROOT / "bench" / "catchup_rss.json"))
    sys.exit(main(parser.parse_args()))
