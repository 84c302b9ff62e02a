"""`service.allocator`: threads sharing few glibc malloc arenas (in a child process: the test
process keeps its own)."""

import platform
import re
import subprocess
import sys

import pytest

from service import allocator

# The arenas are glibc's; its malloc_stats counts them.
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc arenas")

# Starts 8 threads that allocate at the same time, then prints malloc's arenas to stderr.
THREADS = """
import ctypes, sys, threading
from service import allocator
if sys.argv[1] == "shared":
    assert allocator.share_arenas(1)
together = threading.Barrier(8)
def allocate():
    held = bytearray(100_000)
    together.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL(None).malloc_stats()
"""


class Libc:
    """A C library whose `mallopt` answers `answer`, and records its calls."""

    def __init__(self, answer: int) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.answer


def arenas_of_eight_threads(how: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", THREADS, how], capture_output=True, text=True, check=True
    )
    return len(re.findall(r"^Arena \d+:$", done.stderr, flags=re.MULTILINE))


@glibc
def test_threads_started_after_share_arenas_allocate_from_the_arenas_shared() -> None:
    assert arenas_of_eight_threads("shared") == 1


@glibc
def test_without_it_threads_allocate_from_arenas_of_their_own() -> None:
    assert arenas_of_eight_threads("default") > 1


def test_share_arenas_sets_glibcs_arena_max() -> None:
    libc = Libc(answer=1)
    assert allocator.share_arenas(3, libc=libc, environ={}) is True
    assert libc.calls == [(allocator.M_ARENA_MAX, 3)]


def test_malloc_arena_max_in_the_environment_stands() -> None:
    libc = Libc(answer=1)
    assert allocator.share_arenas(libc=libc, environ={"MALLOC_ARENA_MAX": "4"}) is False
    assert libc.calls == []


def test_a_c_library_that_refuses_it_is_reported() -> None:
    assert allocator.share_arenas(libc=Libc(answer=0), environ={}) is False


def test_a_c_library_without_mallopt_is_left_alone() -> None:
    assert allocator.share_arenas(libc=object(), environ={}) is False
