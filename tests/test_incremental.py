"""Work in proportion to what is new (issue 14): a run with nothing new skips what would change nothing, and the
result is exactly what doing the work gives. Real landing files, a real DuckDB warehouse, no mocks."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import duckdb

from conftest import NOW, make_event, query, write_events
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

    later = NOW + timedelta(hours=1)
    again = analytics.refresh(settings, now=later)  # nothing changed: the copy is as it was, so are the numbers
    assert published(settings) == ([(NOW,)], [(2,)])
    assert replace(again, published=None) == replace(first, published=None)

    with duckdb.connect(str(settings.warehouse_path)) as warehouse:  # a skip record gone, say
        warehouse.execute("delete from klaviyo_skipped")
    analytics.refresh(settings, now=later)
    assert published(settings)[0] == [(later,)]

    analytics.analytics_path(settings.warehouse_path).unlink()  # a copy someone deleted is written again
    analytics.refresh(settings, now=later + timedelta(hours=1))
    assert published(settings) == ([(later + timedelta(hours=1),)], [(2,)])

    ingest(settings, story("kim", 60), "hour-2.ndjson")  # new events, before identity has even run
    analytics.refresh(settings, now=later + timedelta(hours=2))
    assert published(settings)[0] == [(later + timedelta(hours=2),)]
