"""Logging setup for the service and the CLI; imports nothing from the project."""

import logging


def configure(level: str = "INFO") -> None:
    """Send log lines to stderr as `time level logger: message`.

    httpx logs every request URL at INFO; it is kept at WARNING so request lines stay out
    of the log (they carry nothing secret here, but are noise at replication rates).
    """
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
