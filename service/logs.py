"""Logging setup for the service and the CLI; imports nothing from the project.

Two formats: `text`, one line per event as `time level logger: message`, and `json`, one JSON
object per line (`time`, `level`, `logger`, `message`) for log shippers. Either way a value
from outside stays inside its line: text lines are escaped by the code that logs them, JSON
strings by the formatter.
"""

import logging
import sys
from typing import Literal

Format = Literal["text", "json"]
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "INFO", format: Format = "text") -> None:
    """Send log lines to stderr in `format`, at `level` and above.

    httpx logs every request URL at INFO; it is kept at WARNING so request lines stay out
    of the log (they carry nothing secret here, but are noise at replication rates).
    """
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
