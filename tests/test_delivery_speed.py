"""Delivery spends Klaviyo's whole allowance (issue 14): the pacer's burst and ceilings, the emulator's cheaper
validation (the same verdicts as the SDK's own parsing), and bursts at the real limits against the real emulator
with no 429, also through a network that stalls."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pydantic
import pytest

from stalling_network import StallingNetwork
from klaviyo_contract import _dropped_keys
from test_klaviyo_contract import (broken_bodies, only_event, valid_bulk_body, valid_profile_import_body,
                                   valid_single_body, SCHEMA_OF)
from upstack_pipeline.klaviyo.client import KlaviyoClient, RatePacer, allowance_seconds
from upstack_pipeline.klaviyo.delivery import deliver
from upstack_pipeline.sandbox.klaviyo_emulator import ApiError, KlaviyoEmulator, _validate_with_sdk, sdk_models
from upstack_pipeline.settings import Settings
from upstack_pipeline.warehouse import Warehouse

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KEY = "pk_test_emulator_only_speed"


class SimulatedTime:
    """A clock that moves only when the pacer sleeps."""

    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_pacer_spends_the_burst_then_holds_the_steady_rate_and_never_exceeds_either_limit():
    time = SimulatedTime()
    pacer = RatePacer(10, 150, clock=time.clock, sleep=time.sleep)
    sends = []
    for _ in range(400):
        pacer.answered(pacer.wait_turn())  # answered at once: the pace is the limits' alone
        sends.append(time.now)

    assert sends[:10] == [0.0] * 10  # a second's allowance leaves at once
    for start in sends:  # any second and any minute, starting anywhere
        assert sum(1 for moment in sends if start <= moment < start + 1) <= 10
        assert sum(1 for moment in sends if start <= moment < start + 60) <= 150
    # The first minute's 150 in about 15 seconds, the next 150 as soon as that minute is over, and so on.
    assert sends[149] <= 1.1 * allowance_seconds(150)
    assert 60 <= sends[150] <= 61 and 120 <= sends[300] <= 122
    assert sends[399] <= 1.1 * allowance_seconds(400)


def test_a_blocked_pacer_waits_out_the_block_for_every_sender():
    time = SimulatedTime()
    pacer = RatePacer(10, 150, clock=time.clock, sleep=time.sleep)
    pacer.block_for(2.5)
    pacer.wait_turn()
    assert time.now == pytest.approx(2.5)


def test_the_floor_is_the_first_150_requests_at_10_a_second_then_150_a_minute():
    assert allowance_seconds(1) == pytest.approx(0.1)
    assert allowance_seconds(83) == pytest.approx(8.3)
    assert allowance_seconds(150) == pytest.approx(15.0)
    assert allowance_seconds(151) == pytest.approx(60.1)
    assert allowance_seconds(450) == pytest.approx(135.0)


def test_a_request_counts_until_a_second_after_its_answer_came():
    """Klaviyo may have counted a request as late as its answer came: the next second's burst waits for that."""
    time = SimulatedTime()
    pacer = RatePacer(10, 150, clock=time.clock, sleep=time.sleep)
    trips = [pacer.wait_turn() for _ in range(10)]
    time.now = 0.4  # the answers took 0.4 s
    for trip in trips:
        pacer.answered(trip)
    pacer.answered(pacer.wait_turn())
    assert time.now == pytest.approx(1.4)


# --- the emulator's one-pass validation gives the SDK's verdicts ------------------------------------------------

def sdk_accepts(model_name: str, body: dict) -> bool:
    """The SDK's own reading: `from_dict` accepts the body and `to_dict` keeps every key that is not null."""
    try:
        parsed = sdk_models()[model_name].from_dict(copy.deepcopy(body))
    except (pydantic.ValidationError, KeyError, TypeError, AttributeError):
        return False
    return not [path for path in _dropped_keys(body, parsed.to_dict(), "") if _at(body, path) is not None]


