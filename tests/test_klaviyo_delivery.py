"""Delivery against the project's Klaviyo emulator: a real HTTP server on 127.0.0.1 that validates like Klaviyo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import query
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.klaviyo.client import KlaviyoClient
from upstack_pipeline.klaviyo.delivery import deliver
from upstack_pipeline.sandbox.klaviyo_emulator import Faults, KlaviyoEmulator
from upstack_pipeline.klaviyo.mapping import map_events
from upstack_pipeline.sandbox.simulate import simulate
from upstack_pipeline.settings import Settings

KEY = "pk_test_emulator_only_0123456789"
END = datetime(2026, 11, 28, tzinfo=timezone.utc)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mapped_once(tmp_path_factory) -> Settings:
    """Two weeks of simulated traffic mapped in send mode 'all', so the outbox holds a thousand events or so."""
    root = tmp_path_factory.mktemp("outbox")
    simulate(root / "sim", visitors=700, days=14, seed=5, end=END)
    plain = Settings(landing_dir=root / "sim", warehouse_path=root / "warehouse.duckdb")
    mapped = replace(plain, klaviyo_api_key=KEY, destination=replace(plain.destination, send_mode="all"))
    ingest_customers(mapped, now=END)
    ingest_events(mapped, now=END)
    resolve_identities(mapped, now=END)
    map_events(mapped, now=END)
    return mapped


@pytest.fixture
def outbox_settings(mapped_once, tmp_path):
    """The mapped warehouse, built once for the module; each test delivers from its own copy of it."""
    assert not Path(f"{mapped_once.warehouse_path}.wal").exists()  # closed and checkpointed: the file is all of it
    warehouse = shutil.copy(mapped_once.warehouse_path, tmp_path / "warehouse.duckdb")
    return replace(mapped_once, warehouse_path=Path(warehouse))


def outbox_size(settings) -> int:
    return query(settings, "select count(*) from klaviyo_outbox")[0][0]


def client_for(emulator, **options) -> KlaviyoClient:
    return KlaviyoClient(emulator.base_url, KEY, backoff_seconds=0.01, **options)


def test_every_outbox_row_arrives_once_and_each_request_is_recorded_without_the_key(outbox_settings):
    with KlaviyoEmulator(api_key=KEY, rate_limits=None) as emulator:
        run = deliver(outbox_settings, now=END, client=client_for(emulator), events_per_request=200)

    expected = outbox_size(outbox_settings)
    assert expected > 500
    assert (run.delivered, run.dead_lettered, run.left_pending) == (expected, 0, 0)
    assert len(emulator.accepted_events()) == expected and emulator.duplicate_events == 0
    assert query(outbox_settings, "select distinct status from klaviyo_outbox") == [("delivered",)]
    statuses = query(outbox_settings, "select status, count(*), sum(events) from klaviyo_deliveries group by 1")
    assert statuses == [(202, run.requests, expected)]
    # Every request has its own id, and every row names the one that delivered it.
    assert query(outbox_settings, "select count(distinct request_id), count(request_id) from klaviyo_deliveries") == [
        (run.requests, run.requests)]
    assert query(outbox_settings, "select count(*) from klaviyo_outbox where request_id in "
                                  "(select request_id from klaviyo_deliveries where status = 202)") == [(expected,)]
    dump = json.dumps(query(outbox_settings, "select * from klaviyo_deliveries"), default=str)
    assert KEY not in dump and KEY not in json.dumps(emulator.requests(), default=str)


@pytest.mark.slow  # hundreds of requests through faults and retries
def test_through_5xx_dropped_connections_and_429s_every_row_arrives_exactly_once(outbox_settings):
    faults = Faults(server_error_rate=0.05, drop_after_processing_rate=0.05, force_429_every=9, seed=1)
    with KlaviyoEmulator(api_key=KEY, rate_limits=None, faults=faults) as emulator:
        run = deliver(outbox_settings, now=END, client=client_for(emulator), events_per_request=20)

    expected = outbox_size(outbox_settings)
    assert run.dead_lettered == 0 and run.left_pending == 0 and run.delivered == expected
    assert len(emulator.accepted_events()) == expected  # dropped answers were resent; dedupe kept one copy
    injected = {request["fault"] for request in emulator.requests()}
    assert {"server_error", "dropped", "forced_429"} <= injected  # each kind of fault really happened
    statuses = {status for (status,) in query(outbox_settings, "select distinct status from klaviyo_deliveries")}
    assert {202, 429, 503, None} <= statuses  # None: the connection dropped before an answer
    # A request's retries share its id: each request is its faults, then one 202 that settled its rows.
    requests = query(outbox_settings, "select list(status order by sent_at) from klaviyo_deliveries "
                                      "group by request_id")
    assert len(requests) < run.requests and any(len(statuses) > 1 for (statuses,) in requests)
    assert all(statuses[-1] == 202 and all(status in (None, 429, 503) for status in statuses[:-1])
               for (statuses,) in requests)
    assert query(outbox_settings, "select count(*) from klaviyo_outbox where request_id in "
                                  "(select request_id from klaviyo_deliveries where status = 202)") == [(expected,)]


def test_a_400_names_one_event_and_only_that_event_is_dead_lettered(outbox_settings):
    [(victim,)] = query(outbox_settings, "select unique_id from klaviyo_outbox order by unique_id limit 1 offset 7")
    with KlaviyoEmulator(api_key=KEY, rate_limits=None) as emulator:
        emulator.reject_unique_ids({victim})
        run = deliver(outbox_settings, now=END, client=client_for(emulator), events_per_request=100)

    expected = outbox_size(outbox_settings)
    assert (run.delivered, run.dead_lettered) == (expected - 1, 1)
    assert query(outbox_settings, "select unique_id, status from klaviyo_dead_letters") == [(victim, 400)]
    assert query(outbox_settings, "select status from klaviyo_outbox where unique_id = ?", [victim]) == [
        ("dead_letter",)]
    # The victim names the request Klaviyo refused it in, with its answer; the others the ones that delivered them.
    assert query(outbox_settings, "select outbox.status, deliveries.status, deliveries.error like '%' || unique_id "
                                  "|| '%', count(*) from klaviyo_outbox as outbox join klaviyo_deliveries as "
                                  "deliveries using (request_id) group by all order by all") == [
        ("dead_letter", 400, True, 1), ("delivered", 202, None, expected - 1)]


def test_a_bad_key_stops_delivery_with_what_to_do_and_leaves_the_outbox_pending(outbox_settings):
    with KlaviyoEmulator(api_key="pk_the_real_one_000000000000") as emulator:
        run = deliver(outbox_settings, now=END, client=client_for(emulator))

    assert run.stopped.startswith("Klaviyo rejected the API key") and "KLAVIYO_API_KEY" in run.stopped
    assert (run.delivered, run.left_pending) == (0, outbox_size(outbox_settings))
    assert query(outbox_settings, "select distinct status from klaviyo_outbox") == [("pending",)]
    assert query(outbox_settings, "select distinct status from klaviyo_deliveries") == [(401,)]


@pytest.mark.slow  # waits through the connection retries
def test_an_unreachable_klaviyo_stops_delivery_soon_says_where_it_looked_and_loses_nothing(outbox_settings):
    with KlaviyoEmulator(api_key=KEY) as emulator:
        closed_port_url = emulator.base_url  # nothing listens there once the emulator has stopped
    started = time.monotonic()
    run = deliver(outbox_settings, now=END, client=KlaviyoClient(closed_port_url, KEY))
    seconds = time.monotonic() - started

    assert run.stopped.startswith(f"Could not reach Klaviyo at {closed_port_url}") and "KLAVIYO_BASE_URL" in run.stopped
    assert "ConnectError" in run.stopped
    # A refused connection is given up after a few quick attempts, not the minute of backoff a 5xx gets.
    assert seconds < 15
    assert (run.delivered, run.left_pending) == (0, outbox_size(outbox_settings))
    assert query(outbox_settings, "select distinct status from klaviyo_outbox") == [("pending",)]
    statuses, errors = query(outbox_settings, "select count(status), count(error) from klaviyo_deliveries")[0]
    assert statuses == 0 and errors >= 3  # every attempt recorded, none answered


def test_an_address_that_is_not_klaviyos_api_stops_delivery_instead_of_dead_lettering_the_outbox(outbox_settings):
    with KlaviyoEmulator(api_key=KEY) as emulator:  # a path after the host: every endpoint answers 404
        run = deliver(outbox_settings, now=END, client=KlaviyoClient(f"{emulator.base_url}/proxy", KEY))

    assert run.stopped.startswith(f"{emulator.base_url}/proxy does not answer as Klaviyo's API does")
    assert "HTTP 404" in run.stopped and "KLAVIYO_BASE_URL" in run.stopped
    assert query(outbox_settings, "select distinct status from klaviyo_outbox") == [("pending",)]
    assert query(outbox_settings, "select count(*) from klaviyo_dead_letters") == [(0,)]


@pytest.mark.slow  # waits through the connection retries
def test_with_nothing_to_send_one_harmless_request_still_tells_whether_klaviyo_can_be_reached(outbox_settings):
    with KlaviyoEmulator(api_key=KEY) as emulator:
        deliver(outbox_settings, now=END, client=client_for(emulator))
        quiet = deliver(outbox_settings, now=END, client=client_for(emulator))
        probes = [request["path"] for request in emulator.requests()][-1:]
    unreachable = deliver(outbox_settings, now=END, client=KlaviyoClient(emulator.base_url, KEY))

    assert (quiet.stopped, quiet.requests, quiet.delivered, probes) == (None, 1, 0, ["/api/events"])
    assert unreachable.stopped.startswith("Could not reach Klaviyo")
    assert query(outbox_settings, "select count(*) from klaviyo_outbox where status <> 'delivered'") == [(0,)]


@pytest.mark.slow  # waits through the retries of every request in flight
@pytest.mark.parametrize("emulator_options, says", [
    ({"faults": Faults(server_error_rate=1.0)}, "answered HTTP 503"),
    ({"newest_revision": "2026-07-15"}, "Klaviyo refused API revision 2026-10-15"),
])
def test_a_klaviyo_that_refuses_every_request_stops_delivery_with_the_cause(outbox_settings, emulator_options, says):
    with KlaviyoEmulator(api_key=KEY, **emulator_options) as emulator:
        run = deliver(outbox_settings, now=END, client=client_for(emulator))
        requests = len(emulator.requests())

    assert says in run.stopped
    assert requests <= 4 * 8  # it stopped: at most the requests in flight, each through its retries
    assert query(outbox_settings, "select distinct status from klaviyo_outbox") == [("pending",)]
    assert query(outbox_settings, "select count(*) from klaviyo_dead_letters") == [(0,)]


@pytest.mark.slow  # delivers in a process of its own
def test_a_delivery_killed_mid_flight_then_rerun_loses_nothing_and_duplicates_nothing(outbox_settings):
    expected = outbox_size(outbox_settings)
    script = (
        "from datetime import datetime, timezone;"
        "from upstack_pipeline.settings import Settings; from upstack_pipeline.klaviyo.delivery import deliver;"
        "deliver(Settings.from_env(), now=datetime(2026, 11, 28, tzinfo=timezone.utc), events_per_request=25)"
    )
    faults = Faults(drop_after_processing_rate=0.1, seed=2)  # some requests arrive but their answer is lost
    with KlaviyoEmulator(api_key=KEY, rate_limits=None, faults=faults) as emulator:
        # The test hook (upstack_pipeline/faults.py): SIGKILL right after the third request is settled, while
        # the next ones are in flight (four at a time).
        env = {**os.environ, "UPSTACK_WAREHOUSE": str(outbox_settings.warehouse_path), "KLAVIYO_API_KEY": KEY,
               "KLAVIYO_BASE_URL": emulator.base_url, "UPSTACK_TEST_STOP_AFTER": "delivery-request:3"}
        killed = subprocess.run([sys.executable, "-c", script], env=env, cwd=PROJECT_ROOT, timeout=300)
        arrived_before_rerun = len(emulator.accepted_events())

        assert killed.returncode == -signal.SIGKILL
        # Exactly three requests of 25 settled; the rest stay claimed, some of them already at Klaviyo.
        assert query(outbox_settings, "select status, count(*) from klaviyo_outbox group by 1 order by 1") == [
            ("claimed", expected - 75), ("delivered", 75)]
        assert 75 <= arrived_before_rerun < expected

        rerun = deliver(outbox_settings, now=END, client=client_for(emulator), events_per_request=25)

        assert rerun.delivered == expected - 75  # the claimed rows again (some had arrived), not the settled ones
        assert len(emulator.accepted_events()) == expected  # nothing lost, and Klaviyo's dedupe kept one copy
    assert query(outbox_settings, "select distinct status from klaviyo_outbox") == [("delivered",)]


def test_with_a_list_the_delivered_people_are_imported_into_it(outbox_settings):
    with_list = replace(outbox_settings, destination=replace(outbox_settings.destination, list_id="LsT42"))
    with KlaviyoEmulator(api_key=KEY, rate_limits=None) as emulator:
        run = deliver(with_list, now=END, client=client_for(emulator))
        imported = emulator.accepted_profiles()

    people = query(outbox_settings, "select count(distinct profile_key) from klaviyo_outbox")[0][0]
    assert len(imported) == people and run.profile_import_errors == []
    assert all(profile["lists"] == ["LsT42"] for profile in imported)
    # The import job's requests (create, poll, errors) are recorded too, each with an id of its own.
    imports = query(with_list, "select count(*), count(distinct request_id) from klaviyo_deliveries "
                               "where endpoint like '/api/profile-bulk-import-jobs%'")
    assert imports[0][0] >= 3 and imports[0][0] == imports[0][1]
