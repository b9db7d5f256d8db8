"""Work in proportion to what is new (issue 14): a run with nothing new skips what would change nothing, and the
result is exactly what doing the work gives. Real landing files, a real DuckDB warehouse, no mocks."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from datetime import datetime, time, timedelta, timezone

import duckdb
import pytest

from conftest import NOW, make_event, query, simulated_store, write_events
from upstack_pipeline import analytics
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import overview, resolve_identities
from upstack_pipeline.klaviyo.mapping import map_events

IDENTITY_TABLES = ("identity_observations", "identity_rejected_values", "identity_links", "browser_links",
                   "browser_clusters", "resolved_events", "identities")
URL = "https://acme.myshopify.com/products/mug"


def story(suffix: str, minutes_ago: int) -> list[dict]:
    """A shopper who types her email on one cookie and comes back on a second cookie in the same session (one
    browser, two cookies), then adds to cart on it: every identity table gets rows."""
    when = (NOW - timedelta(minutes=minutes_ago)).isoformat()
    later = (NOW - timedelta(minutes=minutes_ago - 1)).isoformat()
    return [
        make_event(f"view-{suffix}", event_name="ViewContent", event_time=when, anonymous_id=f"a-{suffix}",
                   session_id=f"s-{suffix}", user_data={"email": f"{suffix}@gmail.com", "klaviyo_identified": False},
                   event_source_url=URL, custom_data={"items": [{"id": "p1", "name": "Mug", "price": 9.0}]}),
        make_event(f"cart-{suffix}", event_time=later, anonymous_id=f"b-{suffix}", session_id=f"s-{suffix}",
                   event_source_url=URL, user_data={"klaviyo_identified": False}),
    ]


def ingest(settings, events: list[dict], file: str) -> None:
    write_events(settings.events_dir / file, events)
    ingest_events(settings, now=NOW)


def tables(settings, names=IDENTITY_TABLES) -> dict[str, list[tuple]]:
    return {table: sorted(map(repr, query(settings, f"select * from {table}"))) for table in names}


def plain(state) -> dict:
    """An identity overview with its frames as rows, to compare (a polars frame compares element by element)."""
    return {name: value.rows() if hasattr(value, "rows") else value for name, value in vars(state).items()}


def test_a_run_with_nothing_new_skips_every_step_and_leaves_what_doing_them_leaves(settings, tmp_path):
    ingest(settings, story("jane", 120), "hour-1.ndjson")
    first = resolve_identities(settings, now=NOW)
    assert first.label_steps >= 1 and first.events_resolved == 2
    assert query(settings, "select email, match_method from resolved_events where event_id = 'cart-jane'") == [
        ("jane@gmail.com", "same_session")]
    before = tables(settings)

    # The same warehouse, once with every step watched (which never skips) and once as a sync runs it.
    watched = replace(settings, warehouse_path=tmp_path / "watched.duckdb")
    watched.warehouse_path.write_bytes(settings.warehouse_path.read_bytes())
    steps: list[str] = []
    resolve_identities(watched, now=NOW + timedelta(hours=1), after_step=lambda connection, step: steps.append(step))
    skipped = resolve_identities(settings, now=NOW + timedelta(hours=1))

    assert steps[-1] == "identities"
    assert (skipped.label_steps, skipped.events_resolved, skipped.new_observations) == (0, 0, 0)
    assert tables(settings) == tables(watched) == before
    assert query(settings, "select updated_at from pipeline_state where stage = 'identity'") == [
        (NOW + timedelta(hours=1),)]


def test_a_run_writes_only_the_browser_clusters_that_changed(settings):
    ingest(settings, story("jane", 180) + story("anna", 170), "hour-1.ndjson")
    resolve_identities(settings, now=NOW)
    clusters = "select rowid, anonymous_id, browser_cluster_id from browser_clusters order by anonymous_id"
    before = query(settings, clusters)
    assert [cookie for _, cookie, _ in before] == ["a-anna", "a-jane", "b-anna", "b-jane"]

    # A shopper on one cookie links no browsers: every cluster's row stays where it was, not deleted and written again.
    single = [make_event("cart-solo", event_time=(NOW - timedelta(minutes=100)).isoformat(), anonymous_id="a-solo",
                         session_id="s-solo", event_source_url=URL, user_data={"klaviyo_identified": False})]
    ingest(settings, single, "hour-2.ndjson")
    assert resolve_identities(settings, now=NOW + timedelta(hours=1)).events_resolved == 1
    assert query(settings, clusters) == before

    # Jane's third cookie joins her cluster: its row is added, and Anna's rows stay where they were.
    third = [make_event("view-jane-3", event_name="ViewContent", event_time=(NOW - timedelta(minutes=90)).isoformat(),
                        anonymous_id="c-jane", session_id="s-jane", event_source_url=URL,
                        user_data={"klaviyo_identified": False})]
    ingest(settings, third, "hour-3.ndjson")
    resolve_identities(settings, now=NOW + timedelta(hours=2))
    after = query(settings, clusters)
    assert [cookie for _, cookie, _ in after] == ["a-anna", "a-jane", "b-anna", "b-jane", "c-jane"]
    assert len({cluster for _, cookie, cluster in after if cookie.endswith("jane")}) == 1
    assert [row for row in after if row[1].endswith("anna")] == [row for row in before if row[1].endswith("anna")]


def test_new_guards_are_applied_even_with_nothing_new(settings):
    ingest(settings, story("jane", 120), "hour-1.ndjson")
    resolve_identities(settings, now=NOW)

    # One browser, two cookies: past a guard of one browser per cluster, the cart's cookie stands alone.
    strict = replace(settings, identity=replace(settings.identity, max_browsers_per_cluster=1))
    run = resolve_identities(strict, now=NOW + timedelta(hours=1))

    assert run.label_steps >= 1
    assert query(settings, "select count(*) from browser_clusters") == [(0,)]


def test_the_identity_overview_is_counted_again_after_a_run_that_changed_something(settings):
    ingest(settings, story("jane", 120), "hour-1.ndjson")
    resolve_identities(settings, now=NOW)
    counted = overview(settings)
    assert (counted.commerce_events, counted.resolved_events, counted.identities) == (2, 2, 1)

    resolve_identities(settings, now=NOW + timedelta(hours=1))  # nothing new: the counts kept are still true
    assert plain(overview(settings)) == plain(counted)
    assert query(settings, "select overview is not null from pipeline_state where stage = 'identity'") == [(True,)]

    ingest(settings, story("kim", 60), "hour-2.ndjson")
    resolve_identities(settings, now=NOW + timedelta(hours=2))
    assert query(settings, "select overview is null from pipeline_state where stage = 'identity'") == [(True,)]
    recounted = overview(settings)
    assert (recounted.commerce_events, recounted.resolved_events, recounted.identities) == (4, 4, 2)
    assert recounted.by_match_method == {"same_session": 2, "typed_in_event": 2}
    assert plain(overview(settings, limit=1)) == plain(replace(
        recounted, rejected_values=recounted.rejected_values.head(1),
        largest_shared_browsers=recounted.largest_shared_browsers.head(1)))


def published(settings) -> tuple:
    with duckdb.connect(str(analytics.analytics_path(settings.warehouse_path)), read_only=True) as copy:
        return (copy.execute("select published_at from published").fetchall(),
                copy.execute("select sum(visitors) from match_rates").fetchall())


def test_the_analysts_copy_is_written_again_only_when_a_table_its_views_read_changed(settings):
    ingest(settings, story("jane", 120), "hour-1.ndjson")
    resolve_identities(settings, now=NOW)
    map_events(settings, now=NOW)
    first = analytics.refresh(settings, now=NOW)
    assert published(settings) == ([(NOW,)], [(2,)])

    # Every refresh on NOW's day: a refresh past midnight has another yesterday to report, so its copy changes.
    step = min(timedelta(hours=1), (datetime.combine(NOW.date() + timedelta(days=1), time(), NOW.tzinfo) - NOW) / 4)
    later = NOW + step
    again = analytics.refresh(settings, now=later)  # nothing changed: the copy is as it was, so are the numbers
    assert published(settings) == ([(NOW,)], [(2,)])
    assert replace(again, published=None) == replace(first, published=None)

    with duckdb.connect(str(settings.warehouse_path)) as warehouse:  # a skip record gone, say
        warehouse.execute("delete from klaviyo_skipped")
    analytics.refresh(settings, now=later)
    assert published(settings)[0] == [(later,)]

    analytics.analytics_path(settings.warehouse_path).unlink()  # a copy someone deleted is written again
    analytics.refresh(settings, now=later + step)
    assert published(settings) == ([(later + step,)], [(2,)])

    ingest(settings, story("kim", 60), "hour-2.ndjson")  # new events, before identity has even run
    analytics.refresh(settings, now=later + 2 * step)
    assert published(settings)[0] == [(later + 2 * step,)]


def copy_rows(settings) -> dict[str, list[tuple]]:
    """The analysts' copy, each table's rows in the order it holds them."""
    with duckdb.connect(str(analytics.analytics_path(settings.warehouse_path)), read_only=True) as copy:
        return {view: copy.execute(f"select * from {view}").fetchall() for view in analytics.PUBLISHED_VIEWS}


def views_over_everything(settings) -> dict[str, list[tuple]]:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as warehouse:
        return {view: warehouse.execute(f"select * from {view}").fetchall() for view in analytics.PUBLISHED_VIEWS}


@pytest.mark.slow  # a simulated world, synced run after run
def test_the_copy_recomputed_day_by_day_holds_exactly_the_rows_the_views_give_over_the_whole_history(settings,
                                                                                                    tmp_path):
    """Twelve simulated days arriving one at a time, with deliveries settling, refusals and a skip record decided
    again in between: after each sync, the copy built from the previous copy and the days the sync touched holds
    the rows, in the order, that the views computed over everything give."""
    world, days = simulated_store(settings, tmp_path, visitors=400, days=12, seed=7,
                                  end=datetime(2026, 11, 28, tzinfo=timezone.utc))
    landing = world.landing_dir
    touched: list[set | None] = []
    for number, day in enumerate(days):
        now = datetime.fromisoformat(day.name[3:]).replace(tzinfo=timezone.utc) + timedelta(days=1, hours=6)
        shutil.copytree(day, landing / "events" / day.name)
        ingest_events(world, now=now)
        resolve_identities(world, now=now)
        map_events(world, now=now)
        with duckdb.connect(str(world.warehouse_path)) as warehouse:  # what delivery settles, in place
            warehouse.execute("""
                update klaviyo_outbox set status = case when hash(unique_id) % 7 = 0 then 'dead_letter'
                                                        else 'delivered' end, delivered_at = ?
                where status = 'pending' and hash(unique_id) % 3 = 0""", [now])
            if number == 3:  # an old skip record withdrawn, its event undecided again
                warehouse.execute("delete from klaviyo_skipped where event_id = (select min(event_id) from "
                                  "klaviyo_skipped where skipped_at < ?)", [now])
            touched.append(analytics.stale_days(warehouse, analytics.analytics_path(world.warehouse_path)))
        analytics.refresh(world, now=now)
        assert copy_rows(world) == views_over_everything(world), f"after {day.name}"
    every_day = {datetime.fromisoformat(day.name[3:]).date() for day in days}
    assert touched[0] is None  # no copy yet: every day
    # Once the history is longer than a few days, a sync recomputes the day that arrived and a day or two around
    # it, not the history (early on, half the days or more are computed whole).
    for day, day_touched in zip(days[5:], touched[5:]):
        assert day_touched and datetime.fromisoformat(day.name[3:]).date() in day_touched
        assert len(day_touched) <= 3 < len(every_day)
    with duckdb.connect(str(world.warehouse_path)) as warehouse:
        assert analytics.stale_days(warehouse, analytics.analytics_path(world.warehouse_path)) == set()


def test_the_day_by_day_copy_knows_every_table_the_published_views_read():
    """A published view reading a table the slices leave out would let a copy built day by day go stale without a
    sign: the lists in analytics.py must keep up with the views' SQL."""
    from upstack_pipeline.warehouse import read_sql, table_docs

    tables = set(table_docs()) | {"usable_identity_observations", "usable_identity_links"}
    known = set(analytics.EVENT_SOURCES) | set(analytics.WHOLE_SOURCES)
    for view in analytics.PUBLISHED_VIEWS + analytics.SESSION_VIEWS:
        words = set(re.findall(r"\w+", "\n".join(line.split("--")[0] for line in read_sql(view).splitlines())))
        assert words & tables <= known, f"{view} reads {sorted(words & tables - known)}"


