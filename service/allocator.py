"""The process's memory allocator: few glibc malloc arenas, set as `pandasync serve` starts.

Imports nothing from the project; changes nothing until `share_arenas` is called.
"""

import ctypes
import os
from collections.abc import Mapping

# mallopt's parameter for the most malloc arenas the process may have (glibc's malloc.h).
M_ARENA_MAX = -8
# glibc gives each thread that allocates an arena of its own, up to 8 a core, and an arena
# keeps what was freed in it for its own threads: the store's worker threads (anyio.to_thread,
# where SQLite runs) each held freed SQLite memory apart. A 400,000-document catch-up
# (bench/catchup_rss.py's setup) peaked at 136 MiB so, at 117 MiB in one arena, for the same
# CPU time (36 to 43 s for 100,000 documents either way).
MALLOC_ARENAS = 1


def share_arenas(
    arenas: int = MALLOC_ARENAS,
    *,
    libc: object | None = None,
    environ: Mapping[str, str] = os.environ,
) -> bool:
    """Make threads that allocate from now on share at most `arenas` malloc arenas.

    Call it before starting threads: one that has allocated keeps its arena. Returns whether
    it was set: not when `MALLOC_ARENA_MAX` is in `environ` (the operator's setting stands),
    nor without glibc's `mallopt` (musl answers 0, macOS has none). `libc` is the C library
    (the process's own by default).
    """
    if "MALLOC_ARENA_MAX" in environ:
        return False
    mallopt = getattr(ctypes.CDLL(None) if libc is None else libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))
