"""Delivery at the limits' floor (issue 14): request bodies built in DuckDB are the bodies the mapping's Python
makes, packed within Klaviyo's request limits; the limits' quick walk never clears what the exact walk refuses; the
emulator checking bodies in processes of its own gives the same answers as checking them in a thread, and a burst
at the real limits through it meets no 429."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import datetime, timezone

import httpx
import pytest

from test_klaviyo_contract import broken_bodies, valid_bulk_body, SCHEMA_OF
from upstack_pipeline.klaviyo import limits
from upstack_pipeline.klaviyo.client import KlaviyoClient
from upstack_pipeline.klaviyo.delivery import _bodies, _plan_requests, _rows_of, deliver
from upstack_pipeline.klaviyo.mapping import bulk_create_body
from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import Warehouse

KEY = "pk_test_emulator_only_floor"
NOW = datetime(2026, 11, 28, 12, tzinfo=timezone.utc)
BULK = "/api/event-bulk-create-jobs"


def fill(warehouse: Warehouse, rows: int, *, note_bytes=lambda i: 10, profiles: int = 7) -> None:
    """`rows` pending events over `profiles` people; event i carries a note of note_bytes(i) characters."""
    with warehouse.connect() as connection:
        connection.execute("""
            insert into klaviyo_outbox (unique_id, event_id, event_name, metric_name, profile_key, profile, event,
                                        backfill, status, created_at)
            select 'u' || i, 'e' || i, 'AddToCart', 'Added to Cart', 'email:p' || (i % $profiles) || '@gmail.com',
                   json_object('email', 'p' || (i % $profiles) || '@gmail.com', 'first_name', 'Zoë ' || i),
                   json_object('properties', json_object('Note', repeat('n', $notes[i + 1]),
                                                         'Quote', 'a "quoted" ü'),
                               'time', '2026-11-28T11:00:00+00:00', 'value', 1.5, 'unique_id', 'u' || i,
                               'backfill', i % 3 = 0,
                               'metric', json_object('data', json_object('type', 'metric', 'attributes',
                                                                         json_object('name', 'Added to Cart')))),
                   i % 3 = 0, 'pending', $now
            from range($rows) as numbers(i)
        """, {"profiles": profiles, "notes": [note_bytes(i) for i in range(rows)], "now": NOW, "rows": rows})


def planned(tmp_path, rows: int, events_per_request: int, **fill_options) -> list[tuple]:
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    fill(warehouse, rows, **fill_options)
    with warehouse.connect() as connection:
        requests = _plan_requests(connection, events_per_request)
        return [(request, events, backfill, body, _rows_of(connection, request))
                for request, events, backfill, body in _bodies(connection, requests)]


def test_a_body_built_in_sql_is_the_body_the_mapping_builds_for_the_same_rows(tmp_path):
    requests = planned(tmp_path, 95, 20)
    assert [request for request, *_ in requests] == list(range(5))
    assert [events for _, events, *_ in requests] == [20, 20, 20, 20, 15]
    seen = []
    for request, events, backfill, body, rows in requests:
        assert json.loads(body) == bulk_create_body(rows)  # every profile entry, event and value, in order
        assert len(rows) == events and backfill == sum(1 for row in rows if row.event["backfill"])
        seen += [(row.profile_key, row.unique_id) for row in rows]
        assert limits.bulk_violations(json.loads(body), now=NOW) == []
    assert seen == sorted(seen) and len(set(seen)) == 95  # consecutive in (profile, event) order, each row once


def test_requests_of_large_events_stay_under_five_megabytes_and_a_thousand_events(tmp_path):
    # 90 KB notes on every third event: 1,000 such rows would be 30 MB, far past Klaviyo's 5 MB.
    requests = planned(tmp_path, 1500, 1000, note_bytes=lambda i: 90_000 if i % 3 == 0 else 200)
    assert sum(events for _, events, *_ in requests) == 1500
    for _, events, _, body, rows in requests:
        assert events <= limits.MAX_EVENTS_PER_BULK_REQUEST
        assert len(body) <= limits.MAX_BULK_REQUEST_BYTES
        assert limits.bulk_violations(json.loads(body), now=NOW) == []
    # Packing by weight costs few requests over a row-by-row packer's: 500 large notes need at least 9 requests.
    assert 9 <= len(requests) <= 12


@pytest.mark.parametrize("value, problem", [
    ("a" * limits.MAX_STRING_BYTES, None),  # exactly 100 KB of ASCII: within
    ("a" * (limits.MAX_STRING_BYTES + 1), "string at properties.Note is 102,401 bytes"),
    ("€" * (limits.MAX_STRING_BYTES // 4 + 1), None),  # 25,601 characters, 76,803 bytes: within
    ("😀" * (limits.MAX_STRING_BYTES // 4 + 1), "string at properties.Note is 102,404 bytes"),
    ({"deep": [{"$price": 1}]}, "key properties.Note.deep[0].$price starts with '$'"),
    ([1.0, float("nan")], "number at properties.Note[1] is nan"),
    ([{"x": float("-inf")}], "number at properties.Note[0].x is -inf"),
])
def test_the_quick_walk_leaves_every_string_key_and_number_limit_to_the_exact_one(value, problem):
    body = valid_bulk_body()
    event = body["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]["events"]["data"][0]
    event["attributes"]["properties"]["Note"] = value
    found = [message for message in limits.bulk_violations(body, now=NOW) if "properties.Note" in message]
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0]


def answers(emulator: KlaviyoEmulator, bodies: list[bytes]) -> list[tuple[int, list]]:
    with httpx.Client(base_url=emulator.base_url, headers={
            "Authorization": f"Klaviyo-API-Key {KEY}", "revision": "2026-10-15",
            "Content-Type": "application/vnd.api+json"}) as client:
        replies = [client.post(BULK, content=body) for body in bodies]
    return [(reply.status_code, sorted((error["detail"], error["source"]["pointer"])
                                       for error in (reply.json() if reply.content else {}).get("errors", [])))
            for reply in replies]


def test_checking_in_processes_answers_as_checking_in_a_thread():
    bulk_cases = [body for name, body in broken_bodies().items() if SCHEMA_OF[name] == "EventsBulkCreateJob"]
    bodies = [limits.encode_body(body) for body in [valid_bulk_body(), *bulk_cases]]
    bodies += [b"{not json", b'{"data": []}', limits.encode_body(valid_bulk_body())]  # the last one: a duplicate
    with KlaviyoEmulator(api_key=KEY, rate_limits=None) as in_thread:
        expected = answers(in_thread, bodies)
        expected_requests = [(entry["status"], entry["events"]) for entry in in_thread.requests()]
        expected_events = in_thread.accepted_events()
    with KlaviyoEmulator(api_key=KEY, rate_limits=None, check_processes=2) as in_processes:
        assert answers(in_processes, bodies) == expected
        assert [(entry["status"], entry["events"]) for entry in in_processes.requests()] == expected_requests
        assert in_processes.accepted_events() == expected_events and in_processes.duplicate_events == 3
    assert [status for status, _ in expected] == [202, 400, 400, 400, 400, 400, 202]
    assert len(expected_events) == 3


@pytest.mark.slow  # the emulator's command and its check processes, seconds of real time
def test_a_burst_through_the_emulators_command_with_its_check_processes_meets_no_429(tmp_path):
    """Klaviyo's real limits, 40 requests of 100 events: four bursts of ten, nothing refused, nothing twice. The
    emulator in a process of its own, as the benchmarks run it (and as Klaviyo is): in this one its event loop would
    take turns with the client's threads for the GIL."""
    settings = Settings(landing_dir=tmp_path, warehouse_path=tmp_path / "warehouse.duckdb", klaviyo_api_key=KEY)
    fill(settings.warehouse(), 4000, profiles=500)
    emulator = subprocess.Popen(
        [sys.executable, "-m", "upstack_pipeline.sandbox.klaviyo_emulator", "--port", "0", "--api-key", KEY,
         "--check-processes", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = emulator.stdout.readline().strip()
        with KlaviyoClient(base_url, KEY) as client:
            run = deliver(settings, now=NOW, client=client, events_per_request=100)
    finally:
        emulator.send_signal(signal.SIGTERM)
        summary = emulator.communicate(timeout=60)[1]
    assert [attempt.status for attempt in run.attempts] == [202] * 40  # real limits on, and not one 429
    assert "accepted 4,000 events (0 duplicates ignored) in 40 requests" in summary
    assert run.delivered == 4000 and run.delivered_backfill == 1334
    with settings.warehouse().connect() as connection:
        assert connection.execute("select status, count(*), count(distinct request_id) from klaviyo_outbox "
                                  "group by status").fetchall() == [("delivered", 4000, 40)]


def test_a_row_of_a_few_megabytes_among_small_ones_leaves_no_request_unsent(tmp_path):
    # A row past the budget (5 MB less the envelope and the largest row) weighs more than one request's span: the
    # requests after it must still be numbered 0, 1, 2, ... or delivery's fetch of them stops short.
    requests = planned(tmp_path, 3000, 1000, note_bytes=lambda i: 3_000_000 if i == 1500 else 200)
    assert [request for request, *_ in requests] == list(range(len(requests)))
    assert sum(events for _, events, *_ in requests) == 3000
    assert sorted(row.unique_id for *_, rows in requests for row in rows) == sorted(f"u{i}" for i in range(3000))
    for _, events, _, body, _ in requests:
        assert events <= limits.MAX_EVENTS_PER_BULK_REQUEST and len(body) <= limits.MAX_BULK_REQUEST_BYTES