def _at(body, path: str):
    node = body
    for part in path.replace("[", ".").replace("]", "").split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def emulator_accepts(model_name: str, body: dict) -> bool:
    try:
        _validate_with_sdk(model_name, body)
    except ApiError as error:
        assert error.status == 400 and error.errors[0]["source"]["pointer"].startswith("/")
        return False
    return True


def variants() -> list[tuple[str, str, dict]]:
    """(name, model, body): valid bodies, the contract tests' broken ones, and what the SDK drops or reads oddly."""
    cases = [("valid bulk", "EventsBulkCreateJob", valid_bulk_body()),
             ("valid single", "EventCreateQueryV2", valid_single_body()),
             ("valid import", "ProfileImportJobCreateQuery", valid_profile_import_body())]
    cases += [(name, SCHEMA_OF[name], body) for name, body in broken_bodies().items()]

    def bulk_with(change) -> dict:
        body = valid_bulk_body()
        change(*only_event(body))
        return body

    cases += [
        ("misspelt key", "EventsBulkCreateJob", bulk_with(lambda event, profile: event.update({"unique-id": "x"}))),
        ("unknown key, null", "EventsBulkCreateJob", bulk_with(lambda event, profile: event.update(extra=None))),
        ("kx for _kx", "EventsBulkCreateJob", bulk_with(lambda event, profile: profile.update(kx="token"))),
        ("int value", "EventsBulkCreateJob", bulk_with(lambda event, profile: event.update(value=24))),
        ("bool value", "EventsBulkCreateJob", bulk_with(lambda event, profile: event.update(value=True))),
        ("time not a time", "EventsBulkCreateJob", bulk_with(lambda event, profile: event.update(time="soon"))),
        ("number as email", "EventsBulkCreateJob", bulk_with(lambda event, profile: profile.update(email=5))),
        ("unknown location key", "EventsBulkCreateJob",
         bulk_with(lambda event, profile: profile["location"].update(street="1 Main St"))),
        ("unknown key in properties", "EventsBulkCreateJob",
         bulk_with(lambda event, profile: event["properties"].update(anything={"goes": None}))),
        ("metric name missing", "EventsBulkCreateJob",
         bulk_with(lambda event, profile: event["metric"]["data"]["attributes"].pop("name"))),
        ("null backfill", "EventsBulkCreateJob", bulk_with(lambda event, profile: event.update(backfill=None))),
    ]
    anonymous_import = valid_profile_import_body()
    anonymous_import["data"]["attributes"]["profiles"]["data"][0]["attributes"]["anonymous_id"] = "anon-1"
    cases.append(("anonymous_id on an import", "ProfileImportJobCreateQuery", anonymous_import))
    return cases


@pytest.mark.parametrize("name, model_name, body", variants(), ids=[case[0] for case in variants()])
def test_the_emulator_accepts_exactly_what_the_sdk_reads_whole(name, model_name, body):
    assert emulator_accepts(model_name, body) == sdk_accepts(model_name, body)


def test_the_emulator_names_the_key_the_sdk_would_drop():
    body = valid_bulk_body()
    only_event(body)[0]["unique-id"] = "typo"
    with pytest.raises(ApiError) as refused:
        _validate_with_sdk("EventsBulkCreateJob", body)
    assert [(error["detail"], error["source"]["pointer"]) for error in refused.value.errors] == [
        ("'unique-id' is not a valid field here (EventsBulkCreateJob)",
         "/data/attributes/events-bulk-create/data/0/attributes/events/data/0/attributes/unique-id")]


def test_where_the_sdk_would_read_an_empty_string_as_an_empty_list_the_emulator_refuses():
    body = valid_profile_import_body()
    body["data"]["relationships"]["lists"]["data"] = ""
    assert sdk_accepts("ProfileImportJobCreateQuery", body)  # from_dict iterates the string: no lists
    assert not emulator_accepts("ProfileImportJobCreateQuery", body)  # Klaviyo's schema says an array


