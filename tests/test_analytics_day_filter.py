"""The analysts' copy reads the event tables on the days of the sessions it recomputes (`_on_their_days`): a filter
of one time range per run of consecutive days. Every row is tested against every range, so over scattered days
(old events an identity run resolved again) the ranges closest together are merged: every day stays inside the
filter, and only the widest gaps are skipped. A real DuckDB, no mocks."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import duckdb

from upstack_pipeline import analytics


def test_scattered_days_are_all_kept_in_at_most_the_cap_of_ranges_and_the_widest_gaps_skipped():
    january = [date(2026, 1, 1) + timedelta(days=2 * n) for n in range(30)]  # 30 runs a day apart
    september = [date(2026, 9, 1) + timedelta(days=2 * n) for n in range(10)]  # 10 more
    days = [*january, date(2026, 6, 1), *september]
    with duckdb.connect() as connection:
        connection.execute("set TimeZone = 'UTC'")
        connection.execute("create temp table session_days_now as "
                           "select 7 as session_key, unnest(?::date[]) as day", [days])
        connection.execute("create temp table recomputed as select 7 as session_key")
        where, times = analytics._on_their_days(connection, "recomputed")
        connection.execute("create temp table events as select event_time from "
                           "range(timestamptz '2026-01-01 12:00', timestamptz '2026-12-31', interval 1 day) "
                           "as t(event_time)")
        kept = {day for (day,) in connection.execute(
            f"select event_time::date from events where {where}", times).fetchall()}

    assert len(times) == 2 * analytics.MAX_DAY_RUNS < 2 * len(days)
    assert set(days) <= kept
    # Spring and summer, the widest gaps, are still skipped; the days between January's are read.
    assert date(2026, 4, 1) not in kept and date(2026, 7, 15) not in kept and date(2026, 1, 2) in kept
    assert all(isinstance(moment, datetime) and moment.tzinfo == timezone.utc for moment in times)
