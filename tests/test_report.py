"""`upstack report` on a warehouse the real pipeline built from tests/test_lift.py's hand-computed world: the page
says the same lift as daily_lift (the acceptance: a lift computed by hand matches every surface, the report too),
the recovered revenue, when the data was published; it fetches nothing from any network; and an empty warehouse or a
missing analysts' copy are answered in words, not a traceback. (tests/browser/ opens the page in Chromium.)"""

import base64
import re
from dataclasses import replace
from datetime import timedelta
from html.parser import HTMLParser

import dagster as dg
import duckdb
import pytest

from conftest import write_events
from dagster_project.definitions import run_sync
from test_lift import DAY, KEY, WORLD
from upstack_pipeline.analytics import analytics_path, lift_totals
from upstack_pipeline.report import build_report, write_report
from upstack_pipeline.sandbox.klaviyo_emulator import KlaviyoEmulator
from upstack_pipeline.settings import Settings

pytestmark = pytest.mark.slow  # whole Dagster syncs
SYNCED_AT = DAY + timedelta(hours=23)
SENTENCE = "lift 50.0% (1 abandoned Added to Cart session only Upstack reached / 2 Klaviyo reaches itself)"
# Attributes through which a browser loads something (or navigates, for href).
LOADING_ATTRIBUTES = {"src", "href", "srcset", "poster", "action", "formaction", "data", "background", "xlink:href",
                      "ping", "manifest", "cite", "longdesc", "icon"}


def synced_warehouse(root, events: list[dict]) -> Settings:
    """`events` landed and synced once by the real job, delivering to the Klaviyo emulator, at SYNCED_AT."""
    landing = root / "landing"
    (landing / "events").mkdir(parents=True)
    (landing / "customers").mkdir()
    settings = Settings(landing_dir=landing, warehouse_path=root / "warehouse.duckdb")
    if events:
        write_events(landing / "events" / "day.ndjson", events)
    with KlaviyoEmulator(api_key=KEY, rate_limits=None) as emulator, dg.instance_for_test() as instance:
        result = run_sync(replace(settings, klaviyo_api_key=KEY, klaviyo_base_url=emulator.base_url), instance,
                          as_of=SYNCED_AT)
    assert result.success
    return settings


@pytest.fixture(scope="module")
def lift_world(tmp_path_factory) -> Settings:
    """tests/test_lift.py's world, synced once for the module: its lift and revenue are computed there by hand."""
    return synced_warehouse(tmp_path_factory.mktemp("report"), WORLD)


def test_the_report_says_the_lift_of_daily_lift_and_the_recovered_revenue(lift_world):
    page = build_report(analytics_path(lift_world.warehouse_path), days=28, now=SYNCED_AT)

    assert SENTENCE in page
    with duckdb.connect(str(lift_world.warehouse_path), read_only=True) as warehouse:
        assert lift_totals(warehouse, since=(DAY - timedelta(days=27)).date()).sentence() == SENTENCE
    assert ">USD 80.00<" in page  # the headline card: fay's order, the one the backup flow brought back
    assert "1 order placed after a click in a backup flow" in page
    assert "Data published 2026-11-20 23:00 UTC" in page
    assert "Last 28 days: Sat Oct 24, 2026 to Fri Nov 20, 2026" in page
    assert "<title>Abandoned-cart recovery" in page
    # Six charts (lift, carts, recovered, match rates, funnel, delivery health), each an SVG with a table beneath.
    charts = re.findall(r'<img class="chart" src="data:image/svg\+xml;base64,([^"]+)"', page)
    assert len(charts) == 6 and page.count("<table>") == 6
    assert all(base64.b64decode(chart).lstrip().startswith(b"<?xml") for chart in charts)
    # The numbers beneath the charts are daily_lift's, recovered_orders', delivery_funnel's and match_rates'.
    assert "<td>Nov 20</td><td>4</td><td>2</td><td>1</td><td>50.0%</td>" in page
    assert "<td>Nov 20</td><td>Added to Cart backup flow</td><td>upstack-backup-abandoned-cart</td><td>1</td>" \
           "<td>USD 80.00</td>" in page
    assert "<td>Nov 20</td><td>1</td><td>0</td><td>0</td><td>100.0%</td>" in page  # one cart accepted, none refused
    assert "<td>Nov 20</td><td>6</td><td>4 (66.7%)</td><td>1 (16.7%)</td><td>1 (16.7%)</td>" in page