def test_a_change_to_one_session_recomputes_its_rows_alone_not_the_other_sessions_of_its_days(settings):
    """A session whose device clock was a month off has a cart on a day long gone and one today; three other
    sessions have carts on those days too. When only the skewed session gets a new event, the sync reads that
    session's events alone (not every session of both days), and the copy still holds what the views give."""
    today = datetime.combine(NOW.date(), time(9), tzinfo=timezone.utc)
    month_ago = today - timedelta(days=30)

    def cart(event_id: str, session: str, at: datetime) -> dict:
        return make_event(event_id, session_id=session, anonymous_id=f"cookie-{session}", event_time=at.isoformat(),
                          event_source_url=URL)

    first = [cart("skewed-old", "skewed", month_ago), cart("skewed-new", "skewed", today)]
    for other in range(3):
        first += [cart(f"old-{other}", f"old-{other}", month_ago + timedelta(minutes=other)),
                  cart(f"new-{other}", f"new-{other}", today + timedelta(minutes=other))]
    for run, events in enumerate([first, [cart("skewed-later", "skewed", today + timedelta(hours=1))]]):
        ingest(settings, events, f"day-{run}.ndjson")
        resolve_identities(settings, now=NOW)
        map_events(settings, now=NOW)
        if run:
            with duckdb.connect(str(settings.warehouse_path)) as warehouse, warehouse.cursor() as cursor:
                stale = analytics._find_stale(cursor, analytics.analytics_path(settings.warehouse_path),
                                              analytics._sources(cursor))
                analytics._shadow_with_slice(cursor, sliced_already=not stale.digests_whole)
                sliced = cursor.execute("select distinct session_id from temp.main.raw_events").fetchall()
                cursor.execute("detach previous")
            assert stale.days == {month_ago.date(), today.date()} and sliced == [("skewed",)]
        analytics.refresh(settings, now=NOW)
        assert copy_rows(settings) == views_over_everything(settings), f"after run {run}"


