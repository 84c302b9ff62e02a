"""The fake PANDA over real HTTP: panda-api.md §4 item by item, §3 details, then the faults."""

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from service.sandbox.fake_panda import PANDA_1_1
from tests.fixtures.panda import RunningPanda, free_port, local_client, start_fake_panda
from tests.waiting import wait_until

JSON = "application/json; charset=utf-8"
HTML = "text/html; charset=utf-8"
NO_CACHE = "max-age=0,no-cache,no-store"
CANNED = {"error_message": "Sorry, this request could not be processed. Please try again later."}
NAME_REQUIRED = {"dataset": {"name": ["This field is required."]}}
BAD_ID = {
    "data": {
        "external_id": ["external_id can only contain letters, numbers, underscores and dashes."]
    }
}
NO_COLUMNS = {"dataset": ["Can not create or modify data for a dataset without columns."]}
LOCKED = "Dataset is currently locked by another process."
DS = "/api/1.0/dataset/ds/"
DATA = "/api/1.0/dataset/ds/data/"
ALL_METHODS = "GET,POST,PUT,DELETE"


@pytest.fixture
def client(panda: RunningPanda) -> Iterator[httpx.Client]:
    """An authenticated client (dash-form headers), JSON bodies."""
    with local_client(base_url=panda.url, headers=panda.auth) as authenticated:
        yield authenticated


@pytest.fixture
def anonymous(panda: RunningPanda) -> Iterator[httpx.Client]:
    """A client without credentials."""
    with local_client(base_url=panda.url) as bare:
        yield bare


def create(client: httpx.Client, slug: str = "ds", columns: str | None = "a,b,c") -> None:
    params = {} if columns is None else {"columns": columns}
    answer = client.put(f"/api/1.0/dataset/{slug}/", params=params, json={"name": slug.upper()})
    assert answer.status_code == 201, answer.text


def row(external_id: str, *values: object) -> dict[str, object]:
    return {"data": list(values), "external_id": external_id}


def echoed(external_id: str, *values: object) -> dict[str, object]:
    return {
        "data": list(values),
        "dataset": DS,
        "external_id": external_id,
        "resource_uri": f"{DATA}{external_id}/",
    }


def bulk(client: httpx.Client, *objects: object, slug: str = "ds") -> httpx.Response:
    return client.put(f"/api/1.0/dataset/{slug}/data/", json={"objects": list(objects)})


def field(panda: RunningPanda, name: str, slug: str = "ds") -> object:
    dataset = panda.dataset(slug)
    assert dataset is not None
    return dataset[name]


def held(panda: RunningPanda) -> object:
    return panda.stats()["held"]


# §4 items 1-5: authentication


def test_item_01_get_without_credentials_is_401_with_an_empty_body(
    client: httpx.Client, anonymous: httpx.Client
) -> None:
    """Item 1: GET /dataset/ds/ without credentials → 401, empty body."""
    create(client)
    answer = anonymous.get(DS)
    assert (answer.status_code, answer.content, answer.headers["content-type"]) == (401, b"", HTML)
    assert "www-authenticate" not in answer.headers


@pytest.mark.parametrize(
    "how",
    ["query parameters", "underscore headers", "dash headers"],
)
def test_item_02_query_parameters_or_either_header_form_authenticate(
    panda: RunningPanda, client: httpx.Client, anonymous: httpx.Client, how: str
) -> None:
    """Item 2: `?email=&api_key=`, or PANDA_EMAIL/PANDA_API_KEY headers (dash form too) → 200."""
    create(client)
    if how == "query parameters":
        answer = anonymous.get(DS, params={"email": panda.email, "api_key": panda.api_key})
    else:
        sep = "_" if how == "underscore headers" else "-"
        headers = {f"PANDA{sep}EMAIL": panda.email, f"PANDA{sep}API{sep}KEY": panda.api_key}
        answer = anonymous.get(DS, headers=headers)
    assert answer.status_code == 200


def test_item_02_a_header_wins_over_the_query_parameter(
    panda: RunningPanda, client: httpx.Client, anonymous: httpx.Client
) -> None:
    """Item 2 (§1): with both a header and a query parameter, the header is used."""
    create(client)
    answer = anonymous.get(
        DS, params={"email": panda.email, "api_key": "wrong"}, headers=panda.auth
    )
    assert answer.status_code == 200


def test_item_03_an_unknown_email_is_401(panda: RunningPanda, anonymous: httpx.Client) -> None:
    """Item 3: an unknown email → 401."""
    headers = {"PANDA-EMAIL": "nobody@example.com", "PANDA-API-KEY": panda.api_key}
    assert anonymous.get(DS, headers=headers).status_code == 401


@pytest.mark.skip(reason="item 3: the fake's one user is always active; is_active has no API")
def test_item_03_an_inactive_user_is_401() -> None:
    """Item 3: a user with is_active=false → 401 (cannot be set up through PANDA's API)."""


def test_item_04_the_email_is_matched_case_insensitively(
    panda: RunningPanda, client: httpx.Client, anonymous: httpx.Client
) -> None:
    """Item 4: the email is matched case-insensitively (and URL-unquoted)."""
    create(client)
    shouted = panda.email.upper().replace("@", "%40")
    headers = {"PANDA-EMAIL": shouted, "PANDA-API-KEY": panda.api_key}
    assert anonymous.get(DS, headers=headers).status_code == 200


