"""`upstack report`'s page as a marketer sees it: opened from disk in a real browser (Debian's Chromium, headless,
driven by Playwright), every chart drawn with its data, and not one request leaving the machine.

Run by `make test-browser` (which installs the `browser` extra), never by `make test`: pyproject's pytest
configuration does not recurse into tests/browser. It needs /usr/bin/chromium (`apt-get install -y chromium`;
CI's .ci/run installs it) and fails, never skips, without it. Set UPSTACK_REPORT_SCREENSHOT to a path to keep a copy
of the screenshot.

The world is four weeks of hand-written carts, every day with shoppers Klaviyo knows, shoppers only Upstack knows,
shoppers nobody knows, a buyer, and some days an order brought back by the backup flow and a cart Klaviyo refuses:
every chart then has something to draw, and the page is read at its usual size (28 days).
"""

import os
import shutil
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from conftest import make_event, write_events
from dagster_project.definitions import run_sync
from upstack_pipeline.analytics import lift_totals
from upstack_pipeline.report import GREEN, GREY, KLAVIYO, RED, UPSTACK, write_report
from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator
from upstack_pipeline.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and quiet: no first-run UI, no sync, no component updates or other background requests of its own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
KEY = "pk_report_browser_emulator_only_0"
DAYS = 28
FIRST_DAY = datetime(2026, 11, 1, tzinfo=timezone.utc)
SYNCED_AT = FIRST_DAY + timedelta(days=DAYS - 1, hours=20)  # the evening of the last day
SHOP = "https://acme.myshopify.com"
BACKUP_LINK = f"{SHOP}/cart?utm_source=klaviyo&utm_medium=email&utm_campaign=upstack-backup-abandoned-cart"
# The colours each chart's data is drawn in (upstack_pipeline.report's), by section of the page.
DRAWN_IN = {"lift": [UPSTACK], "sessions": [GREY, KLAVIYO, UPSTACK], "recovered": [UPSTACK],
            "match-rates": [KLAVIYO, UPSTACK], "funnel": [GREY, KLAVIYO, GREEN, RED], "health": [GREEN, RED]}


def event(event_id: str, name: str, at: datetime, cookie: str, session: str, *, email: str | None = None,
          klaviyo_cookie: bool = False, value: float = 30.0, url: str = f"{SHOP}/products/mug", **custom) -> dict:
    items = [{"id": "p1", "name": "Mug", "price": value, "quantity": 1, "url": f"{SHOP}/products/mug?variant=11"}]
    return make_event(event_id, event_name=name, event_time=at.isoformat(), anonymous_id=cookie, session_id=session,
                      event_source_url=url, user_data={"email": email, "klaviyo_identified": klaviyo_cookie},
                      custom_data={"value": value, "currency": "USD", "items": items, **custom})


def four_weeks() -> tuple[list[dict], set[str]]:
    """The world's events, and the carts Klaviyo is to refuse (by event id, the unique_id it dedupes on)."""
    events, refused = [], set()
    for d in range(DAYS):
        morning = FIRST_DAY + timedelta(days=d, hours=9)
        for i in range(2 + d % 4):  # typed an email in the cart's visit: Klaviyo's own flow reaches them
            events.append(event(f"typed-{d}-{i}", "AddToCart", morning + timedelta(minutes=7 * i), f"typed-{d}-{i}",
                                f"typed-{d}-{i}", email=f"typed{d}x{i}@mail.com"))
        events.append(event(f"cookie-{d}", "AddToCart", morning + timedelta(hours=1), f"cookie-{d}", f"cookie-{d}",
                            klaviyo_cookie=True))
        for i in range(1 + (d % 3 == 0)):  # typed an email the day before; anonymous now: only Upstack knows them
            cookie = f"known-{d}-{i}"
            events.append(event(f"{cookie}-form", "ViewContent", morning - timedelta(hours=14), cookie, f"{cookie}-0",
                                email=f"known{d}x{i}@mail.com"))
            events.append(event(f"{cookie}-cart", "AddToCart", morning + timedelta(hours=2, minutes=i), cookie,
                                f"{cookie}-1", value=25.0 + 10 * i))
            if d % 9 == 4 and i == 0:
                refused.add(f"{cookie}-cart")
        for i in range(1 + d % 2):  # never identified
            events.append(event(f"nobody-{d}-{i}", "AddToCart", morning + timedelta(hours=3), f"nobody-{d}-{i}",
                                f"nobody-{d}-{i}"))
        buyer = f"buyer-{d}"
        events.append(event(f"{buyer}-cart", "AddToCart", morning + timedelta(hours=4), buyer, buyer,
                            email=f"{buyer}@mail.com"))
        events.append(event(f"{buyer}-order", "Purchase", morning + timedelta(hours=4, minutes=5), buyer, buyer,
                            email=f"{buyer}@mail.com", order_id=f"{2000 + d}"))
        if d % 4 == 1:  # came back from the backup flow's email and bought
            back = f"back-{d}"
            events.append(event(f"{back}-landing", "ViewContent", morning + timedelta(hours=5), back, back,
                                url=BACKUP_LINK))
            events.append(event(f"{back}-order", "Purchase", morning + timedelta(hours=5, minutes=4), back, back,
                                email=f"{back}@mail.com", value=40.0 + 10 * (d % 3), order_id=f"{3000 + d}"))
    return events, refused


