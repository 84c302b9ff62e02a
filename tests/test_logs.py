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