def test_item_05_a_wrong_key_is_401_by_default(
    panda: RunningPanda, client: httpx.Client, anonymous: httpx.Client
) -> None:
    """Item 5: a valid email with a wrong key → 401 from the fake by default."""
    create(client)
    headers = {"PANDA-EMAIL": panda.email, "PANDA-API-KEY": "wrong"}
    assert anonymous.get(DS, headers=headers).status_code == 401


def test_item_05_the_panda_quirk_switch_accepts_any_non_empty_key() -> None:
    """Item 5: real PANDA answers 200 to any non-empty key; `accept_any_key` reproduces it."""
    with start_fake_panda(port=free_port(), accept_any_key=True) as quirky:
        url = f"{quirky.url}/api/1.0/dataset/"
        with local_client() as http:
            wrong = http.get(url, headers={"PANDA-EMAIL": quirky.email, "PANDA-API-KEY": "x"})
            empty = http.get(url, headers={"PANDA-EMAIL": quirky.email, "PANDA-API-KEY": ""})
    assert (wrong.status_code, empty.status_code) == (200, 401)


# §4 items 6-11: datasets


def test_item_06_a_missing_dataset_is_404_with_an_empty_body(client: httpx.Client) -> None:
    """Item 6: GET /dataset/missing/ → 404, empty body."""
    answer = client.get("/api/1.0/dataset/missing/")
    assert (answer.status_code, answer.content) == (404, b"")


