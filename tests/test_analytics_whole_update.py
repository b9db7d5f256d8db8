"""A copy whose every day is recomputed from the previous copy is written as a new file: only the previous copy's
record of sessions is carried over (and updated), never the rest of the old file. Real landing files, a real DuckDB
warehouse and copy, no mocks."""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb

from conftest import NOW
from test_incremental import ingest, story
from upstack_pipeline import analytics
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.klaviyo.mapping import map_events

# Both shoppers on one day two days back, whatever the hour of the run: the second one's day is then every day.
DAY = datetime.combine(NOW.date() - timedelta(days=2), datetime.min.time(), NOW.tzinfo)


def minutes_ago(hour: int) -> int:
    return int((NOW - DAY.replace(hour=hour)) / timedelta(minutes=1))


def copy_tables(settings) -> dict[str, list]:
    """Each table of the copy by name: the views' rows in the order held, the record of sessions sorted."""
    with duckdb.connect(str(analytics.analytics_path(settings.warehouse_path)), read_only=True) as copy:
        names = [name for (name,) in copy.execute("select table_name from duckdb_tables() order by 1").fetchall()]
        found = {name: copy.execute(f"select * from {name}").fetchall() for name in names if name != "published"}
    for name in ("published_sessions", "published_session_days"):
        found[name] = sorted(found[name], key=repr)
    return found


def test_a_copy_recomputed_whole_from_the_previous_one_carries_only_its_record_of_sessions(settings):
    ingest(settings, story("jane", minutes_ago(10)), "hour-1.ndjson")
    resolve_identities(settings, now=NOW)
    map_events(settings, now=NOW)
    analytics.refresh(settings, now=NOW)
    copy = analytics.analytics_path(settings.warehouse_path)
    with duckdb.connect(str(copy)) as scratch:  # a table an analyst left in the copy
        scratch.execute("create table leftover as select 1 as kept; checkpoint")

    ingest(settings, story("kim", minutes_ago(11)), "hour-2.ndjson")
    resolve_identities(settings, now=NOW + timedelta(hours=1))
    map_events(settings, now=NOW + timedelta(hours=1))
    with duckdb.connect(str(settings.warehouse_path)) as warehouse, warehouse.cursor() as cursor:
        stale = analytics._find_stale(cursor, copy, analytics._sources(cursor))
        cursor.execute("detach previous")
    # The one day is every day: recomputed whole, with the sessions found by their writers' stamps, so the record
    # of sessions is the previous copy's, updated.
    assert stale.days is None and stale.previous and not stale.digests_whole and not stale.days_whole
    analytics.refresh(settings, now=NOW + timedelta(hours=1))
    updated = copy_tables(settings)
    assert "leftover" not in updated
    assert len(updated["published_sessions"]) == 2 and updated["match_rates"]

    copy.unlink()
    analytics.refresh(settings, now=NOW + timedelta(hours=1))
    assert updated == copy_tables(settings)
