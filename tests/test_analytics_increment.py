"""The analysts' copy updated in proportion to the day (issue 14): the sessions to digest again are found by the
times their writers stamp, checked against the tables' totals, and the copy is updated in a file copy of itself.
Real simulated days, a real DuckDB warehouse and copy, no mocks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from types import SimpleNamespace
from datetime import datetime, timedelta, timezone

import duckdb
import pytest

from conftest import simulated_store
from upstack_pipeline import analytics
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.klaviyo.mapping import map_events

END = datetime(2026, 11, 20, tzinfo=timezone.utc)


@pytest.fixture
def world(settings, tmp_path):
    """Six simulated days, landing one at a time (`arrive(number)` ingests and runs identity and mapping)."""
    world, days = simulated_store(settings, tmp_path, visitors=200, days=6, seed=11, end=END)
    landing = world.landing_dir

    def arrive(number: int) -> datetime:
        now = datetime.fromisoformat(days[number].name[3:]).replace(tzinfo=timezone.utc) + timedelta(days=1,
                                                                                                     hours=6)
        shutil.copytree(days[number], landing / "events" / days[number].name)
        ingest_events(world, now=now)
        resolve_identities(world, now=now)
        map_events(world, now=now)
        return now

    return SimpleNamespace(settings=world, arrive=arrive, days=days)


def stale(settings) -> analytics._Stale:
    with duckdb.connect(str(settings.warehouse_path)) as warehouse, warehouse.cursor() as cursor:
        found = analytics._find_stale(cursor, analytics.analytics_path(settings.warehouse_path),
                                      analytics._sources(cursor))
        if found.previous:
            cursor.execute("detach previous")
        return found


def copy_tables(settings) -> dict[str, list[tuple]]:
    """Every table of the copy, views in the order held, the record of sessions sorted, the date of the copy aside;
    and the rows per session beside it, sorted."""
    with duckdb.connect(str(analytics.analytics_path(settings.warehouse_path)), read_only=True) as copy:
        found = {view: copy.execute(f"select * from {view}").fetchall() for view in analytics.PUBLISHED_VIEWS}
        for table in ("published_sessions", "published_session_days", "commerce_metrics"):
            found[table] = sorted(copy.execute(f"select * from {table}").fetchall(), key=repr)
        found["sources"] = copy.execute("select sources from published").fetchall()
    with duckdb.connect(str(analytics.session_rows_path(settings.warehouse_path)), read_only=True) as rows:
        for table in (*analytics.SESSION_VIEWS, "summed_into"):
            found[table] = sorted(rows.execute(f"select * from {table}").fetchall(), key=repr)
    return found


@pytest.mark.slow
def test_the_copy_updated_day_by_day_holds_what_a_copy_computed_whole_holds(world):
    """After each day, the copy updated from its previous self (rows, the record of each session's digest and
    days, what it was computed from) equals a copy computed from nothing; the days after the first few digest
    again only the sessions their writers stamped."""
    located, by_session = [], []
    for number in range(len(world.days)):
        now = world.arrive(number)
        found = stale(world.settings)
        located.append(number > 0 and not found.digests_whole)
        by_session.append(found.days is not None)
        analytics.refresh(world.settings, now=now)
        updated = copy_tables(world.settings)
        analytics.analytics_path(world.settings.warehouse_path).unlink()
        analytics.refresh(world.settings, now=now)
        assert updated == copy_tables(world.settings), f"after {world.days[number].name}"
    assert all(located[1:])
    assert all(by_session[3:])  # from the fourth day on, the changed sessions are fewer than half


@pytest.mark.slow
def test_a_change_no_writer_stamped_is_found_by_the_totals(world):
    """A row rewritten without its stamp, or deleted: the stamped sessions' sums do not add up to the tables'
    totals, so every session is digested again, and the changed session's days are recomputed."""
    for number in range(4):
        now = world.arrive(number)
        analytics.refresh(world.settings, now=now)
    copy = analytics.analytics_path(world.settings.warehouse_path)
    with duckdb.connect(str(world.settings.warehouse_path)) as warehouse:
        event_id, day = warehouse.execute("""
            select event_id, (event_time at time zone 'UTC')::date from resolved_events
            order by event_time limit 1""").fetchone()
        warehouse.execute("update resolved_events set klaviyo_native = not klaviyo_native where event_id = ?",
                          [event_id])
    found = stale(world.settings)
    assert found.digests_whole and day in found.days
    analytics.refresh(world.settings, now=now + timedelta(hours=1))
    with duckdb.connect(str(world.settings.warehouse_path), read_only=True) as warehouse:
        assert copy_tables(world.settings)["match_rates"] == warehouse.execute("select * from match_rates").fetchall()
        assert analytics.stale_days(warehouse, copy) == set()

    with duckdb.connect(str(world.settings.warehouse_path)) as warehouse:
        warehouse.execute("delete from klaviyo_skipped "
                          "where event_id = (select min(event_id) from klaviyo_skipped)")
    assert stale(world.settings).digests_whole
    analytics.refresh(world.settings, now=now + timedelta(hours=2))
    with duckdb.connect(str(world.settings.warehouse_path), read_only=True) as warehouse:
        funnel = warehouse.execute("select * from delivery_funnel").fetchall()
    assert copy_tables(world.settings)["delivery_funnel"] == funnel