def test_item_07_put_creates_a_dataset_with_columns(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 7: PUT ?columns=a,b,c on a new slug → 201, absolute Location, schema, null count."""
    answer = client.put(DS, params={"columns": "a,b,c"}, json={"name": "DS"})
    body = answer.json()
    assert answer.status_code == 201
    assert answer.headers["location"] == f"{panda.url}{DS}"
    assert (body["slug"], body["name"], body["row_count"]) == ("ds", "DS", None)
    assert [column["name"] for column in body["column_schema"]] == ["a", "b", "c"]
    assert body["column_schema"][0] == {
        "name": "a",
        "indexed": False,
        "type": None,
        "indexed_name": None,
        "min": None,
        "max": None,
    }


def test_item_07_a_dataset_has_pandas_keys_and_string_ids(client: httpx.Client) -> None:
    """Item 7 (§3.1): the full dataset carries PANDA's keys; ids are JSON strings."""
    create(client)
    body = client.get(DS).json()
    assert sorted(body) == [
        "categories",
        "column_schema",
        "creation_date",
        "creator",
        "current_task",
        "data_uploads",
        "description",
        "id",
        "initial_upload",
        "last_modification",
        "last_modified",
        "last_modified_by",
        "locked",
        "locked_at",
        "name",
        "related_links",
        "related_uploads",
        "resource_uri",
        "row_count",
        "sample_data",
        "slug",
    ]
    assert (body["id"], body["resource_uri"], body["sample_data"]) == ("1", DS, None)
    assert len(body["creation_date"]) == len("2024-01-01T00:00:00")


def test_item_08_a_second_put_updates_and_ignores_columns(client: httpx.Client) -> None:
    """Item 8: the same PUT again with ?columns=x → 202, same id, column schema unchanged."""
    first = client.put(DS, params={"columns": "a,b,c"}, json={"name": "DS"}).json()
    answer = client.put(DS, params={"columns": "x"}, json={"name": "Renamed"})
    body = answer.json()
    assert answer.status_code == 202
    assert (body["id"], body["column_schema"], body["name"]) == (
        first["id"],
        first["column_schema"],
        "Renamed",
    )


def test_item_09_put_without_a_name_is_400_on_create_and_on_update(
    client: httpx.Client,
) -> None:
    """Item 9: PUT /dataset/ds2/ with {} → 400 name required, for create and for update."""
    on_create = client.put("/api/1.0/dataset/ds2/", json={})
    created_meanwhile = client.get("/api/1.0/dataset/ds2/").status_code
    create(client, "ds2")
    on_update = client.put("/api/1.0/dataset/ds2/", json={"name": ""})
    assert (on_create.status_code, on_create.json(), created_meanwhile) == (
        400,
        NAME_REQUIRED,
        404,
    )
    assert (on_update.status_code, on_update.json()) == (400, NAME_REQUIRED)


def test_item_10_a_body_slug_differing_from_the_url_is_ignored(client: httpx.Client) -> None:
    """Item 10: PUT /dataset/ds/ with a body slug `other` → the slug stays `ds`."""
    answer = client.put(DS, json={"name": "DS", "slug": "other"})
    assert (answer.status_code, answer.json()["slug"]) == (201, "ds")
    assert client.get("/api/1.0/dataset/other/").status_code == 404


def test_item_11_delete_dataset_then_get_and_delete_again_are_404(client: httpx.Client) -> None:
    """Item 11: DELETE /dataset/ds/ → 204; then GET → 404 and DELETE → 404."""
    create(client)
    statuses = [client.delete(DS).status_code, client.get(DS).status_code]
    statuses.append(client.delete(DS).status_code)
    assert statuses == [204, 404, 404]


# §4 items 12-20: bulk PUT


def test_item_12_bulk_put_writes_rows_and_counts_them(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 12: bulk PUT of r1, r2 → 202 {"objects": [r1, r2]}; row_count 2."""
    create(client)
    answer = bulk(client, row("r1", 1, 2, 3), row("r2", "x", "y", "z"))
    assert (answer.status_code, answer.json()) == (
        202,
        {"objects": [echoed("r1", 1, 2, 3), echoed("r2", "x", "y", "z")]},
    )
    assert answer.headers["cache-control"] == NO_CACHE
    assert field(panda, "row_count") == 2


def test_item_13_a_bulk_rewrite_updates_rows_and_says_so(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 13: item 12 again with r1 changed → 202; row_count 2; new r1; "2 rows updated"."""
    create(client)
    bulk(client, row("r1", 1, 2, 3), row("r2", 4, 5, 6))
    answer = bulk(client, row("r1", 7, 8, 9), row("r2", 4, 5, 6))
    assert answer.status_code == 202
    assert (field(panda, "row_count"), field(panda, "last_modification")) == (
        2,
        "2 rows updated",
    )
    assert client.get(f"{DATA}r1/").json()["data"] == [7, 8, 9]


def test_item_14_a_bulk_with_a_short_row_is_400_and_writes_nothing(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 14: one object with 2 values → 400 "Got 2 data fields. Expected 3."; none stored."""
    create(client)
    answer = bulk(client, row("r1", 1, 2, 3), row("r2", 1, 2))
    assert (answer.status_code, answer.json()) == (
        400,
        {"data": ["Got 2 data fields. Expected 3."]},
    )
    assert (panda.rows("ds"), field(panda, "row_count")) == ({}, None)


@pytest.mark.parametrize("external_id", ["a b", ""])
def test_item_15_a_bulk_id_outside_letters_digits_underscore_dash_is_400(
    panda: RunningPanda, client: httpx.Client, external_id: str
) -> None:
    """Item 15: a bulk external_id "a b" or "" → 400 with PANDA's character message."""
    create(client)
    answer = bulk(client, row("ok", 1, 2, 3), row(external_id, 1, 2, 3))
    assert (answer.status_code, answer.json(), panda.rows("ds")) == (400, BAD_ID, {})


def test_item_15_a_non_ascii_bulk_id_is_400(client: httpx.Client) -> None:
    """Item 15 (§3.2): the bulk id check is ASCII-only, so "café" is refused."""
    create(client)
    assert bulk(client, row("café", 1, 2, 3)).json() == BAD_ID


@pytest.mark.parametrize("external_id", [5, None])
def test_item_16_a_bulk_id_that_is_not_a_string_is_400(
    client: httpx.Client, external_id: object
) -> None:
    """Item 16: a bulk external_id 5 or null → 400 "external_id must be a string."."""
    create(client)
    answer = bulk(client, {"data": [1, 2, 3], "external_id": external_id})
    assert (answer.status_code, answer.json()) == (
        400,
        {"data": {"external_id": ["external_id must be a string."]}},
    )


def test_item_17_a_bulk_object_without_data_is_400(client: httpx.Client) -> None:
    """Item 17: a bulk object without `data` → 400 "The data field is required."."""
    create(client)
    answer = bulk(client, {"external_id": "r1"})
    assert (answer.status_code, answer.json()) == (
        400,
        {"data": {"data": ["The data field is required."]}},
    )


@pytest.mark.parametrize("body", [{"rows": []}, [{"data": [1, 2, 3]}]])
def test_item_18_a_bulk_body_without_objects_is_400_invalid_data_sent(
    client: httpx.Client, body: object
) -> None:
    """Item 18: a bulk body without `objects` (a bare array too) → 400 `Invalid data sent.`."""
    create(client)
    answer = client.put(DATA, json=body)
    assert (answer.status_code, answer.text, answer.headers["content-type"]) == (
        400,
        "Invalid data sent.",
        HTML,
    )


def test_item_19_an_empty_bulk_is_202_with_no_objects(client: httpx.Client) -> None:
    """Item 19: `{"objects": []}` on a dataset with columns → 202 `{"objects": []}`."""
    create(client)
    answer = bulk(client)
    assert (answer.status_code, answer.json()) == (202, {"objects": []})


def test_item_20_duplicate_ids_in_one_bulk_are_echoed_and_the_last_wins(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 20: the same external_id twice in one bulk → 202, both echoed, the last stored."""
    create(client)
    answer = bulk(client, row("r1", 1, 2, 3), row("r1", 4, 5, 6))
    assert answer.json() == {"objects": [echoed("r1", 1, 2, 3), echoed("r1", 4, 5, 6)]}
    assert (panda.rows("ds"), field(panda, "row_count")) == ({"r1": [4, 5, 6]}, 1)


# §4 items 21-26: single rows


def test_item_21_row_put_is_202_for_a_new_row_and_again_for_a_rewrite(
    client: httpx.Client,
) -> None:
    """Item 21: PUT /data/s1/ → 202 (not 201) with external_id "s1"; a repeat → 202."""
    create(client)
    first = client.put(f"{DATA}s1/", json={"data": [1, 2, 3]})
    again = client.put(f"{DATA}s1/", json={"data": [4, 5, 6]})
    assert (first.status_code, first.json()) == (202, echoed("s1", 1, 2, 3))
    assert (again.status_code, again.json()) == (202, echoed("s1", 4, 5, 6))


def test_item_22_a_row_put_writes_the_body_external_id_over_the_url(
    client: httpx.Client,
) -> None:
    """Item 22: PUT /data/s2/ with external_id "s3" → 202 "s3"; GET s3 → 200, GET s2 → 404."""
    create(client)
    answer = client.put(f"{DATA}s2/", json={"data": [1, 2, 3], "external_id": "s3"})
    assert (answer.status_code, answer.json()["external_id"]) == (202, "s3")
    assert (client.get(f"{DATA}s3/").status_code, client.get(f"{DATA}s2/").status_code) == (
        200,
        404,
    )


def test_item_23_a_row_put_naming_another_dataset_is_400(client: httpx.Client) -> None:
    """Item 23: a row PUT with `"dataset": "/api/1.0/dataset/other/"` → 400 text."""
    create(client)
    body = {"data": [1, 2, 3], "dataset": "/api/1.0/dataset/other/"}
    answer = client.put(f"{DATA}s1/", json=body)
    assert (answer.status_code, answer.text) == (
        400,
        "Dataset specified in request body does not agree with dataset API endpoint used.",
    )


def test_item_24_post_row_is_201_with_an_absolute_location(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 24: POST /data/ with external_id p1 → 201, Location .../data/p1/, row_count +1."""
    create(client)
    bulk(client, row("r1", 1, 2, 3))
    answer = client.post(DATA, json={"data": [1, 2, 3], "external_id": "p1"})
    assert (answer.status_code, answer.json()) == (201, echoed("p1", 1, 2, 3))
    assert answer.headers["location"] == f"{panda.url}{DATA}p1/"
    assert field(panda, "row_count") == 2


def test_item_25_post_to_a_row_is_501_and_patch_is_405(client: httpx.Client) -> None:
    """Item 25: POST /data/x/ → 501; PATCH /data/x/ → 405 with `Allow: GET,POST,PUT,DELETE`."""
    create(client)
    post = client.post(f"{DATA}x/", json={"data": [1, 2, 3]})
    patch = client.patch(f"{DATA}x/", json={"data": [1, 2, 3]})
    assert (post.status_code, post.content) == (501, b"")
    assert (patch.status_code, patch.headers["allow"], patch.text) == (
        405,
        ALL_METHODS,
        ALL_METHODS,
    )


@pytest.mark.parametrize("method", ["PUT", "POST"])
@pytest.mark.parametrize("count", [2, 4])
def test_item_26_a_single_row_with_the_wrong_field_count_is_400(
    client: httpx.Client, method: str, count: int
) -> None:
    """Item 26: a single-row PUT or POST with 2 or 4 values → 400 "Got N ... Expected 3."."""
    create(client)
    url = f"{DATA}s1/" if method == "PUT" else DATA
    answer = client.request(method, url, json={"data": list(range(count)), "external_id": "s1"})
    assert (answer.status_code, answer.json()) == (
        400,
        {"data": [f"Got {count} data fields. Expected 3."]},
    )


# §4 items 27-33: reading and deleting rows


def test_item_27_a_row_has_exactly_four_keys(client: httpx.Client) -> None:
    """Item 27: GET /data/r1/ → 200 with data, dataset, external_id, resource_uri."""
    create(client)
    bulk(client, row("r1", "x", None, True))
    answer = client.get(f"{DATA}r1/")
    assert (answer.status_code, answer.json()) == (200, echoed("r1", "x", None, True))


def test_item_28_a_missing_row_is_404(client: httpx.Client) -> None:
    """Item 28: GET /data/nope/ → 404 (tastypie's JSON error body)."""
    create(client)
    answer = client.get(f"{DATA}nope/")
    assert (answer.status_code, answer.json()) == (404, CANNED)


def test_item_29_deleting_a_row_is_204_and_lowers_row_count(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 29: DELETE /data/r1/ → 204; row_count goes down by 1."""
    create(client)
    bulk(client, row("r1", 1, 2, 3), row("r2", 1, 2, 3))
    answer = client.delete(f"{DATA}r1/")
    assert (answer.status_code, answer.content) == (204, b"")
    assert (field(panda, "row_count"), panda.rows("ds")) == (1, {"r2": [1, 2, 3]})


def test_item_30_deleting_a_missing_row_is_204_and_keeps_row_count(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 30: DELETE /data/nope/ → 204; row_count unchanged."""
    create(client)
    bulk(client, row("r1", 1, 2, 3), row("r2", 1, 2, 3))
    assert client.delete(f"{DATA}nope/").status_code == 204
    assert (field(panda, "row_count"), field(panda, "last_modification")) == (
        2,
        "1 row deleted",
    )


def test_item_31_deleting_all_rows_empties_the_dataset(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """Item 31: DELETE /data/ → 204; row_count 0; the row list is empty."""
    create(client)
    bulk(client, row("r1", 1, 2, 3), row("r2", 1, 2, 3))
    assert client.delete(DATA).status_code == 204
    assert (field(panda, "row_count"), panda.rows("ds")) == (0, {})
    assert field(panda, "last_modification") == "All 2 rows deleted"


def test_item_32_the_row_list_honours_limit(panda: RunningPanda, client: httpx.Client) -> None:
    """Item 32: GET /data/?limit=1 over 2 rows → meta limit 1, offset 0, next set, 1 object."""
    create(client)
    bulk(client, row("r1", 1, 2, 3), row("r2", 1, 2, 3))
    answer = client.get(DATA, params={"limit": 1, "email": panda.email})
    body = answer.json()
    assert answer.status_code == 200
    assert body["meta"] == {
        "limit": 1,
        "offset": 0,
        "total_count": 2,
        "previous": None,
        "next": f"{DATA}?limit=1&email={panda.email.replace('@', '%40')}&offset=1",
    }
    assert body["objects"] == [echoed("r1", 1, 2, 3)]


def test_item_33_the_row_list_carries_the_simple_dataset(client: httpx.Client) -> None:
    """Item 33: GET /data/ → dataset fields plus meta and objects, without the four big keys."""
    create(client)
    body = client.get(DATA).json()
    assert {"id", "name", "row_count", "column_schema", "meta", "objects"} <= set(body)
    assert not {"sample_data", "data_uploads", "related_uploads", "current_task"} & set(body)


# §4 items 34-39: preconditions, locks, slashes, content types


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", DATA, {"objects": [row("r1", 1, 2, 3)]}),
        ("PUT", f"{DATA}s1/", {"data": [1, 2, 3]}),
        ("POST", DATA, {"data": [1, 2, 3], "external_id": "p1"}),
    ],
)
def test_item_34_row_writes_to_a_dataset_without_columns_are_400(
    client: httpx.Client, method: str, path: str, body: object
) -> None:
    """Item 34: any row write on a dataset created without columns → 400 (dataset message)."""
    create(client, columns=None)
    answer = client.request(method, path, json=body)
    assert (answer.status_code, answer.json()) == (400, NO_COLUMNS)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/1.0/dataset/missing/data/"),
        ("GET", "/api/1.0/dataset/missing/data/r1/"),
        ("PUT", "/api/1.0/dataset/missing/data/"),
        ("PUT", "/api/1.0/dataset/missing/data/r1/"),
        ("POST", "/api/1.0/dataset/missing/data/"),
        ("DELETE", "/api/1.0/dataset/missing/data/r1/"),
        ("DELETE", "/api/1.0/dataset/missing/data/"),
    ],
)
def test_item_35_data_calls_on_a_missing_dataset_are_404(
    client: httpx.Client, method: str, path: str
) -> None:
    """Item 35: any data call on /dataset/missing/data/... → 404."""
    body = {"objects": [row("r1", 1, 2, 3)], "data": [1, 2, 3]}
    answer = client.request(method, path, json=None if method in ("GET", "DELETE") else body)
    assert answer.status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", DATA, {"objects": [row("r1", 1, 2, 3)]}),
        ("PUT", f"{DATA}s1/", {"data": [1, 2, 3]}),
        ("DELETE", f"{DATA}r1/", None),
        ("DELETE", DATA, None),
    ],
)
def test_item_36_a_locked_dataset_refuses_row_writes_with_403(
    panda: RunningPanda, client: httpx.Client, method: str, path: str, body: object
) -> None:
    """Item 36: with the dataset locked (the `locked` fault), row writes → 403; GET list → 200."""
    create(client)
    bulk(client, row("r1", 1, 2, 3))
    panda.set_faults(locked=["ds"])
    answer = client.request(method, path, json=body)
    assert (answer.status_code, answer.text, answer.headers["content-type"]) == (
        403,
        LOCKED,
        HTML,
    )
    assert (client.get(DATA).status_code, field(panda, "locked")) == (200, True)
    assert panda.rows("ds") == {"r1": [1, 2, 3]}


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
def test_item_37_a_path_without_its_trailing_slash_is_redirected_301(
    panda: RunningPanda, anonymous: httpx.Client, method: str
) -> None:
    """Item 37: PUT (GET, DELETE) /data/s1 → 301 to the same URL with a slash, before auth."""
    answer = anonymous.request(method, f"{DATA}s1?x=1", content=b'{"data": [1, 2, 3]}')
    assert (answer.status_code, answer.headers["location"]) == (
        301,
        f"{panda.url}{DATA}s1/?x=1",
    )


