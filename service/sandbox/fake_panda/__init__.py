"""A PANDA-compatible HTTP server for tests, benchmarks and the demo; never used by the service.

It answers `/api/1.0/...` as PANDA 1.1 does (shared/panda-api.md: status codes, bodies, content
types, quirks), keeping datasets and rows in memory. One user, `FakePandaOptions.email`; its
`api_key` is checked unless `accept_any_key` reproduces PANDA's accept-any-key quirk.

It answers at once unless `FakePandaOptions.cost` is set (`pandasync fake-panda --cost
panda-1.1`): then each /api/ request takes as long as on real PANDA 1.1, 30 ms plus 2.4 ms a
row written (panda-api.md §5 item 10; reads pay the 30 ms), and requests are served one at a
time, in arrival order, as PANDA's single worker serves them. Faults apply before the cost:
`latency_s` and `hang` hold a request before it queues, and `down` answers without it.

Test controls, without authentication, outside `/api/`:

- `GET /_fake/faults` shows the faults; `PUT /_fake/faults` with a JSON object changes the keys
  it names (the others keep their value); `DELETE /_fake/faults` clears them all.
  - `latency_s` (float): added before every /api/ answer.
  - `error_rate` (0..1): share of row writes (bulk PUT, row PUT/POST/DELETE, delete all)
    answered 500 with PANDA's generic JSON error, before writing; seeded by `seed`.
  - `locked` (list of slugs): row writes there get 403 `Dataset is currently locked by
    another process.` after validation, as in PANDA; the dataset shows `"locked": true`.
  - `refuse_ids` (list of external_ids): a row write naming one gets 400
    `{"data": {"external_id": [...]}}`; a bulk PUT containing one writes nothing.
  - `hang` (bool): /api/ requests wait until it is cleared (controls keep answering); a
    request whose client disconnects meanwhile is dropped unprocessed.
  - `down` (bool): every /api/ request gets nginx's 502 page, as when PANDA's app is gone;
    with `retry_after_s` (float or null) a 503 with that `Retry-After` instead.
- `GET /_fake/stats`: `{"requests": n, "writes": n, "by_status": {"202": n, ...}, "held": n,
  "cost": ..., "busy_s": s}` over /api/ requests: `requests` counts arrivals, `writes` the
  row writes answered 2xx, `held` the requests `hang` holds right now, `cost` the cost model
  (`{"name": "panda-1.1", "request_s": 0.03, "row_s": 0.0024}`, or null when off) and
  `busy_s` the seconds it has made requests take.
- `POST /_fake/reset` (204): no datasets, no faults, zero stats, random source re-seeded.
"""

from service.sandbox.fake_panda.app import create_app, serve
from service.sandbox.fake_panda.cost import PANDA_1_1, PROFILES, Cost
from service.sandbox.fake_panda.options import FakePandaOptions

__all__ = ["PANDA_1_1", "PROFILES", "Cost", "FakePandaOptions", "create_app", "serve"]
