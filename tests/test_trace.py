"""`upstack trace`'s library: a shopper's story from each landing line to Klaviyo's answer, read from a warehouse the
real pipeline built (a Dagster sync delivering into the Klaviyo emulator), and the view shopper_journey under it."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from conftest import NOW, make_event, query, write_events, write_lines
from dagster_project.definitions import run_sync
from upstack_pipeline.analytics import refresh
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.klaviyo.client import KlaviyoClient
from upstack_pipeline.klaviyo.delivery import deliver
from upstack_pipeline.klaviyo.mapping import map_events
from upstack_pipeline.sandbox.klaviyo_emulator import Faults, KlaviyoEmulator
from upstack_pipeline.settings import Settings
from upstack_pipeline.trace import JOURNEY_VIEW, format_trace, trace

KEY = "pk_trace_test_emulator_only_0000"
ANONYMOUS = {"klaviyo_identified": False}


def ago(**delta) -> str:
    return (NOW - timedelta(**delta)).isoformat()


def land_jane(landing: Path) -> None:
    """Jane types her email on a product page; three days later she comes back on the same browser without
    typing it, her cookie is reset mid-session (a second cookie, same session), she adds to cart, starts checkout
    and orders; a few minutes ago she looked at another product (her session is still active). Someone else
    browses in between."""
    write_events(landing / "events/dt=1/part-0.ndjson", [
        make_event("view-1", event_name="ViewContent", anonymous_id="cookie-jane", session_id="s1",
                   event_time=ago(days=3), event_source_url="https://acme.myshopify.com/products/mug",
                   user_data={"email": "Jane@Gmail.com", "first_name": "Jane", "klaviyo_identified": False}),
        make_event("newsletter", event_name="PageView", anonymous_id="cookie-jane", session_id="s1",
                   event_time=ago(days=3, minutes=-1), event_source_url="https://acme.myshopify.com/",
                   user_data={"email": "test@test.com"}),
    ])
    write_events(landing / "events/dt=2/part-0.ndjson", [
        make_event("page-1", event_name="PageView", anonymous_id="cookie-other", session_id="s9",
                   event_time=ago(hours=3), event_source_url="https://acme.myshopify.com/", user_data={}),
        make_event("cart-1", anonymous_id="cookie-jane", session_id="s2", event_time=ago(hours=2),
                   event_source_url="https://acme.myshopify.com/products/mug", user_data=ANONYMOUS),
        make_event("checkout-1", event_name="InitiateCheckout", anonymous_id="cookie-jane-2", session_id="s2",
                   event_time=ago(minutes=110), event_source_url="https://acme.myshopify.com/checkout",
                   user_data=ANONYMOUS),
        make_event("order-1", event_name="Purchase", anonymous_id="cookie-jane-2", session_id="s2",
                   event_time=ago(minutes=100), event_source_url="https://acme.myshopify.com/thanks",
                   user_data=ANONYMOUS, custom_data={"value": 30.0, "currency": "USD", "order_id": "1001", "items": [
                       {"id": "p1", "name": "Mug", "price": 12.0, "quantity": 1},
                       {"id": "p2", "name": "Cup", "price": 18.0, "quantity": 1}]}),
        make_event("view-2", event_name="ViewContent", anonymous_id="cookie-jane", session_id="s3",
                   event_time=ago(minutes=5), event_source_url="https://acme.myshopify.com/products/cup",
                   user_data=ANONYMOUS),
    ])


@pytest.fixture(scope="module")
def synced(tmp_path_factory) -> Settings:
    """Jane's warehouse after one `upstack sync` delivering into the emulator, which refuses her checkout."""
    root = tmp_path_factory.mktemp("trace")
    settings = Settings(landing_dir=root / "landing", warehouse_path=root / "warehouse.duckdb")
    (settings.landing_dir / "customers").mkdir(parents=True)
    land_jane(settings.landing_dir)
    with KlaviyoEmulator(api_key=KEY) as emulator, dg.instance_for_test() as instance:
        emulator.reject_unique_ids({"checkout-1"})
        result = run_sync(replace(settings, klaviyo_api_key=KEY, klaviyo_base_url=emulator.base_url), instance)
    assert result.success
    return settings