@pytest.mark.parametrize("content_type", [None, "text/plain"])
def test_item_38_a_put_without_a_json_content_type_fails_with_500(
    panda: RunningPanda, client: httpx.Client, content_type: str | None
) -> None:
    """Item 38: PUT with a JSON body but no or a text/plain Content-Type → 500, nothing written."""
    create(client)
    headers = {} if content_type is None else {"Content-Type": content_type}
    answer = client.put(DATA, content=b'{"objects": []}', headers=headers)
    assert (answer.status_code, answer.json()) == (500, CANNED)
    assert field(panda, "row_count") is None


def test_item_38_invalid_json_fails_with_500(client: httpx.Client) -> None:
    """Item 38 (§2): invalid JSON under application/json is also PANDA's 500."""
    create(client)
    answer = client.put(DATA, content=b"{", headers={"Content-Type": "application/json"})
    assert (answer.status_code, answer.json()) == (500, CANNED)


def test_item_39_json_successes_carry_pandas_content_type_and_cache_control(
    client: httpx.Client,
) -> None:
    """Item 39: JSON successes → `application/json; charset=utf-8` and PANDA's Cache-Control."""
    create(client)
    success = client.get(DS)
    error = client.put("/api/1.0/dataset/ds2/", json={})
    assert (success.headers["content-type"], success.headers["cache-control"]) == (
        JSON,
        NO_CACHE,
    )
    assert (error.headers["content-type"], "cache-control" in error.headers) == (JSON, False)


