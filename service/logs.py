"""Logging setup for the service and the CLI; imports nothing from the project.

Two formats: `text`, one line per event as `time level logger: message`, and `json`, one JSON
object per line (`time`, `level`, `logger`, `message`) for log shippers, with each `key=value`
of the message as a field of its own (`source`, `dataset`, `doc_id`, `seq`...). Either way a
value from outside stays inside its line: the formatter escapes every control character and line
separator of a message (a document id holding a newline cannot forge a second line, nor a NUL
or an ANSI escape reach the log), and JSON strings are escaped again by the JSON encoder.
"""

import functools
import logging
import re
import sys
from typing import Any, Literal

Format = Literal["text", "json"]
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A %-placeholder of a log call's fixed phrase, and the `key=` just before it if any.
_PLACEHOLDER = re.compile(
    r"%%|(?:(?P<key>[a-z_][a-z0-9_]*)=)?%[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa]"
)
# Fields of a JSON line that a message's key never overwrites.
_OWN = frozenset({"time", "level", "logger", "message"})


@functools.lru_cache(maxsize=1024)
def _keys(phrase: str) -> tuple[str | None, ...]:
    """The key of each argument of `phrase` (None for one without `key=`), in order."""
    return tuple(match["key"] for match in _PLACEHOLDER.finditer(phrase) if match.group() != "%%")


class _Fields(logging.Filter):
    """Copies each `key=%s` argument of a record's message into a field of the same name.

    The value is the argument as given (text, number, or its text for anything else), not as
    formatted; a key that names one of the record's own attributes is left out.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and isinstance(record.args, tuple):
            for key, value in zip(_keys(record.msg), record.args, strict=False):
                if key is None or key in _OWN or hasattr(record, key):
                    continue
                plain = value is None or isinstance(value, str | int | float | bool)
                setattr(record, key, value if plain else str(value))
        return True


# C0 and C1 control characters (NUL, tab, newline, carriage return, ESC...) and Unicode's line
# and paragraph separators, which some readers also break lines at.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """`text` with each control character and line separator written as its Python escape
    (`\\n`, `\\x00`, `\\x1b`, `\\u2028`): one line, printable as it stands."""
    return _UNSAFE.sub(lambda found: repr(found.group())[1:-1], text)


class _TextFormatter(logging.Formatter):
    """`logging.Formatter` with the message escaped (a traceback still follows on its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class EscapingJsonFormatter(JsonFormatter):
        """One JSON object a line, its message escaped as in the text format."""

        def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
            message = log_data.get("message")
            if isinstance(message, str):
                log_data["message"] = escape(message)
            return log_data

    return EscapingJsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def configure(level: str = "INFO", format: Format = "text") -> None:
    """Send log lines to stderr in `format`, at `level` and above.

    httpx logs every request URL at INFO; it is kept at WARNING so request lines stay out
    of the log (they carry nothing secret here, but are noise at replication rates), and so
    is alembic.
    """
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(_json_formatter())
        handler.addFilter(_Fields())
    else:
        handler.setFormatter(_TextFormatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # alembic says at INFO how it set itself up each time the store's schema is checked.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