def story_of(text: str, event_id: str) -> str:
    """The lines of one event's part of a formatted trace."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("  ") and f" {event_id}  (" in line)
    end = next((index for index in range(start + 1, len(lines)) if not lines[index].startswith("      ")),
               len(lines))
    return "\n".join(lines[start:end])


def request_of(settings: Settings, unique_id: str) -> str:
    [(request_id,)] = query(settings, "select request_id from klaviyo_outbox where unique_id = ?", [unique_id])
    return request_id


@pytest.mark.slow  # a whole Dagster sync
def test_a_returning_shoppers_trace_tells_each_event_from_its_landing_line_to_klaviyos_answer(synced):
    found = trace(synced, "jane@gmail.com")
    text = format_trace(found)

    assert found.found_as == "email" and found.person.email == "jane@gmail.com"
    assert found.browsers == ["cookie-jane", "cookie-jane-2"]
    assert [event.event_id for event in found.events] == ["view-1", "cart-1", "checkout-1", "order-1", "view-2"]
    # The tie that names her returning sessions: the cookie <-> email link, when it was first seen and on what.
    [first_seen] = [row[0] for row in query(synced, "select first_seen from identity_links where left_value = "
                                                    "'cookie-jane' and right_value = 'jane@gmail.com'")]
    assert "  cookie cookie-jane <-> email jane@gmail.com\n      first seen " \
           f"{first_seen:%Y-%m-%d %H:%M:%S} UTC via event view-1 (events/dt=1/part-0.ndjson line 1)" in text
    assert "cookie cookie-jane = cookie cookie-jane-2\n      shared_session s2" in text
    assert "email test@test.com rejected: blocklisted" in text  # the newsletter box's placeholder

    typed = story_of(text, "view-1")
    assert "landed:    events/dt=1/part-0.ndjson line 1" in typed
    assert "resolved:  jane@gmail.com by typed_in_event, evidence this event" in typed
    assert "decision:  skipped, native_identified (typed_in_event)" in typed
    assert "not sent:  Klaviyo identifies it itself" in typed and "request:" not in typed

    cart = story_of(text, "cart-1")
    request_id = request_of(synced, "cart-1")
    assert query(synced, "select status from klaviyo_deliveries where request_id = ?", [request_id]) == [(202,)]
    assert "landed:    events/dt=2/part-0.ndjson line 2" in cart
    assert "resolved:  jane@gmail.com by cookie_history, evidence view-1, ViewContent at " in cart
    assert "decision:  outbox, delivered" in cart
    assert "payload:   Added to Cart from Upstack for email:jane@gmail.com: AddedItemProductID p1, CartValue 24" in cart
    assert f"request:   {request_id}: HTTP 202 (1 attempt, the last sent " in cart

    order = story_of(text, "order-1")
    assert "Placed Order from Upstack" in order and "lines:     Ordered Product events: 2 delivered" in order
    assert "decision:  none yet: its session has not been idle 30 minutes" in story_of(text, "view-2")


@pytest.mark.slow  # a whole Dagster sync
def test_an_event_klaviyo_refused_shows_its_refusal_and_the_request_that_carried_it(synced):
    found = trace(synced, "checkout-1")
    text = format_trace(found)

    assert found.found_as == "event_id" and [event.event_id for event in found.events] == ["checkout-1"]
    assert found.person.email == "jane@gmail.com"
    refused = story_of(text, "checkout-1")
    request_id = request_of(synced, "checkout-1")
    # Narrowing the 400 down sent the rest of Jane's events again, as a request of its own.
    assert request_id != request_of(synced, "cart-1") == request_of(synced, "order-1")
    assert query(synced, "select status from klaviyo_deliveries where request_id = ?", [request_id]) == [(400,)]
    assert "decision:  outbox, dead_letter: Klaviyo refused it" in refused
    assert f"request:   {request_id}: HTTP 400: events[1] (unique_id checkout-1): this event was refused" in refused
    assert "refused:   events[1] (unique_id checkout-1): this event was refused (the emulator was told to refuse " \
           "its unique_id)." in refused


@pytest.mark.slow  # a whole Dagster sync
@pytest.mark.parametrize("needle, found_as", [
    ("  JANE@gmail.com ", "email"),
    ("cookie-jane-2", "anonymous_id"),
    ("cart-1", "event_id"),
    ("up_db5cd0f49dd54ec32442", "upstack_id"),
])
def test_every_kind_of_needle_finds_the_same_person(synced, needle, found_as):
    [(upstack_id,)] = query(synced, "select upstack_id from identities where email = 'jane@gmail.com'")
    assert upstack_id == "up_db5cd0f49dd54ec32442"  # derived from the email: the same in every warehouse

    found = trace(synced, needle)

    assert (found.found_as, found.person.upstack_id) == (found_as, upstack_id)
    assert f"Person {upstack_id}" in format_trace(found)


@pytest.mark.slow  # a whole Dagster sync
def test_the_view_has_one_row_per_commerce_event_and_says_so(synced):
    assert query(synced, f"select count(*), count(distinct event_id) from {JOURNEY_VIEW}") == \
        query(synced, "select count(*), count(*) from resolved_events")
    [(comment,)] = query(synced, "select comment from duckdb_views() where view_name = ?", [JOURNEY_VIEW])
    assert comment.startswith("One row per commerce event") and comment.endswith("tells the same story as text.")
    header = (Path(__file__).resolve().parent.parent / "sql" / f"{JOURNEY_VIEW}.sql").read_text().split("\ncreate ")[0]
    described = re.findall(r"^-- (\w+): ", header, flags=re.MULTILINE)
    assert described == [name for (name,) in query(synced, "select column_name from duckdb_columns() where "
                                                           "table_name = ? order by column_index", [JOURNEY_VIEW])]
    [(raw_json, decision, request_id, http_status)] = query(
        synced, f"select raw_json, decision, request_id, http_status from {JOURNEY_VIEW} where event_id = 'cart-1'")
    assert json.loads(raw_json)["event_id"] == "cart-1"
    assert (decision, request_id, http_status) == ("outbox", request_of(synced, "cart-1"), 202)


@pytest.mark.slow  # a whole Dagster sync
def test_a_browser_nobody_is_tied_to_and_a_page_view_say_so(synced):
    browser = format_trace(trace(synced, "cookie-other"))
    page = format_trace(trace(synced, "page-1"))

    assert "Browser cookie-other (no person named)" in browser and "Commerce events (0)" in browser
    assert "page-1 is a PageView event (events/dt=2/part-0.ndjson line 1, cookie cookie-other), not a commerce " \
           "event" in page


def test_without_delivery_the_story_is_still_told_and_an_unknown_needle_says_what_to_pass(settings):
    write_events(settings.events_dir / "part-0.ndjson", [make_event("cart-1", event_time=ago(hours=2))])
    write_lines(settings.events_dir / "part-1.ndjson", ['{"event_id": "broken-1", "event_name": "AddToCart"}'])
    for step in (ingest_events, resolve_identities, map_events, refresh):  # the analytics step creates the view
        step(settings, now=NOW)

    nothing = trace(settings, "nobody@nowhere.org")
    quarantined = format_trace(trace(settings, "broken-1"))

    assert (nothing.found_as, nothing.person, nothing.events) == (None, None, [])
    assert format_trace(nothing) == (
        "Trace of nobody@nowhere.org: no match\n"
        "  Nothing in the warehouse matches 'nobody@nowhere.org'. Pass an event_id (the pixel's), an upstack_id "
        "(up_ and 20 hex digits, from identities or resolved_events), an anonymous_id (the pixel's cookie) or an "
        "email address (any case).\n")
    assert "broken-1 is the event_id of a line that was quarantined, never ingested: events/part-1.ndjson line 1, " \
           "missing_field" in quarantined


def test_a_warehouse_that_does_not_exist_is_named(tmp_path):
    found = trace(Settings(warehouse_path=tmp_path / "nowhere.duckdb"), "jane@gmail.com")

    assert found.found_as is None
    assert found.notes == [f"There is no warehouse at {tmp_path / 'nowhere.duckdb'}: set UPSTACK_WAREHOUSE, or run "
                           "`upstack sync`."]


@pytest.mark.slow  # waits through Klaviyo's Retry-After
def test_retries_share_their_request_id_and_every_delivered_row_names_a_recorded_request(settings):
    write_events(settings.events_dir / "part-0.ndjson", [
        make_event(f"cart-{person}", anonymous_id=f"cookie-{person}", session_id=f"s-{person}",
                   event_time=ago(hours=2), user_data={"email": f"shopper{person}@gmail.com"})
        for person in range(6)])
    mapped = replace(settings, destination=replace(settings.destination, send_mode="all"))
    for step in (ingest_events, resolve_identities, map_events):
        step(mapped, now=NOW)
    with KlaviyoEmulator(api_key=KEY, rate_limits=None, faults=Faults(force_429_every=2)) as emulator:
        run = deliver(mapped, now=NOW, client=KlaviyoClient(emulator.base_url, KEY, backoff_seconds=0.01),
                      events_per_request=2, concurrency=1)
    refresh(mapped, now=NOW)  # the sync's last step, which creates the view the trace reads

    assert (run.delivered, run.retried) == (6, 2)  # the emulator answers 429 to its 2nd and 4th requests
    requests = query(settings, "select list(status order by sent_at) from klaviyo_deliveries group by request_id")
    assert sorted(statuses for (statuses,) in requests) == [[202], [429, 202], [429, 202]]
    assert query(settings, "select count(*) from klaviyo_outbox where status = 'delivered' and request_id in "
                           "(select request_id from klaviyo_deliveries where status = 202)") == [(6,)]
    [(retried, request_id)] = query(settings, "select event_id, request_id from klaviyo_outbox where request_id in "
                                              "(select request_id from klaviyo_deliveries where status = 429) "
                                              "order by event_id limit 1")
    assert f"request:   {request_id}: HTTP 202 (2 attempts, the last sent " in format_trace(trace(settings, retried))
