"""The mapping looks only at what identity (re)resolved since its last run and at what it held back (issue 14), and
decides exactly what looking at every event decides. Real landing files, a real DuckDB warehouse, no mocks."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import duckdb
import pytest

from conftest import query
from upstack_pipeline.customers import ingest_customers
from upstack_pipeline.events import ingest_events
from upstack_pipeline.identity import resolve_identities
from upstack_pipeline.klaviyo.mapping import STAGE, map_events, overview

# Every column but those that say when.
OUTBOX = ("select unique_id, event_id, metric_name, profile_key, profile, event, backfill, status, notes "
          "from klaviyo_outbox")
SKIPPED = "select event_id, event_name, reason, detail from klaviyo_skipped"


def decisions(settings) -> tuple[list, list]:
    return sorted(map(repr, query(settings, OUTBOX))), sorted(map(repr, query(settings, SKIPPED)))


@pytest.mark.slow  # a simulated world, synced run after run
def test_each_hourly_run_decides_what_looking_at_every_event_decides(settings, tmp_path):
    """Eight simulated days arriving one at a time, each synced ten minutes after its midnight (sessions of the
    late evening still active, held back to the next run), with deliveries settling and a skip record deleted by
    hand in between: from the same warehouse, the run that looks at what is new and one that looks at every event
    leave the same outbox and skipped events, and the same overview."""
    from upstack_pipeline.sandbox.simulate import simulate

    end = datetime(2026, 11, 28, tzinfo=timezone.utc)
    simulate(tmp_path / "sim", visitors=300, days=8, seed=11, end=end)
    landing = tmp_path / "arriving"
    shutil.copytree(tmp_path / "sim" / "customers", landing / "customers")
    world = replace(settings, landing_dir=landing)
    whole = replace(world, warehouse_path=tmp_path / "whole.duckdb")
    ingest_customers(world, now=end)
    held_back = []
    for number, day in enumerate(sorted((tmp_path / "sim" / "events").glob("dt=*"))):
        now = datetime.fromisoformat(day.name[3:]).replace(tzinfo=timezone.utc) + timedelta(days=1, minutes=10)
        shutil.copytree(day, landing / "events" / day.name)
        ingest_events(world, now=now)
        resolve_identities(world, now=now)
        with duckdb.connect(str(world.warehouse_path)) as warehouse:
            if number == 3:  # a skip record deleted by hand: its event is undecided again
                warehouse.execute("delete from klaviyo_skipped where event_id = (select min(event_id) from "
                                  "klaviyo_skipped)")
        shutil.copyfile(world.warehouse_path, whole.warehouse_path)
        with duckdb.connect(str(whole.warehouse_path)) as warehouse:  # no record of a last run: every event
            warehouse.execute("delete from pipeline_state where stage = ?", [STAGE])

        incremental, full = map_events(world, now=now), map_events(whole, now=now)

        assert decisions(world) == decisions(whole), f"after {day.name}"
        assert (incremental.outbox_rows, incremental.skipped) == (full.outbox_rows, full.skipped)
        # Only the first run, and the one after a decision went missing, looked at every event.
        assert incremental.every_event == (number in (0, 3)) and full.every_event
        assert overview(world, now=now) == overview(whole, now=now)
        state = overview(world, now=now)
        assert state.undecided_idle_events == 0
        held_back.append(state.held_back)
        with duckdb.connect(str(world.warehouse_path)) as warehouse:  # what delivery settles, in place
            warehouse.execute("update klaviyo_outbox set status = 'delivered', delivered_at = ? "
                              "where status = 'pending' and hash(unique_id) % 3 = 0", [now])
    assert sum(held_back) > 0  # some sessions were still active at a sync, and waited for the next
    assert query(world, "select count(*) from commerce_metrics") == [(4,)]


def test_a_run_with_nothing_new_looks_at_the_held_back_events_only(settings, tmp_path):
    """Nothing new since the last run: the mapping reads no resolution it already decided on."""
    from upstack_pipeline.sandbox.simulate import simulate

    end = datetime(2026, 11, 28, tzinfo=timezone.utc)
    simulate(tmp_path / "sim", visitors=200, days=3, seed=5, end=end)
    world = replace(settings, landing_dir=tmp_path / "sim")
    now = end + timedelta(minutes=10)
    ingest_customers(world, now=now)
    ingest_events(world, now=now)
    resolve_identities(world, now=now - timedelta(minutes=1))  # identity runs just before the mapping
    first = map_events(world, now=now)
    assert first.events_decided > 0 and first.every_event

    later = now + timedelta(hours=1)  # every session idle now: the held-back events are decided, nothing else
    waiting = overview(world, now=now).held_back
    again = map_events(world, now=later)
    assert waiting > 0 and again.events_decided == waiting and not again.every_event
    last = map_events(world, now=later + timedelta(hours=1))
    assert (last.events_decided, last.every_event) == (0, False)
    assert overview(world, now=later) == overview(world, now=later + timedelta(hours=1))
    assert overview(world, now=later).undecided_idle_events == 0