def test_a_day_is_recomputed_with_every_event_of_its_sessions_and_so_is_every_other_day_of_them(settings):
    """Two carts across midnights, arriving a day at a time: the order that ends the second one is a day after the
    cart, so the cart's day changes too; the first one's cart the day before that counts only there."""
    midnight = datetime.combine(NOW.date() - timedelta(days=3), datetime.min.time(), tzinfo=timezone.utc)

    def cart(event_id: str, session: str, at: datetime, **fields) -> dict:
        return make_event(event_id, session_id=session, anonymous_id=f"cookie-{session}", event_time=at.isoformat(),
                          event_source_url=URL, **fields)

    arrivals = [
        [cart("early-cart", "early", midnight - timedelta(minutes=10))],
        [cart("early-cart-again", "early", midnight + timedelta(minutes=5)),
         cart("late-cart", "late", midnight + timedelta(hours=23, minutes=55))],
        [cart("late-order", "late", midnight + timedelta(days=1, minutes=5), event_name="Purchase",
              custom_data={"order_id": "o-1", "value": 9.0, "currency": "USD",
                           "items": [{"id": "p1", "name": "Mug", "price": 9.0}]})],
    ]
    for number, events in enumerate(arrivals):
        ingest(settings, events, f"day-{number}.ndjson")
        resolve_identities(settings, now=NOW)
        map_events(settings, now=NOW)
        analytics.refresh(settings, now=NOW)
        assert copy_rows(settings) == views_over_everything(settings), f"after arrival {number}"
    carts = {row[0]: row[2] for row in copy_rows(settings)["daily_lift"] if row[1] == "Added to Cart"}
    assert carts == {midnight.date() - timedelta(days=1): 1}  # the early cart on its first day; the late one bought
