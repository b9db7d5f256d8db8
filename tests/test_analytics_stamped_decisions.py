"""The analysts' copy finds a session by a skip row mapping stamped on its own (a session identity resolved in an
earlier run, decided once it closed): its resolved_events row keeps its old stamp, so the session is looked up by
the event. Real simulated days, a real DuckDB warehouse and copy, no mocks."""

from __future__ import annotations

from datetime import timedelta

import duckdb
import pytest

from test_analytics_increment import copy_tables, stale, world  # noqa: F401 (world is a fixture)
from upstack_pipeline import analytics


@pytest.mark.slow
def test_a_skip_stamped_without_its_resolved_row_is_found_by_its_event(world):  # noqa: F811
    for number in range(4):
        now = world.arrive(number)
        analytics.refresh(world.settings, now=now)
    later = now + timedelta(hours=1)
    with duckdb.connect(str(world.settings.warehouse_path)) as warehouse:
        event_id, day = warehouse.execute("""
            select event_id, (event_time at time zone 'UTC')::date from resolved_events
            semi join (select event_id from klaviyo_skipped where reason = 'unresolved') using (event_id)
            order by event_time limit 1""").fetchone()
        warehouse.execute("update klaviyo_skipped set reason = 'no_consent', skipped_at = ? where event_id = ?",
                          [later, event_id])
        resolved_at = warehouse.execute("select resolved_at from resolved_events where event_id = ?",
                                        [event_id]).fetchone()[0]
    assert resolved_at < later  # only the skip row says it changed

    found = stale(world.settings)
    assert not found.digests_whole and found.days is not None and day in found.days
    analytics.refresh(world.settings, now=later)
    with duckdb.connect(str(world.settings.warehouse_path), read_only=True) as warehouse:
        funnel = warehouse.execute("select * from delivery_funnel").fetchall()
        assert analytics.stale_days(warehouse, analytics.analytics_path(world.settings.warehouse_path)) == set()
    assert copy_tables(world.settings)["delivery_funnel"] == funnel
