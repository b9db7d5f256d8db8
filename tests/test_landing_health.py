"""The landing checks judge what the run ingested, against the whole table, without reading every event_id of
history on every hourly run (issue 14)."""

from __future__ import annotations

from datetime import timedelta

import duckdb

from conftest import NOW, make_event, write_events
from upstack_pipeline.events import ingest_events
from upstack_pipeline.ingestion import landing_health
from upstack_pipeline.warehouse import event_id_hashes_cover


def test_a_run_that_repeats_a_kept_event_id_is_caught_by_that_run(settings):
    write_events(settings.events_dir / "a.ndjson", [make_event("e1"), make_event("e2")])
    ingest_events(settings, now=NOW)
    assert landing_health(settings.warehouse(), now=NOW).repeated_event_ids == 0

    later = NOW + timedelta(hours=1)
    write_events(settings.events_dir / "b.ndjson", [make_event("e3")])
    ingest_events(settings, now=later)
    # A broken ledger (simulated: the row written again) makes a repeat in this run.
    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute("insert into raw_events select * replace (? as ingested_at) from raw_events "
                           "where event_id = 'e1'", [later])
    assert landing_health(settings.warehouse(), now=later).repeated_event_ids == 1
    # Runs that did not write it are not blamed for it.
    assert landing_health(settings.warehouse(), now=NOW).repeated_event_ids == 0



def test_a_repeat_written_with_its_hash_is_caught_through_the_hashes(settings):
    """A broken ledger reading a file again writes its rows as a new load, with their hashes, as ingestion does: the
    check reads the loads those hashes name (the repeat's and the kept row's), not every event id of the history."""
    write_events(settings.events_dir / "a.ndjson", [make_event("e1"), make_event("e2")])
    ingest_events(settings, now=NOW)
    later = NOW + timedelta(hours=1)
    with settings.warehouse().connect() as connection:
        connection.execute("insert into raw_events select * replace (? as ingested_at, 7 as load_id) from raw_events "
                           "where event_id = 'e1'", [later])
        connection.execute("insert into raw_event_id_hashes values (event_id_hash('e1'), 7)")
        assert event_id_hashes_cover(connection)

    assert landing_health(settings.warehouse(), now=later).repeated_event_ids == 1
    assert landing_health(settings.warehouse(), now=NOW).repeated_event_ids == 0