# --- a burst at the real limits ---------------------------------------------------------------------------------

def bench_delivery():
    spec = importlib.util.spec_from_file_location("bench_delivery", PROJECT_ROOT / "bench" / "delivery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_burst_at_klaviyos_real_limits_goes_at_the_allowed_pace_and_meets_no_429(tmp_path):
    now = datetime.now(timezone.utc)
    settings = Settings(landing_dir=tmp_path, warehouse_path=tmp_path / "warehouse.duckdb", klaviyo_api_key=KEY)
    bench_delivery().fill_outbox(Warehouse(settings.warehouse_path), 250, now)
    with KlaviyoEmulator(api_key=KEY) as emulator:  # Klaviyo's limits, 10/s and 150/min
        with KlaviyoClient(emulator.base_url, KEY) as client:
            run = deliver(settings, now=now, client=client, events_per_request=10)

    received = emulator.requests()
    assert run.delivered == 250 and len(received) == run.requests == 25
    assert [request["status"] for request in received] == [202] * 25  # real limits on, and not one 429
    arrivals = sorted(request["at"] for request in received)
    assert arrivals[9] - arrivals[0] < 1  # the first second's ten went in the first second
    span = arrivals[-1] - arrivals[0]
    assert 2.0 <= span <= 1.5 * allowance_seconds(25)  # the limits' pace: not faster, not much slower


@pytest.mark.slow  # waits out Klaviyo's one-second windows and the stall in real time
def test_a_network_stall_that_delays_a_burst_does_not_bring_the_next_into_its_window(tmp_path):
    """Klaviyo counts a request when it arrives, which its sender cannot see. A pacer counting departures (with a
    0.1 s margin) met 429s here: the stall holds the second second's burst until 1.6 s, so Klaviyo's window runs
    from 1.6 s, and a third burst sent 1.1 s after the second arrived inside it."""
    now = datetime.now(timezone.utc)
    settings = Settings(landing_dir=tmp_path, warehouse_path=tmp_path / "warehouse.duckdb", klaviyo_api_key=KEY)
    bench_delivery().fill_outbox(Warehouse(settings.warehouse_path), 400, now)
    with KlaviyoEmulator(api_key=KEY) as emulator, StallingNetwork(emulator.port, stall=(0.5, 1.6)) as network:
        with KlaviyoClient(network.base_url, KEY) as client:
            run = deliver(settings, now=now, client=client, events_per_request=10)

    assert network.held > 0  # the stall did hold requests back
    received = emulator.requests()
    assert run.delivered == 400 and len(received) == run.requests == 40
    assert [request["status"] for request in received] == [202] * 40
    arrivals = sorted(request["at"] for request in received)
    assert arrivals[-1] - arrivals[0] <= 1.5 * allowance_seconds(40) + 0.6  # the stall's cost, not more


@pytest.mark.slow  # two processes: the bench and its emulator
def test_the_delivery_bench_measures_the_pacer_at_slow_answers():
    """Every answer 0.4 s late: the next second's burst leaves a second after the first's answers, so 15 requests
    (two bursts) take at least 1.8 s from the first request to the last answer (counting departures, 1.5 s), and
    meet no 429."""
    completed = subprocess.run([sys.executable, "bench/delivery.py", "--events", "15000", "--answer-seconds", "0.4"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    last = completed.stdout.strip().splitlines()[-1]
    seconds = float(last.split(" requests in ")[1].split(" s;")[0])
    assert last.startswith("15 requests in ") and 1.75 <= seconds <= 4 and last.endswith("; 0 answered 429")


@pytest.mark.slow  # two processes: the bench and its emulator
def test_the_delivery_bench_reports_the_run_against_the_limits_floor():
    completed = subprocess.run([sys.executable, "bench/delivery.py", "--events", "5000"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    last = completed.stdout.strip().splitlines()[-1]
    assert last.startswith("5 requests in ") and "; the floor is 0.5 s: " in last
    assert last.endswith("; 0 answered 429")
