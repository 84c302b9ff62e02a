"""Log lines as a log shipper reads them: one JSON object a line, values from outside inside."""

import json
import subprocess
import sys


def test_json_logs_are_one_object_a_line_with_time_level_logger_and_message() -> None:
    probe = (
        "import logging\n"
        "from service import logs\n"
        "logs.configure('INFO', 'json')\n"
        "logging.getLogger('service.ingress.poller').warning("
        "'webhook refused: source=%r', 'evil\\nname\\u2028x')\n"
        "logging.getLogger('service.ingress.poller').debug('not shown')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert sorted(record) == ["level", "logger", "message", "time"]
    assert (record["level"], record["logger"]) == ("WARNING", "service.ingress.poller")
    assert record["message"] == "webhook refused: source='evil\\nname\\u2028x'"


def test_text_logs_stay_as_they_were() -> None:
    probe = (
        "import logging\n"
        "from service import logs\n"
        "logs.configure('INFO')\n"
        "logging.getLogger('service.x').info('hello: source=%s', 'a')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stderr.rstrip().endswith(" INFO service.x: hello: source=a")


# A document id as a hostile sender would write it: a forged second line, a carriage return,
# a NUL, an ANSI colour escape and a Unicode line separator.
HOSTILE_ID = "a\n2026-01-01 00:00:00,000 INFO service.x: forged\r\x00\x1b[31mred\u2028b"
ESCAPED_ID = "a\\n2026-01-01 00:00:00,000 INFO service.x: forged\\r\\x00\\x1b[31mred\\u2028b"


def _logged(format: str) -> str:
    probe = (
        "import logging, sys\n"
        "from service import logs\n"
        f"logs.configure('INFO', {format!r})\n"
        "logging.getLogger('service.ingress.poller').warning("
        "'document refused: source=%s doc_id=%s', 'feed', sys.stdin.read())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], input=HOSTILE_ID.encode(), capture_output=True, check=True
    )
    return done.stderr.decode()


def test_an_id_from_outside_stays_on_its_text_line_with_its_controls_escaped() -> None:
    (line,) = _logged("text").splitlines()
    assert line.endswith(
        f" WARNING service.ingress.poller: document refused: source=feed doc_id={ESCAPED_ID}"
    )


def test_an_id_from_outside_stays_on_its_json_line_escaped_as_in_the_text_format() -> None:
    (line,) = _logged("json").splitlines()
    assert json.loads(line)["message"] == f"document refused: source=feed doc_id={ESCAPED_ID}"
