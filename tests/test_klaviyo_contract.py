"""Klaviyo payloads against Klaviyo's published contract: the SDK's request models, the OpenAPI spec (the part of it
in tests/contract/), and the limits the spec states only in prose (`upstack_pipeline.klaviyo.limits`)."""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime, timedelta, timezone

import pytest

import klaviyo_contract
from klaviyo_contract import validate_with_openapi, validate_with_sdk
from upstack_pipeline.klaviyo import limits
from upstack_pipeline.sandbox.klaviyo_emulator import sdk_models
from upstack_pipeline.klaviyo.limits import bulk_violations, encode_body, event_violations

NOW = datetime(2026, 3, 15, 12, 0, 0, tzinfo=timezone.utc)


def at(delta: timedelta) -> str:
    return (NOW + delta).isoformat(timespec="seconds")


def metric(name: str) -> dict:
    return {"data": {"type": "metric", "attributes": {"name": name}}}


def event(unique_id: str, name: str = "Viewed Product from Upstack", properties: dict | None = None,
          **attributes) -> dict:
    """A bulk-entry event (BaseEventCreateQueryBulkEntryResourceObject)."""
    attrs = {"properties": {"ProductName": "Mug", "ProductID": "p1"} if properties is None else properties,
             "time": at(timedelta(hours=-1)), "unique_id": unique_id, "metric": metric(name)}
    attrs.update(attributes)
    return {"type": "event", "attributes": attrs}


def entry(profile_attributes: dict, events: list[dict], **profile_data) -> dict:
    """One profile's entry (EventsBulkCreateQueryResourceObject)."""
    return {"type": "event-bulk-create", "attributes": {
        "profile": {"data": {"type": "profile", "attributes": profile_attributes, **profile_data}},
        "events": {"data": events}}}


def bulk(*entries: dict) -> dict:
    """An EventsBulkCreateJob body."""
    return {"data": {"type": "event-bulk-create-job",
                     "attributes": {"events-bulk-create": {"data": list(entries)}}}}


def valid_bulk_body() -> dict:
    """2 profiles, 3 events: money fields, a backfilled event, nested Items, nullable fields set to null."""
    items = [{"ProductID": "p1", "SKU": "MUG-1", "ProductName": "Mug", "Quantity": 2, "ItemPrice": 12.0,
              "RowTotal": 24.0, "Categories": ["Kitchen", "Mugs"], "ImageURL": "https://acme.example/mug.png"}]
    return bulk(
        entry({"email": "jane@gmail.com", "first_name": "Jane", "last_name": None,
               "location": {"city": "Lisbon", "region": "Lisboa"},
               "properties": {"upstack_id": "u-1", "upstack_match_method": "email_capture",
                              "upstack_first_seen": at(timedelta(days=-3))}},
              [event("evt-1", "Added to Cart from Upstack", {
                  "ProductName": "Mug", "ProductID": "p1", "Price": 12.0, "Quantity": 2, "CartValue": 24.0,
                  "ItemNames": ["Mug"], "Items": items, "CheckoutURL": "https://acme.example/cart"},
                  value=24.0, value_currency="USD"),
               event("evt-2")]),
        entry({"_kx": "kx-token-1", "properties": {"upstack_id": "u-2"}},
              [event("evt-3", "Placed Order from Upstack", {
                  "OrderID": "1001", "Revenue": 24.0, "Items": items, "ItemNames": ["Mug"], "DiscountCodes": []},
                  value=24.0, value_currency="EUR", backfill=True, time=at(timedelta(days=-30)))]),
    )


def valid_single_body() -> dict:
    """An EventCreateQueryV2 body (Create Event)."""
    return {"data": {"type": "event", "attributes": {
        "properties": {"ProductName": "Mug", "Items": [{"ProductID": "p1", "Quantity": 1}]},
        "time": at(timedelta(minutes=-5)), "value": 12.0, "value_currency": "USD", "unique_id": "evt-9",
        "metric": metric("Added to Cart from Upstack"),
        "profile": {"data": {"type": "profile", "attributes": {
            "email": "jane@gmail.com", "phone_number": None, "properties": {"upstack_id": "u-1"}}}}}}}