# §3 details beyond the checklist


def test_last_modification_uses_pandas_texts(panda: RunningPanda, client: httpx.Client) -> None:
    """§3.3.8: single and bulk writes describe themselves as PANDA does ("1 rows added" too)."""
    create(client)
    writes: list[tuple[str, str, object]] = [
        ("PUT", f"{DATA}s1/", {"data": [1, 2, 3]}),
        ("PUT", f"{DATA}s1/", {"data": [1, 2, 3]}),
        ("PUT", DATA, {"objects": [row("r1", 1, 2, 3)]}),
        ("PUT", DATA, {"objects": [row("r1", 1, 2, 3), row("r2", 1, 2, 3)]}),
        ("DELETE", f"{DATA}r2/", None),
    ]
    seen = []
    for method, path, body in writes:
        client.request(method, path, json=body)
        seen.append(field(panda, "last_modification"))
    assert seen == [
        "1 row added",
        "1 row updated",
        "1 rows added",
        "1 rows added and 1 updated",
        "1 row deleted",
    ]


def test_sample_data_keeps_the_first_five_rows_ever_written(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """§3.3.8: `sample_data` holds the first five data arrays written and is never refreshed."""
    create(client)
    bulk(client, *[row(f"r{n}", n, n, n) for n in range(4)])
    bulk(client, *[row(f"q{n}", -n, -n, -n) for n in range(1, 4)])
    client.delete(DATA)
    assert field(panda, "sample_data") == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [-1, -1, -1]]


