"""Who holds a delivery lease: this process's identity, and whether a holder is provably gone.

Pure reads of the local machine (`/proc`), no store and no network. A holder is gone for sure
only when it ran in this kernel boot and this PID namespace and its process is no longer
there (or its PID now belongs to a process started later); anything else may still be alive.
"""

import functools
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class Holder:
    """A process that may hold leases: its host and PID, and what proves it is the same
    process (kernel boot id, PID namespace, its start time in clock ticks since boot)."""

    host: str
    pid: int
    boot: str
    pidns: str
    start: str

    def text(self) -> str:
        """As stored with a lease (JSON)."""
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        """For logs and status: `host pid N`."""
        return f"{self.host} pid {self.pid}"

    @classmethod
    def of(cls, text: str | None) -> "Holder | None":
        """The holder stored with a lease; None when there is none or it is not readable."""
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _start_of(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat), "" when it does not exist or
    has ended (a zombie, not yet reaped by its parent)."""
    stat = _read(_PROC / str(pid) / "stat")
    # The command name (field 2) is in parentheses and may hold spaces: count after it.
    fields = stat.rpartition(")")[2].split()
    if len(fields) <= 19 or fields[0] in ("Z", "X"):
        return ""
    return fields[19]


def _pidns() -> str:
    try:
        return str(os.stat(_PROC / "self" / "ns" / "pid").st_ino)
    except OSError:
        return ""


@functools.cache
def me() -> Holder:
    """This process (read once)."""
    pid = os.getpid()
    return Holder(
        host=socket.gethostname(),
        pid=pid,
        boot=_read(_PROC / "sys" / "kernel" / "random" / "boot_id"),
        pidns=_pidns(),
        start=_start_of(pid),
    )


def gone(holder: Holder) -> bool:
    """Whether `holder`'s process has provably ended: it ran in this boot and PID namespace,
    and its PID is free now or taken by a process started at another time. False whenever
    that cannot be known (another host or container, no /proc)."""
    here = me()
    if not (here.boot and here.pidns and here.start):
        return False
    if (holder.boot, holder.pidns) != (here.boot, here.pidns) or not holder.start:
        return False
    return _start_of(holder.pid) != holder.start
