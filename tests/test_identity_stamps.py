"""Identity writes only the resolutions that changed (issue 14): an event it resolves again to the same answer keeps
its row and its resolved_at, so mapping and analytics, which look again at the rows stamped since their last run,
look at what changed only, and decide and publish what they did when identity stamped every event it resolved
again. Real simulated days, a real DuckDB warehouse and analysts' copy, no mocks."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import duckdb
import pytest

from conftest import make_event, query, simulated_store, write_events
from upstack_pipeline import analytics
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.klaviyo.mapping import map_events

END = datetime(2026, 11, 20, tzinfo=timezone.utc)
RESOLVED = "select * exclude (resolved_at), resolved_at from resolved_events order by event_id"
# Every column but those that say when.
OUTBOX = ("select unique_id, event_id, metric_name, profile_key, profile, event, backfill, status, notes "
          "from klaviyo_outbox order by unique_id")
SKIPPED = "select event_id, event_name, reason, detail from klaviyo_skipped order by event_id, reason"


def copy_tables(settings) -> dict[str, list]:
    """The analysts' copy: every view's rows, the record of sessions, and the sums it was computed from (the
    writers' latest stamps aside: those differ by design)."""
    with duckdb.connect(str(analytics.analytics_path(settings.warehouse_path)), read_only=True) as copy:
        found = {view: copy.execute(f"select * from {view}").fetchall() for view in analytics.PUBLISHED_VIEWS}
        for table in ("published_sessions", "published_session_days"):
            found[table] = sorted(copy.execute(f"select * from {table}").fetchall(), key=repr)
        sources = json.loads(copy.execute("select sources from published").fetchone()[0])
        found["sources"] = {key: value for key, value in sources.items() if key != "stamps"}
    return found


@pytest.mark.slow  # a simulated world, synced run after run
def test_a_day_run_restamps_only_the_events_whose_answer_changed_and_mapping_and_analytics_follow(
        settings, tmp_path):
    world, days = simulated_store(settings, tmp_path, visitors=200, days=6, seed=11, end=END)
    landing = world.landing_dir
    for day in days:
        now = datetime.fromisoformat(day.name[3:]).replace(tzinfo=timezone.utc) + timedelta(days=1, hours=6)
        shutil.copytree(day, landing / "events" / day.name)
        if day == days[-1]:
            # An email typed, in a file that came late, in the session of an event no run could name (its shopper
            # consented to marketing, so it is sent once named), on a browser with events in earlier sessions: that
            # event's answer changes (back-stitched); the browser's earlier events are resolved again, to the same
            # answer (history only looks back).
            [(earlier, event_time, shop, anonymous_id, session_id)] = query(world, """
                select event_id, event_time, shop, anonymous_id, session_id from resolved_events as event
                where unresolved_reason = 'no_evidence' and consent_marketing
                order by (select count(*) from resolved_events as other
                          where other.anonymous_id = event.anonymous_id and other.event_time < event.event_time
                              and other.session_id <> event.session_id) desc, event_time desc, event_id
                limit 1""")
            previous_sessions = {event_id for (event_id,) in query(world, """
                select event_id from resolved_events
                where anonymous_id = ? and event_time < ? and session_id <> ?""", [anonymous_id, event_time,
                                                                                   session_id])}
            write_events(landing / "events" / day.name / "hour=23" / "late.ndjson", [make_event(
                "late-typed", event_name="ViewContent", event_time=(event_time + timedelta(minutes=1)).isoformat(),
                shop=shop, anonymous_id=anonymous_id, session_id=session_id,
                event_source_url=f"https://{shop}/products/mug",
                user_data={"email": "late.typer@gmail.com", "klaviyo_identified": False},
                custom_data={"items": [{"id": "p1", "name": "Mug", "price": 9.0}]})])
        ingest_events(world, now=now)
        if day != days[-1]:
            resolve_identities(world, now=now)
            map_events(world, now=now)
            analytics.refresh(world, now=now)

    # The same warehouse and copy, resolved with every target stamped again, as if each had changed: mapping and
    # analytics, which look again at what is stamped, must decide and publish the same from either.
    restamped = replace(world, warehouse_path=tmp_path / "restamped.duckdb")
    shutil.copyfile(world.warehouse_path, restamped.warehouse_path)
    shutil.copyfile(analytics.analytics_path(world.warehouse_path), analytics.analytics_path(restamped.warehouse_path))
    shutil.copyfile(analytics.session_rows_path(world.warehouse_path),
                    analytics.session_rows_path(restamped.warehouse_path))
    before = {row[0]: row for row in query(world, RESOLVED)}
    targets = []

    def keep_targets(connection: duckdb.DuckDBPyConnection, step: str) -> None:
        if step == "identities":
            targets.extend(event_id for (event_id,) in connection.execute("select event_id from targets").fetchall())

    def stamp_every_target(connection: duckdb.DuckDBPyConnection, step: str) -> None:
        if step == "identities":
            connection.execute("update resolved_events set resolved_at = ? "
                               "where event_id in (select event_id from targets)", [now])

    resolve_identities(world, now=now, after_step=keep_targets)
    resolve_identities(restamped, now=now, after_step=stamp_every_target)

    after = {row[0]: row for row in query(world, RESOLVED)}
    assert [row[:-1] for row in after.values()] == [row[:-1] for row in query(restamped, RESOLVED)]
    earlier_targets = [event_id for event_id in targets if event_id in before]
    same = [event_id for event_id in earlier_targets if after[event_id][:-1] == before[event_id][:-1]]
    changed = [event_id for event_id in earlier_targets if after[event_id][:-1] != before[event_id][:-1]]
    assert previous_sessions and previous_sessions <= set(same) and earlier in changed
    assert query(world, "select match_method from resolved_events where event_id = ?", [earlier]) == [
        ("same_session",)]
    # The answers that stayed keep their stamp; those that changed, and the new events, carry this run's.
    assert all(after[event_id][-1] == before[event_id][-1] < now for event_id in same)
    assert all(after[event_id][-1] == now for event_id in changed)
    assert all(row[-1] == now for event_id, row in after.items() if event_id not in before)
    assert all(after[event_id] == row for event_id, row in before.items() if event_id not in targets)

    for each in (world, restamped):
        map_events(each, now=now)
        analytics.refresh(each, now=now)
    assert query(world, OUTBOX) == query(restamped, OUTBOX)
    assert query(world, SKIPPED) == query(restamped, SKIPPED)
    # The event named late went from a skip for want of an identity to the outbox.
    assert query(world, "select count(*) from klaviyo_outbox where event_id = ?", [earlier]) == [(1,)]
    assert copy_tables(world) == copy_tables(restamped)
