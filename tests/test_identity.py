"""Identity resolution (SPEC 4) journey by journey: real landing files, a real DuckDB warehouse, no mocks.

Each test writes the events of one shopper story, ingests them, resolves identities and asserts, for every commerce
event (ViewContent, AddToCart, InitiateCheckout, Purchase), exactly who it was attributed to (email, Klaviyo _kx, or
nobody) and how (match_method). Times are explicit and lie in the past relative to NOW.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import timedelta, timezone

import duckdb
import pytest

from conftest import NOW, make_event, query, upstack_id, write_events
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.warehouse import read_sql

# Every story starts ten days ago, on a whole minute, and is written with a -05:00 offset (the offset is honoured).
BASE = (NOW - timedelta(days=10)).replace(second=0, microsecond=0)
EASTERN = timezone(timedelta(hours=-5))
SHOP_URL = "https://acme.myshopify.com"
NOBODY = (None, None, None)
IPHONE_SAFARI = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Version/18.1 Safari"


def at(days: float = 0, minutes: float = 0) -> str:
    return (BASE + timedelta(days=days, minutes=minutes)).astimezone(EASTERN).isoformat()


def ev(event_id: str, name: str, when: str, anon: str, session: str, user: dict | None = None,
       url: str = SHOP_URL + "/products/mug") -> dict:
    """One pixel event; user_data holds only what is given (plus klaviyo_identified=false)."""
    return make_event(event_id, event_name=name, event_time=when, anonymous_id=anon, session_id=session,
                      event_source_url=url, user_data={"klaviyo_identified": False, **(user or {})})


def run(settings, events: list[dict] | None = None, file: str = "run1.ndjson", now=NOW):
    if events:
        write_events(settings.events_dir / file, events)
    ingest_events(settings, now=now)
    if any(settings.customers_dir.iterdir()):
        ingest_customers(settings, now=now)
    return resolve_identities(settings, now=now)


def resolved(settings) -> dict[str, tuple]:
    return {event_id: (email, kx, method) for event_id, email, kx, method in query(
        settings, "select event_id, email, kx, match_method from resolved_events order by event_id")}


def column(settings, name: str) -> dict[str, object]:
    return dict(query(settings, f"select event_id, {name} from resolved_events order by event_id"))


def flags(settings) -> set[tuple[str, str]]:
    return set(query(settings, "select flag, subject from identity_flags"))


def with_identity(settings, **changes):
    return replace(settings, identity=replace(settings.identity, **changes))


# ------------------------------------------------------------------------------------------------ journeys

def test_returning_safari_shopper_with_an_expired_klaviyo_cookie_is_named_by_cookie_history(settings):
    jane = "jane.doe@gmail.com"
    run(settings, [
        # Day 0: she browses, types her email at checkout and buys; Klaviyo's own cookie knows her then.
        ev("s1-view", "ViewContent", at(0, 0), "safari-jane", "s1"),
        ev("s1-cart", "AddToCart", at(0, 2), "safari-jane", "s1"),
        ev("s1-checkout", "InitiateCheckout", at(0, 5), "safari-jane", "s1", {"email": " Jane.Doe@Gmail.com "}),
        ev("s1-purchase", "Purchase", at(0, 9), "safari-jane", "s1", {"klaviyo_identified": True}),
        # Day 8: Safari has deleted Klaviyo's JavaScript cookie; our server-set cookie survived.
        ev("s2-page", "PageView", at(8, 0), "safari-jane", "s2"),
        ev("s2-view", "ViewContent", at(8, 1), "safari-jane", "s2"),
        ev("s2-cart", "AddToCart", at(8, 3), "safari-jane", "s2"),
        ev("s2-checkout", "InitiateCheckout", at(8, 4), "safari-jane", "s2"),
    ])

    assert resolved(settings) == {
        "s1-view": (jane, None, "same_session"),
        "s1-cart": (jane, None, "same_session"),
        "s1-checkout": (jane, None, "typed_in_event"),
        "s1-purchase": (jane, None, "same_session"),
        "s2-view": (jane, None, "cookie_history"),
        "s2-cart": (jane, None, "cookie_history"),
        "s2-checkout": (jane, None, "cookie_history"),
    }
    assert column(settings, "klaviyo_native") == {
        "s1-view": True, "s1-cart": True, "s1-checkout": True, "s1-purchase": True,
        "s2-view": False, "s2-cart": False, "s2-checkout": False,
    }
    assert column(settings, "klaviyo_native_reason") == {
        "s1-view": "typed_in_session", "s1-cart": "typed_in_session", "s1-checkout": "typed_in_event",
        "s1-purchase": "klaviyo_cookie", "s2-view": None, "s2-cart": None, "s2-checkout": None,
    }
    assert column(settings, "evidence_event_id")["s2-cart"] == "s1-checkout"


def test_klaviyo_email_click_on_a_phone_names_a_later_anonymous_cart_by_the_kx(settings):
    run(settings, [
        # Day 3: she taps a Klaviyo email on her phone; the landing URL carries _kx (URL-encoded).
        ev("land-view", "ViewContent", at(3, 0), "phone", "p1",
           url=SHOP_URL + "/products/mug?_kx=Kx9%3DAbC&utm_source=klaviyo"),
        ev("land-cart", "AddToCart", at(3, 2), "phone", "p1"),
        # Day 6: back on the same phone, anonymous; the pixel no longer sees Klaviyo's cookie.
        ev("later-view", "ViewContent", at(6, 0), "phone", "p2"),
        ev("later-cart", "AddToCart", at(6, 1), "phone", "p2"),
        # Another phone got the kx on user_data instead of the URL.
        ev("other-view", "ViewContent", at(4, 0), "phone-2", "q1", {"kx": "Kx-other"}),
        ev("other-cart", "AddToCart", at(5, 0), "phone-2", "q2"),
        # A third phone comes back a week, then three weeks after its click: a _kx ties the browser as long as
        # the pixel's cookie lives, long after Klaviyo's own cookie is gone from Safari.
        ev("old-view", "ViewContent", at(-12), "phone-3", "r1", url=SHOP_URL + "/?_kx=KxOld"),
        ev("old-week-later-cart", "AddToCart", at(-5), "phone-3", "r2"),
        ev("old-three-weeks-later-cart", "AddToCart", at(9), "phone-3", "r3"),
    ])

    assert resolved(settings) == {
        "land-view": (None, "Kx9=AbC", "klaviyo_click"),
        "land-cart": (None, "Kx9=AbC", "klaviyo_click"),
        "later-view": (None, "Kx9=AbC", "klaviyo_click"),
        "later-cart": (None, "Kx9=AbC", "klaviyo_click"),
        "other-view": (None, "Kx-other", "klaviyo_click"),
        "other-cart": (None, "Kx-other", "klaviyo_click"),
        "old-view": (None, "KxOld", "klaviyo_click"),
        "old-week-later-cart": (None, "KxOld", "klaviyo_click"),
        "old-three-weeks-later-cart": (None, "KxOld", "klaviyo_click"),
    }
    # Nobody typed an email and Klaviyo's cookie did not identify these events: they are ours to send.
    assert set(column(settings, "klaviyo_native").values()) == {False}
    # The kx is a person of its own (no email tied to it), named on the events.
    identities = query(settings, "select anchor_type, kx, upstack_id from identities order by kx")
    assert [(anchor, kx) for anchor, kx, _ in identities] == [("kx", "Kx-other"), ("kx", "Kx9=AbC"), ("kx", "KxOld")]
    upstack_ids = column(settings, "upstack_id")
    assert upstack_ids["later-cart"] == upstack_ids["land-view"] == identities[1][2]


def test_instagram_in_app_browser_hands_the_click_to_safari_within_minutes(settings):
    fbclid = "IwAR2xYzInstagramClick"
    fbc = f"fb.1.{int((BASE.timestamp() + 86400) * 1000)}.{fbclid}"
    mia = "mia@icloud.com"
    run(settings, [
        # Instagram's in-app browser: she lands from the ad and types her email in a sign-up form.
        ev("ig-view", "ViewContent", at(1, 0), "ig-webview", "ig-1", {"fbc": fbc},
           url=f"{SHOP_URL}/products/mug?fbclid={fbclid}"),
        ev("ig-signup", "Identify", at(1, 2), "ig-webview", "ig-1", {"email": mia, "fbc": fbc}),
        ev("ig-cart", "AddToCart", at(1, 3), "ig-webview", "ig-1", {"fbc": fbc}),
        # "Open in Safari" four minutes later: a new cookie, the same click id, no email.
        ev("safari-view", "ViewContent", at(1, 7), "safari", "sf-1", {"fbc": fbc},
           url=f"{SHOP_URL}/products/mug?fbclid={fbclid}"),
        ev("safari-cart", "AddToCart", at(1, 9), "safari", "sf-1", {"fbc": fbc}),
        ev("safari-checkout", "InitiateCheckout", at(1, 10), "safari", "sf-1", {"fbc": fbc}),
    ])

    assert resolved(settings) == {
        "ig-view": (mia, None, "same_session"),
        "ig-cart": (mia, None, "same_session"),
        "safari-view": (mia, None, "click_id_handoff"),
        "safari-cart": (mia, None, "click_id_handoff"),
        "safari-checkout": (mia, None, "click_id_handoff"),
    }
    assert query(settings, "select anonymous_id, other_anonymous_id, linked_by, evidence from browser_links") == [
        ("ig-webview", "safari", "click_id_handoff", f"fbclid:{fbclid}")]
    assert column(settings, "klaviyo_native")["safari-cart"] is False


def test_an_in_app_handoff_whose_two_browsers_land_in_different_runs_is_still_linked(settings):
    fbclid = "IwAR7TwoHourlyFiles"
    url = f"{SHOP_URL}/products/mug?fbclid={fbclid}"
    # Run 1: only Safari's events have landed so far.
    run(settings, [
        ev("safari-view", "ViewContent", at(1, 7), "safari", "sf-1", url=url),
        ev("safari-cart", "AddToCart", at(1, 9), "safari", "sf-1"),
    ], file="safari.ndjson")
    assert resolved(settings) == {"safari-view": NOBODY, "safari-cart": NOBODY}

    # Run 2: the in-app browser's events, earlier in time, land an hour later.
    run(settings, [
        ev("ig-view", "ViewContent", at(1, 0), "ig-webview", "ig-1", url=url),
        ev("ig-signup", "Identify", at(1, 2), "ig-webview", "ig-1", {"email": "mia@icloud.com"}),
    ], file="instagram.ndjson", now=NOW + timedelta(hours=1))

    assert resolved(settings) == {
        "ig-view": ("mia@icloud.com", None, "same_session"),
        "safari-view": ("mia@icloud.com", None, "click_id_handoff"),
        "safari-cart": ("mia@icloud.com", None, "click_id_handoff"),
    }
    assert set(column(settings, "klaviyo_native").values()) == {True, False}
    assert column(settings, "klaviyo_native")["safari-cart"] is False


def test_a_click_id_two_hours_apart_or_opened_in_three_browsers_is_not_a_handoff(settings):
    fbclid, posted = "IwAR9SlowHandoff", "IwAR3PostedInAGroupChat"
    run(settings, [
        ev("ig-view", "ViewContent", at(1, 0), "ig-webview", "ig-1", url=f"{SHOP_URL}/?fbclid={fbclid}"),
        ev("ig-signup", "Identify", at(1, 2), "ig-webview", "ig-1", {"email": "mia@icloud.com"}),
        ev("safari-view", "ViewContent", at(1, 120), "safari", "sf-1", url=f"{SHOP_URL}/?fbclid={fbclid}"),
        ev("safari-cart", "AddToCart", at(1, 122), "safari", "sf-1"),
        # One click id opened in three browsers within minutes: a shared link, not one person.
        ev("a-view", "ViewContent", at(2, 0), "browser-a", "a1", {"email": "ann@gmail.com"},
           url=f"{SHOP_URL}/?fbclid={posted}"),
        ev("b-cart", "AddToCart", at(2, 3), "browser-b", "b1", url=f"{SHOP_URL}/?fbclid={posted}"),
        ev("c-cart", "AddToCart", at(2, 5), "browser-c", "c1", url=f"{SHOP_URL}/?fbclid={posted}"),
    ])

    assert resolved(settings) == {
        "ig-view": ("mia@icloud.com", None, "same_session"),
        "safari-view": NOBODY,
        "safari-cart": NOBODY,
        "a-view": ("ann@gmail.com", None, "typed_in_event"),
        "b-cart": NOBODY,
        "c-cart": NOBODY,
    }
    assert query(settings, "select count(*) from browser_links") == [(0,)]
    assert column(settings, "unresolved_reason")["safari-cart"] == "no_evidence"
    assert flags(settings) == {("shared_click_id", f"fbclid:{posted}")}


def test_login_with_only_the_shopify_customer_id_is_named_through_the_customers_export(settings):
    (settings.customers_dir / "customers.csv").write_text(
        "customer_id,email,phone,first_name,last_name,city,region,country,accepts_marketing\n"
        "8123456789,Lena.Ruiz@Gmail.com,,Lena,Ruiz,Austin,TX,US,true\n")
    run(settings, [
        ev("login", "Identify", at(2, 0), "laptop", "l1", {"external_id": "8123456789"}),
        ev("l1-view", "ViewContent", at(2, 1), "laptop", "l1", {"external_id": "8123456789"}),
        ev("l1-cart", "AddToCart", at(2, 2), "laptop", "l1", {"external_id": "8123456789"}),
        ev("l2-cart", "AddToCart", at(4, 0), "laptop", "l2"),   # logged out, two days later
    ])

    # The only link from the customer id to an email is the customers export: customer_file.
    lena = "lena.ruiz@gmail.com"
    assert resolved(settings) == {
        "l1-view": (lena, None, "customer_file"),
        "l1-cart": (lena, None, "customer_file"),
        "l2-cart": (lena, None, "customer_file"),
    }
    assert query(settings, "select email, customer_ids, first_name, city from identities") == [
        (lena, ["8123456789"], "Lena", "Austin")]


def test_a_customers_export_arriving_after_the_login_names_the_earlier_events(settings):
    run(settings, [
        ev("login", "Identify", at(2, 0), "laptop", "l1", {"external_id": "8123456789"}),
        ev("l1-cart", "AddToCart", at(2, 2), "laptop", "l1", {"external_id": "8123456789"}),
    ])
    assert resolved(settings) == {"l1-cart": NOBODY}

    (settings.customers_dir / "customers.csv").write_text("customer_id,email\n8123456789,lena.ruiz@gmail.com\n")
    run(settings, now=NOW + timedelta(minutes=5))

    assert resolved(settings) == {"l1-cart": ("lena.ruiz@gmail.com", None, "customer_file")}


def test_a_customer_id_seen_with_an_email_on_one_browser_names_a_login_on_another(settings):
    sam = "sam.lee@outlook.com"
    run(settings, [
        # On the laptop, Shopify's login carries both the customer id and the email.
        ev("laptop-login", "Identify", at(1, 0), "laptop", "l1", {"external_id": "777", "email": sam}),
        # On the phone, the login event only has the customer id.
        ev("phone-login", "Identify", at(3, 0), "phone", "p1", {"external_id": "777"}),
        ev("phone-view", "ViewContent", at(3, 1), "phone", "p1"),
        ev("phone-cart", "AddToCart", at(3, 2), "phone", "p1"),
        ev("phone-later-cart", "AddToCart", at(5, 0), "phone", "p2"),
    ])

    assert resolved(settings) == {
        "phone-view": (sam, None, "login"),
        "phone-cart": (sam, None, "login"),
        "phone-later-cart": (sam, None, "login"),
    }
    # Klaviyo's embed logging the customer in is unverified (identity-design.md 8.3): not counted as native.
    assert column(settings, "klaviyo_native")["phone-cart"] is False


def _family_tablet(extra: list[dict] | None = None) -> list[dict]:
    return [
        # Mum, day 1.
        ev("mum1-view", "ViewContent", at(1, 0), "tablet", "t1"),
        ev("mum1-checkout", "InitiateCheckout", at(1, 3), "tablet", "t1", {"email": "mum@gmail.com"}),
        # The teenager, day 3: browses and carts, then types their own email.
        ev("teen-view", "ViewContent", at(3, 0), "tablet", "t2"),
        ev("teen-cart", "AddToCart", at(3, 2), "tablet", "t2"),
        ev("teen-checkout", "InitiateCheckout", at(3, 4), "tablet", "t2", {"email": "teen@gmail.com"}),
        ev("teen-purchase", "Purchase", at(3, 6), "tablet", "t2"),
        # Mum again, day 5: carts before typing her email.
        ev("mum2-cart", "AddToCart", at(5, 0), "tablet", "t3"),
        ev("mum2-checkout", "InitiateCheckout", at(5, 2), "tablet", "t3", {"email": "mum@gmail.com"}),
        # Day 6: someone carts without typing anything.
        ev("anon-cart", "AddToCart", at(6, 0), "tablet", "t4"),
        *(extra or []),
    ]


def test_family_tablet_with_two_people_names_each_session_by_its_own_typist(settings):
    run(settings, _family_tablet())

    # In-session evidence always beats the tablet's history: the teenager's early events are not mum's.
    # max_emails_per_browser=2 does not treat two people as a shared device: an anonymous session takes the
    # latest typed email on the tablet (identity switch), here mum's.
    assert resolved(settings) == {
        "mum1-view": ("mum@gmail.com", None, "same_session"),
        "mum1-checkout": ("mum@gmail.com", None, "typed_in_event"),
        "teen-view": ("teen@gmail.com", None, "same_session"),
        "teen-cart": ("teen@gmail.com", None, "same_session"),
        "teen-checkout": ("teen@gmail.com", None, "typed_in_event"),
        "teen-purchase": ("teen@gmail.com", None, "same_session"),
        "mum2-cart": ("mum@gmail.com", None, "same_session"),
        "mum2-checkout": ("mum@gmail.com", None, "typed_in_event"),
        "anon-cart": ("mum@gmail.com", None, "cookie_history"),
    }
    upstack_ids = column(settings, "upstack_id")
    assert upstack_ids["mum1-view"] == upstack_ids["anon-cart"] != upstack_ids["teen-cart"]


def test_family_tablet_with_a_third_person_becomes_a_shared_device(settings):
    run(settings, _family_tablet([
        # Dad, day 7: types his email; the tablet now carries three emails.
        ev("dad-view", "ViewContent", at(7, 0), "tablet", "t5"),
        ev("dad-checkout", "InitiateCheckout", at(7, 1), "tablet", "t5", {"email": "dad@gmail.com"}),
        ev("after-dad-cart", "AddToCart", at(8, 0), "tablet", "t6"),
        ev("after-dad-checkout", "InitiateCheckout", at(8, 1), "tablet", "t6"),
    ]))

    # Before dad, two emails: the latest still names the anonymous session; after him, nobody does. Typed
    # emails still name their own session.
    assert resolved(settings) == {
        "mum1-view": ("mum@gmail.com", None, "same_session"),
        "mum1-checkout": ("mum@gmail.com", None, "typed_in_event"),
        "teen-view": ("teen@gmail.com", None, "same_session"),
        "teen-cart": ("teen@gmail.com", None, "same_session"),
        "teen-checkout": ("teen@gmail.com", None, "typed_in_event"),
        "teen-purchase": ("teen@gmail.com", None, "same_session"),
        "mum2-cart": ("mum@gmail.com", None, "same_session"),
        "mum2-checkout": ("mum@gmail.com", None, "typed_in_event"),
        "anon-cart": ("mum@gmail.com", None, "cookie_history"),
        "dad-view": ("dad@gmail.com", None, "same_session"),
        "dad-checkout": ("dad@gmail.com", None, "typed_in_event"),
        "after-dad-cart": NOBODY,
        "after-dad-checkout": NOBODY,
    }
    reasons = column(settings, "unresolved_reason")
    assert reasons["after-dad-cart"] == reasons["after-dad-checkout"] == "shared_device"


def test_a_tablet_with_three_emails_but_never_more_than_two_within_a_cookies_lifetime_is_no_shared_device(settings):
    settings = with_identity(settings, cookie_lifetime=timedelta(days=3))
    run(settings, _family_tablet([
        ev("dad-checkout", "InitiateCheckout", at(7, 1), "tablet", "t5", {"email": "dad@gmail.com"}),
        ev("after-dad-cart", "AddToCart", at(8, 0), "tablet", "t6"),
    ]))

    # Three emails in all, but within three days before dad's only mum's (day 5) and his: the latest names the cart.
    assert resolved(settings)["after-dad-cart"] == ("dad@gmail.com", None, "cookie_history")


def test_a_shared_device_is_flagged_once_under_its_cluster(settings):
    run(settings, _family_tablet([
        ev("gran-checkout", "InitiateCheckout", at(7, 0), "tablet", "t5", {"email": "gran@gmail.com"}),
        ev("after-gran-cart", "AddToCart", at(8, 0), "tablet", "t6"),
    ]))
    assert column(settings, "unresolved_reason")["after-gran-cart"] == "shared_device"
    assert query(settings, "select flag, subject, detail from identity_flags") == [
        ("shared_device", "tablet", "more than 2 emails: its history names nobody")]

    # Another anonymous cart on the tablet, in a later run: named by nobody again, and flagged no second time.
    run(settings, [ev("later-cart", "AddToCart", at(9, 0), "tablet", "t7")], file="run2.ndjson",
        now=NOW + timedelta(minutes=10))
    assert column(settings, "unresolved_reason")["later-cart"] == "shared_device"
    assert query(settings, "select count(*) from identity_flags") == [(1,)]


def test_family_tablet_with_max_one_email_per_browser_names_no_anonymous_session_after_the_second(settings):
    strict = with_identity(settings, max_emails_per_browser=1)
    run(strict, _family_tablet())

    assert resolved(strict) == {
        "mum1-view": ("mum@gmail.com", None, "same_session"),
        "mum1-checkout": ("mum@gmail.com", None, "typed_in_event"),
        "teen-view": ("teen@gmail.com", None, "same_session"),
        "teen-cart": ("teen@gmail.com", None, "same_session"),
        "teen-checkout": ("teen@gmail.com", None, "typed_in_event"),
        "teen-purchase": ("teen@gmail.com", None, "same_session"),
        "mum2-cart": ("mum@gmail.com", None, "same_session"),
        "mum2-checkout": ("mum@gmail.com", None, "typed_in_event"),
        "anon-cart": NOBODY,
    }
    assert column(strict, "unresolved_reason")["anon-cart"] == "shared_device"


def test_placeholder_emails_never_become_identities_and_are_counted(settings):
    run(settings, [
        ev("v1", "ViewContent", at(1, 0), "cookie-p", "s1", {"email": "test@test.com"}),
        ev("c1", "AddToCart", at(1, 1), "cookie-p", "s1", {"email": " TEST@test.com"}),
        ev("k1", "InitiateCheckout", at(1, 2), "cookie-p", "s1", {"email": "undefined"}),
        ev("k2", "InitiateCheckout", at(1, 3), "cookie-p", "s1", {"email": ""}),
        ev("p1", "Purchase", at(1, 4), "cookie-p", "s1", {"email": "support@acme.myshopify.com"}),
        ev("id1", "Identify", at(1, 5), "cookie-p", "s1", {"email": "orders@acme.myshopify.com"}),
        ev("later", "AddToCart", at(3, 0), "cookie-p", "s2"),
    ])

    assert resolved(settings) == {event: NOBODY for event in ("v1", "c1", "k1", "k2", "p1", "later")}
    assert set(column(settings, "unresolved_reason").values()) == {"no_evidence"}
    assert query(settings, "select count(*) from identities") == [(0,)]
    assert query(settings, "select count(*) from identity_observations where id_type = 'email'") == [(0,)]
    assert set(query(settings, "select id_type, value, reason, times_seen from identity_rejected_values")) == {
        ("email", "test@test.com", "blocklisted", 2),
        ("email", "undefined", "placeholder", 1),
        ("email", "", "placeholder", 1),
        ("email", "support@acme.myshopify.com", "blocklisted", 1),
        ("email", "orders@acme.myshopify.com", "store_address", 1),
    }


def _cookie_reset() -> list[dict]:
    same_device = {"client_ip_address": "198.51.100.23", "client_user_agent": IPHONE_SAFARI}
    return [
        ev("old-checkout", "InitiateCheckout", at(2, 0), "cookie-before", "r1",
           {"email": "noah@gmail.com", **same_device}),
        ev("old-cart", "AddToCart", at(2, 1), "cookie-before", "r1", same_device),
        # Cookies cleared: a new anonymous_id, a new session, no click id; same IP and user agent 4 minutes later.
        ev("new-view", "ViewContent", at(2, 5), "cookie-after", "r2", same_device),
        ev("new-cart", "AddToCart", at(2, 6), "cookie-after", "r2", same_device),
        # Another phone on the same IP with a different browser: never linked.
        ev("neighbour-cart", "AddToCart", at(2, 7), "cookie-neighbour", "r3",
           {"client_ip_address": "198.51.100.23", "client_user_agent": "Mozilla/5.0 (Linux; Android 15) Chrome"}),
    ]


def test_a_cookie_reset_is_not_linked_by_default(settings):
    run(settings, _cookie_reset())

    assert resolved(settings) == {
        "old-checkout": ("noah@gmail.com", None, "typed_in_event"),
        "old-cart": ("noah@gmail.com", None, "same_session"),
        "new-view": NOBODY,
        "new-cart": NOBODY,
        "neighbour-cart": NOBODY,
    }
    assert query(settings, "select count(*) from browser_links") == [(0,)]


def test_a_cookie_reset_is_linked_by_ip_and_user_agent_only_with_probabilistic_matching(settings):
    probabilistic = with_identity(settings, probabilistic_matching=True)
    run(probabilistic, _cookie_reset())

    assert resolved(probabilistic) == {
        "old-checkout": ("noah@gmail.com", None, "typed_in_event"),
        "old-cart": ("noah@gmail.com", None, "same_session"),
        "new-view": ("noah@gmail.com", None, "probabilistic_ip_ua"),
        "new-cart": ("noah@gmail.com", None, "probabilistic_ip_ua"),
        "neighbour-cart": NOBODY,
    }


def test_an_email_typed_mid_session_stitches_the_earlier_events_of_that_session(settings):
    run(settings, [
        ev("view", "ViewContent", at(4, 0), "cookie-m", "m1"),
        ev("cart", "AddToCart", at(4, 2), "cookie-m", "m1"),
        ev("shipping", "AddShippingInfo", at(4, 5), "cookie-m", "m1", {"email": "Olga@Proton.me"}),
        ev("checkout", "InitiateCheckout", at(4, 6), "cookie-m", "m1"),
        ev("purchase", "Purchase", at(4, 9), "cookie-m", "m1", {"email": "olga@proton.me"}),
        # Another shopper carting meanwhile, on another cookie and session, is not stitched.
        ev("stranger-cart", "AddToCart", at(4, 3), "cookie-stranger", "m2"),
    ])

    assert resolved(settings) == {
        "view": ("olga@proton.me", None, "same_session"),
        "cart": ("olga@proton.me", None, "same_session"),
        "checkout": ("olga@proton.me", None, "same_session"),
        "purchase": ("olga@proton.me", None, "typed_in_event"),
        "stranger-cart": NOBODY,
    }
    assert column(settings, "evidence_event_id") == {
        "view": "shipping", "cart": "shipping", "checkout": "shipping", "purchase": "purchase",
        "stranger-cart": None,
    }
    assert column(settings, "klaviyo_native_reason") == {
        "view": "typed_in_session", "cart": "typed_in_session", "checkout": "typed_in_session",
        "purchase": "typed_in_event", "stranger-cart": None,
    }


def test_an_email_typed_in_a_later_hourly_run_leaves_the_earlier_anonymous_session_alone(settings):
    run(settings, [
        ev("k1-view", "ViewContent", at(2, 0), "safari-kim", "k1"),
        ev("k1-cart", "AddToCart", at(2, 1), "safari-kim", "k1"),
    ], file="hour-1.ndjson")
    assert resolved(settings) == {"k1-view": NOBODY, "k1-cart": NOBODY}

    # Next hour's file: a new session on the same cookie, where she types her email. Her cookie's earlier events
    # are looked at again (the cookie has new evidence); nothing before the email names them.
    run(settings, [
        ev("k2-view", "ViewContent", at(3, 0), "safari-kim", "k2"),
        ev("k2-checkout", "InitiateCheckout", at(3, 2), "safari-kim", "k2", {"email": "kim@gmail.com"}),
    ], file="hour-2.ndjson", now=NOW + timedelta(hours=1))

    assert resolved(settings) == {
        "k1-view": NOBODY,
        "k1-cart": NOBODY,
        "k2-view": ("kim@gmail.com", None, "same_session"),
        "k2-checkout": ("kim@gmail.com", None, "typed_in_event"),
    }
    assert column(settings, "klaviyo_native") == {
        "k1-view": False, "k1-cart": False, "k2-view": True, "k2-checkout": True}


def test_events_arriving_out_of_order_across_runs_are_stitched_and_a_rerun_changes_nothing(settings):
    # Run 1: the anonymous cart events of the session, in a file whose name sorts last.
    run(settings, [
        ev("view", "ViewContent", at(5, 0), "cookie-o", "o1"),
        ev("cart", "AddToCart", at(5, 2), "cookie-o", "o1"),
    ], file="part-0002.ndjson")
    assert resolved(settings) == {"view": NOBODY, "cart": NOBODY}

    # Run 2: the checkout of the same session, with the typed email, lands late in a file that sorts first.
    run(settings, [
        ev("checkout", "InitiateCheckout", at(5, 4), "cookie-o", "o1", {"email": "pia@gmail.com"}),
    ], file="part-0001.ndjson", now=NOW + timedelta(minutes=10))
    assert resolved(settings) == {
        "view": ("pia@gmail.com", None, "same_session"),
        "cart": ("pia@gmail.com", None, "same_session"),
        "checkout": ("pia@gmail.com", None, "typed_in_event"),
    }
    assert set(column(settings, "klaviyo_native_reason").values()) == {"typed_in_session", "typed_in_event"}

    # Run 3: nothing new. Nothing changes, not even resolved_at.
    everything = "select * from resolved_events order by event_id"
    people = "select * from identities order by upstack_id"
    before, people_before = query(settings, everything), query(settings, people)
    later = run(settings, now=NOW + timedelta(minutes=20))
    assert later.events_resolved == 0
    assert query(settings, everything) == before
    assert query(settings, people) == people_before

    # Run 4: she comes back; she is the same person, with the same upstack_id.
    upstack_id = column(settings, "upstack_id")["cart"]
    assert upstack_id is not None
    run(settings, [ev("return-cart", "AddToCart", at(7, 0), "cookie-o", "o2")],
        file="part-0003.ndjson", now=NOW + timedelta(minutes=30))
    assert resolved(settings)["return-cart"] == ("pia@gmail.com", None, "cookie_history")
    assert set(column(settings, "upstack_id").values()) == {upstack_id}
    assert query(settings, "select upstack_id, email from identities") == [(upstack_id, "pia@gmail.com")]


def test_a_link_seen_again_keeps_its_first_sighting_unless_a_late_event_saw_it_earlier(settings):
    def links() -> dict[str, tuple]:
        return {right: (first_seen, last_seen, times, first_event) for right, first_seen, last_seen, times, first_event
                in query(settings, "select right_value, first_seen, last_seen, times_seen, first_event_id "
                                   "from identity_links where left_value = 'cookie-l' and right_type = 'email'")}

    run(settings, [
        ev("ann-1", "ViewContent", at(3, 0), "cookie-l", "l1", {"email": "ann@gmail.com"}),
        ev("bo-1", "ViewContent", at(3, 5), "cookie-l", "l1", {"email": "bo@gmail.com"}),
    ], file="part-0001.ndjson")
    first = links()

    # The next run sees Ann's link again, later, and Bo's in an event from before the one that was read first.
    run(settings, [
        ev("ann-2", "ViewContent", at(4, 0), "cookie-l", "l2", {"email": "ann@gmail.com"}),
        ev("bo-0", "ViewContent", at(2, 0), "cookie-l", "l0", {"email": "bo@gmail.com"}),
    ], file="part-0002.ndjson", now=NOW + timedelta(minutes=10))
    second = links()
    assert second["ann@gmail.com"] == (first["ann@gmail.com"][0], second["ann@gmail.com"][1], 2, "ann-1")
    assert second["ann@gmail.com"][1] > first["ann@gmail.com"][1]
    assert second["bo@gmail.com"] == (second["bo@gmail.com"][0], first["bo@gmail.com"][1], 2, "bo-0")
    assert second["bo@gmail.com"][0] < first["bo@gmail.com"][0]


# ------------------------------------------------------------------------------------------------ guards

def test_two_cookies_joined_by_a_click_id_with_different_emails_are_not_merged(settings):
    fbclid = "IwAR5SharedWithAFriend"
    url = f"{SHOP_URL}/products/mug?fbclid={fbclid}"
    run(settings, [
        # Alice clicks the ad and types her email; she sends the link to Bob, who opens it minutes later.
        ev("alice-view", "ViewContent", at(1, 0), "alice-ig", "a1", url=url),
        ev("alice-signup", "Identify", at(1, 1), "alice-ig", "a1", {"email": "alice@gmail.com"}),
        ev("bob-view", "ViewContent", at(1, 5), "bob-safari", "b1", url=url),
        ev("bob-checkout", "InitiateCheckout", at(1, 8), "bob-safari", "b1", {"email": "bob@yahoo.com"}),
        ev("bob-later-cart", "AddToCart", at(2, 0), "bob-safari", "b2"),
        ev("alice-later-cart", "AddToCart", at(2, 0), "alice-ig", "a2"),
    ])

    assert resolved(settings) == {
        "alice-view": ("alice@gmail.com", None, "same_session"),
        "bob-view": ("bob@yahoo.com", None, "same_session"),
        "bob-checkout": ("bob@yahoo.com", None, "typed_in_event"),
        "bob-later-cart": ("bob@yahoo.com", None, "cookie_history"),
        "alice-later-cart": ("alice@gmail.com", None, "cookie_history"),
    }
    assert ("conflicting_emails", "alice-ig ~ bob-safari") in flags(settings)
    assert query(settings, "select count(*) from browser_clusters") == [(0,)]
    assert len(set(column(settings, "browser_cluster_id").values())) == 2


def _click_chain() -> list[dict]:
    """Three cookies chained by two ad-click handoffs; the email is typed on the first, the cart is on the last."""
    return [
        ev("one-view", "ViewContent", at(1, 0), "chain-1", "c1", url=f"{SHOP_URL}/?fbclid=ClickOne"),
        ev("one-signup", "Identify", at(1, 1), "chain-1", "c1", {"email": "ruth@gmail.com"}),
        ev("two-view", "ViewContent", at(1, 3), "chain-2", "c2", url=f"{SHOP_URL}/?fbclid=ClickOne"),
        ev("two-view-2", "ViewContent", at(1, 10), "chain-2", "c2", url=f"{SHOP_URL}/?gclid=ClickTwo"),
        ev("three-view", "ViewContent", at(1, 12), "chain-3", "c3", url=f"{SHOP_URL}/?gclid=ClickTwo"),
        ev("three-cart", "AddToCart", at(1, 14), "chain-3", "c3"),
    ]


def test_a_cluster_within_max_browsers_per_cluster_is_merged(settings):
    run(settings, _click_chain())

    assert resolved(settings) == {
        "one-view": ("ruth@gmail.com", None, "same_session"),
        "two-view": ("ruth@gmail.com", None, "click_id_handoff"),
        "two-view-2": ("ruth@gmail.com", None, "click_id_handoff"),
        "three-view": ("ruth@gmail.com", None, "click_id_handoff"),
        "three-cart": ("ruth@gmail.com", None, "click_id_handoff"),
    }
    assert query(settings, "select distinct browser_cluster_id from browser_clusters") == [("bc_chain-1",)]


def test_a_cluster_bigger_than_max_browsers_per_cluster_is_flagged_and_not_merged(settings):
    small = with_identity(settings, max_browsers_per_cluster=2)
    run(small, _click_chain())

    assert resolved(small) == {
        "one-view": ("ruth@gmail.com", None, "same_session"),
        "two-view": NOBODY,
        "two-view-2": NOBODY,
        "three-view": NOBODY,
        "three-cart": NOBODY,
    }
    assert query(small, "select flag, subject, detail from identity_flags") == [
        ("oversize_cluster", "bc_chain-1", "3 cookies linked; left unmerged")]
    assert query(small, "select count(*) from browser_clusters") == [(0,)]


def test_a_forwarded_klaviyo_email_never_names_the_recipient_with_the_sender(settings):
    run(settings, [
        # Alice clicks her Klaviyo email on her laptop and checks out: her _kx is tied to her email.
        ev("alice-view", "ViewContent", at(1, 0), "alice-laptop", "a1", url=f"{SHOP_URL}/?_kx=KxAlice"),
        ev("alice-checkout", "InitiateCheckout", at(1, 2), "alice-laptop", "a1",
           {"email": "alice@gmail.com", "kx": "KxAlice"}),
        # Bob's browser knows Bob.
        ev("bob-checkout", "InitiateCheckout", at(2, 0), "bob-phone", "b1", {"email": "bob@yahoo.com"}),
        # Alice forwards the email; Bob taps it on his phone.
        ev("bob-fwd-view", "ViewContent", at(3, 0), "bob-phone", "b2", url=f"{SHOP_URL}/products/mug?_kx=KxAlice"),
        ev("bob-fwd-cart", "AddToCart", at(3, 2), "bob-phone", "b2"),
        # Bob again the next day, anonymous.
        ev("bob-next-cart", "AddToCart", at(4, 0), "bob-phone", "b3"),
    ])

    # Never Alice on Bob's phone; with a _kx known to be someone else's on his browser, nobody.
    assert resolved(settings) == {
        "alice-view": ("alice@gmail.com", None, "same_session"),
        "alice-checkout": ("alice@gmail.com", None, "typed_in_event"),
        "bob-checkout": ("bob@yahoo.com", None, "typed_in_event"),
        "bob-fwd-view": NOBODY,
        "bob-fwd-cart": NOBODY,
        "bob-next-cart": NOBODY,
    }
    reasons = column(settings, "unresolved_reason")
    assert {reasons[event] for event in ("bob-fwd-view", "bob-fwd-cart", "bob-next-cart")} == {
        "conflicting_identity"}
    assert not [row for row in query(settings, "select anonymous_id, email, kx from resolved_events")
                if row[0] == "bob-phone" and (row[1] == "alice@gmail.com" or row[2] == "KxAlice")]


def test_a_forwarded_klaviyo_email_whose_kx_owner_is_unknown_never_names_the_recipient_by_it(settings):
    # Alice's _kx was never seen next to her email on this store's pixel (the usual case): its owner is unknown
    # to us, but Klaviyo resolves it to Alice. Bob's phone already carries Bob's typed email.
    run(settings, [
        ev("bob-checkout", "InitiateCheckout", at(2, 0), "bob-phone", "b1", {"email": "bob@yahoo.com"}),
        ev("bob-fwd-view", "ViewContent", at(3, 0), "bob-phone", "b2", url=f"{SHOP_URL}/products/mug?_kx=KxAlice"),
        ev("bob-fwd-cart", "AddToCart", at(3, 2), "bob-phone", "b2"),
        ev("bob-next-cart", "AddToCart", at(4, 0), "bob-phone", "b3"),
    ])

    # A _kx against the browser's own typed email is a conflicting identity (identity-design.md 2.4 and 2.6):
    # sending Bob's cart keyed by Alice's _kx would email Alice about Bob's cart.
    assert resolved(settings) == {
        "bob-checkout": ("bob@yahoo.com", None, "typed_in_event"),
        "bob-fwd-view": NOBODY,
        "bob-fwd-cart": NOBODY,
        "bob-next-cart": ("bob@yahoo.com", None, "cookie_history"),
    }
    assert column(settings, "unresolved_reason")["bob-fwd-cart"] == "conflicting_identity"


def test_a_cookie_without_email_never_bridges_two_people_into_one_cluster(settings):
    run(settings, [
        # Alice hands an ad click to the family Mac; a day later Bob hands another click from the Mac to his phone.
        ev("a-view", "ViewContent", at(1, 0), "alice-ig", "a1", url=f"{SHOP_URL}/?fbclid=BridgeOne"),
        ev("a-signup", "Identify", at(1, 1), "alice-ig", "a1", {"email": "alice@gmail.com"}),
        ev("mac-view", "ViewContent", at(1, 3), "family-mac", "m1", url=f"{SHOP_URL}/?fbclid=BridgeOne"),
        ev("mac-view-2", "ViewContent", at(2, 0), "family-mac", "m2", url=f"{SHOP_URL}/?gclid=BridgeTwo"),
        ev("b-view", "ViewContent", at(2, 5), "bob-phone", "b1", url=f"{SHOP_URL}/?gclid=BridgeTwo"),
        ev("b-signup", "Identify", at(2, 6), "bob-phone", "b1", {"email": "bob@yahoo.com"}),
        # Alice types her email again on her own phone; then Bob carts on his phone without typing.
        ev("a-again", "Identify", at(3, 0), "alice-ig", "a2", {"email": "alice@gmail.com"}),
        ev("b-cart", "AddToCart", at(4, 0), "bob-phone", "b2"),
    ])

    got = resolved(settings)
    assert got["b-view"] == ("bob@yahoo.com", None, "same_session")
    # Bob's own phone carries only Bob's email: his cart is his, never Alice's through the Mac in between.
    assert got["b-cart"] == ("bob@yahoo.com", None, "cookie_history")


def test_a_kx_posted_to_a_group_and_opened_on_many_browsers_is_quarantined(settings):
    url = f"{SHOP_URL}/?_kx=KxPostedOnReddit"
    run(settings, [ev(f"view-{n}", "ViewContent", at(1, n), f"browser-{n}", f"s{n}", url=url) for n in range(4)])

    assert resolved(settings) == {f"view-{n}": NOBODY for n in range(4)}
    assert query(settings, "select id_type, value, reason, times_seen, browsers from identity_rejected_values") == [
        ("kx", "KxPostedOnReddit", "many_browsers", 4, 4)]


def test_a_kx_opened_on_more_browsers_than_one_person_uses_but_never_within_the_window_is_kept(settings):
    settings = with_identity(settings, supernode_window=timedelta(days=2))
    # Five browsers in all, never more than three within two days; then four within minutes.
    spread = [ev(f"spread-{n}", "ViewContent", at(day), f"spread-{n}", f"sp{n}", url=f"{SHOP_URL}/?_kx=KxSpread")
              for n, day in enumerate((0, 3, 6, 7, 8))]
    burst = [ev(f"burst-{n}", "ViewContent", at(9, n), f"burst-{n}", f"bu{n}", url=f"{SHOP_URL}/?_kx=KxBurst")
             for n in range(4)]
    run(settings, spread + burst)

    assert query(settings, "select value, browsers from identity_rejected_values "
                           "where reason = 'many_browsers'") == [("KxBurst", 4)]
    got = resolved(settings)
    assert {got[f"spread-{n}"] for n in range(5)} == {(None, "KxSpread", "klaviyo_click")}
    assert {got[f"burst-{n}"] for n in range(4)} == {NOBODY}


def test_a_phone_hash_alone_names_the_shopper_once_it_was_seen_with_the_phone(settings):
    import hashlib

    phone_hash = hashlib.sha256(b"+14155550134").hexdigest()
    checkout = make_event("checkout", event_name="InitiateCheckout", anonymous_id="laptop", session_id="s1",
                          event_time=(NOW - timedelta(days=2)).isoformat(),
                          user_data={"email": "jane@gmail.com", "phone": "(415) 555-0134", "ph": phone_hash})
    hashed_only = make_event("hashed-only", event_name="AddToCart", anonymous_id="tablet", session_id="s2",
                             event_time=(NOW - timedelta(days=1)).isoformat(), user_data={"ph": phone_hash})
    write_events(settings.events_dir / "a.ndjson", [checkout, hashed_only])
    ingest_events(settings, now=NOW)
    resolve_identities(settings, now=NOW)

    assert query(settings, "select email, match_method from resolved_events where event_id = 'hashed-only'") == [
        ("jane@gmail.com", "same_session")]
    assert ("phone_hash", phone_hash, "phone", "+14155550134") in query(
        settings, "select left_type, left_value, right_type, right_value from identity_links")


# ------------------------------------------------------------------------------------------------ review cases


def test_a_kx_never_turns_into_the_email_typed_beside_it_on_someone_elses_browser(settings):
    # Bob clicked Alice's forwarded email (_kx=KA) and typed his own email on that very event...
    run(settings, [ev("bob-checkout", "InitiateCheckout", at(0), "bob-laptop", "b1", {"email": "bob@gmail.com"},
                      url=SHOP_URL + "/checkout?_kx=KA")])
    # ...days later Alice clicks her own email on a new phone: her cart is hers, keyed by her _kx, never Bob's email.
    run(settings, [ev("alice-view", "ViewContent", at(2), "alice-phone", "a1", url=SHOP_URL + "/p?_kx=KA"),
                   ev("alice-cart", "AddToCart", at(2, 3), "alice-phone", "a1")], file="run2.ndjson")

    assert resolved(settings)["alice-cart"] == (None, "KA", "klaviyo_click")


def test_two_logins_of_different_people_keep_their_browsers_apart_like_typed_emails_do(settings):
    (settings.customers_dir / "customers.csv").write_text(
        "customer_id,email\nCA,alice@gmail.com\nCB,bob@gmail.com\n")
    run(settings, [
        ev("x-land", "ViewContent", at(0), "X", "x1", url=SHOP_URL + "/p?fbclid=F1"),
        ev("y-land", "ViewContent", at(0, 5), "Y", "y1", url=SHOP_URL + "/p?fbclid=F1"),
        ev("y-login", "ViewContent", at(1), "Y", "y2", {"external_id": "CB"}),
        ev("x-login", "ViewContent", at(2), "X", "x2", {"external_id": "CA"}),
        ev("y-cart", "AddToCart", at(3), "Y", "y3"),
    ])

    assert resolved(settings)["y-cart"][0] == "bob@gmail.com"
    assert query(settings, "select count(*) from browser_clusters") == [(0,)]


def test_a_phone_that_turns_out_shared_in_a_later_run_stops_naming_earlier_events(settings):
    run(settings, [ev("z-checkout", "InitiateCheckout", at(0), "Z", "z1",
                      {"email": "alice@gmail.com", "phone": "(415) 555-0101"}),
                   ev("x-cart", "AddToCart", at(5), "X", "x1", {"phone": "415-555-0101"})])
    assert resolved(settings)["x-cart"][0] == "alice@gmail.com"
    alice_phones = "select phones from identities where email = 'alice@gmail.com'"
    assert query(settings, alice_phones) == [(["+14155550101"],)]

    run(settings, [ev("y-checkout", "InitiateCheckout", at(5, 8), "Y", "y1",
                      {"email": "bob@gmail.com", "phone": "4155550101"})], file="run2.ndjson")

    assert resolved(settings)["x-cart"] == NOBODY
    assert query(settings, alice_phones) == [([],)]  # a shared phone is nobody's


# ------------------------------------------------------------------------------------------------ memory and supernodes

def test_a_safari_shopper_back_after_90_days_is_named_by_the_browsers_email(settings):
    # She bought on her iPhone three months ago; Klaviyo's script cookie died a week later, our cookie did not.
    run(settings, [
        ev("june-checkout", "InitiateCheckout", at(-80), "iphone", "s1", {"email": "ines@icloud.com"}),
        ev("june-purchase", "Purchase", at(-80, 5), "iphone", "s1", {"klaviyo_identified": True}),
        ev("september-view", "ViewContent", at(10), "iphone", "s2"),
        ev("september-cart", "AddToCart", at(10, 2), "iphone", "s2"),
    ])

    got = resolved(settings)
    assert got["september-cart"] == got["september-view"] == ("ines@icloud.com", None, "cookie_history")
    assert column(settings, "klaviyo_native")["september-cart"] is False  # a backup flow's shopper


def test_the_tie_ends_with_the_cookie_lifetime_setting_not_a_fixed_window(settings):
    short_lived = with_identity(settings, cookie_lifetime=timedelta(days=60))
    run(short_lived, [
        ev("checkout", "InitiateCheckout", at(-80), "iphone", "s1", {"email": "ines@icloud.com"}),
        ev("two-months-later", "AddToCart", at(-25), "iphone", "s2"),
        ev("three-months-later", "AddToCart", at(10), "iphone", "s3"),
    ])

    assert resolved(short_lived)["two-months-later"] == ("ines@icloud.com", None, "cookie_history")
    assert resolved(short_lived)["three-months-later"] == NOBODY


def test_a_shared_tablet_stays_shared_long_after_its_third_email(settings):
    # Three people typed their emails on the family tablet two months ago. Age does not make it anyone's again.
    run(settings, [
        ev("mum", "InitiateCheckout", at(-55), "tablet", "t1", {"email": "mum@gmail.com"}),
        ev("dad", "InitiateCheckout", at(-52), "tablet", "t2", {"email": "dad@gmail.com"}),
        ev("teen", "InitiateCheckout", at(-50), "tablet", "t3", {"email": "teen@gmail.com"}),
        ev("today-cart", "AddToCart", at(10), "tablet", "t4"),
        # A laptop with one email long ago is still its owner's.
        ev("laptop-checkout", "InitiateCheckout", at(-55), "laptop", "l1", {"email": "solo@gmail.com"}),
        ev("laptop-cart", "AddToCart", at(10), "laptop", "l2"),
    ])

    assert resolved(settings)["today-cart"] == NOBODY
    assert column(settings, "unresolved_reason")["today-cart"] == "shared_device"
    assert resolved(settings)["laptop-cart"] == ("solo@gmail.com", None, "cookie_history")


def _placeholder_typists(first: int, last: int, day: float = 0) -> list[dict]:
    """Unrelated shoppers, each on a browser of their own, fob off the pop-up with the same made-up address (on no
    block list), then come back days later and add to cart without typing anything."""
    events = []
    for n in range(first, last):
        events += [
            ev(f"popup-{n}", "Identify", at(day + n, 0), f"stranger-{n}", f"p{n}", {"email": "asdf@asdf.com"}),
            ev(f"cart-{n}", "AddToCart", at(day + n + 0.5), f"stranger-{n}", f"c{n}"),
        ]
    return events


def test_a_placeholder_typed_on_many_unrelated_browsers_is_quarantined_whatever_its_spelling(settings):
    jane_devices = [  # a real shopper on her phone, laptop and tablet: three browsers is one person
        ev(f"jane-{device}", "InitiateCheckout", at(n), f"jane-{device}", f"j{n}", {"email": "jane@gmail.com"})
        for n, device in enumerate(("phone", "laptop", "tablet"))
    ]
    run(settings, _placeholder_typists(0, 5) + jane_devices + [
        ev("jane-later", "AddToCart", at(6), "jane-laptop", "j9")])

    got = resolved(settings)
    assert {got[f"cart-{n}"] for n in range(5)} == {NOBODY}
    assert got["jane-later"] == ("jane@gmail.com", None, "cookie_history")
    assert query(settings, "select id_type, value, reason, times_seen, browsers from identity_rejected_values "
                           "where reason = 'many_browsers' order by id_type") == [
        ("email", "asdf@asdf.com", "many_browsers", 5, 5)]
    # Its sightings are kept and counted, never used.
    assert query(settings, "select count(*) from identity_observations where id_value = 'asdf@asdf.com'") == [(5,)]
    assert query(settings, "select count(*) from usable_identity_observations "
                           "where id_value = 'asdf@asdf.com'") == [(0,)]
    assert query(settings, "select count(*) from identities where email = 'asdf@asdf.com'") == [(0,)]


def test_a_placeholder_found_in_a_later_run_withdraws_what_it_named_and_stays_quarantined(settings):
    from upstack_pipeline.klaviyo.mapping import map_events

    def sync(events: list[dict], file: str, now) -> None:
        run(settings, events, file=file, now=now)
        map_events(settings, now=now)

    # Run 1: three shoppers typed it, as three browsers of one person could: their carts are named by it.
    sync(_placeholder_typists(0, 3, day=-10), "run1.ndjson", NOW - timedelta(days=5))
    assert resolved(settings)["cart-0"] == ("asdf@asdf.com", None, "cookie_history")
    assert query(settings, "select count(*) from identities where email = 'asdf@asdf.com'") == [(1,)]
    assert query(settings, "select count(*) from klaviyo_outbox where profile_key = 'email:asdf@asdf.com'") == [(3,)]

    # Run 2: a fourth browser within the supernode window (90 days). What it named is resolved again and taken back.
    sync(_placeholder_typists(3, 4, day=-10), "run2.ndjson", NOW - timedelta(days=4))
    assert {resolved(settings)[f"cart-{n}"] for n in range(4)} == {NOBODY}
    assert query(settings, "select count(*) from identities where email = 'asdf@asdf.com'") == [(0,)]
    assert query(settings, "select count(*) from klaviyo_outbox where profile_key = 'email:asdf@asdf.com'") == [(0,)]
    assert set(query(settings, "select event_id, reason from klaviyo_skipped where event_id like 'cart-%'")) == {
        (f"cart-{n}", "unresolved") for n in range(4)}

    # Run 3: one more typist is counted and never used.
    sync(_placeholder_typists(4, 5, day=-10), "run3.ndjson", NOW)
    assert resolved(settings)["cart-4"] == NOBODY
    assert query(settings, "select reason, times_seen, browsers from identity_rejected_values "
                           "where value = 'asdf@asdf.com'") == [("many_browsers", 5, 5)]


def test_a_quarantined_placeholder_typed_again_resolves_only_the_new_browser_again(settings, tmp_path):
    # Hashed as the pixel sends it too: a hash seen again on a new browser used to send every browser that ever
    # sent it back through resolution, every run, as if its translation could have changed; a quarantined value
    # translates to nobody before and after.
    def typists(first: int, last: int) -> list[dict]:
        return [{**event, "user_data": {**event["user_data"], "em": hashlib.sha256(b"asdf@asdf.com").hexdigest()}}
                if "email" in event["user_data"] else event for event in _placeholder_typists(first, last)]

    run(settings, typists(0, 5), now=NOW - timedelta(days=1))
    assert query(settings, "select id_type from identity_rejected_values where reason = 'many_browsers' "
                           "order by 1") == [("email",), ("email_hash",)]
    before = {row[0]: row for row in query(settings, "select event_id, resolved_at from resolved_events")}

    targets = []

    def keep_targets(connection, step: str) -> None:
        if step == "identities":
            targets.extend(event_id for (event_id,) in connection.execute("select event_id from targets").fetchall())

    write_events(settings.events_dir / "run2.ndjson", typists(5, 6))
    ingest_events(settings, now=NOW)
    resolve_identities(settings, now=NOW, after_step=keep_targets)

    assert sorted(targets) == ["cart-5"]
    assert {row[0]: row for row in query(settings, "select event_id, resolved_at from resolved_events "
                                                   "where event_id <> 'cart-5'")} == before
    # The same answers as one run over the whole history.
    whole = replace(settings, landing_dir=tmp_path / "whole", warehouse_path=tmp_path / "whole.duckdb")
    for folder in (whole.events_dir, whole.customers_dir):
        folder.mkdir(parents=True)
    run(whole, typists(0, 6))
    answers = "select * exclude (resolved_at) from resolved_events order by event_id"
    assert query(settings, answers) == query(whole, answers)
    assert resolved(settings)["cart-5"] == NOBODY


def test_a_placeholder_that_named_a_login_through_the_customers_export_is_taken_back_too(settings):
    from upstack_pipeline.klaviyo.mapping import map_events

    # The store's export has a customer who signed up with the placeholder; she logs in and browses.
    (settings.customers_dir / "customers.csv").write_text("customer_id,email\nC9,asdf@asdf.com\n")
    run(settings, [ev("kim-login", "ViewContent", at(-9), "kim-phone", "k1", {"external_id": "C9"}),
                   ev("kim-cart", "AddToCart", at(-9, 2), "kim-phone", "k1", {"external_id": "C9"})],
        now=NOW - timedelta(days=6))
    map_events(settings, now=NOW - timedelta(days=6))
    assert resolved(settings)["kim-cart"] == ("asdf@asdf.com", None, "customer_file")

    run(settings, _placeholder_typists(0, 4, day=-5), file="run2.ndjson")
    map_events(settings, now=NOW)

    assert resolved(settings)["kim-cart"] == NOBODY
    assert query(settings, "select count(*) from klaviyo_outbox where profile_key = 'email:asdf@asdf.com'") == [(0,)]


def test_a_higher_threshold_releases_a_quarantined_value_on_the_next_run(settings):
    run(settings, _placeholder_typists(0, 5))
    assert resolved(settings)["cart-0"] == NOBODY

    tolerant = with_identity(settings, max_browsers_per_identifier=5)
    resolve_identities(tolerant, now=NOW)

    assert resolved(tolerant)["cart-0"] == ("asdf@asdf.com", None, "cookie_history")
    assert query(tolerant, "select count(*) from identity_rejected_values") == [(0,)]
    assert query(tolerant, "select count(*) from identities where email = 'asdf@asdf.com'") == [(1,)]


def test_a_value_one_shop_rejects_as_its_own_address_can_still_be_a_supernode_under_another(settings):
    typed = [ev(f"p{n}", "ViewContent", at(n), f"b{n}", f"s{n}", {"email": "orders@acme.com"}) for n in range(4)]
    run(settings, [*typed, {**ev("p9", "ViewContent", at(5), "b9", "s9", {"email": "orders@acme.com"}),
                            "shop": "acme.com"}])

    assert query(settings, "select reason, browsers from identity_rejected_values "
                           "where value = 'orders@acme.com'") == [("many_browsers", 4)]
    assert {resolved(settings)[f"p{n}"] for n in range(4)} == {NOBODY}


def test_a_supernode_another_shop_rejects_in_a_later_run_keeps_its_verdicts_counts(settings):
    # Quarantined in one run; a later run sees it typed at the shop whose own address it is, a rule's rejection,
    # which adds to the row's counts: the verdict's counts (of the observations) are taken again.
    run(settings, [ev(f"p{n}", "ViewContent", at(n), f"b{n}", f"s{n}", {"email": "orders@acme.com"})
                   for n in range(4)])
    counts = query(settings, "select reason, times_seen, browsers from identity_rejected_values "
                             "where value = 'orders@acme.com'")
    run(settings, [{**ev("p9", "ViewContent", at(5), "b9", "s9", {"email": "orders@acme.com"}), "shop": "acme.com"}],
        file="run2.ndjson")

    assert counts == [("many_browsers", 4, 4)]
    assert query(settings, "select reason, times_seen, browsers from identity_rejected_values "
                           "where value = 'orders@acme.com'") == counts


def test_browsers_spread_over_months_are_one_person_changing_devices_not_a_placeholder(settings):
    # A new browser every seven weeks (a new phone, a new laptop, cleared cookies): four in all, never more than two
    # within a season.
    run(settings, [
        ev(f"checkout-{n}", "InitiateCheckout", at(-200 + 50 * n), f"device-{n}", f"s{n}", {"email": "ana@gmail.com"})
        for n in range(4)
    ] + [ev("cart", "AddToCart", at(9), "device-3", "s9")])

    assert query(settings, "select count(*) from identity_rejected_values") == [(0,)]
    assert resolved(settings)["cart"] == ("ana@gmail.com", None, "cookie_history")
    assert query(settings, "select count(distinct anonymous_id) from identity_observations "
                           "where id_value = 'ana@gmail.com'") == [(4,)]


def test_a_quarantined_email_typed_on_a_browser_still_ends_the_previous_persons_claim(settings):
    # Eve shops from more browsers than the guard allows, so her email is quarantined like a placeholder. On the
    # family tablet, where Alice typed hers, Eve's session (and the next anonymous one) must not become Alice's.
    eve_elsewhere = [ev(f"eve-{n}", "Identify", at(n), f"eve-browser-{n}", f"e{n}", {"email": "eve@gmail.com"})
                     for n in range(4)]
    run(settings, [
        ev("alice-checkout", "InitiateCheckout", at(-5), "tablet", "t1", {"email": "alice@gmail.com"}),
        *eve_elsewhere,
        ev("eve-view", "ViewContent", at(5), "tablet", "t2"),
        ev("eve-cart", "AddToCart", at(5, 1), "tablet", "t2"),
        ev("eve-shipping", "Identify", at(5, 3), "tablet", "t2", {"email": "eve@gmail.com"}),
        ev("later-cart", "AddToCart", at(7), "tablet", "t3"),
    ])

    assert query(settings, "select value from identity_rejected_values where reason = 'many_browsers'") == [
        ("eve@gmail.com",)]
    got = resolved(settings)
    assert got["eve-view"] == got["eve-cart"] == got["later-cart"] == NOBODY
    reasons = column(settings, "unresolved_reason")
    assert reasons["eve-cart"] == reasons["later-cart"] == "quarantined_identifier"
    assert column(settings, "klaviyo_native")["eve-cart"] is True  # Klaviyo saw her type it


def test_a_run_that_would_leave_an_event_with_two_rows_fails_and_writes_nothing(settings):
    """resolved_events has no key (sql/warehouse.sql says why), so identity refuses to write an event twice itself,
    as the key did. An event_id raw_events holds twice (a ledger broken by hand: ingestion never writes one) would
    be resolved twice."""
    write_events(settings.events_dir / "hour.ndjson", [make_event("cart-1"), make_event("cart-2")])
    ingest_events(settings, now=NOW)
    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute("insert into raw_events select * from raw_events where event_id = 'cart-1'")

    with pytest.raises(duckdb.InvalidInputException,
                       match=r"identity would leave 1 of its events with two rows in resolved_events \(cart-1 among"):
        resolve_identities(settings, now=NOW)
    assert query(settings, "select count(*) from resolved_events") == [(0,)]
    assert query(settings, "select count(*) from pipeline_state where stage = 'identity'") == [(0,)]

    with duckdb.connect(str(settings.warehouse_path)) as connection:  # the extra row gone, the run goes through
        connection.execute("delete from raw_events where event_id = 'cart-1' and rowid > "
                           "(select min(rowid) from raw_events where event_id = 'cart-1')")
    resolve_identities(settings, now=NOW)
    assert query(settings, "select event_id, count(*) from resolved_events group by 1 order by 1") == [
        ("cart-1", 1), ("cart-2", 1)]


def test_a_person_keeps_one_row_and_identities_sql_refuses_to_leave_two(settings):
    """identities has no key either (sql/warehouse.sql says why): a run replaces each of its people's rows whole, so a
    second row given to a person by hand is gone once a run touches them; and the last statement of identities.sql
    refuses to leave one of the chunk's people with two rows, as the key did. A real run's delete removes such a
    row first, so that statement is run here on its own, after it, on a person with two rows."""
    jane_id = upstack_id("email", "jane@gmail.com")
    write_events(settings.events_dir / "hour-1.ndjson", [make_event("cart-1", user_data={"email": "jane@gmail.com"})])
    ingest_events(settings, now=NOW)
    resolve_identities(settings, now=NOW)
    people = "select upstack_id, email, count(*) from identities group by all"
    assert query(settings, people) == [(jane_id, "jane@gmail.com", 1)]

    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute("insert into identities select * from identities")
        # The chunk's people are touched_anchors'; upstack_id() is identifier_normalization.sql's macro.
        macros = duckdb.extract_statements(read_sql("identifier_normalization"))
        connection.execute(next(macro.query for macro in macros if "temp macro upstack_id(" in macro.query))
        connection.execute("create temp table touched_anchors as select 'email' as anchor_type, "
                           "'jane@gmail.com' as anchor")
        with pytest.raises(duckdb.InvalidInputException, match=rf"identity would leave 1 of its people with two rows "
                                                               rf"in identities \({jane_id} among them\)"):
            connection.execute(duckdb.extract_statements(read_sql("identities"))[-1].query)

    write_events(settings.events_dir / "hour-2.ndjson", [make_event("cart-2", user_data={"email": "jane@gmail.com"})])
    ingest_events(settings, now=NOW)
    resolve_identities(settings, now=NOW + timedelta(minutes=5))
    assert query(settings, people) == [(jane_id, "jane@gmail.com", 1)]