def test_a_rewritten_row_moves_to_the_end_of_the_list(client: httpx.Client) -> None:
    """§3.2: the list is in Solr `_docid_` order, where a rewrite moves a row to the end."""
    create(client)
    bulk(client, row("r1", 1, 2, 3), row("r2", 1, 2, 3), row("r3", 1, 2, 3))
    client.put(f"{DATA}r1/", json={"data": [4, 5, 6]})
    objects = client.get(DATA, params={"limit": 10}).json()["objects"]
    assert [found["external_id"] for found in objects] == ["r2", "r3", "r1"]


def test_deleting_all_rows_of_a_never_written_dataset_is_500_and_leaves_row_count_zero(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """§3.2 quirk: DELETE /data/ with row_count null → 500 (harmless); the unlock saves 0."""
    create(client)
    answer = client.delete(DATA)
    assert (answer.status_code, answer.json(), field(panda, "row_count")) == (500, CANNED, 0)


def test_a_disallowed_method_is_405_before_authentication(anonymous: httpx.Client) -> None:
    """§1 order of checks: PATCH without credentials → 405, not 401."""
    answer = anonymous.patch(DS, json={})
    assert (answer.status_code, answer.headers["allow"]) == (405, ALL_METHODS)


def test_a_single_row_write_without_data_is_500(client: httpx.Client) -> None:
    """§3.2 quirk: no DataValidation on single-row writes, so a missing `data` is a 500."""
    create(client)
    answer = client.put(f"{DATA}s1/", json={"external_id": "s1"})
    assert (answer.status_code, answer.json()) == (500, CANNED)


def test_a_single_row_id_is_not_validated_and_a_spaced_one_has_no_uri(
    client: httpx.Client,
) -> None:
    """§3.2: a single-row body id with a space is stored, with `resource_uri` ""."""
    create(client)
    answer = client.put(f"{DATA}s1/", json={"data": [1, 2, 3], "external_id": "a b"})
    assert (answer.status_code, answer.json()["resource_uri"]) == (202, "")


def test_a_non_integer_limit_is_500(client: httpx.Client) -> None:
    """§3.2: a non-integer `limit` on the row list → 500."""
    create(client)
    assert client.get(DATA, params={"limit": "ten"}).status_code == 500


def test_the_dataset_list_pages_newest_first(client: httpx.Client) -> None:
    """§3.1: GET /dataset/ pages with limit/offset, newest first, `next` repeating parameters."""
    for slug in ("one", "two", "three"):
        create(client, slug)
    body = client.get("/api/1.0/dataset/", params={"limit": 2, "simple": "true"}).json()
    assert [found["slug"] for found in body["objects"]] == ["three", "two"]
    assert body["meta"]["next"] == "/api/1.0/dataset/?limit=2&simple=true&offset=2"
    assert "sample_data" not in body["objects"][0]


def test_post_dataset_derives_its_slug_from_the_name_and_numbers_a_clash(
    client: httpx.Client,
) -> None:
    """§3.1: POST /dataset/ slugifies the name, appending -2 when the slug is taken."""
    first = client.post("/api/1.0/dataset/", params={"columns": "a"}, json={"name": "My Data!"})
    second = client.post("/api/1.0/dataset/", json={"name": "My Data!"})
    assert (first.status_code, first.json()["slug"], second.json()["slug"]) == (
        201,
        "my-data",
        "my-data-2",
    )


def test_a_posted_duplicate_slug_makes_the_slug_ambiguous(client: httpx.Client) -> None:
    """§3.1: POST with an existing slug in the body is not refused; the next GET is a 300."""
    create(client)
    answer = client.post("/api/1.0/dataset/", json={"name": "Again", "slug": "ds"})
    assert (answer.status_code, client.get(DS).status_code) == (201, 300)


def test_mismatched_typed_columns_are_400_after_saving_the_dataset(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """§3.1: `typed_columns` of the wrong length → 400 text, the dataset saved without columns."""
    answer = client.put(DS, params={"columns": "a,b", "typed_columns": "true"}, json={"name": "D"})
    assert answer.status_code == 400
    assert field(panda, "column_schema") is None


def test_typed_columns_get_indexed_names(client: httpx.Client) -> None:
    """§3.1: typed columns with types get `column_<type>_<slug>` indexed names."""
    params = {"columns": "First Name,Age", "typed_columns": "true,TRUE", "column_types": ",int"}
    body = client.put(DS, params=params, json={"name": "D"}).json()
    assert [(c["indexed"], c["type"], c["indexed_name"]) for c in body["column_schema"]] == [
        (True, None, None),
        (True, "int", "column_int_age"),
    ]


def test_bulk_validation_stops_at_the_first_failing_object(client: httpx.Client) -> None:
    """§3.2: objects are validated in order; the first failure is the one reported."""
    create(client)
    answer = bulk(client, row("r1", 1, 2), row("bad id", 1, 2, 3))
    assert answer.json() == {"data": ["Got 2 data fields. Expected 3."]}


def test_unknown_paths_are_404(client: httpx.Client) -> None:
    """Paths PANDA does not route (here an id with a space) → 404."""
    assert client.get(f"{DATA}a%20b/").status_code == 404


# The cost model (panda-api.md §5 item 10)

ROWS = 20
BULK_COST_S = PANDA_1_1.request_s + ROWS * PANDA_1_1.row_s  # 30 ms + 20 rows at 2.4 ms = 78 ms
BULK = {"objects": [row(f"r{index}", index, "b", "c") for index in range(ROWS)]}


@pytest.fixture(scope="module")
def costed_server() -> Iterator[RunningPanda]:
    """A fake PANDA as slow as PANDA 1.1, for this module."""
    with start_fake_panda(cost=PANDA_1_1) as running:
        yield running


@pytest.fixture
def costed(costed_server: RunningPanda) -> Iterator[httpx.Client]:
    """An authenticated client of the costed server, reset, with dataset `ds` created."""
    costed_server.reset()
    with local_client(base_url=costed_server.url, headers=costed_server.auth) as authenticated:
        create(authenticated)
        yield authenticated


def timed(send: Callable[[], httpx.Response]) -> tuple[int, float]:
    started = time.monotonic()
    answer = send()
    return answer.status_code, time.monotonic() - started


def test_with_the_panda_cost_a_bulk_put_takes_30_ms_plus_2_4_ms_a_row(
    costed: httpx.Client,
) -> None:
    """A bulk PUT of 20 rows takes at least 30 ms plus 2.4 ms for each row."""
    status, elapsed_s = timed(lambda: costed.put(DATA, json=BULK))
    assert (status, elapsed_s >= BULK_COST_S) == (202, True), elapsed_s


def test_with_the_panda_cost_a_read_takes_the_fixed_30_ms(costed: httpx.Client) -> None:
    """A GET writes no row and pays the fixed part of the cost only."""
    status, elapsed_s = timed(lambda: costed.get(DS))
    assert (status, elapsed_s >= PANDA_1_1.request_s) == (200, True), elapsed_s


def test_with_the_panda_cost_concurrent_requests_are_served_one_after_the_other(
    costed: httpx.Client, costed_server: RunningPanda
) -> None:
    """A bulk PUT and a row DELETE sent together take at least both costs added up."""
    delete_cost_s = PANDA_1_1.request_s + PANDA_1_1.row_s
    with (
        local_client(base_url=costed_server.url, headers=costed_server.auth) as other,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        other.get(DS)  # connect first, so both requests leave at once
        started = time.monotonic()
        bulk_put = pool.submit(costed.put, DATA, json=BULK)
        delete = pool.submit(other.delete, f"{DATA}r0/")
        statuses = (bulk_put.result().status_code, delete.result().status_code)
        elapsed_s = time.monotonic() - started
    assert (statuses, elapsed_s >= BULK_COST_S + delete_cost_s) == ((202, 204), True), elapsed_s


def test_stats_show_the_cost_and_the_time_it_charged(
    costed: httpx.Client, costed_server: RunningPanda
) -> None:
    """`cost` names the profile; `busy_s` adds up each request's cost (create, PUT, GET)."""
    costed.put(DATA, json=BULK)
    costed.get(DS)
    stats = costed_server.stats()
    assert stats["cost"] == {"name": "panda-1.1", "request_s": 0.03, "row_s": 0.0024}
    assert stats["busy_s"] == pytest.approx(3 * PANDA_1_1.request_s + ROWS * PANDA_1_1.row_s)


def test_without_a_cost_the_same_bulk_put_takes_far_less(client: httpx.Client) -> None:
    """Off by default: the 20-row PUT takes under half its PANDA cost (best of three)."""
    create(client)
    runs = [timed(lambda: client.put(DATA, json=BULK)) for _ in range(3)]
    fastest_s = min(elapsed_s for _, elapsed_s in runs)
    assert ({status for status, _ in runs}, fastest_s < BULK_COST_S / 2) == ({202}, True), runs


# Faults


def test_fault_latency_delays_every_api_answer(panda: RunningPanda, client: httpx.Client) -> None:
    """`latency_s` is added before every /api/ answer."""
    panda.set_faults(latency_s=0.3)
    started = time.monotonic()
    answer = client.get(DS)
    assert (answer.status_code, time.monotonic() - started >= 0.3) == (404, True)


def test_fault_error_rate_one_fails_every_row_write_with_pandas_500(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """`error_rate=1` answers every row write 500 (generic body) before writing; reads pass."""
    create(client)
    panda.set_faults(error_rate=1.0)
    writes = [
        bulk(client, row("r1", 1, 2, 3)),
        client.put(f"{DATA}s1/", json={"data": [1, 2, 3]}),
        client.post(DATA, json={"data": [1, 2, 3]}),
        client.delete(f"{DATA}r1/"),
        client.delete(DATA),
    ]
    assert [(answer.status_code, answer.json()) for answer in writes] == [(500, CANNED)] * 5
    assert (client.get(DS).status_code, field(panda, "row_count")) == (200, None)


def test_fault_error_rate_draws_are_seeded_and_replayed_after_reset(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """`error_rate` draws come from the seeded random source, re-seeded by a reset."""

    def statuses() -> list[int]:
        create(client)
        panda.set_faults(error_rate=0.5)
        return [bulk(client, row("r1", 1, 2, 3)).status_code for _ in range(30)]

    first = statuses()
    panda.reset()
    assert (statuses(), set(first)) == (first, {202, 500})


def test_fault_refuse_ids_fails_a_whole_bulk_and_single_writes_with_400(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """`refuse_ids`: a write naming a refused id → 400 PANDA-shaped; a bulk writes nothing."""
    create(client)
    panda.set_faults(refuse_ids=["bad"])
    answers = [
        bulk(client, row("good", 1, 2, 3), row("bad", 1, 2, 3)),
        client.put(f"{DATA}bad/", json={"data": [1, 2, 3]}),
        client.delete(f"{DATA}bad/"),
    ]
    assert [(answer.status_code, answer.json()) for answer in answers] == [(400, BAD_ID)] * 3
    assert bulk(client, row("good", 1, 2, 3)).status_code == 202
    assert panda.rows("ds") == {"good": [1, 2, 3]}


def test_fault_hang_holds_api_requests_until_cleared_while_controls_answer(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """`hang` holds /api/ requests until cleared; the control endpoints keep answering."""
    create(client)
    panda.set_faults(hang=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(client.get, DS)
        wait_until(lambda: held(panda) == 1, what="the request to be held")
        assert not waiting.done()
        panda.clear_faults()
        assert waiting.result(timeout=10).status_code == 200
    assert held(panda) == 0


def test_fault_hang_drops_a_request_whose_client_left(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """A request held by `hang` whose client disconnects is never processed."""
    create(client)
    panda.set_faults(hang=True)
    port = int(panda.url.rsplit(":", 1)[1])
    body = b'{"objects": [{"data": [1, 2, 3], "external_id": "r1"}]}'
    request = (
        f"PUT {DATA} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"PANDA-EMAIL: {panda.email}\r\nPANDA-API-KEY: {panda.api_key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(request)
        wait_until(lambda: held(panda) == 1, what="the write to be held")
    wait_until(lambda: held(panda) == 0, what="the server to notice the client left")
    panda.clear_faults()
    assert (panda.rows("ds"), panda.stats()["writes"]) == ({}, 0)


def test_fault_down_answers_every_api_request_with_nginx_502(
    panda: RunningPanda, client: httpx.Client
) -> None:
    """`down` answers every /api/ request 502 with an nginx HTML page; controls still answer."""
    panda.set_faults(down=True)
    answer = client.get(DS)
    assert (answer.status_code, answer.headers["content-type"]) == (502, "text/html")
    assert "502 Bad Gateway" in answer.text
    assert "nginx" in answer.text


def test_fault_down_with_retry_after_answers_503(panda: RunningPanda, client: httpx.Client) -> None:
    """`down` with `retry_after_s` answers 503 with that Retry-After."""
    panda.set_faults(down=True, retry_after_s=7)
    answer = client.put(DATA, json={"objects": []})
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "7")


def test_faults_keep_unspecified_keys_and_delete_clears_them(
    panda: RunningPanda, anonymous: httpx.Client
) -> None:
    """PUT /_fake/faults changes only the keys given; DELETE clears every fault."""
    panda.set_faults(latency_s=0.01, locked=["ds"])
    panda.set_faults(error_rate=0.25)
    shown = anonymous.get("/_fake/faults").json()
    panda.clear_faults()
    cleared = anonymous.get("/_fake/faults").json()
    assert shown == {
        "latency_s": 0.01,
        "error_rate": 0.25,
        "locked": ["ds"],
        "refuse_ids": [],
        "hang": False,
        "down": False,
        "retry_after_s": None,
    }
    assert cleared == {**shown, "latency_s": 0.0, "error_rate": 0.0, "locked": []}


@pytest.mark.parametrize(
    "faults", [{"latency": 1}, {"error_rate": 2}, {"hang": "yes"}, {"locked": "ds"}]
)
def test_faults_refuse_an_unknown_key_or_a_bad_value_with_400(
    anonymous: httpx.Client, faults: dict[str, Any]
) -> None:
    """A malformed fault setting is refused with 400 and changes nothing."""
    answer = anonymous.put("/_fake/faults", json=faults)
    assert (answer.status_code, "error" in answer.json()) == (400, True)
    assert anonymous.get("/_fake/faults").json()["hang"] is False


def test_stats_count_api_requests_row_writes_and_statuses(
    panda: RunningPanda, client: httpx.Client, anonymous: httpx.Client
) -> None:
    """/_fake/stats counts /api/ requests, row writes answered 2xx, and answers by status."""
    create(client)
    bulk(client, row("r1", 1, 2, 3))
    bulk(client, row("r1", 1, 2))
    client.delete(f"{DATA}r1/")
    anonymous.get(DS)
    assert panda.stats() == {
        "requests": 5,
        "writes": 2,
        "by_status": {"201": 1, "202": 1, "204": 1, "400": 1, "401": 1},
        "held": 0,
        "cost": None,
        "busy_s": 0.0,
    }


def test_reset_clears_datasets_faults_and_stats(
    panda: RunningPanda, client: httpx.Client, anonymous: httpx.Client
) -> None:
    """POST /_fake/reset: no datasets, no faults, zero stats."""
    create(client)
    panda.set_faults(locked=["ds"])
    panda.reset()
    assert (panda.dataset("ds"), panda.stats()["requests"]) == (None, 1)
    assert anonymous.get("/_fake/faults").json()["locked"] == []


def test_start_fake_panda_serves_on_the_port_asked_and_stops_by_pid() -> None:
    """`start_fake_panda` waits until the server answers and stops its process on exit."""
    port = free_port()
    with start_fake_panda(port=port, email="Someone@Example.org", api_key="k") as own:
        with local_client() as http:
            answer = http.get(f"{own.url}/api/1.0/dataset/", headers=own.auth)
        assert (own.url, answer.status_code) == (f"http://127.0.0.1:{port}", 200)
    with local_client() as http, pytest.raises(httpx.ConnectError):
        http.get(f"{own.url}/_fake/stats")