@pytest.fixture
def chromium() -> Path:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Debian's Chromium is not installed at {CHROMIUM}: install it with `apt-get install -y "
                    "chromium` (as root; CI's .ci/run does), then run `make test-browser` again")
    return CHROMIUM


def test_the_report_draws_every_chart_in_chromium_and_requests_nothing_from_the_network(chromium, tmp_path):
    landing = tmp_path / "landing"
    (landing / "customers").mkdir(parents=True)
    settings = Settings(landing_dir=landing, warehouse_path=tmp_path / "warehouse.duckdb")
    events, refused = four_weeks()
    write_events(landing / "events" / "four-weeks.ndjson", events)
    with KlaviyoEmulator(api_key=KEY, rate_limits=None) as emulator, dg.instance_for_test() as instance:
        emulator.reject_unique_ids(refused)
        assert run_sync(replace(settings, klaviyo_api_key=KEY, klaviyo_base_url=emulator.base_url), instance,
                        as_of=SYNCED_AT).success
    report = write_report(settings.warehouse_path, tmp_path / "report.html", days=DAYS, now=SYNCED_AT)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as warehouse:
        lift = lift_totals(warehouse, since=FIRST_DAY.date())
    assert lift.upstack_delivered_sessions > 0 and lift.upstack_refused_sessions == len(refused)

    requests: list[str] = []
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(report.as_uri(), wait_until="load")
            title = page.title()
            headline = page.inner_text("p.sentence")
            published = page.inner_text("header .meta")
            charts = page.evaluate("""() => [...document.querySelectorAll('img.chart')].map(img => {
                const box = img.getBoundingClientRect();
                return {section: img.closest('section').id, loaded: img.complete && img.naturalWidth > 0,
                        box: [box.left + window.scrollX, box.top + window.scrollY, box.width, box.height]};
            })""")
            screenshot = tmp_path / "report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    if keep := os.environ.get("UPSTACK_REPORT_SCREENSHOT"):
        shutil.copyfile(screenshot, keep)

    assert requests and requests[0] == report.as_uri()
    assert [url for url in requests if not url.startswith(("file://", "data:", "blob:"))] == []
    assert problems == []  # nothing refused by the page's Content-Security-Policy, no error of any kind
    assert title == "Abandoned-cart recovery, Sun Nov 1, 2026 to Sat Nov 28, 2026"
    assert lift.sentence() in headline
    assert "Data published 2026-11-28 20:00 UTC" in published

    assert [chart["section"] for chart in charts] == list(DRAWN_IN)
    image = Image.open(screenshot).convert("RGB")
    for chart in charts:
        left, top, width, height = chart["box"]
        assert chart["loaded"] and width > 600 and height > 200, chart
        region = image.crop((round(left), round(top), round(left + width), round(top + height)))
        colours = region.getcolors(maxcolors=width * height)
        assert len(colours) > 2, f"the {chart['section']} chart is blank"
        for colour in DRAWN_IN[chart["section"]]:
            assert _pixels_of(colours, colour) >= 20, f"the {chart['section']} chart draws nothing in {colour}"


def _pixels_of(colours: list[tuple[int, tuple[int, int, int]]], hex_colour: str) -> int:
    """How many pixels are `hex_colour`, give or take a little (the browser's colour handling)."""
    target = tuple(int(hex_colour[index:index + 2], 16) for index in (1, 3, 5))
    return sum(count for count, pixel in colours if max(abs(a - b) for a, b in zip(pixel, target)) <= 6)


def test_the_world_spans_the_report_window():
    """The world's days are the report's: four weeks ending the day of the sync."""
    days = {datetime.fromisoformat(line["event_time"]).date() for line in four_weeks()[0]
            if line["event_name"] == "AddToCart"}
    assert min(days) == FIRST_DAY.date() and max(days) == SYNCED_AT.date() == date(2026, 11, 28)
    assert len(days) == DAYS