def test_the_page_loads_nothing_from_any_network(lift_world):
    """Everything is inline: no script, style sheet, font or image is fetched, so the page opens offline and
    tells no one it was opened. Checked on the page and inside each chart's SVG."""
    page = build_report(analytics_path(lift_world.warehouse_path), days=28, now=SYNCED_AT)
    loaded = _loads(page)
    assert loaded and all(url.startswith("data:") for url in loaded), loaded
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "url(" not in page
    assert "://" not in page  # not even as text: no URL a browser could be led to
    assert "default-src 'none'" in page  # and the browser is told to refuse any load the page did not expect

    for chart in (base64.b64decode(url.split(",", 1)[1]).decode() for url in loaded):
        assert all(target.startswith("#") for target in _loads(chart)), _loads(chart)
        assert "<script" not in chart and "@import" not in chart
        assert all(target.startswith("#") for target in re.findall(r"url\(([^)]*)\)", chart))


def test_the_report_is_the_same_page_for_the_same_data(lift_world, tmp_path):
    out = write_report(lift_world.warehouse_path, tmp_path / "reports" / "report.html", days=28, now=SYNCED_AT)

    assert out == tmp_path / "reports" / "report.html"
    assert out.read_text(encoding="utf-8") == build_report(analytics_path(lift_world.warehouse_path), days=28,
                                                           now=SYNCED_AT)
    assert list(out.parent.iterdir()) == [out]  # written aside and renamed: nothing else left behind


def test_days_without_events_say_so_with_the_latest_day(lift_world):
    page = build_report(analytics_path(lift_world.warehouse_path), days=7, now=SYNCED_AT + timedelta(days=30))

    assert "Nothing to report yet" in page
    assert "No storefront events in these 7 days: the latest is from Fri Nov 20, 2026" in page
    assert "<img" not in page


def test_an_empty_warehouse_is_a_page_saying_there_is_nothing_yet(tmp_path):
    empty = synced_warehouse(tmp_path, [])

    page = build_report(analytics_path(empty.warehouse_path), days=28, now=SYNCED_AT)

    assert "Nothing to report yet" in page
    assert "The warehouse holds no storefront events yet" in page
    assert "Data published 2026-11-20 23:00 UTC" in page
    assert "<img" not in page and "lift " not in page


def test_a_missing_analysts_copy_asks_for_a_sync_first(tmp_path):
    with pytest.raises(ValueError, match=r"no analysts' copy at .*warehouse\.analytics\.duckdb: run `upstack sync` "
                                         r"first"):
        write_report(tmp_path / "warehouse.duckdb", tmp_path / "report.html", now=SYNCED_AT)
    assert not (tmp_path / "report.html").exists()


def test_a_copy_from_an_older_release_asks_for_a_sync(tmp_path):
    with duckdb.connect(str(tmp_path / "warehouse.analytics.duckdb")) as connection:
        connection.execute("create table daily_lift (day date)")
    with pytest.raises(ValueError, match=r"has no delivery_funnel, .*: .*run `upstack sync` to publish it again"):
        write_report(tmp_path / "warehouse.duckdb", tmp_path / "report.html", now=SYNCED_AT)


def test_days_must_be_at_least_one(lift_world):
    with pytest.raises(ValueError, match="days must be at least 1"):
        build_report(analytics_path(lift_world.warehouse_path), days=0, now=SYNCED_AT)


def _loads(markup: str) -> list[str]:
    """Every value of an attribute through which a browser loads (or goes to) something."""
    found: list[str] = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(value or "" for name, value in attrs if name.lower() in LOADING_ATTRIBUTES)

        handle_startendtag = handle_starttag

    collector = Collector()
    collector.feed(markup)
    collector.close()
    return found
