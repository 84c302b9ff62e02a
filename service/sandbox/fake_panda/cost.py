"""What a request costs when the fake plays real PANDA's speed: a fixed time plus a time a row.

Pure values; `app` sleeps for the cost and serves costed requests one at a time.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """The time one /api/ request takes: `request_s`, plus `row_s` for each row it writes.

    A row written is one object of a bulk PUT, a row PUT or POST, a row DELETE, or a delete
    all (one Solr delete); reads and refused writes cost `request_s` only.
    """

    name: str
    request_s: float
    row_s: float

    def seconds(self, rows: int) -> float:
        """The time a request that wrote `rows` rows takes, in seconds."""
        return self.request_s + self.row_s * rows

    def to_json(self) -> dict[str, object]:
        """The cost as `GET /_fake/stats` shows it."""
        return {"name": self.name, "request_s": self.request_s, "row_s": self.row_s}


# panda-api.md §5 item 10, measured on PANDA 1.1's code (one process, as its uwsgi runs): a bulk
# PUT of 1000 rows takes 2.3-2.6 s, a single-row PUT 27-39 ms, requests are served one at a
# time; "about 30 ms a request plus 2.4 ms a row". Reads were not measured; they pay the fixed
# part, Django's request handling, which every request goes through.
PANDA_1_1 = Cost("panda-1.1", request_s=0.030, row_s=0.0024)

PROFILES: dict[str, Cost] = {PANDA_1_1.name: PANDA_1_1}
