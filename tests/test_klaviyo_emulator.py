"""The Klaviyo emulator over real HTTP on 127.0.0.1: what it accepts, refuses, limits and breaks, as Klaviyo would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

import klaviyo_contract
from upstack_pipeline.sandbox.klaviyo_emulator import Faults, KlaviyoEmulator, RateLimits
from upstack_pipeline.klaviyo.mapping import OutboxRow, bulk_create_body, event_create_body, profile_import_body

KEY = "pk_emulator_test_key_0123456789abcdef"
REVISION = "2026-10-15"
HEADERS = {"Authorization": f"Klaviyo-API-Key {KEY}", "revision": REVISION, "Accept": "application/vnd.api+json"}
BULK = "/api/event-bulk-create-jobs"
IMPORTS = "/api/profile-bulk-import-jobs"
EVENT_POINTER = "/data/attributes/events-bulk-create/data/{i}/attributes/events/data/{j}/attributes"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def event(unique_id: str, metric: str, minutes_ago: int, **properties) -> dict:
    return {"properties": properties or {"ProductName": "Mug", "ProductID": "p1"},
            "time": (datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)).isoformat(timespec="seconds"),
            "value": 24.0, "value_currency": "USD", "unique_id": unique_id,
            "metric": {"data": {"type": "metric", "attributes": {"name": metric}}}}


JANE = {"email": "jane@gmail.com", "first_name": "Jane", "properties": {"upstack_id": "u-1"}}
SAM = {"_kx": "kx-sam-123", "properties": {"upstack_id": "u-2"}}
CART, CHECKOUT = "Added to Cart from Upstack", "Started Checkout from Upstack"


def rows() -> list[OutboxRow]:
    """Two shoppers, three events, two metrics: what the outbox holds after mapping."""
    return [
        OutboxRow("evt-1", "email:jane@gmail.com", JANE, event("evt-1", CART, 30, CartValue=24.0, Items=[])),
        OutboxRow("evt-2", "_kx:kx-sam-123", SAM, event("evt-2", CART, 20, CartValue=12.0, Items=[])),
        OutboxRow("evt-3", "email:jane@gmail.com", JANE, event("evt-3", CHECKOUT, 10, CartValue=24.0, Items=[])),
    ]


@pytest.fixture
def emulator():
    with KlaviyoEmulator(api_key=KEY, rate_limits=None) as running:
        yield running


def http(emulator: KlaviyoEmulator, **headers) -> httpx.Client:
    merged = {**HEADERS, **headers}
    return httpx.Client(base_url=emulator.base_url, headers={k: v for k, v in merged.items() if v is not None},
                        timeout=10)


def only_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/vnd.api+json"
    [error] = response.json()["errors"]
    assert {"id", "status", "code", "title", "detail", "source"} <= set(error)
    assert error["status"] == response.status_code
    return error


def test_a_valid_bulk_body_is_accepted_and_read_back_per_metric(emulator):
    body = bulk_create_body(rows())
    with http(emulator) as client:
        response = client.post(BULK, json=body)

    assert response.status_code == 202 and response.content == b""
    assert emulator.accepted_by_metric() == {CART: 2, CHECKOUT: 1}
    accepted = {event["unique_id"]: event for event in emulator.accepted_events()}
    assert set(accepted) == {"evt-1", "evt-2", "evt-3"}
    assert accepted["evt-3"]["profile"] == JANE and accepted["evt-3"]["metric"] == CHECKOUT
    assert accepted["evt-2"]["profile"] == SAM
    sent = {row.unique_id: row.event for row in rows()}
    assert {k: v for k, v in accepted["evt-1"]["attributes"].items() if k != "time"} == {
        k: v for k, v in sent["evt-1"].items() if k != "time"}
    assert emulator.duplicate_events == 0
    [logged] = emulator.requests()
    assert (logged["method"], logged["path"], logged["status"], logged["events"]) == ("POST", BULK, 202, 3)


def test_the_same_events_again_are_counted_as_duplicates_and_not_stored_twice(emulator):
    body = bulk_create_body(rows())
    with http(emulator) as client:
        assert client.post(BULK, json=body).status_code == 202
        assert client.post(BULK, json=body).status_code == 202  # a client's retry after a lost answer
        # Create Event with one of them: same profile, metric and unique_id, so the same event.
        assert client.post("/api/events", json=event_create_body(rows()[1])).status_code == 202

    assert emulator.duplicate_events == 4
    assert len(emulator.accepted_events()) == 3
    assert emulator.accepted_by_metric() == {CART: 2, CHECKOUT: 1}


def test_an_event_without_unique_id_is_deduplicated_on_its_time_to_the_second(emulator):
    attributes = event("unused", CART, 5)
    del attributes["unique_id"]
    row = OutboxRow("x", "email:jane@gmail.com", JANE, attributes)
    with http(emulator) as client:
        assert client.post("/api/events", json=event_create_body(row)).status_code == 202
        assert client.post("/api/events", json=event_create_body(row)).status_code == 202
    assert (len(emulator.accepted_events()), emulator.duplicate_events) == (1, 1)


@pytest.mark.parametrize("authorization", [None, "Klaviyo-API-Key pk_wrong", f"Bearer {KEY}", KEY])
def test_a_missing_or_wrong_key_is_401_and_nothing_is_stored(emulator, authorization):
    with http(emulator, Authorization=authorization) as client:
        response = client.post(BULK, json=bulk_create_body(rows()))
    assert response.status_code == 401
    assert only_error(response)["code"] == "not_authenticated"
    assert emulator.accepted_events() == []


def test_a_key_without_the_endpoints_scope_is_403():
    with KlaviyoEmulator(api_key=KEY, scopes=frozenset({"profiles:write"}), rate_limits=None) as emulator:
        with http(emulator) as client:
            events = client.post(BULK, json=bulk_create_body(rows()))
            probe = client.post("/api/events", json={})  # scopes are checked before the body
            to_list = client.post(IMPORTS, json=profile_import_body([JANE], "LIST1"))
            no_list = client.post(IMPORTS, json=profile_import_body([JANE], None))
            accounts = client.get("/api/accounts")
            job = client.get(f"{IMPORTS}/{no_list.json()['data']['id']}")  # profiles:write grants profiles:read
    assert [events.status_code, probe.status_code, to_list.status_code, accounts.status_code] == [403] * 4
    assert "events:write" in only_error(events)["detail"] and only_error(events)["code"] == "permission_denied"
    assert "lists:write" in only_error(to_list)["detail"]
    assert "accounts:read" in only_error(accounts)["detail"]
    assert (no_list.status_code, job.status_code) == (202, 200)
    assert emulator.accepted_events() == []


def test_a_missing_revision_header_is_400(emulator):
    with http(emulator, revision=None) as client:
        response = client.post(BULK, json=bulk_create_body(rows()))
    assert response.status_code == 400
    error = only_error(response)
    assert "revision" in error["detail"] and error["source"]["parameter"] == "revision"
    assert emulator.accepted_events() == []


def test_a_body_the_sdk_model_refuses_is_400_pointing_at_the_field(emulator):
    body = bulk_create_body(rows())
    body["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]["events"]["data"][1][
        "attributes"]["value"] = "24.00"
    with http(emulator) as client:
        response = client.post(BULK, json=body)
    assert response.status_code == 400
    error = only_error(response)
    assert error["code"] == "invalid"
    assert error["source"]["pointer"] == EVENT_POINTER.format(i=0, j=1) + "/value"
    assert "valid number" in error["detail"]
    assert emulator.accepted_events() == []


def test_a_key_klaviyo_does_not_know_is_400_naming_it(emulator):
    body = bulk_create_body(rows())
    attributes = body["data"]["attributes"]["events-bulk-create"]["data"][1]["attributes"]["events"]["data"][0][
        "attributes"]
    attributes["unique-id"] = attributes.pop("unique_id")  # the SDK would silently drop it, and with it the dedupe
    with http(emulator) as client:
        response = client.post(BULK, json=body)
    assert response.status_code == 400
    error = only_error(response)
    assert error["source"]["pointer"] == EVENT_POINTER.format(i=1, j=0) + "/unique-id"
    assert "'unique-id'" in error["detail"]


def test_a_body_that_is_not_json_is_400(emulator):
    with http(emulator) as client:
        response = client.post(BULK, content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert only_error(response)["code"] == "parse_error"


def test_a_request_over_klaviyos_prose_limits_is_400(emulator):
    profile_rows = [OutboxRow(f"evt-{n}", f"email:s{n % 50}@gmail.com", {"email": f"s{n % 50}@gmail.com"},
                              event(f"evt-{n}", CART, 5)) for n in range(1001)]
    with http(emulator) as client:
        too_many = client.post(BULK, json=bulk_create_body(profile_rows))
        future = bulk_create_body(rows()[:1])
        future["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]["events"]["data"][0][
            "attributes"]["time"] = (datetime.now(timezone.utc) + timedelta(days=400)).isoformat()
        too_late = client.post(BULK, json=future)
    assert too_many.status_code == 400
    assert any("1,001 events" in error["detail"] for error in too_many.json()["errors"])
    assert too_late.status_code == 400
    error = only_error(too_late)
    assert "not before now + 1 year" in error["detail"]
    assert error["source"]["pointer"] == EVENT_POINTER.format(i=0, j=0)
    assert emulator.accepted_events() == []


@pytest.mark.slow  # waits for the rate limit's window to reopen
def test_the_third_request_in_a_second_is_429_with_retry_after_then_the_window_reopens():
    with KlaviyoEmulator(api_key=KEY, rate_limits=RateLimits(per_second=2, per_minute=1000)) as emulator:
        with http(emulator) as client:
            answers = [client.post(BULK, json=bulk_create_body([row])) for row in rows()]
            time.sleep(int(answers[2].headers.get("Retry-After", "1")))
            after = client.post(BULK, json=bulk_create_body(rows()[2:]))

    assert [answer.status_code for answer in answers] == [202, 202, 429]
    throttled = answers[2]
    assert int(throttled.headers["Retry-After"]) >= 1
    assert only_error(throttled)["code"] == "throttled"
    assert "RateLimit-Remaining" not in throttled.headers  # Klaviyo sends Retry-After instead on a 429
    assert [answers[0].headers["RateLimit-Limit"], answers[0].headers["RateLimit-Remaining"],
            answers[1].headers["RateLimit-Remaining"]] == ["1000", "999", "998"]
    assert 0 < int(answers[1].headers["RateLimit-Reset"]) <= 60
    assert after.status_code == 202
    assert sorted(event["unique_id"] for event in emulator.accepted_events()) == ["evt-1", "evt-2", "evt-3"]


def test_force_429_every_nth_request():
    with KlaviyoEmulator(api_key=KEY, rate_limits=None, faults=Faults(force_429_every=3)) as emulator:
        with http(emulator) as client:
            answers = [client.get("/api/accounts") for _ in range(9)]
    assert [answer.status_code for answer in answers] == [200, 200, 429] * 3
    assert answers[2].headers["Retry-After"] == "1" and only_error(answers[2])["code"] == "throttled"
    assert [entry["fault"] for entry in emulator.requests()].count("forced_429") == 3


def test_server_errors_answer_503_and_store_nothing():
    with KlaviyoEmulator(api_key=KEY, rate_limits=None, faults=Faults(server_error_rate=1.0)) as emulator:
        with http(emulator) as client:
            response = client.post(BULK, json=bulk_create_body(rows()))
    assert response.status_code == 503
    assert only_error(response)["code"] == "service_unavailable"
    assert emulator.accepted_events() == [] and emulator.accepted_by_metric() == {}
    assert [(entry["status"], entry["fault"]) for entry in emulator.requests()] == [(503, "server_error")]


def test_a_dropped_answer_raises_in_the_client_but_the_events_were_stored():
    with KlaviyoEmulator(api_key=KEY, rate_limits=None, faults=Faults(drop_after_processing_rate=1.0)) as emulator:
        with http(emulator) as client:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                client.post(BULK, json=bulk_create_body(rows()))
    assert emulator.accepted_by_metric() == {CART: 2, CHECKOUT: 1}
    assert [(entry["status"], entry["fault"]) for entry in emulator.requests()] == [(None, "dropped")]


def test_slow_answers_arrive_late_and_faults_repeat_for_a_seed():
    with KlaviyoEmulator(api_key=KEY, rate_limits=None, faults=Faults(slow_rate=1.0, slow_seconds=0.3)) as emulator:
        with http(emulator) as client:
            started = time.monotonic()
            assert client.get("/api/accounts").status_code == 200
            assert time.monotonic() - started >= 0.3

    def statuses(seed: int) -> list[int]:
        faults = Faults(server_error_rate=0.5, seed=seed)
        with KlaviyoEmulator(api_key=KEY, rate_limits=None, faults=faults) as emulator:
            with http(emulator) as client:
                return [client.get("/api/accounts").status_code for _ in range(12)]

    first = statuses(3)
    assert first == statuses(3) and {200, 503} == set(first)


def test_rejected_unique_ids_get_a_400_whose_pointer_names_the_event(emulator):
    emulator.reject_unique_ids({"evt-2"})
    with http(emulator) as client:
        response = client.post(BULK, json=bulk_create_body(rows()))
        rest = client.post(BULK, json=bulk_create_body([rows()[0], rows()[2]]))
    assert response.status_code == 400
    error = only_error(response)
    # Jane's two events form entry 0; Sam's is entry 1, event 0.
    assert error["source"]["pointer"] == EVENT_POINTER.format(i=1, j=0) + "/unique_id"
    assert "evt-2" in error["detail"]
    assert rest.status_code == 202
    assert sorted(event["unique_id"] for event in emulator.accepted_events()) == ["evt-1", "evt-3"]


def test_a_profile_import_job_is_created_polled_and_reports_profiles_without_identifier(emulator):
    profiles = [JANE, {"first_name": "Nobody"}, {"phone_number": "+15005550006", "first_name": "Pat"}]
    with http(emulator) as client:
        created = client.post(IMPORTS, json=profile_import_body(profiles, "LIST1"))
        job_id = created.json()["data"]["id"]
        polled = client.get(f"{IMPORTS}/{job_id}")
        errors = client.get(f"{IMPORTS}/{job_id}/import-errors")
        clean = client.post(IMPORTS, json=profile_import_body([SAM], None)).json()["data"]["id"]
        clean_errors = client.get(f"{IMPORTS}/{clean}/import-errors")
        unknown = client.get(f"{IMPORTS}/no-such-job")

    assert created.status_code == 202
    job = created.json()["data"]
    assert job["type"] == "profile-bulk-import-job" and job["attributes"]["status"] == "queued"
    assert job["attributes"]["total_count"] == 3
    assert job["relationships"]["lists"]["data"] == [{"type": "list", "id": "LIST1"}]
    assert polled.status_code == 200
    attributes = polled.json()["data"]["attributes"]
    assert (attributes["status"], attributes["total_count"], attributes["completed_count"],
            attributes["failed_count"]) == ("complete", 3, 2, 1)
    assert errors.status_code == 200
    [import_error] = errors.json()["data"]
    assert import_error["type"] == "import-error"
    assert import_error["attributes"]["source"]["pointer"] == "/data/attributes/profiles/data/1"
    assert clean_errors.json()["data"] == []
    assert unknown.status_code == 404
    imported = {json.dumps(entry["profile"], sort_keys=True): entry["lists"] for entry in emulator.accepted_profiles()}
    assert imported[json.dumps(JANE, sort_keys=True)] == ["LIST1"]
    assert len(imported) == 3  # Jane and Pat into LIST1, Sam into no list


def test_get_accounts_returns_the_one_account(emulator):
    with http(emulator) as client:
        response = client.get("/api/accounts")
    assert response.status_code == 200
    [account] = response.json()["data"]
    assert account["type"] == "account" and account["id"]


def test_answers_match_the_response_schemas_of_klaviyos_openapi_spec(emulator):
    spec = klaviyo_contract.openapi_spec()
    from openapi_schema_validator import OAS30ReadValidator, oas30_format_checker

    _, registry = klaviyo_contract._spec_registry()

    def check(pointer: str, document: dict) -> None:
        validator = OAS30ReadValidator({"$ref": f"{klaviyo_contract.SPEC_URI}#{pointer}"}, registry=registry,
                                       format_checker=oas30_format_checker)
        problems = [f"/{'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"
                    for error in validator.iter_errors(document)]
        assert not problems, f"{pointer}:\n" + "\n".join(problems)

    schema = "/components/schemas/"
    client_error = "/components/responses/ClientError/content/application~1vnd.api+json/schema"
    assert spec["paths"][IMPORTS]["post"]["responses"]["202"]["content"]
    with http(emulator) as client:
        created = client.post(IMPORTS, json=profile_import_body([JANE, {"first_name": "Nobody"}], "LIST1")).json()
        job_id = created["data"]["id"]
        check(schema + "PostProfileImportJobResponse", created)
        check(schema + "GetProfileImportJobResponseCompoundDocument", client.get(f"{IMPORTS}/{job_id}").json())
        check(schema + "GetImportErrorResponseCollection", client.get(f"{IMPORTS}/{job_id}/import-errors").json())
        check(schema + "GetAccountResponseCollection", client.get("/api/accounts").json())
        check(client_error, client.post(BULK, json={"data": {}}).json())
    with http(emulator, Authorization=None) as client:
        check(client_error, client.get("/api/accounts").json())


def test_the_authorization_value_never_appears_in_the_request_log(emulator):
    with http(emulator) as client:
        client.post(BULK, json=bulk_create_body(rows()))
        client.get(f"/api/accounts?key={KEY}")  # even where a careless client puts it
    with http(emulator, Authorization=f"Klaviyo-API-Key {KEY}x") as client:
        client.get("/api/accounts")
    log = json.dumps(emulator.requests())
    assert KEY not in log and "Klaviyo-API-Key" not in log
    assert [entry["status"] for entry in emulator.requests()] == [202, 200, 401]
    assert set(emulator.requests()[0]) == {"method", "path", "status", "events", "at", "fault"}


def test_unknown_paths_and_methods_are_404_and_405(emulator):
    with http(emulator) as client:
        assert client.get("/api/nothing-here").status_code == 404
        assert client.get(BULK).status_code == 405


def test_the_command_serves_until_sigterm_and_reads_the_key_from_the_environment():
    env = {**os.environ, "KLAVIYO_API_KEY": KEY}
    process = subprocess.Popen([sys.executable, "-m", "upstack_pipeline.sandbox.klaviyo_emulator", "--port", "0"],
                               cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        response = httpx.get(f"{base_url}/api/accounts", headers=HEADERS, timeout=10)
        assert response.status_code == 200 and "RateLimit-Limit" in response.headers  # limits on by default
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert KEY not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_command_answers_late_when_told_to_as_a_distant_klaviyo_would():
    process = subprocess.Popen([sys.executable, "-m", "upstack_pipeline.sandbox.klaviyo_emulator", "--port", "0",
                                "--api-key", KEY, "--check-processes", "0", "--answer-seconds", "0.5"],
                               cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = process.stdout.readline().strip()
        started = time.monotonic()
        response = httpx.get(f"{base_url}/api/accounts", headers=HEADERS, timeout=10)
        assert response.status_code == 200 and time.monotonic() - started >= 0.5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "answering 0.5 s late" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_command_needs_a_key(monkeypatch, capsys):
    from upstack_pipeline.sandbox.klaviyo_emulator import main

    monkeypatch.delenv("KLAVIYO_API_KEY", raising=False)
    assert main(["--port", "0"]) == 2
    assert "KLAVIYO_API_KEY" in capsys.readouterr().err


def test_nothing_is_served_after_stop_not_even_on_a_kept_alive_connection():
    emulator = KlaviyoEmulator(api_key=KEY, rate_limits=None).start()
    with http(emulator) as client:
        assert client.get("/api/accounts").status_code == 200
        emulator.stop()
        with pytest.raises(httpx.TransportError):
            client.get("/api/accounts")
    assert len(emulator.requests()) == 1