def test_the_views_are_recreated_only_when_this_release_would_create_them_otherwise(settings):
    def comment(connection) -> str:
        return connection.execute("select comment from duckdb_views() where view_name = 'daily_lift'").fetchone()[0]

    with settings.warehouse().connect() as warehouse:
        analytics.ensure_views(warehouse)
        described = comment(warehouse)
        warehouse.execute("comment on view daily_lift is 'set by hand'")
        analytics.ensure_views(warehouse)  # the same release and schema: left as they are
        assert comment(warehouse) == "set by hand"
        warehouse.execute("update pipeline_state set fingerprint = 'an older release' where stage = 'analytics_views'")
        analytics.ensure_views(warehouse)
        assert comment(warehouse) == described
        warehouse.execute("drop view match_rates")
        analytics.ensure_views(warehouse)
        assert warehouse.execute("select count(*) from match_rates").fetchone() == (0,)


def test_a_slice_copies_only_the_fields_of_a_struct_the_views_read():
    with duckdb.connect() as connection:
        from upstack_pipeline.warehouse import new_schema_ddl

        connection.execute(new_schema_ddl())
        columns = analytics._read_columns(connection)["raw_events"]
    assert 'struct_pack("order_id" := "custom_data"."order_id", "value" := "custom_data"."value", ' \
           '"currency" := "custom_data"."currency") as "custom_data"' in columns
    assert "items" not in columns


@pytest.mark.slow
def test_rows_per_session_that_match_no_copy_are_computed_again_whole(world, tmp_path):
    """The rows per session live beside the copy, each naming the sources of the copy they were summed into:
    removed, damaged, or of another copy (an earlier sync's, put back), they are computed again whole, and the copy
    still equals one computed from nothing."""
    rows = analytics.session_rows_path(world.settings.warehouse_path)
    for number in range(2):
        analytics.refresh(world.settings, now=world.arrive(number))
    shutil.copyfile(rows, tmp_path / "earlier.duckdb")

    def damage(how: str) -> None:
        if how == "removed":
            rows.unlink()
        elif how == "not DuckDB's":
            rows.write_bytes(b"not a DuckDB file")
        elif how == "corrupted":  # DuckDB's header intact, its first block's bytes not
            with rows.open("r+b") as file:
                file.seek(8192 + 100)
                file.write(b"\xff" * 64)
        else:
            shutil.copyfile(tmp_path / "earlier.duckdb", rows)

    for number, how in zip(range(2, 6), ("removed", "not DuckDB's", "corrupted", "earlier")):
        now = world.arrive(number)
        assert stale(world.settings).days is not None  # the copy alone would be updated by session
        damage(how)
        analytics.refresh(world.settings, now=now)
        updated = copy_tables(world.settings)
        analytics.analytics_path(world.settings.warehouse_path).unlink()
        rows.unlink()
        analytics.refresh(world.settings, now=now)
        assert updated == copy_tables(world.settings), how


@pytest.mark.slow
def test_rows_per_session_held_open_by_another_process_stop_the_sync_with_what_to_do(world):
    """The rows file is the pipeline's own: a process holding it open (a notebook, by mistake) gets no rows removed
    from under it; the sync stops and says to close it."""
    analytics.refresh(world.settings, now=world.arrive(0))
    rows = analytics.session_rows_path(world.settings.warehouse_path)
    now = world.arrive(1)
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; held = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(60)", str(rows)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(RuntimeError, match="open in another process.*close it there and run again"):
            analytics.refresh(world.settings, now=now)
        assert rows.is_file()
    finally:
        holder.kill()
        holder.wait()
    analytics.refresh(world.settings, now=now)
    updated = copy_tables(world.settings)
    analytics.analytics_path(world.settings.warehouse_path).unlink()
    analytics.refresh(world.settings, now=now)
    assert updated == copy_tables(world.settings)
