"""How long `pandasync --help` and `pandasync --version` take, against the 0.3 s target.

Not a test. Run it with `.venv/bin/python bench/cli_startup.py [--runs N]`. Each run is a new
process, as a user's shell starts it; it prints the median and the slowest run of each, and a
bare Python start-up for comparison, all measured in this run on this machine.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.3


def timed(command: list[str], runs: int) -> list[float]:
    """Wall-clock seconds of `runs` runs of `command`, each in a new process."""
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, capture_output=True, check=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    python = sys.executable
    say(f"start-up of the pandasync command, {runs} runs each (new process every run)")
    for name, command in (
        ("python -c pass", [python, "-c", "pass"]),
        ("pandasync --help", [python, "-m", "service.cli", "--help"]),
        ("pandasync --version", [python, "-m", "service.cli", "--version"]),
    ):
        seconds = timed(command, runs)
        median = statistics.median(seconds)
        say(
            f"  {name:<22} median {median:.3f} s, slowest {max(seconds):.3f} s"
            f"  ({median / TARGET_S:.2f} of the {TARGET_S} s target)"
        )


if __name__ == "__main__":
    main()
