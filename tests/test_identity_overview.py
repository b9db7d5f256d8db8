"""The identity overview's counts of resolved_events and its browsers with the most emails are kept between runs
and brought up to date by each run from the rows it wrote and replaced, instead of counted again over the history
(issue 14, item 2: overview numbers maintained per run instead of recounted). After every day of a simulated store,
and after a run that quarantines an email two browsers showed, they are what counting the whole history gives.
Real simulated days, a real DuckDB warehouse, no mocks."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import duckdb
import pytest

from conftest import make_event, query, simulated_store, write_events
from test_incremental import plain
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import COUNTS_STAGE, STAGE, overview, resolve_identities

END = datetime(2026, 11, 20, tzinfo=timezone.utc)
PLACEHOLDER = "everyone@gmail.com"  # typed on more browsers than one person uses: quarantined on the last day


def kept(settings) -> dict | None:
    rows = query(settings, "select overview from pipeline_state where stage = ?", [COUNTS_STAGE])
    return json.loads(rows[0][0]) if rows and rows[0][0] is not None else None


def counted_whole(settings, tmp_path, limit: int):
    """The overview of a copy of the warehouse that keeps nothing between runs: counted over the whole history."""
    whole = replace(settings, warehouse_path=tmp_path / "whole.duckdb")
    shutil.copyfile(settings.warehouse_path, whole.warehouse_path)
    with duckdb.connect(str(whole.warehouse_path)) as connection:
        connection.execute("delete from pipeline_state where stage = ?", [COUNTS_STAGE])
        connection.execute("update pipeline_state set overview = null where stage = ?", [STAGE])
    return overview(whole, limit=limit)


def typed(event_id: str, when: datetime, cookie: str, email: str) -> dict:
    return make_event(event_id, event_name="ViewContent", event_time=when.isoformat(), anonymous_id=cookie,
                      session_id=f"session-{event_id}", event_source_url="https://acme.myshopify.com/products/mug",
                      user_data={"email": email, "klaviyo_identified": False},
                      custom_data={"items": [{"id": "p1", "name": "Mug", "price": 9.0}]})


@pytest.mark.slow  # a simulated world, synced run after run
def test_the_kept_counts_are_what_counting_the_whole_history_gives_after_every_run(settings, tmp_path):
    world, days = simulated_store(settings, tmp_path, visitors=200, days=6, seed=11, end=END)
    limit = 50  # every shared browser of this world, so that one leaving the list is seen
    carried = 0
    for number, day in enumerate(days):
        start = datetime.fromisoformat(day.name[3:]).replace(tzinfo=timezone.utc)
        shutil.copytree(day, world.landing_dir / "events" / day.name)
        if number == 0:
            # A browser on which two emails were typed, one of them the placeholder: shared, until the last day.
            write_events(world.landing_dir / "events" / day.name / "hour=23" / "two.ndjson", [
                typed("two-own", start + timedelta(hours=23), "two-emails", "own.address@gmail.com"),
                typed("two-placeholder", start + timedelta(hours=23, minutes=5), "two-emails", PLACEHOLDER)])
        if day == days[-1]:
            write_events(world.landing_dir / "events" / day.name / "hour=23" / "many.ndjson", [
                typed(f"many-{browser}", start + timedelta(hours=23, minutes=browser), f"browser-{browser}",
                      PLACEHOLDER) for browser in range(4)])
        now = start + timedelta(days=1, hours=6)
        ingest_events(world, now=now)
        resolve_identities(world, now=now)

        whole = counted_whole(world, tmp_path, limit)
        counts = kept(world)
        if number > 0:
            # The run brought the counts the last overview kept up to date; they are the whole history's.
            assert counts is not None and counts["commerce_events"] == whole.commerce_events
            assert (counts["resolved_events"], counts["by_match_method"], counts["unresolved_by_reason"]) == (
                whole.resolved_events, whole.by_match_method, whole.unresolved_by_reason)
            if day == days[-1]:
                # A quarantine can take an email from any browser: the list is left to the overview to count.
                assert counts["largest_shared_browsers"] is None
            else:
                assert [tuple(row) for row in counts["largest_shared_browsers"]["rows"]] == (
                    whole.largest_shared_browsers.rows())
                carried += 1
        assert plain(overview(world, limit=limit)) == plain(whole)
        assert plain(overview(world, limit=3)) == plain(counted_whole(world, tmp_path, 3))
        shared = dict(whole.largest_shared_browsers.rows())
        assert ("two-emails" in shared) == (day != days[-1]), day

    assert carried == len(days) - 2
    assert query(world, "select count(*) from identity_rejected_values where value = ?", [PLACEHOLDER]) == [(1,)]
    assert len(shared) >= 1  # the world's other shared browsers stay

    # A run of another release in between, which keeps no counts: its marks on identity's row, and an answer it
    # changed without adding a row. The counts kept are not trusted, then dropped by the next run.
    with duckdb.connect(str(world.warehouse_path)) as connection:
        connection.execute("update pipeline_state set fingerprint = 'another release', overview = null "
                           "where stage = ?", [STAGE])
        connection.execute("update resolved_events set match_method = null, unresolved_reason = 'no_evidence' "
                           "where event_id = (select min(event_id) from resolved_events "
                           "where match_method is not null)")
    assert plain(overview(world, limit=limit)) == plain(counted_whole(world, tmp_path, limit))
    resolve_identities(world, now=now + timedelta(hours=1))
    assert kept(world) is None
    assert plain(overview(world, limit=limit)) == plain(counted_whole(world, tmp_path, limit))