def valid_profile_import_body() -> dict:
    """A ProfileImportJobCreateQuery body that also adds the profiles to a list."""
    return {"data": {
        "type": "profile-bulk-import-job",
        "attributes": {"profiles": {"data": [
            {"type": "profile", "attributes": {"email": "jane@gmail.com", "first_name": "Jane",
                                               "location": {"city": "Lisbon"},
                                               "properties": {"upstack_id": "u-1"}}},
            {"type": "profile", "attributes": {"phone_number": "+351912345678", "external_id": None}},
        ]}},
        "relationships": {"lists": {"data": [{"type": "list", "id": "Y6nRLr"}]}}}}


def only_event(body: dict) -> tuple[dict, dict]:
    """(event attributes, profile attributes) of the first event of a bulk body."""
    first = body["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]
    return first["events"]["data"][0]["attributes"], first["profile"]["data"]["attributes"]


# --- (a) valid bodies pass everything -------------------------------------------------------------------------

VALID = [("EventsBulkCreateJob", valid_bulk_body), ("EventCreateQueryV2", valid_single_body),
         ("ProfileImportJobCreateQuery", valid_profile_import_body)]


@pytest.mark.parametrize("model_name, make_body", VALID, ids=[name for name, _ in VALID])
def test_valid_bodies_pass_the_sdk_models(model_name, make_body):
    validate_with_sdk(model_name, make_body())


@pytest.mark.parametrize("schema_name, make_body", VALID, ids=[name for name, _ in VALID])
def test_valid_bodies_pass_the_openapi_schemas(schema_name, make_body):
    validate_with_openapi(schema_name, make_body())


def test_valid_bulk_body_is_within_the_limits():
    body = valid_bulk_body()
    assert bulk_violations(body, now=NOW) == []
    model = validate_with_sdk("EventsBulkCreateJob", body)
    entries = model.data.attributes.events_bulk_create.data
    assert [len(e.attributes.events.data) for e in entries] == [2, 1]
    assert entries[1].attributes.events.data[0].attributes.backfill is True


def test_valid_single_event_is_within_the_limits():
    attributes = valid_single_body()["data"]["attributes"]
    assert event_violations(attributes, attributes["profile"]["data"]["attributes"], now=NOW) == []


def test_limits_are_the_ones_klaviyos_spec_states_in_prose():
    """Each number is read back from the sentence of the published spec it comes from, so a limit changed by hand
    (or a spec that changes it) fails here."""
    spec = json.dumps(klaviyo_contract.openapi_spec())
    stated = {
        r"Accepts up to ([\d,]+) events per request": limits.MAX_EVENTS_PER_BULK_REQUEST,
        r"events per request\. The maximum allowed payload size is (\d+)MB": limits.MAX_BULK_REQUEST_BYTES // 1024**2,
        r"A single string cannot exceed (\d+)KB": limits.MAX_STRING_BYTES // 1024,
        r"The maximum allowed payload size per-profile is (\d+)KB": limits.MAX_PROFILE_STRINGS_BYTES // 1024,
        r"must not exceed (\d+) properties": limits.MAX_PROPERTIES,
        r"Name of the event\. Must be less than (\d+) characters": limits.MAX_METRIC_NAME_CHARS + 1,
    }
    for sentence, ours in stated.items():
        found = {int(number.replace(",", "")) for number in re.findall(sentence, spec)}
        assert found == {ours}, (sentence, found, ours)


def test_profile_identifiers_are_the_ones_the_spec_documents():
    schemas = klaviyo_contract.openapi_spec()["components"]["schemas"]
    for name in ("OnsiteProfileCreateQueryResourceObject", "EventProfileCreateQueryResourceObject"):
        documented = schemas[name]["properties"]["attributes"]["properties"]
        assert set(limits.PROFILE_IDENTIFIERS) <= set(documented), name
    shape = schemas["EventsBulkCreateJobResourceObject"]
    assert shape["properties"]["attributes"]["required"] == [limits.BULK_EVENTS_KEY]


# --- (b) each prose limit is caught, with a precise message ---------------------------------------------------

def test_1001_events_in_one_request():
    body = bulk(entry({"email": "jane@gmail.com"}, [event(f"evt-{i}") for i in range(1001)]))
    assert bulk_violations(body, now=NOW) == ["request has 1,001 events (max 1,000)"]
    del body["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]["events"]["data"][-1]
    assert bulk_violations(body, now=NOW) == []


def test_request_over_5_mb():
    big = "x" * (90 * 1024)
    body = bulk(entry({"email": "jane@gmail.com"}, [event(f"evt-{i}", properties={"Body": big}) for i in range(60)]))
    size = len(encode_body(body))
    assert size > 5 * 1024 * 1024
    assert bulk_violations(body, now=NOW) == [f"request body is {size:,} bytes as JSON (max 5,242,880 = 5 MB)"]


def test_string_over_100_kb_nested_in_properties():
    event_attributes, profile = only_event(valid_bulk_body())
    event_attributes["properties"]["Items"][0]["ProductName"] = "x" * (100 * 1024 + 1)
    assert event_violations(event_attributes, profile, now=NOW) == [
        "string at properties.Items[0].ProductName is 102,401 bytes in UTF-8 (max 102,400 = 100 KB)"]
    event_attributes["properties"]["Items"][0]["ProductName"] = "x" * (100 * 1024)
    assert event_violations(event_attributes, profile, now=NOW) == []
    # Bytes, not characters: 51,201 two-byte characters are over the limit.
    event_attributes["properties"]["Items"][0]["ProductName"] = "é" * 51_201
    assert event_violations(event_attributes, profile, now=NOW) == [
        "string at properties.Items[0].ProductName is 102,402 bytes in UTF-8 (max 102,400 = 100 KB)"]


def test_string_over_100_kb_in_profile_properties():
    event_attributes, profile = only_event(valid_bulk_body())
    profile["properties"]["notes"] = "x" * (100 * 1024 + 1)
    assert event_violations(event_attributes, profile, now=NOW)[0] == (
        "string at profile.data.attributes.properties.notes is 102,401 bytes in UTF-8 (max 102,400 = 100 KB)")


def test_profile_strings_over_100_kb_together():
    event_attributes, profile = only_event(valid_bulk_body())
    profile.update(first_name="x" * 60_000, last_name="y" * 60_000)
    assert event_violations(event_attributes, profile, now=NOW) == [
        f"profile strings total {limits.profile_strings_bytes(profile):,} bytes in UTF-8 (max 102,400 = 100 KB)"]
    assert limits.profile_strings_bytes(profile) > 120_000


def test_fit_profile_drops_the_longest_free_text_until_the_profile_fits_and_keeps_identifiers():
    profile = {"email": "jane@gmail.com", "first_name": "J" * 60_000, "last_name": "Doe",
               "location": {"city": "c" * 70_000, "region": "TX"}, "properties": {"upstack_id": "u1"}}
    fitted, notes = limits.fit_profile(profile)
    assert fitted == {"email": "jane@gmail.com", "first_name": "J" * 60_000, "last_name": "Doe",
                      "location": {"region": "TX"}, "properties": {"upstack_id": "u1"}}
    assert notes == ["dropped profile location.city (70,000 bytes): Klaviyo takes strings of at most 102,400 "
                     "bytes and 102,400 bytes of strings per profile"]
    assert profile["location"]["city"] == "c" * 70_000  # the caller's profile is left as it was
    alone, notes = limits.fit_profile({"email": "jane@gmail.com", "location": {"city": "c" * 200_000}})
    assert alone == {"email": "jane@gmail.com"} and len(notes) == 1
    long_email = {"email": "j" * 200_000}
    assert limits.fit_profile(long_email) == (long_email, [])


def test_one_property_too_many():
    event_attributes, profile = only_event(valid_bulk_body())
    event_attributes["properties"] = {f"p{i}": i for i in range(limits.MAX_PROPERTIES + 1)}
    assert event_violations(event_attributes, profile, now=NOW) == [
        f"properties has {limits.MAX_PROPERTIES + 1} top-level keys (max {limits.MAX_PROPERTIES})"]
    del event_attributes["properties"][f"p{limits.MAX_PROPERTIES}"]
    assert event_violations(event_attributes, profile, now=NOW) == []


def test_metric_name_of_128_characters():
    event_attributes, profile = only_event(valid_bulk_body())
    event_attributes["metric"] = metric("M" * 128)
    assert event_violations(event_attributes, profile, now=NOW) == [
        f"metric name is 128 characters (Klaviyo needs fewer than 128): {'M' * 40!r}..."]
    event_attributes["metric"] = metric("M" * 127)
    assert event_violations(event_attributes, profile, now=NOW) == []


def test_time_before_2000_and_a_year_ahead():
    event_attributes, profile = only_event(valid_bulk_body())
    event_attributes["time"] = "1999-12-31T23:59:59Z"
    assert event_violations(event_attributes, profile, now=NOW) == ["time 1999-12-31T23:59:59+00:00 is before 2000"]
    event_attributes["time"] = "2000-01-01T00:00:00Z"
    assert event_violations(event_attributes, profile, now=NOW) == []
    event_attributes["time"] = at(timedelta(days=2 * 365))
    assert event_violations(event_attributes, profile, now=NOW) == [
        "time 2028-03-14T12:00:00+00:00 is not before now + 1 year (2027-03-15T12:00:00+00:00)"]
    event_attributes["time"] = at(timedelta(days=364))
    assert event_violations(event_attributes, profile, now=NOW) == []


def test_time_must_be_rfc3339_with_an_offset():
    event_attributes, profile = only_event(valid_bulk_body())
    event_attributes["time"] = "2026-03-15T11:00:00"
    assert event_violations(event_attributes, profile, now=NOW) == [
        "time '2026-03-15T11:00:00' is not an RFC 3339 date-time with an offset (like 2026-01-31T12:00:00+00:00)"]
    event_attributes["time"] = None  # Klaviyo then uses the time it received the request
    assert event_violations(event_attributes, profile, now=NOW) == []


def test_bulk_messages_name_the_event():
    body = bulk(entry({"email": "jane@gmail.com"}, [event("a"), event("b"), event("c")]),
                entry({"phone_number": "+351912345678"}, [event("abc", time="1999-01-01T00:00:00Z")]))
    assert bulk_violations(body, now=NOW) == ["events[3] (unique_id abc): time 1999-01-01T00:00:00+00:00 is before 2000"]


def test_profile_without_identifier():
    event_attributes, _ = only_event(valid_bulk_body())
    message = ("profile has no identifier (needs a non-empty one of email, phone_number, external_id, anonymous_id, "
               "_kx, or a Klaviyo profile id)")
    assert event_violations(event_attributes, {"first_name": "Jane"}, now=NOW) == [message]
    assert event_violations(event_attributes, {"email": " ", "phone_number": None}, now=NOW) == [message]
    assert event_violations(event_attributes, {"anonymous_id": "anon-1"}, now=NOW) == []
    assert event_violations(event_attributes, {}, now=NOW, profile_id="01HXYZ") == []
    body = bulk(entry({"first_name": "Jane"}, [event("evt-1")]))
    assert bulk_violations(body, now=NOW) == [f"profiles[0]: {message}"]
    body = bulk(entry({}, [event("evt-1")], id="01HXYZ"))
    assert bulk_violations(body, now=NOW) == []


def test_repeated_unique_id_in_one_request():
    body = bulk(entry({"email": "jane@gmail.com"}, [event("abc"), event("def")]),
                entry({"_kx": "kx-1"}, [event("abc", "Added to Cart from Upstack")]))
    assert bulk_violations(body, now=NOW) == ["events[2] (unique_id abc): unique_id repeats events[0] in this request"]


def test_legacy_dollar_keys():
    event_attributes, profile = only_event(valid_bulk_body())
    profile["$first_name"] = "Jane"
    event_attributes["properties"]["$value"] = 24.0
    assert event_violations(event_attributes, profile, now=NOW) == [
        "key properties.$value starts with '$' (a legacy v1/v2 special property)",
        "key profile.data.attributes.$first_name starts with '$' (a legacy v1/v2 special property)"]


def test_legacy_dollar_keys_at_any_depth():
    event_attributes, profile = only_event(valid_bulk_body())
    event_attributes["properties"]["Items"][0]["$extra"] = {"html": "<p/>"}
    profile["properties"]["$source"] = "upstack"
    assert event_violations(event_attributes, profile, now=NOW) == [
        "key properties.Items[0].$extra starts with '$' (a legacy v1/v2 special property)",
        "key profile.data.attributes.properties.$source starts with '$' (a legacy v1/v2 special property)"]


@pytest.mark.parametrize("value, currency, message", [
    ("24.00", "USD", "value '24.00' is not a number"),
    (float("nan"), "USD", "number at value is nan (JSON has no NaN or Infinity)"),
    (float("inf"), "USD", "number at value is inf (JSON has no NaN or Infinity)"),
    (True, "USD", "value True is not a number"),
    (24.0, "usd", "value_currency 'usd' is not a three-letter ISO 4217 code"),
])
def test_value_and_currency(value, currency, message):
    event_attributes, profile = only_event(valid_bulk_body())
    event_attributes.update(value=value, value_currency=currency)
    assert event_violations(event_attributes, profile, now=NOW) == [message]


def test_malformed_bodies_are_reported_not_raised():
    assert bulk_violations({"data": {}}, now=NOW) == [
        'body is not an event-bulk-create-job: data.attributes["events-bulk-create"].data is not a list']
    assert bulk_violations(bulk(), now=NOW) == ["request has no events"]
    assert event_violations({"properties": {}}, {"email": "jane@gmail.com"}, now=NOW) == [
        "metric name is missing or empty"]
    with pytest.raises(ValueError, match="timezone-aware"):
        bulk_violations(valid_bulk_body(), now=datetime(2026, 3, 15))


def limit_breaking_body() -> dict:
    body = valid_bulk_body()
    event_attributes, profile = only_event(body)
    event_attributes["properties"] = {f"p{i}": "x" for i in range(limits.MAX_PROPERTIES + 1)}
    event_attributes["properties"]["$value"] = 1
    event_attributes["metric"] = metric("M" * 200)
    event_attributes["time"] = "1995-01-01T00:00:00Z"
    event_attributes["unique_id"] = "evt-2"
    profile.clear()
    return body


def test_limits_catch_what_the_validators_let_through():
    assert len(bulk_violations(limit_breaking_body(), now=NOW)) == 6


@pytest.mark.parametrize("validate", [validate_with_sdk, validate_with_openapi], ids=["sdk", "openapi"])
def test_the_validators_let_limit_violations_through(validate):
    """Why limits.py exists: a body that breaks six prose limits passes both structural validators."""
    validate("EventsBulkCreateJob", limit_breaking_body())


# --- (c) the structural validators do reject broken bodies ----------------------------------------------------

def broken_bodies() -> dict[str, dict]:
    missing_metric = valid_bulk_body()
    del only_event(missing_metric)[0]["metric"]
    wrong_type = valid_bulk_body()
    wrong_type["data"]["type"] = "event-bulk-create-jobs"
    wrong_event_type = valid_single_body()
    wrong_event_type["data"]["type"] = "events"
    string_value = valid_bulk_body()
    only_event(string_value)[0]["value"] = "24.00"
    no_profiles_key = valid_profile_import_body()
    del no_profiles_key["data"]["attributes"]["profiles"]
    wrong_list_type = valid_profile_import_body()
    wrong_list_type["data"]["relationships"]["lists"]["data"][0]["type"] = "lists"
    return {"missing metric": missing_metric, "wrong job type": wrong_type, "wrong event type": wrong_event_type,
            "value as string": string_value, "no profiles": no_profiles_key, "wrong list type": wrong_list_type}


SCHEMA_OF = {"missing metric": "EventsBulkCreateJob", "wrong job type": "EventsBulkCreateJob",
             "wrong event type": "EventCreateQueryV2", "value as string": "EventsBulkCreateJob",
             "no profiles": "ProfileImportJobCreateQuery", "wrong list type": "ProfileImportJobCreateQuery"}


@pytest.mark.parametrize("case", list(SCHEMA_OF))
def test_sdk_rejects_broken_bodies(case):
    with pytest.raises(AssertionError, match=f"klaviyo-api's {SCHEMA_OF[case]} rejects the body"):
        validate_with_sdk(SCHEMA_OF[case], broken_bodies()[case])


@pytest.mark.parametrize("case", list(SCHEMA_OF))
def test_openapi_rejects_broken_bodies(case):
    with pytest.raises(AssertionError, match=f"Klaviyo's OpenAPI schema {SCHEMA_OF[case]} rejects the body"):
        validate_with_openapi(SCHEMA_OF[case], broken_bodies()[case])


def test_openapi_errors_name_the_place():
    body = valid_bulk_body()
    del only_event(body)[0]["metric"]
    with pytest.raises(AssertionError) as failure:
        validate_with_openapi("EventsBulkCreateJob", body)
    assert ("at /data/attributes/events-bulk-create/data/0/attributes/events/data/0/attributes: "
            "'metric' is a required property") in str(failure.value)


def test_openapi_honours_nullable_and_formats():
    """OAS 3.0 `nullable`: null passes where the spec allows it and fails where it does not; date-time is checked."""
    body = valid_single_body()
    body["data"]["attributes"].update(value=None, value_currency=None, unique_id=None, time=None)
    validate_with_openapi("EventCreateQueryV2", body)
    body["data"]["attributes"]["metric"]["data"]["attributes"]["name"] = None
    with pytest.raises(AssertionError, match="None is not of type 'string'"):
        validate_with_openapi("EventCreateQueryV2", body)
    body = valid_single_body()
    body["data"]["attributes"]["time"] = "yesterday"
    with pytest.raises(AssertionError, match="'yesterday' is not a 'date-time'"):
        validate_with_openapi("EventCreateQueryV2", body)


def test_sdk_helper_rejects_keys_the_sdk_would_drop():
    body = valid_bulk_body()
    only_event(body)[0]["unique-id"] = "typo"
    sdk_models()["EventsBulkCreateJob"].from_dict(copy.deepcopy(body))  # the SDK alone accepts it
    with pytest.raises(AssertionError, match=r"ignores these keys .*events\.data\[0\]\.attributes\.unique-id"):
        validate_with_sdk("EventsBulkCreateJob", body)
    validate_with_sdk("EventsBulkCreateJob", body, allow_unknown_keys=True)
    # Profile imports document no anonymous_id: the SDK would silently drop it.
    body = valid_profile_import_body()
    body["data"]["attributes"]["profiles"]["data"][0]["attributes"]["anonymous_id"] = "anon-1"
    with pytest.raises(AssertionError, match=r"profiles\.data\[0\]\.attributes\.anonymous_id"):
        validate_with_sdk("ProfileImportJobCreateQuery", body)


# --- the part of the spec in the repo is the part the client and the emulator use --------------------------------

def spec_operations() -> dict[tuple[str, str], dict]:
    """(METHOD, path template) -> operation, for every operation in the repo's excerpt of the spec."""
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {(method.upper(), path): operation for path, item in klaviyo_contract.openapi_spec()["paths"].items()
            for method, operation in item.items() if method in methods}


def test_the_spec_excerpt_has_every_endpoint_the_emulator_serves_and_no_other():
    from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator

    operations = spec_operations()
    served = set()
    for route in KlaviyoEmulator(api_key="unused", rate_limits=None)._routes:
        matches = [(method, path) for method, path in operations
                   if method == route.method and route.pattern.fullmatch(re.sub(r"\{[^}]+\}", "ID1", path))]
        assert len(matches) == 1, f"{route.method} {route.pattern.pattern} is in the spec excerpt {len(matches)} times"
        assert route.scope in operations[matches[0]]["x-klaviyo-scopes"], (route, operations[matches[0]])
        served.update(matches)
    assert served == set(operations), f"the excerpt has operations nothing serves: {set(operations) - served}"


def test_the_spec_excerpt_has_every_path_the_client_calls():
    from upstack_pipeline.klaviyo.client import SCOPE_PROBES
    from upstack_pipeline.klaviyo.delivery import BULK_EVENTS_PATH

    posts = {BULK_EVENTS_PATH, *(path for path, _body in SCOPE_PROBES.values())}
    gets = {"/api/profile-bulk-import-jobs/{job_id}", "/api/profile-bulk-import-jobs/{id}/import-errors"}
    operations = spec_operations()
    assert {("POST", path) for path in posts} | {("GET", path) for path in gets} <= set(operations)


def test_every_reference_of_the_spec_excerpt_resolves_inside_it():
    spec = klaviyo_contract.openapi_spec()

    def references(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from [value] if key == "$ref" else references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    found = set(references(spec))
    assert "#/components/schemas/EventsBulkCreateJob" in found
    for reference in found:
        _, kind, section, name = reference.split("/")
        assert kind == "components" and name in spec["components"].get(section, {}), reference
    assert spec["info"]["version"] == "2026-07-15" and spec["openapi"] == "3.0.2"
